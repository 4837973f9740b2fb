//! Between the scheduler's types and the shared state's plain records:
//! what a worker needs to run an action (encoded so any replica's worker can
//! run it), owners, merge keys and views.

use super::*;
use crate::execution::state::{self, Millis, OpRecord};

/// The checked Action, Command and timeout, as stored with a queued
/// operation (the platform is its queue).
#[derive(Clone, PartialEq, prost::Message)]
struct Spec {
    #[prost(bytes = "vec", tag = "1")]
    action: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    command: Vec<u8>,
    #[prost(uint64, tag = "3")]
    timeout_ms: u64,
}

pub(super) fn encode_spec(checked: &Checked) -> bytes::Bytes {
    let spec = Spec {
        action: prost::Message::encode_to_vec(&checked.action),
        command: prost::Message::encode_to_vec(&checked.command),
        timeout_ms: checked.timeout.as_millis() as u64,
    };
    prost::Message::encode_to_vec(&spec).into()
}

/// The task for a claimed operation; `None` if its record is unreadable.
pub(super) fn task_of(op: &OpRecord, id: String) -> Option<Task> {
    let spec: Spec = prost::Message::decode(op.spec.as_ref()).ok()?;
    Some(Task {
        id,
        instance: InstanceName::new(&op.instance).ok()?,
        action_digest: op.action_digest.parse().ok()?,
        action: prost::Message::decode(spec.action.as_slice()).ok()?,
        command: prost::Message::decode(spec.command.as_slice()).ok()?,
        timeout: Duration::from_millis(spec.timeout_ms),
        queued_at: to_time(op.queued_at),
    })
}

pub(super) fn queue_of(platform: &Platform) -> String {
    state::queue_key(platform.pairs())
}

pub(super) fn platform_of(queue: &str) -> Platform {
    Platform::new(state::queue_pairs(queue))
}

/// Identical actions of one instance merge: the same inputs as the AcKey.
pub(super) fn merge_key(instance: &InstanceName, digest: &Digest) -> String {
    format!("{}\n{digest}", instance.as_str())
}

pub(super) fn owner_key(p: &Principal) -> String {
    match p {
        Principal::Anonymous => "a".into(),
        Principal::Token(n) => format!("t:{n}"),
        Principal::Certificate(n) => format!("c:{n}"),
    }
}

fn owner_of(key: &str) -> Principal {
    match key.split_once(':') {
        Some(("t", n)) => Principal::Token(n.into()),
        Some(("c", n)) => Principal::Certificate(n.into()),
        _ => Principal::Anonymous,
    }
}

pub(super) fn to_time(ms: Millis) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

pub(super) fn since(ms: Millis, now: Millis) -> Duration {
    Duration::from_millis(now.saturating_sub(ms))
}

pub(super) fn encode_response(r: &ExecuteResponse) -> bytes::Bytes {
    prost::Message::encode_to_vec(r).into()
}

pub(super) fn to_view(op: &OpRecord) -> Option<OpView> {
    let response = match &op.response {
        Some(b) => Some(Arc::new(<ExecuteResponse as prost::Message>::decode(b.as_ref()).ok()?)),
        None => None,
    };
    Some(OpView {
        name: op.name.clone(),
        instance: InstanceName::new(&op.instance).ok()?,
        action_digest: op.action_digest.parse().ok()?,
        stages: op.stages.iter().map(|s| Stage::try_from(*s).unwrap_or(Stage::Unknown)).collect(),
        response,
        worker: op.worker.clone(),
        queued_at: to_time(op.queued_at),
        owners: op.owners.iter().map(|o| owner_of(o)).collect(),
        task: op.running.as_ref().map(|(_, task)| task.clone()),
    })
}

pub(super) fn status(code: tonic::Code, message: String) -> ExecuteResponse {
    ExecuteResponse {
        status: Some(rpc::Status { code: code as i32, message, details: Vec::new() }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip() {
        for p in [Principal::Anonymous, Principal::Token("a:b".into()), Principal::Certificate("cn".into())] {
            assert_eq!(owner_of(&owner_key(&p)), p);
        }
    }
}
