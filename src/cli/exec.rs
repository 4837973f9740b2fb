//! Execution commands over REAPI: `run`, `job submit|status|cancel`,
//! `jobs list`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Subcommand;
use prost::Message;
use remote_apis::client::{CasClient, ClientOptions, Transport};
use remote_apis::longrunning::operations_client::OperationsClient;
use remote_apis::longrunning::{
    CancelOperationRequest, GetOperationRequest, ListOperationsRequest, Operation, operation,
};
use remote_apis::merkle::{self, TreeBuilder};
use remote_apis::reapi::command::EnvironmentVariable;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::reapi::execution_stage::Value as Stage;
use remote_apis::reapi::{
    Action, ActionResult, Command, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, Platform, Tree, platform,
};
use remote_apis::{Digest, DigestFunction, InstanceName};

use super::follow::{Follower, Sink};
use super::rpc_error;
use crate::execution::platform::parse_property;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A file or directory to send (relative to here, kept at that path).
    #[arg(long = "input", value_name = "PATH")]
    inputs: Vec<String>,
    /// A file or directory the command produces; downloaded here afterwards.
    #[arg(long = "output", value_name = "PATH")]
    outputs: Vec<String>,
    /// A platform property the worker must offer.
    #[arg(long = "platform", value_name = "KEY=VALUE", value_parser = parse_property)]
    platform: Vec<(String, String)>,
    /// An environment variable of the command. Nothing else is inherited,
    /// except PATH when it is not given.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_property)]
    env: Vec<(String, String)>,
    /// Kill the command after this long (e.g. 30s, 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Run even if the result is cached, and do not cache this run.
    #[arg(long)]
    no_cache: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Execute an Action already in the CAS (digest HASH/SIZE); waits for it
    /// unless --no-wait.
    Submit {
        action: Digest,
        /// Execute even if the ActionCache has a result.
        #[arg(long)]
        skip_cache: bool,
        /// Print the operation name and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show an operation's stage and result.
    Status { operation: String },
    /// Cancel a queued or running operation (its process is killed).
    Cancel { operation: String },
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Operations the server remembers: running and recently finished.
    List {
        #[arg(long, default_value_t = 100)]
        limit: i32,
    },
}

async fn channel(server: &str, options: &ClientOptions) -> anyhow::Result<Transport> {
    remote_apis::client::connect(server, options).await.map_err(|s| rpc_error("connecting", s))
}

fn execution(channel: Transport) -> ExecutionClient<Transport> {
    ExecutionClient::new(channel).max_decoding_message_size(64 << 20)
}

pub async fn run(args: RunArgs, server: &str, options: &ClientOptions, instance: &str) -> anyhow::Result<ExitCode> {
    let instance = InstanceName::new(instance).context("--instance")?;
    let channel = channel(server, options).await?;
    let cas = CasClient::new(channel.clone(), instance.clone());
    let function = DigestFunction::Sha256;

    let inputs = args.inputs.clone();
    let tree = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut builder = TreeBuilder::new(function);
        for input in &inputs {
            let path = input.trim_end_matches('/');
            merkle::path_components(path).map_err(|e| anyhow::anyhow!("--input {input}: {e}"))?;
            merkle::add_local_path(&mut builder, path, Path::new(path)).with_context(|| format!("--input {input}"))?;
        }
        Ok(builder.build())
    })
    .await??;
    for o in &args.outputs {
        merkle::path_components(o).map_err(|e| anyhow::anyhow!("--output {o}: {e}"))?;
    }
    let mut env = args.env.clone();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())));
    }
    env.sort();
    let command = Command {
        arguments: args.command.clone(),
        environment_variables: env.into_iter().map(|(name, value)| EnvironmentVariable { name, value }).collect(),
        output_paths: args.outputs.clone(),
        ..Default::default()
    };
    let (command_digest, command_bytes) = merkle::encode(function, &command);
    let mut properties: Vec<platform::Property> =
        args.platform.iter().map(|(k, v)| platform::Property { name: k.clone(), value: v.clone() }).collect();
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    let action = Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(tree.root_digest.to_proto()),
        timeout: args
            .timeout
            .map(|t| remote_apis::protobuf::Duration { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 }),
        do_not_cache: args.no_cache,
        platform: (!properties.is_empty()).then_some(Platform { properties }),
        ..Default::default()
    };
    let (action_digest, action_bytes) = merkle::encode(function, &action);
    upload(&cas, &tree, vec![(command_digest, command_bytes), (action_digest, action_bytes)]).await?;

    let mut live = [Follower::idle(Sink::Stdout), Follower::idle(Sink::Stderr)];
    let response = execute_live(channel, &instance, action_digest, args.no_cache, &mut live).await?;
    let [live_out, live_err] = live;
    let result = finished_result(&response)?;
    let stdout = read_output(&cas, result.stdout_digest.as_ref(), &result.stdout_raw, function).await?;
    let stderr = read_output(&cas, result.stderr_digest.as_ref(), &result.stderr_raw, function).await?;
    live_out.finish(&stdout).await?;
    live_err.finish(&stderr).await?;
    download_outputs(&cas, &result, function).await?;
    if let Some(status) = response.status.as_ref().filter(|s| s.code != 0) {
        eprintln!("error: {:?}: {}", tonic::Code::from_i32(status.code), status.message);
    }
    // The server's word on a failure (the link to its status page), as
    // Bazel shows it: after the command's own output.
    if result.exit_code != 0 && !response.message.is_empty() {
        eprintln!("{}", response.message);
    }
    Ok(exit_code(result.exit_code))
}

