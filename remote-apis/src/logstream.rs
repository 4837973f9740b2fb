//! Names of what a running action produces, readable through ByteStream
//! Read while it runs: its stdout and stderr (REAPI LogStream, announced in
//! `ExecuteOperationMetadata.stdout_stream_name` / `stderr_stream_name`),
//! and, as a cargo-distbuild extension, the current content of one of its
//! declared outputs (the rustc wrapper reads the `.rmeta` of a compile that
//! goes on, so cargo's pipelining survives remote execution).
//!
//! ```text
//! stream:          {instance}/logstreams/{id}/stdout
//!                  {instance}/logstreams/{id}/stderr
//! running output:  {instance}/operations/{operation id}/outputs/{path}
//! ```
//!
//! As for blob names, the instance may be empty (no leading slash) or hold
//! slashes, so names are parsed by finding the keyword segment from the
//! left; `logstreams` and `operations` are reserved in instance names. The
//! `{id}` is unguessable (the server uses its task id); `{path}` is exactly
//! one of the Command's `output_paths` (or `output_files`) and may hold
//! slashes.

use crate::digest::ParseError;
use crate::quote;
use crate::resource::{InstanceName, instance_of, instance_prefix};

/// The keyword segment of stream names.
pub const STREAMS: &str = "logstreams";

/// Which of an action's two streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }

    fn parse(s: &str) -> Option<StreamKind> {
        match s {
            "stdout" => Some(StreamKind::Stdout),
            "stderr" => Some(StreamKind::Stderr),
            _ => None,
        }
    }
}

/// A parsed stream name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamName {
    pub instance: InstanceName,
    pub id: String,
    pub kind: StreamKind,
}

/// A parsed running-output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningOutputName {
    pub instance: InstanceName,
    /// The operation's name as Execute returned it (`operations/{id}`).
    pub operation: String,
    pub path: String,
}

/// Either kind of live name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveName {
    Stream(StreamName),
    Output(RunningOutputName),
}

impl LiveName {
    pub fn instance(&self) -> &InstanceName {
        match self {
            LiveName::Stream(s) => &s.instance,
            LiveName::Output(o) => &o.instance,
        }
    }
}

/// The name of stream `kind` of the stream set `id` in `instance`.
pub fn stream_name(instance: &InstanceName, id: &str, kind: StreamKind) -> String {
    format!("{}{STREAMS}/{id}/{}", instance_prefix(instance), kind.as_str())
}

/// The name that reads the current content of `path`, a declared output
/// of the running operation `operation_name` (as Execute returned it:
/// `operations/{id}`; a bare id is taken as well).
pub fn running_output_name(instance: &str, operation_name: &str, path: &str) -> String {
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    let id = operation_name.strip_prefix("operations/").unwrap_or(operation_name);
    format!("{prefix}operations/{id}/outputs/{path}")
}

impl StreamName {
    pub fn to_name(&self) -> String {
        stream_name(&self.instance, &self.id, self.kind)
    }
}

/// Parses a live name: `None` when `name` is neither kind (a blob name,
/// say), an error when it is one of them but malformed.
pub fn parse(name: &str) -> Option<Result<LiveName, ParseError>> {
    let segments: Vec<&str> = name.split('/').collect();
    if let Some(at) = segments.iter().position(|s| *s == STREAMS) {
        return Some(parse_stream(name, &segments, at).map(LiveName::Stream));
    }
    let at = segments.iter().position(|s| *s == "operations")?;
    if segments.get(at + 2) != Some(&"outputs") {
        return None;
    }
    Some(parse_output(name, &segments, at).map(LiveName::Output))
}

fn parse_stream(name: &str, segments: &[&str], at: usize) -> Result<StreamName, ParseError> {
    let instance = instance_of(name, &segments[..at])?;
    match &segments[at + 1..] {
        [id, kind] if !id.is_empty() => match StreamKind::parse(kind) {
            Some(kind) => Ok(StreamName { instance, id: id.to_string(), kind }),
            None => Err(ParseError::new(format!("stream name {} does not end in stdout or stderr", quote(name)))),
        },
        _ => Err(ParseError::new(format!(
            "stream name {} is not {{instance}}/{STREAMS}/{{id}}/stdout or stderr",
            quote(name)
        ))),
    }
}

fn parse_output(name: &str, segments: &[&str], at: usize) -> Result<RunningOutputName, ParseError> {
    let instance = instance_of(name, &segments[..at])?;
    let id = segments[at + 1];
    let path = segments[at + 3..].join("/");
    if id.is_empty() || path.is_empty() {
        return Err(ParseError::new(format!(
            "running-output name {} is not {{instance}}/operations/{{id}}/outputs/{{path}}",
            quote(name)
        )));
    }
    Ok(RunningOutputName { instance, operation: format!("operations/{id}"), path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(s: &str) -> InstanceName {
        InstanceName::new(s).unwrap()
    }

    #[test]
    fn stream_names_round_trip() {
        for instance in ["", "main", "projects/p/instances/i"] {
            for kind in [StreamKind::Stdout, StreamKind::Stderr] {
                let name = stream_name(&inst(instance), "abc123", kind);
                let parsed = StreamName { instance: inst(instance), id: "abc123".into(), kind };
                assert_eq!(parse(&name).unwrap().unwrap(), LiveName::Stream(parsed.clone()), "{name}");
                assert_eq!(parsed.to_name(), name);
            }
        }
        assert_eq!(stream_name(&inst(""), "x", StreamKind::Stdout), "logstreams/x/stdout");
        assert_eq!(stream_name(&inst("a/b"), "x", StreamKind::Stderr), "a/b/logstreams/x/stderr");
    }

    #[test]
    fn running_output_names_round_trip() {
        let cases = [
            ("", "operations/u1", "out/lib.rmeta", "operations/u1/outputs/out/lib.rmeta"),
            ("a/b", "operations/u1", "x", "a/b/operations/u1/outputs/x"),
            ("main", "u1", "../up/x", "main/operations/u1/outputs/../up/x"),
        ];
        for (instance, op, path, want) in cases {
            let name = running_output_name(instance, op, path);
            assert_eq!(name, want);
            let parsed = RunningOutputName {
                instance: inst(instance),
                operation: format!("operations/{}", op.trim_start_matches("operations/")),
                path: path.into(),
            };
            assert_eq!(parse(&name).unwrap().unwrap(), LiveName::Output(parsed));
        }
    }

    #[test]
    fn other_names_and_bad_ones() {
        // Not live names at all.
        for name in ["blobs/abc/1", "main/blobs/abc/1", "operations/u1", "main/uploads/u/blobs/abc/1"] {
            assert!(parse(name).is_none(), "{name}");
        }
        // Live names, malformed.
        for name in [
            "logstreams/x",
            "logstreams/x/stdin",
            "logstreams//stdout",
            "logstreams/x/stdout/more",
            "a//b/logstreams/x/stdout",
            "operations/u1/outputs/",
            "operations//outputs/x",
        ] {
            assert!(parse(name).unwrap().is_err(), "{name}");
        }
        assert!(InstanceName::new("a/logstreams").is_err());
    }
}
