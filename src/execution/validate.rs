//! Everything checked before an action is queued: the Action, Command and
//! input tree exist (all missing blobs reported at once, in the form that
//! makes clients upload and retry), every path follows the spec's rules and
//! stays inside the input root, the input tree (counted expanded) is within
//! the tree limits, and the timeout is within the server's limit.

use remote_apis::quote;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use remote_apis::reapi::{Action, Command, Directory};
use remote_apis::{Digest, merkle};

use super::platform::Platform;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::worker::{DirectoryCache, TreeLimits};

/// Rules from the configuration: timeouts, and the limits on input trees.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub default: Duration,
    pub max: Duration,
    pub tree: TreeLimits,
}

/// An action ready to queue.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub action: Action,
    pub command: Command,
    pub platform: Platform,
    pub timeout: Duration,
}

/// Reads the Action (FAILED_PRECONDITION + MISSING when it is absent).
pub async fn read_action(cas: &Store, action_digest: &Digest) -> Result<Action> {
    read_message::<Action>(cas, action_digest, "action").await
}

/// Checks the rest of an action read by [`read_action`].
/// `dirs` remembers decoded Directory messages across calls (they are
/// content-addressed, so a cached one is always right); the blobs they name
/// are still checked for presence every time. `defaults` are the instance's
/// platform properties (`[instances] platform`), added where the action's
/// platform lacks the name.
pub async fn check(
    cas: &Store,
    dirs: &DirectoryCache,
    action_digest: Digest,
    mut action: Action,
    timeouts: Timeouts,
    defaults: &[(String, String)],
) -> Result<Checked> {
    let function = action_digest.function;
    let command_digest = Digest::from_field(function, action.command_digest.as_ref(), "action.command_digest")
        .map_err(|e| Error::bad_field("action.command_digest", e.0))?;
    let root_digest = Digest::from_field(function, action.input_root_digest.as_ref(), "action.input_root_digest")
        .map_err(|e| Error::bad_field("action.input_root_digest", e.0))?;
    let missing = cas.find_missing(&[command_digest, root_digest]).await?;
    if !missing.is_empty() {
        // The tree below a missing root is unknown; report what is known.
        return Err(Error::missing_blobs(missing, "action inputs"));
    }
    let command = read_message::<Command>(cas, &command_digest, "command").await?;
    check_command(&command, &timeouts.tree)?;
    check_tree(cas, dirs, root_digest, &timeouts.tree).await?;
    let timeout = match action.timeout.as_ref() {
        None => timeouts.default,
        Some(t) if t.seconds < 0 || t.nanos < 0 => return Err(Error::bad_field("action.timeout", "is negative")),
        Some(t) if t.seconds == 0 && t.nanos == 0 => timeouts.default,
        Some(t) => {
            let asked = Duration::new(t.seconds as u64, t.nanos as u32);
            if asked > timeouts.max {
                return Err(Error::bad_field(
                    "action.timeout",
                    format!(
                        "{} is above this server's maximum of {}",
                        humantime::format_duration(asked),
                        humantime::format_duration(timeouts.max)
                    ),
                ));
            }
            asked
        }
    };
    // Older clients put the platform in the Command.
    #[allow(deprecated)]
    let mut platform = match action.platform.as_ref() {
        Some(p) if !p.properties.is_empty() => Platform::from_proto(Some(p)),
        _ => Platform::from_proto(command.platform.as_ref()),
    };
    if let Some(merged) = platform.with_defaults(defaults) {
        // The worker reads the Action's platform (else the Command's): the
        // queued copy carries the merged one. The action digest, and so the
        // cache key, stays the client's.
        action.platform = Some(merged.to_proto());
        platform = merged;
    }
    // Sandbox settings (`network`, `memory_limit`, `process_limit`,
    // `output_*_limit`) that no worker could read are refused here, before
    // the action waits in a queue, with the same message a worker gives.
    crate::worker::runner::Settings::from_platform(platform.pairs())
        .map_err(|e| Error::bad_field("action.platform", e))?;
    let unlimited = crate::worker::OutputLimits { max_bytes: u64::MAX, max_files: u64::MAX };
    unlimited.for_action(&platform)?;
    Ok(Checked { action, command, platform, timeout })
}