/// The exit status this process reports for the remote command's.
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn upload(cas: &CasClient, tree: &merkle::BuiltTree, mut blobs: Vec<(Digest, Bytes)>) -> anyhow::Result<()> {
    blobs.extend(tree.directories.iter().map(|(d, data, _)| (*d, data.clone())));
    let mut wanted: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    wanted.extend(tree.files.iter().map(|f| f.digest));
    let missing: std::collections::HashSet<Digest> =
        cas.find_missing(&wanted).await.map_err(|s| rpc_error("FindMissingBlobs", s))?.into_iter().collect();
    let blobs: Vec<(Digest, Bytes)> = blobs.into_iter().filter(|(d, _)| missing.contains(d)).collect();
    cas.upload_blobs(blobs).await.map_err(|s| rpc_error("uploading", s))?;
    for f in tree.files.iter().filter(|f| missing.contains(&f.digest)) {
        let file = tokio::fs::File::open(&f.path).await.with_context(|| f.path.display().to_string())?;
        cas.upload_reader(f.digest, file)
            .await
            .map_err(|s| rpc_error(&format!("uploading {}", f.path.display()), s))?;
    }
    Ok(())
}

/// Executes and follows the operation to its end; returns its name and
/// response.
async fn execute(
    channel: Transport,
    instance: &InstanceName,
    action: Digest,
    skip_cache: bool,
    print_name: bool,
) -> anyhow::Result<(String, ExecuteResponse)> {
    let mut stream = start_execute(channel, instance, action, skip_cache).await?;
    let mut printed = false;
    while let Some(op) = stream.message().await.map_err(|s| rpc_error("Execute", s))? {
        if print_name && !printed {
            println!("{}", op.name);
            printed = true;
        }
        if let Some(response) = response_of(&op)? {
            return Ok((op.name, response));
        }
    }
    bail!("the server ended the operation stream before the action finished")
}

/// Executes, printing the command's output live (see [`super::follow`])
/// as soon as the operation announces its streams; returns the response.
async fn execute_live(
    channel: Transport,
    instance: &InstanceName,
    action: Digest,
    skip_cache: bool,
    live: &mut [Follower; 2],
) -> anyhow::Result<ExecuteResponse> {
    let mut stream = start_execute(channel.clone(), instance, action, skip_cache).await?;
    while let Some(op) = stream.message().await.map_err(|s| rpc_error("Execute", s))? {
        if let Some(m) = op.metadata.as_ref().and_then(|m| ExecuteOperationMetadata::decode(m.value.as_slice()).ok()) {
            live[0].start(&channel, &m.stdout_stream_name);
            live[1].start(&channel, &m.stderr_stream_name);
        }
        if let Some(response) = response_of(&op)? {
            return Ok(response);
        }
    }
    bail!("the server ended the operation stream before the action finished")
}

/// Sends an ExecuteRequest; returns the operation stream.
async fn start_execute(
    channel: Transport,
    instance: &InstanceName,
    action: Digest,
    skip_cache: bool,
) -> anyhow::Result<tonic::Streaming<Operation>> {
    let req = ExecuteRequest {
        instance_name: instance.to_string(),
        skip_cache_lookup: skip_cache,
        action_digest: Some(action.to_proto()),
        digest_function: action.function.to_proto() as i32,
        ..Default::default()
    };
    Ok(execution(channel).execute(req).await.map_err(|s| rpc_error("Execute", s))?.into_inner())
}

