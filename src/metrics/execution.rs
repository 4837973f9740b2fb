//! Execution events the scheduler records as they happen: how long actions
//! waited in a queue, how long each phase ran on the worker, and why
//! actions failed. Everything else about execution (stages, queues,
//! workers, the scheduler's counters) is read at scrape time.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use remote_apis::protobuf::Timestamp;
use remote_apis::reapi::ExecuteResponse;
use tonic::Code;

type Label = [(&'static str, &'static str); 1];

/// Seconds, 1 ms to an hour.
const BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Why an action failed: a bounded set.
const REASONS: [&str; 5] = ["exit_code", "timeout", "worker_lost", "unmatched", "error"];

/// The phases of ExecutedActionMetadata measured, with their timestamps.
const PHASES: [&str; 4] = ["input_fetch", "execution", "output_upload", "worker"];

pub struct ExecutionMetrics {
    queue_wait: Histogram,
    phases: [Histogram; 4],
    failures: [Counter; 5],
    timeouts: Counter,
}

impl ExecutionMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let queue_wait = histogram();
        registry.register(
            "execution_queue_wait_seconds",
            "How long actions waited in a queue before a worker took them (again after a re-queue)",
            queue_wait.clone(),
        );
        let phases_family = Family::<Label, Histogram>::new_with_constructor(histogram as fn() -> Histogram);
        registry.register(
            "execution_duration_seconds",
            "Time on the worker by phase (input_fetch, execution, output_upload, and worker: the whole), \
             from the results' ExecutedActionMetadata",
            phases_family.clone(),
        );
        let failures_family = Family::<Label, Counter>::default();
        registry.register(
            "execution_failures",
            "Executed actions that did not succeed, by reason: exit_code (non-zero exit), timeout, \
             worker_lost (gave up after lost workers), unmatched (no worker could run it), error",
            failures_family.clone(),
        );
        let timeouts = Counter::default();
        registry.register("execution_timeouts", "Actions killed at their timeout", timeouts.clone());
        ExecutionMetrics {
            queue_wait,
            phases: PHASES.map(|p| phases_family.get_or_create(&[("phase", p)]).clone()),
            failures: REASONS.map(|r| failures_family.get_or_create(&[("reason", r)]).clone()),
            timeouts,
        }
    }

    /// A worker took an action that waited `waited` in its queue.
    pub fn dispatched(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// An operation finished with `response` (not a cache hit). `ran`: a
    /// worker was given it at least once.
    pub fn completed(&self, response: &ExecuteResponse, ran: bool) {
        if let Some(reason) = failure_reason(response, ran) {
            self.failures[reason].inc();
            if REASONS[reason] == "timeout" {
                self.timeouts.inc();
            }
        }
        let Some(m) = response.result.as_ref().and_then(|r| r.execution_metadata.as_ref()) else { return };
        let spans = [
            (&m.input_fetch_start_timestamp, &m.input_fetch_completed_timestamp),
            (&m.execution_start_timestamp, &m.execution_completed_timestamp),
            (&m.output_upload_start_timestamp, &m.output_upload_completed_timestamp),
            (&m.worker_start_timestamp, &m.worker_completed_timestamp),
        ];
        for (histogram, (start, end)) in self.phases.iter().zip(spans) {
            if let (Some(start), Some(end)) = (start, end) {
                histogram.observe(seconds_between(start, end));
            }
        }
    }
}

/// The index in [`REASONS`] of why `response` is a failure, or `None` for
/// a success or a cancellation (counted on its own).
fn failure_reason(response: &ExecuteResponse, ran: bool) -> Option<usize> {
    let code = response.status.as_ref().map_or(0, |s| s.code);
    let reason = match Code::from(code) {
        Code::Ok => match &response.result {
            Some(r) if r.exit_code == 0 => return None,
            Some(_) => "exit_code",
            None => "error",
        },
        Code::Cancelled => return None,
        Code::DeadlineExceeded => "timeout",
        Code::Unavailable if ran => "worker_lost",
        Code::FailedPrecondition if !ran => "unmatched",
        _ => "error",
    };
    REASONS.iter().position(|r| *r == reason)
}

fn seconds_between(start: &Timestamp, end: &Timestamp) -> f64 {
    let secs = (end.seconds - start.seconds) as f64 + f64::from(end.nanos - start.nanos) / 1e9;
    secs.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_apis::reapi::ActionResult;
    use remote_apis::rpc;

    fn with(code: Code, exit: Option<i32>) -> ExecuteResponse {
        ExecuteResponse {
            status: (code != Code::Ok).then(|| rpc::Status { code: code as i32, ..Default::default() }),
            result: exit.map(|exit_code| ActionResult { exit_code, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn failures_have_one_bounded_reason() {
        let name = |r: &ExecuteResponse, ran| failure_reason(r, ran).map(|i| REASONS[i]);
        assert_eq!(name(&with(Code::Ok, Some(0)), true), None);
        assert_eq!(name(&with(Code::Ok, Some(3)), true), Some("exit_code"));
        assert_eq!(name(&with(Code::Ok, None), true), Some("error"));
        assert_eq!(name(&with(Code::Cancelled, None), true), None);
        assert_eq!(name(&with(Code::DeadlineExceeded, Some(137)), true), Some("timeout"));
        assert_eq!(name(&with(Code::Unavailable, None), true), Some("worker_lost"));
        assert_eq!(name(&with(Code::Unavailable, None), false), Some("error"));
        assert_eq!(name(&with(Code::FailedPrecondition, None), false), Some("unmatched"));
        assert_eq!(name(&with(Code::FailedPrecondition, None), true), Some("error"));
        assert_eq!(name(&with(Code::Internal, None), true), Some("error"));
    }

    #[test]
    fn spans_never_go_backwards() {
        let t = |seconds, nanos| Timestamp { seconds, nanos };
        assert_eq!(seconds_between(&t(10, 500_000_000), &t(12, 0)), 1.5);
        assert_eq!(seconds_between(&t(12, 0), &t(10, 0)), 0.0);
    }
}
