//! Everything checked before an action is queued: the Action, Command and
//! input tree exist (all missing blobs reported at once, in the form that
//! makes clients upload and retry), every path is relative and stays inside
//! the input root, and the timeout is within the server's limit.

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;
use remote_apis::reapi::{Action, Command, Directory};
use remote_apis::{Digest, merkle};

use super::platform::Platform;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::worker::DirectoryCache;

/// Timeout rules from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub default: Duration,
    pub max: Duration,
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
/// are still checked for presence every time.
pub async fn check(
    cas: &Store,
    dirs: &DirectoryCache,
    action_digest: Digest,
    action: Action,
    timeouts: Timeouts,
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
    check_command(&command)?;
    check_tree(cas, dirs, root_digest).await?;
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
    let platform = match action.platform.as_ref() {
        Some(p) if !p.properties.is_empty() => Platform::from_proto(Some(p)),
        _ => Platform::from_proto(command.platform.as_ref()),
    };
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

/// Arguments, working directory, outputs and environment. (The 2.0 output
/// fields are deprecated, and still served: Bazel 4 uses them.)
#[allow(deprecated)]
pub fn check_command(command: &Command) -> Result<()> {
    if command.arguments.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::bad_field("command.arguments", "is empty: there is no program to run"));
    }
    merkle::path_components(&command.working_directory)
        .map_err(|e| Error::bad_field("command.working_directory", e.0))?;
    let outputs = [
        ("command.output_paths", &command.output_paths),
        ("command.output_files", &command.output_files),
        ("command.output_directories", &command.output_directories),
    ];
    for (field, paths) in outputs {
        for p in paths {
            merkle::path_components(p).map_err(|e| Error::bad_field(field, e.0))?;
            if p.is_empty() && field == "command.output_files" {
                return Err(Error::bad_field(field, "an output file cannot be the working directory"));
            }
        }
    }
    for v in &command.environment_variables {
        if v.name.is_empty() || v.name.contains('=') || v.name.contains('\0') || v.value.contains('\0') {
            return Err(Error::bad_field(
                "command.environment_variables",
                format!("{:?} is not a valid variable name", v.name),
            ));
        }
    }
    Ok(())
}

/// Walks the input tree: every directory and file must be present, names and
/// symlink targets valid. All missing blobs are reported together.
async fn check_tree(cas: &Store, dirs: &DirectoryCache, root: Digest) -> Result<()> {
    let function = root.function;
    let mut seen = HashSet::from([root]);
    let mut level = vec![(root, 0usize)];
    // Files, and the directories taken from the cache: all must be present.
    let mut files = HashSet::new();
    let mut missing = Vec::new();
    while !level.is_empty() {
        let mut next = Vec::new();
        for (digest, depth) in level {
            let dir = match dirs.get(&digest) {
                // Known by content; its presence is checked with the files.
                Some(d) => {
                    files.insert(digest);
                    d
                }
                None => match read_message::<Directory>(cas, &digest, "input directory").await {
                    Ok(d) => {
                        let d = std::sync::Arc::new(d);
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
            crate::worker::check_directory(&dir, depth).map_err(|e| e.context(format!("input directory {digest}")))?;
            for f in &dir.files {
                files.insert(Digest::from_field(function, f.digest.as_ref(), "file digest")?);
            }
            for d in &dir.directories {
                let d = Digest::from_field(function, d.digest.as_ref(), "directory digest")?;
                if seen.insert(d) {
                    next.push((d, depth + 1));
                }
            }
        }
        level = next;
    }
    let files: Vec<Digest> = files.into_iter().collect();
    missing.extend(cas.find_missing(&files).await?);
    if missing.is_empty() { Ok(()) } else { Err(Error::missing_blobs(missing, "input root")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::reapi::command::EnvironmentVariable;

    #[test]
    #[allow(deprecated)]
    fn commands() {
        let ok = Command { arguments: vec!["true".into()], ..Default::default() };
        check_command(&ok).unwrap();
        let cases: Vec<(Command, &str)> = vec![
            (Command::default(), "command.arguments"),
            (Command { working_directory: "../x".into(), ..ok.clone() }, "command.working_directory"),
            (Command { working_directory: "/abs".into(), ..ok.clone() }, "command.working_directory"),
            (Command { output_paths: vec!["a/../../b".into()], ..ok.clone() }, "command.output_paths"),
            (Command { output_files: vec!["/etc/passwd".into()], ..ok.clone() }, "command.output_files"),
            (Command { output_directories: vec!["..".into()], ..ok.clone() }, "command.output_directories"),
            (
                Command {
                    environment_variables: vec![EnvironmentVariable { name: "A=B".into(), value: String::new() }],
                    ..ok.clone()
                },
                "command.environment_variables",
            ),
        ];
        for (command, field) in cases {
            let err = check_command(&command).unwrap_err();
            assert_eq!(err.code, tonic::Code::InvalidArgument);
            assert_eq!(err.bad_field.as_ref().map(|(f, _)| f.as_str()), Some(field), "{command:?}");
        }
    }
}