async fn read_message<M: Message + Default>(cas: &Store, digest: &Digest, what: &str) -> Result<M> {
    let data = match cas.get_bytes(digest).await {
        Ok(d) => d,
        Err(e) if e.code == tonic::Code::NotFound => return Err(Error::missing_blobs(vec![*digest], what)),
        Err(e) => return Err(e),
    };
    M::decode(data.as_ref()).map_err(|e| Error::invalid(format!("{what} {digest} does not decode: {e}")))
}

/// Arguments, working directory, outputs and environment. Output paths are
/// resolved against the working directory (`.` and `..` are legal) and may
/// not leave the input root nor be deeper than the tree limit. (The 2.0
/// output fields are deprecated, and still served: Bazel 4 uses them.)
#[allow(deprecated)]
pub fn check_command(command: &Command, limits: &TreeLimits) -> Result<()> {
    if command.arguments.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::bad_field("command.arguments", "is empty: there is no program to run"));
    }
    let wd = merkle::path_components(&command.working_directory)
        .map_err(|e| Error::bad_field("command.working_directory", e.0))?;
    limits
        .check_depth("the working directory", wd.len())
        .map_err(|e| Error::bad_field("command.working_directory", e.message))?;
    let outputs = [
        ("command.output_paths", &command.output_paths),
        ("command.output_files", &command.output_files),
        ("command.output_directories", &command.output_directories),
    ];
    for (field, paths) in outputs {
        for p in paths {
            let parts =
                merkle::resolve_output_path(&command.working_directory, p).map_err(|e| Error::bad_field(field, e.0))?;
            limits
                .check_depth(&format!("output path {}", quote(p)), parts.len())
                .map_err(|e| Error::bad_field(field, e.message))?;
            // The working directory and its ancestors are directories.
            if field == "command.output_files" && wd.starts_with(&parts) {
                return Err(Error::bad_field(
                    field,
                    format!("{} names the working directory or one above it, not a file", quote(p)),
                ));
            }
        }
    }
    for v in &command.environment_variables {
        if v.name.is_empty() || v.name.contains('=') || v.name.contains('\0') || v.value.contains('\0') {
            return Err(Error::bad_field(
                "command.environment_variables",
                format!("{} is not a valid variable name", quote(&v.name)),
            ));
        }
    }
    Ok(())
}

