//! The one place the cache key is built. The key is the digest of the REAPI
//! Action, so everything that can change rustc's outputs must be in the
//! Action, and nothing else may be.
//!
//! What goes in, numbered (bump [`KEY_VERSION`] when this list or the way an
//! item is encoded changes):
//!
//! 1. [`KEY_VERSION`], as the Action's salt.
//! 2. The toolchain: rustc, its shared libraries and the target's sysroot
//!    libraries, as one Merkle tree under `toolchain/` (its digest names the
//!    exact compiler).
//! 3. The arguments, with every path mapped into the input root and made
//!    relative to the mapped working directory (`roots.rs`).
//! 4. The working directory, mapped.
//! 5. The environment variables the crate reads (`env-dep` lines of its
//!    dep-info) with their values, plus a fixed `PATH` and `RUSTC_BOOTSTRAP`
//!    when set. For registry and git crates (`immutable.rs`): every variable
//!    cargo sets for the package instead.
//! 6. The input files, by mapped path and digest: the sources dep-info lists
//!    (for registry and git crates: every file of the package and its
//!    `OUT_DIR`),
//!    the `--extern` libraries and the libraries they depend on, the files in
//!    `-L native=` directories under a root; and the directories that a
//!    listed path climbs out of with `..` (`#[path = "../x.rs"]` inside an
//!    otherwise unused directory), which must exist for the OS to resolve it.
//! 7. The expected outputs.
//! 8. The platform: OS and ISA of the toolchain's host, and a C linker when
//!    the crate links.
//!
//! Left out on purpose, each for a reason:
//! - absolute local paths (checkout, `CARGO_HOME`, target directory): mapped;
//! - `CARGO_MAKEFLAGS` (the jobserver), registry tokens and every other
//!   variable the crate does not read: they do not change the outputs;
//! - `CARGO_PKG_*` and the like are in only when the crate reads them;
//! - the wrapper's own path and version: the behaviour that matters is in
//!   the command line and item 1.

use remote_apis::merkle::{BuiltTree, TreeBuilder, encode};
use remote_apis::reapi::{Action, Command, Platform, command::EnvironmentVariable, platform::Property};
use remote_apis::{Digest, DigestFunction};

/// Bumped when the key's inputs, or their encoding, change.
pub const KEY_VERSION: &str = "distbuild-rustc-key/2";

/// The fixed `PATH` actions run with: rustc finds `cc` there when it links.
pub const ACTION_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

pub use remote_apis::wrapper_state::LINKER_PROPERTY;

/// The script that starts rustc in the worker's input root: it `cd`s into
/// the mapped working directory, makes the path variables absolute
/// (`OUT_DIR`, and for registry crates `CARGO_MANIFEST_DIR`/`_PATH`: crates
/// `include!(concat!(env!("OUT_DIR"), ...))`), and remaps the exec root out
/// of every embedded path, so outputs do not depend on where they were built.
pub const LAUNCHER: &str = r#"r=$(pwd); for v in OUT_DIR CARGO_MANIFEST_DIR CARGO_MANIFEST_PATH; do eval "x=\${$v-}"; if [ -n "$x" ]; then export "$v=$r/$x"; fi; done; cd "$1" || exit 1; shift; exec "$r/$0" "$@" "--remap-path-prefix=$r/=""#;

/// Everything that goes into the key (see the module comment for the list).
pub struct KeyInputs<'a> {
    /// 2. The toolchain tree's root digest.
    pub toolchain: Digest,
    /// 3. Mapped arguments.
    pub args: &'a [String],
    /// 4. Mapped working directory.
    pub cwd: &'a str,
    /// 5. Variables, sorted by name.
    pub env: &'a [(String, String)],
    /// 6. Input files: (path in the input root, digest, executable, local path).
    pub files: &'a [(String, Digest, bool, std::path::PathBuf)],
    /// 6. Directories that must exist (paths in the input root).
    pub dirs: &'a [String],
    /// 7. Output files, paths in the input root.
    pub outputs: &'a [String],
    /// 8. Whether the compile links.
    pub links: bool,
}

/// The Action, its Command, and the input root to upload.
pub struct BuiltAction {
    pub action: Action,
    pub action_digest: Digest,
    pub command: Command,
    pub command_digest: Digest,
    pub input_root: BuiltTree,
}

pub fn platform(links: bool) -> Platform {
    let isa = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        other => other,
    };
    let mut properties = vec![
        Property { name: "ISA".into(), value: isa.into() },
        Property { name: "OSFamily".into(), value: std::env::consts::OS.into() },
    ];
    if links {
        properties.push(Property { name: LINKER_PROPERTY.0.into(), value: LINKER_PROPERTY.1.into() });
    }
    properties.sort_by(|a, b| a.name.cmp(&b.name));
    Platform { properties }
}

