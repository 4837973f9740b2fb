//! Periodic upkeep: the one way the server and workers run a small task
//! every so often (expiring sessions and operations, dropping silent
//! workers, giving freed memory back) until they stop.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Spawns, on the current runtime, a task that calls `work` every `period`
/// until `stop` is cancelled. A tick missed under load is not made up in a
/// burst: the next one comes a period later.
pub fn every(period: Duration, stop: CancellationToken, mut work: impl FnMut() + Send + 'static) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => work(),
                () = stop.cancelled() => return,
            }
        }
    });
}