/// Walks the input tree level by level: every directory and file must be
/// present, names and symlink targets valid, and the tree, counted
/// expanded, within `limits` (a level beyond the depth limit is never read).
/// All missing blobs are reported together.
async fn check_tree(cas: &Store, dirs: &DirectoryCache, root: Digest, limits: &TreeLimits) -> Result<()> {
    let function = root.function;
    let mut fetched: HashMap<Digest, Arc<Directory>> = HashMap::new();
    let mut seen = HashSet::from([root]);
    let mut level = vec![root];
    let mut depth = 0;
    // Files, and the directories taken from the cache: all must be present.
    let mut files = HashSet::new();
    let mut missing = Vec::new();
    while !level.is_empty() {
        limits.check_depth("the input root", depth).map_err(too_big)?;
        let mut next = Vec::new();
        for digest in level {
            let dir = match dirs.get(&digest) {
                // Known by content; its presence is checked with the files.
                Some(d) => {
                    files.insert(digest);
                    d
                }
                None => match read_message::<Directory>(cas, &digest, "input directory").await {
                    Ok(d) => {
                        let d = Arc::new(d);
                        dirs.put(digest, d.clone());
                        d
                    }
                    Err(e) if !e.missing.is_empty() => {
                        missing.push(digest);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            crate::worker::check_directory(&dir).map_err(|e| e.context(format!("input directory {digest}")))?;
            for f in &dir.files {
                files.insert(Digest::from_field(function, f.digest.as_ref(), "file digest")?);
            }
            for d in &dir.directories {
                let d = Digest::from_field(function, d.digest.as_ref(), "directory digest")?;
                if seen.insert(d) {
                    next.push(d);
                }
            }
            fetched.insert(digest, dir);
        }
        level = next;
        depth += 1;
    }
    if missing.is_empty() {
        limits.check("the input root", &crate::worker::tree_size(root, &fetched)?).map_err(too_big)?;
    }
    let files: Vec<Digest> = files.into_iter().collect();
    missing.extend(cas.find_missing(&files).await?);
    if missing.is_empty() { Ok(()) } else { Err(Error::missing_blobs(missing, "input root")) }
}

/// A tree over the limits is a request this server refuses as given.
fn too_big(e: Error) -> Error {
    Error::bad_field("action.input_root_digest", e.message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::reapi::command::EnvironmentVariable;

    fn limits() -> TreeLimits {
        TreeLimits { max_depth: 8, ..TreeLimits::default() }
    }

    /// The spec on output paths: "The paths are relative to the working
    /// directory of the action execution", "The path MUST NOT include a
    /// trailing slash, nor a leading slash, being a relative path"; the
    /// empty output directory "can be used to capture the entire working
    /// directory tree". So `.` and `..` are legal, and only what leaves the
    /// input root is refused. The working directory is "relative to the
    /// input root" and "must be a directory which exists in the input tree":
    /// no `..` there.
    #[test]
    #[allow(deprecated)]
    fn commands() {
        let ok = Command { arguments: vec!["true".into()], ..Default::default() };
        let bst = Command { working_directory: "buildstream/smoke/hello.bst".into(), ..ok.clone() };
        let accepted: Vec<Command> = vec![
            ok.clone(),
            // BuildStream 2.8: the working directory itself and an install
            // directory three levels up.
            Command { output_paths: vec![".".into(), "../../../buildstream-install".into()], ..bst.clone() },
            Command { output_directories: vec!["".into(), "..".into()], ..bst.clone() },
            Command { output_files: vec!["../x".into(), "./y".into()], ..bst.clone() },
            Command { output_paths: vec!["a/b/../c".into()], ..ok.clone() },
            Command { output_paths: vec!["a/b/c/d/e/f/g/h".into()], ..ok.clone() },
        ];
        for command in accepted {
            check_command(&command, &limits()).unwrap_or_else(|e| panic!("{command:?}: {e}"));
        }
        let refused: Vec<(Command, &str)> = vec![
            (Command::default(), "command.arguments"),
            (Command { working_directory: "../x".into(), ..ok.clone() }, "command.working_directory"),
            (Command { working_directory: "/abs".into(), ..ok.clone() }, "command.working_directory"),
            (Command { working_directory: "a/./b".into(), ..ok.clone() }, "command.working_directory"),
            (Command { output_paths: vec!["a/../../b".into()], ..ok.clone() }, "command.output_paths"),
            (Command { output_paths: vec!["../../../../x".into()], ..bst.clone() }, "command.output_paths"),
            (Command { output_paths: vec!["a/".into()], ..ok.clone() }, "command.output_paths"),
            (Command { output_paths: vec!["a//b".into()], ..ok.clone() }, "command.output_paths"),
            (Command { output_paths: vec!["a/b/c/d/e/f/g/h/i".into()], ..ok.clone() }, "command.output_paths"),
            (Command { output_files: vec!["/etc/passwd".into()], ..ok.clone() }, "command.output_files"),
            (Command { output_files: vec![".".into()], ..bst.clone() }, "command.output_files"),
            (Command { output_files: vec!["../..".into()], ..bst.clone() }, "command.output_files"),
            (Command { output_files: vec!["".into()], ..ok.clone() }, "command.output_files"),
            (Command { output_directories: vec!["..".into()], ..ok.clone() }, "command.output_directories"),
            (
                Command {
                    environment_variables: vec![EnvironmentVariable { name: "A=B".into(), value: String::new() }],
                    ..ok.clone()
                },
                "command.environment_variables",
            ),
        ];
        for (command, field) in refused {
            let err = check_command(&command, &limits()).unwrap_err();
            assert_eq!(err.code, tonic::Code::InvalidArgument);
            assert_eq!(err.bad_field.as_ref().map(|(f, _)| f.as_str()), Some(field), "{command:?}");
        }
        let deep = Command { output_paths: vec!["a/b/c/d/e/f/g/h/i".into()], ..ok };
        let err = check_command(&deep, &limits()).unwrap_err();
        assert!(err.message.contains("[execution] max_tree_depth"), "{}", err.message);
    }
}
