//! The remote's ActionCache behind [`AcStore`].
//!
//! A key made from an action ([`AcKey::new`]) is looked up and written with
//! GetActionResult/UpdateActionResult under its real instance name (or the
//! configured one) and action digest, so the remote's other clients share
//! the entries. Its value is an encoded ActionResult: decoded to be sent,
//! and what comes back is encoded again.
//!
//! A derived key (no origin: the Remote Asset records) has no action. Its
//! value, any bytes, is kept as the `stdout_raw` of an ActionResult under a
//! synthetic action digest made from the key ([`synthetic_action`]). Only
//! distbuild servers using this store read those entries; to any other
//! client they are results of actions that do not exist, and a remote that
//! does not keep inlined stdout cannot hold them.
//!
//! `remove` does nothing: REAPI has no way to delete an entry. Entries are
//! dropped only for being incomplete, and the remote checks completeness
//! against its own CAS before it answers (and a distbuild front server's
//! completeness check runs again on every hit), so a stale entry is never
//! served as complete.

use async_trait::async_trait;
use bytes::Bytes;
use prost::Message;
use remote_apis::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use remote_apis::{Digest, DigestFunction, InstanceName};
use tonic::Code;

use super::GrpcStore;
use crate::ac::{AcKey, AcStore};
use crate::error::{Error, Result};

/// Where an entry lives on the remote.
struct Target {
    instance: InstanceName,
    action: Digest,
    /// The value is the bytes of a derived key, wrapped in `stdout_raw`.
    derived: bool,
}

impl GrpcStore {
    fn target(&self, key: &AcKey) -> Target {
        match key.origin() {
            Some(origin) => Target {
                instance: self.instance.clone().unwrap_or_else(|| origin.instance.clone()),
                action: origin.action,
                derived: false,
            },
            None => Target { instance: self.blob_instance(), action: synthetic_action(key), derived: true },
        }
    }
}

/// The action digest a derived key's entry is kept under: the SHA-256 of
/// the key in a domain of its own, with a size of 1 byte. No real action
/// can have it, since a real action's digest is the hash of its 64-byte
/// preimage only if its size is 64.
pub(super) fn synthetic_action(key: &AcKey) -> Digest {
    let mut hasher = DigestFunction::Sha256.hasher();
    hasher.update(b"distbuild.grpc-store.derived.v1\0");
    hasher.update(key.bytes());
    Digest { size: 1, ..hasher.finish() }
}

#[async_trait]
impl AcStore for GrpcStore {
    async fn get(&self, key: &AcKey) -> Result<Option<Bytes>> {
        let target = self.target(key);
        let request = GetActionResultRequest {
            instance_name: target.instance.to_string(),
            action_digest: Some(target.action.to_proto()),
            // A derived value is the stdout; an action's result is left as
            // stored (the front server inlines from its own CAS).
            inline_stdout: target.derived,
            inline_stderr: false,
            inline_output_files: Vec::new(),
            digest_function: target.action.function.to_proto() as i32,
        };
        match self.call("GetActionResult", self.ac.clone().get_action_result(request)).await {
            Ok(result) if target.derived => Ok(Some(Bytes::from(result.stdout_raw))),
            Ok(result) => Ok(Some(Bytes::from(result.encode_to_vec()))),
            Err(e) if e.code == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        let target = self.target(key);
        let result = if target.derived {
            ActionResult { stdout_raw: value.into(), ..Default::default() }
        } else {
            ActionResult::decode(value).map_err(|e| {
                Error::invalid(format!(
                    "grpc store {}: the value for action {} is not an ActionResult: {e}",
                    self.endpoint, target.action
                ))
            })?
        };
        let request = UpdateActionResultRequest {
            instance_name: target.instance.to_string(),
            action_digest: Some(target.action.to_proto()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: target.action.function.to_proto() as i32,
        };
        self.call("UpdateActionResult", self.ac.clone().update_action_result(request)).await.map(|_| ())
    }

    /// Nothing: see the module's documentation.
    async fn remove(&self, _key: &AcKey) -> Result<()> {
        Ok(())
    }
}