pub fn stage_of(op: &Operation) -> Stage {
    op.metadata
        .as_ref()
        .and_then(|m| ExecuteOperationMetadata::decode(m.value.as_slice()).ok())
        .and_then(|m| Stage::try_from(m.stage).ok())
        .unwrap_or(Stage::Unknown)
}

pub fn response_of(op: &Operation) -> anyhow::Result<Option<ExecuteResponse>> {
    match &op.result {
        Some(operation::Result::Response(any)) => {
            Ok(Some(ExecuteResponse::decode(any.value.as_slice()).context("decoding the ExecuteResponse")?))
        }
        Some(operation::Result::Error(status)) => bail!("operation failed: {}", status.message),
        None => Ok(None),
    }
}

/// The result, or the status as an error when there is no result.
fn finished_result(response: &ExecuteResponse) -> anyhow::Result<ActionResult> {
    match (&response.result, &response.status) {
        (Some(r), _) => Ok(r.clone()),
        (None, Some(s)) if s.code != 0 => bail!("{:?}: {}", tonic::Code::from_i32(s.code), s.message),
        (None, _) => bail!("the server returned no result"),
    }
}

async fn read_output(
    cas: &CasClient,
    digest: Option<&remote_apis::reapi::Digest>,
    raw: &[u8],
    function: DigestFunction,
) -> anyhow::Result<Vec<u8>> {
    if !raw.is_empty() {
        return Ok(raw.to_vec());
    }
    let Some(d) = digest else { return Ok(Vec::new()) };
    let d = Digest::from_proto(function, d)?;
    if d.size == 0 {
        return Ok(Vec::new());
    }
    Ok(cas.read_blob(d).await.map_err(|s| rpc_error("reading output", s))?.to_vec())
}

/// Writes output files, directories and symlinks under the current directory.
async fn download_outputs(cas: &CasClient, result: &ActionResult, function: DigestFunction) -> anyhow::Result<()> {
    for f in &result.output_files {
        let digest = Digest::from_field(function, f.digest.as_ref(), "output digest")?;
        fetch_file(cas, digest, Path::new(&f.path), f.is_executable).await?;
    }
    for d in &result.output_directories {
        let digest = Digest::from_field(function, d.tree_digest.as_ref(), "tree digest")?;
        let tree = Tree::decode(cas.read_blob(digest).await.map_err(|s| rpc_error("reading a tree", s))?.as_ref())?;
        let root = tree.root.clone().unwrap_or_default();
        let children: std::collections::HashMap<Digest, remote_apis::reapi::Directory> =
            tree.children.into_iter().map(|c| (merkle::encode(function, &c).0, c)).collect();
        let mut stack = vec![(PathBuf::from(&d.path), root)];
        while let Some((at, dir)) = stack.pop() {
            tokio::fs::create_dir_all(&at).await.with_context(|| at.display().to_string())?;
            for f in &dir.files {
                merkle::check_name(&f.name)?;
                let digest = Digest::from_field(function, f.digest.as_ref(), "file digest")?;
                fetch_file(cas, digest, &at.join(&f.name), f.is_executable).await?;
            }
            for s in &dir.symlinks {
                merkle::check_name(&s.name)?;
                make_symlink(&s.target, &at.join(&s.name))?;
            }
            for child in &dir.directories {
                merkle::check_name(&child.name)?;
                let cd = Digest::from_field(function, child.digest.as_ref(), "directory digest")?;
                let sub = children.get(&cd).cloned().with_context(|| format!("tree lacks directory {cd}"))?;
                stack.push((at.join(&child.name), sub));
            }
        }
    }
    for s in &result.output_symlinks {
        make_symlink(&s.target, Path::new(&s.path))?;
    }
    Ok(())
}

fn make_symlink(target: &str, at: &Path) -> anyhow::Result<()> {
    if let Some(parent) = at.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).with_context(|| at.display().to_string())
}

async fn fetch_file(cas: &CasClient, digest: Digest, path: &Path, executable: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await?;
    }
    super::cas::download_to(cas, digest, path).await?;
    let mode = if executable { 0o755 } else { 0o644 };
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .await
        .with_context(|| path.display().to_string())
}

