//! ByteStream reads of what a running action produces (see
//! `remote_apis::logstream`): its live stdout/stderr, and the current
//! content of one of its declared outputs. The ByteStream service parses
//! and authorizes the name; this serves it from the scheduler.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use remote_apis::logstream::LiveName;

use super::scheduler::Scheduler;
use crate::error::Result;
use crate::store::Store;

pub struct LiveReads {
    scheduler: Arc<Scheduler>,
    cas: Store,
}

impl LiveReads {
    /// Running outputs are served from `cas`, where workers upload them.
    pub fn new(scheduler: Arc<Scheduler>, cas: Store) -> Self {
        LiveReads { scheduler, cas }
    }

    /// The bytes of `name` from `offset`, at most `limit`: a stream blocks
    /// for new output until the action ends; a running output is its
    /// content as the worker uploaded it just now.
    pub async fn read(
        &self,
        name: &LiveName,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        match name {
            LiveName::Stream(stream) => match self.scheduler.logs().read(stream, offset, limit)? {
                Some(s) => Ok(s),
                None => Err(crate::error::Error::not_found(self.scheduler.stream_missing(&stream.id).await)),
            },
            LiveName::Output(output) => {
                let digest = self.scheduler.running_output(&output.instance, &output.operation, &output.path).await?;
                self.cas.get(&digest, offset, limit).await
            }
        }
    }
}
