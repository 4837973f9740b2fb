//! The one place a C compile's cache key is built: the digest of its REAPI
//! Action. What goes in, numbered (bump [`CC_KEY_VERSION`] when this list or
//! an item's encoding changes):
//!
//! 1. [`CC_KEY_VERSION`], as the Action's salt.
//! 2. The compiler's files (`toolchain.rs`): driver, cc1/cc1plus, as, their
//!    shared libraries, by path in the input root and digest.
//! 3. The arguments, every path mapped into the input root (`roots.rs`,
//!    [`Roots::for_cc`](crate::roots::Roots::for_cc)) and made relative to
//!    the mapped working directory; `-ffile-prefix-map`s that say what the
//!    roots say are left out (the launcher's remap does the same).
//! 4. The working directory, mapped.
//! 5. `SOURCE_DATE_EPOCH` (`__DATE__`, `__TIME__`) when set, and a fixed `PATH`.
//! 6. The source and every header it includes (the pre-pass listing,
//!    `deps.rs`), system headers too, by mapped path and digest; and the
//!    `-I` directories, which must exist for `#include "../x.h"` through them.
//! 7. The object, mapped.
//! 8. The platform: OS and ISA.
//!
//! Left out: absolute local paths (mapped), the `.d` file (written here from
//! the listing), every variable the compiler does not read. Variables that
//! change what it reads (`CPATH`...) keep the compile local instead.

use std::path::PathBuf;

use remote_apis::merkle::{TreeBuilder, encode};
use remote_apis::reapi::{Action, Command, command::EnvironmentVariable};
use remote_apis::{Digest, DigestFunction};

use crate::key::{ACTION_PATH, BuiltAction};

/// Bumped when the key's inputs, or their encoding, change.
pub const CC_KEY_VERSION: &str = "distbuild-cc-key/1";

/// Starts the compiler in the worker's input root: the toolchain's shared
/// libraries on the loader's path, the mapped working directory, the input
/// root as the sysroot (system headers are under `sys/`), and the exec root
/// remapped out of debug info and `__FILE__`.
pub const CC_LAUNCHER: &str = r#"r=$(pwd); export LD_LIBRARY_PATH="$r/cc-lib"; cd "$1" || exit 1; shift; exec "$r/$0" "$@" "--sysroot=$r/sys" "-ffile-prefix-map=$r/=""#;

/// Everything that goes into the key (see the module comment).
pub struct CcKeyInputs<'a> {
    /// 2. The driver's path in the input root.
    pub driver: &'a str,
    /// 3. Mapped arguments.
    pub args: &'a [String],
    /// 4. Mapped working directory.
    pub cwd: &'a str,
    /// 5. Variables.
    pub env: &'a [(String, String)],
    /// 2 and 6. (path in the input root, digest, executable, local path).
    pub files: &'a [(String, Digest, bool, PathBuf)],
    /// 6. Directories that must exist.
    pub dirs: &'a [String],
    /// 7. The object.
    pub output: &'a str,
}

pub fn build(function: DigestFunction, k: &CcKeyInputs) -> Result<BuiltAction, String> {
    let mut tree = TreeBuilder::new(function);
    tree.add_directory(k.cwd).map_err(|e| e.0)?;
    for d in k.dirs {
        tree.add_directory(d).map_err(|e| e.0)?;
    }
    let mut files: Vec<&(String, Digest, bool, PathBuf)> = k.files.iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);
    for (path, digest, executable, local) in files {
        tree.add_file(path, *digest, *executable, local.clone()).map_err(|e| e.0)?;
    }
    let input_root = tree.build();

    let mut arguments = vec!["/bin/sh".to_string(), "-c".to_string(), CC_LAUNCHER.to_string()];
    arguments.push(k.driver.to_string());
    arguments.push(k.cwd.to_string());
    arguments.extend(k.args.iter().cloned());
    let mut env: Vec<EnvironmentVariable> =
        k.env.iter().map(|(n, v)| EnvironmentVariable { name: n.clone(), value: v.clone() }).collect();
    env.push(EnvironmentVariable { name: "PATH".into(), value: ACTION_PATH.into() });
    env.sort_by(|a, b| a.name.cmp(&b.name));
    env.dedup_by(|a, b| a.name == b.name);
    let platform = crate::key::platform(false);
    #[allow(deprecated)]
    let command = Command {
        arguments,
        environment_variables: env,
        output_paths: vec![k.output.to_string()],
        platform: Some(platform.clone()),
        ..Default::default()
    };
    let (command_digest, _) = encode(function, &command);
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(input_root.root_digest.to_proto()),
        salt: CC_KEY_VERSION.as_bytes().to_vec(),
        platform: Some(platform),
        ..Default::default()
    };
    let (action_digest, _) = encode(function, &action);
    Ok(BuiltAction { action, action_digest, command, command_digest, input_root })
}