pub async fn job(cmd: JobCommand, server: &str, options: &ClientOptions, instance: &str) -> anyhow::Result<ExitCode> {
    let instance = InstanceName::new(instance).context("--instance")?;
    let channel = channel(server, options).await?;
    match cmd {
        JobCommand::Submit { action, skip_cache, no_wait } => {
            if no_wait {
                let mut stream = start_execute(channel, &instance, action, skip_cache).await?;
                let first = stream.message().await.map_err(|s| rpc_error("Execute", s))?;
                let op = first.context("the server sent no operation")?;
                println!("{}", op.name);
                return Ok(ExitCode::SUCCESS);
            }
            let (name, response) = execute(channel, &instance, action, skip_cache, true).await?;
            print_response(&name, Stage::Completed, Some(&response));
            Ok(response_exit(&response))
        }
        JobCommand::Status { operation } => {
            let op = OperationsClient::new(channel)
                .get_operation(GetOperationRequest { name: operation })
                .await
                .map_err(|s| rpc_error("GetOperation", s))?
                .into_inner();
            let response = response_of(&op)?;
            print_response(&op.name, stage_of(&op), response.as_ref());
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel { operation } => {
            OperationsClient::new(channel)
                .cancel_operation(CancelOperationRequest { name: operation.clone() })
                .await
                .map_err(|s| rpc_error("CancelOperation", s))?;
            println!("cancelled {operation}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn response_exit(response: &ExecuteResponse) -> ExitCode {
    match (&response.status, &response.result) {
        (Some(s), _) if s.code != 0 => ExitCode::FAILURE,
        (_, Some(r)) => exit_code(r.exit_code),
        _ => ExitCode::FAILURE,
    }
}

fn print_response(name: &str, stage: Stage, response: Option<&ExecuteResponse>) {
    println!("operation: {name}");
    println!("stage:     {}", stage.as_str_name());
    let Some(r) = response else { return };
    if let Some(s) = r.status.as_ref().filter(|s| s.code != 0) {
        println!("status:    {:?}: {}", tonic::Code::from_i32(s.code), s.message);
    }
    if !r.message.is_empty() {
        println!("message:   {}", r.message);
    }
    if let Some(result) = &r.result {
        println!("exit code: {}", result.exit_code);
        println!("cached:    {}", r.cached_result);
        if let Some(m) = &result.execution_metadata {
            println!("worker:    {}", m.worker);
        }
        let digest = |d: &Option<remote_apis::reapi::Digest>| {
            d.as_ref().map(|d| format!("{}/{}", d.hash, d.size_bytes)).unwrap_or_default()
        };
        println!("stdout:    {}", digest(&result.stdout_digest));
        println!("stderr:    {}", digest(&result.stderr_digest));
        for f in &result.output_files {
            println!("output:    {} {}", f.path, digest(&f.digest));
        }
        for d in &result.output_directories {
            println!("output:    {}/ tree {}", d.path, digest(&d.tree_digest));
        }
    }
}

pub async fn jobs(cmd: JobsCommand, server: &str, options: &ClientOptions) -> anyhow::Result<ExitCode> {
    let JobsCommand::List { limit } = cmd;
    let channel = channel(server, options).await?;
    let resp = OperationsClient::new(channel)
        .list_operations(ListOperationsRequest { page_size: limit, ..Default::default() })
        .await
        .map_err(|s| rpc_error("ListOperations", s))?
        .into_inner();
    println!("{:<48} {:<10} {:<8} ACTION", "OPERATION", "STAGE", "RESULT");
    for op in &resp.operations {
        let action = op
            .metadata
            .as_ref()
            .and_then(|m| ExecuteOperationMetadata::decode(m.value.as_slice()).ok())
            .and_then(|m| m.action_digest)
            .map(|d| format!("{}/{}", d.hash, d.size_bytes))
            .unwrap_or_default();
        let result = match response_of(op)? {
            None => "-".to_string(),
            Some(r) if r.status.as_ref().is_some_and(|s| s.code != 0) => {
                format!("{:?}", tonic::Code::from_i32(r.status.map(|s| s.code).unwrap_or(2)))
            }
            Some(r) if r.cached_result => "cached".to_string(),
            Some(r) => format!("exit {}", r.result.map(|x| x.exit_code).unwrap_or(-1)),
        };
        println!("{:<48} {:<10} {:<8} {action}", op.name, stage_of(op).as_str_name(), result);
    }
    if resp.operations.is_empty() {
        println!("(no operations)");
    }
    Ok(ExitCode::SUCCESS)
}