pub fn build(function: DigestFunction, k: &KeyInputs) -> Result<BuiltAction, String> {
    let mut tree = TreeBuilder::new(function);
    tree.add_subtree(crate::roots::TOOLCHAIN, k.toolchain).map_err(|e| e.0)?;
    tree.add_directory(k.cwd).map_err(|e| e.0)?;
    for d in k.dirs {
        tree.add_directory(d).map_err(|e| e.0)?;
    }
    for (path, digest, executable, local) in k.files {
        if path.starts_with(&format!("{}/", crate::roots::TOOLCHAIN)) {
            continue; // inside the toolchain tree already
        }
        tree.add_file(path, *digest, *executable, local.clone()).map_err(|e| e.0)?;
    }
    let input_root = tree.build();

    let mut arguments = vec!["/bin/sh".to_string(), "-c".to_string(), LAUNCHER.to_string()];
    arguments.push(format!("{}/bin/rustc", crate::roots::TOOLCHAIN));
    arguments.push(k.cwd.to_string());
    arguments.extend(k.args.iter().cloned());
    let mut env: Vec<EnvironmentVariable> =
        k.env.iter().map(|(n, v)| EnvironmentVariable { name: n.clone(), value: v.clone() }).collect();
    env.push(EnvironmentVariable { name: "PATH".into(), value: ACTION_PATH.into() });
    env.sort_by(|a, b| a.name.cmp(&b.name));
    env.dedup_by(|a, b| a.name == b.name);
    let mut outputs = k.outputs.to_vec();
    outputs.sort();
    outputs.dedup();
    let platform = platform(k.links);
    // The platform goes in the Action (v2.2) and, for older servers, the Command.
    #[allow(deprecated)]
    let command = Command {
        arguments,
        environment_variables: env,
        output_paths: outputs,
        platform: Some(platform.clone()),
        ..Default::default()
    };
    let (command_digest, _) = encode(function, &command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(input_root.root_digest.to_proto()),
        salt: KEY_VERSION.as_bytes().to_vec(),
        platform: Some(platform),
        ..Default::default()
    };
    let (action_digest, _) = encode(function, &action);
    Ok(BuiltAction { action, action_digest, command, command_digest, input_root })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The inputs of one compile, as a test changes them.
    struct Case {
        args: Vec<String>,
        env: Vec<(String, String)>,
        files: Vec<(String, Digest, bool, PathBuf)>,
        dirs: Vec<String>,
        links: bool,
    }

    type Change = (&'static str, fn(&mut Case));

    fn digest_after(change: fn(&mut Case)) -> Digest {
        let f = DigestFunction::Sha256;
        let mut c = Case {
            args: vec!["--crate-name".to_string(), "x".into(), "src/lib.rs".into()],
            env: vec![("CARGO_PKG_NAME".to_string(), "x".to_string())],
            files: vec![(
                "ws/src/lib.rs".to_string(),
                f.digest_of(b"fn x() {}"),
                false,
                PathBuf::from("/a/src/lib.rs"),
            )],
            dirs: vec![],
            links: false,
        };
        change(&mut c);
        let outputs = vec!["target/debug/deps/libx.rlib".to_string()];
        let k = KeyInputs {
            toolchain: f.digest_of(b"toolchain"),
            args: &c.args,
            cwd: "ws",
            env: &c.env,
            files: &c.files,
            dirs: &c.dirs,
            outputs: &outputs,
            links: c.links,
        };
        build(f, &k).unwrap().action_digest
    }

    /// Every numbered input changes the key; the local path of a file does not.
    #[test]
    fn key_inputs_table() {
        let base = digest_after(|_| {});
        assert_eq!(base, digest_after(|_| {}), "deterministic");
        let same: &[Change] = &[("local path of a file", |c| c.files[0].3 = PathBuf::from("/elsewhere/src/lib.rs"))];
        for (what, change) in same {
            assert_eq!(base, digest_after(*change), "{what} must not change the key");
        }
        let differ: &[Change] = &[
            ("an argument", |c| c.args.push("-O".into())),
            ("argument order", |c| c.args.swap(0, 2)),
            ("a variable's value", |c| c.env[0].1 = "y".into()),
            ("a new variable", |c| c.env.push(("OUT_DIR".into(), "target/o".into()))),
            ("a file's content", |c| c.files[0].1 = DigestFunction::Sha256.digest_of(b"fn y() {}")),
            ("a file's place", |c| c.files[0].0 = "ws/src/main.rs".into()),
            ("a file's exec bit", |c| c.files[0].2 = true),
            ("a directory that must exist", |c| c.dirs.push("ws/src/unused".into())),
            ("linking", |c| c.links = true),
        ];
        for (what, change) in differ {
            assert_ne!(base, digest_after(*change), "{what} must change the key");
        }
    }

    #[test]
    fn the_command_starts_rustc_from_the_toolchain_tree() {
        let f = DigestFunction::Sha256;
        let k = KeyInputs {
            toolchain: f.digest_of(b"t"),
            args: &["a.rs".into()],
            cwd: "ws",
            env: &[],
            files: &[],
            dirs: &[],
            outputs: &["target/b".into(), "target/a".into()],
            links: true,
        };
        let b = build(f, &k).unwrap();
        assert_eq!(&b.command.arguments[3..], &["toolchain/bin/rustc", "ws", "a.rs"]);
        assert_eq!(b.command.output_paths, vec!["target/a", "target/b"]);
        assert!(b.action.platform.unwrap().properties.iter().any(|p| p.name == LINKER_PROPERTY.0));
        let names: Vec<_> = b.input_root.root.directories.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["toolchain", "ws"]);
        assert_eq!(b.action.salt, KEY_VERSION.as_bytes());
    }
}
