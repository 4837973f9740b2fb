//! Every gRPC call: requests by service, method and status code, latency,
//! and bytes received and sent, as a tower layer beside the request log.
//!
//! The status code comes from the `grpc-status` header of a trailers-only
//! response (an error before any message) or from the trailers at the end
//! of the body, so the response body is wrapped: it also counts the bytes
//! as frames pass, and records the call when the body ends. A body dropped
//! before its end (the client went away mid-stream) counts as CANCELLED.
//! Latency is from the request to the end of the response body, so a
//! stream's latency is its whole life.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::codegen::Service;
use tower_layer::Layer;

type Labels2 = [(&'static str, &'static str); 2];
type Labels3 = [(&'static str, &'static str); 3];

/// Latency buckets, seconds: a FindMissingBlobs on loopback to a long stream.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The services this server answers and their methods: only these become
/// labels; anything else is "other".
const KNOWN: &[(&str, &[&str])] = &[
    (
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        &[
            "FindMissingBlobs",
            "BatchUpdateBlobs",
            "BatchReadBlobs",
            "GetTree",
            "SplitBlob",
            "SpliceBlob",
            "GetChunkMapping",
            "RegisterChunkMapping",
        ],
    ),
    ("google.bytestream.ByteStream", &["Read", "Write", "QueryWriteStatus"]),
    ("build.bazel.remote.execution.v2.ActionCache", &["GetActionResult", "UpdateActionResult"]),
    ("build.bazel.remote.execution.v2.Execution", &["Execute", "WaitExecution"]),
    ("build.bazel.remote.execution.v2.Capabilities", &["GetCapabilities"]),
    ("build.bazel.remote.asset.v1.Fetch", &["FetchBlob", "FetchDirectory"]),
    ("build.bazel.remote.asset.v1.Push", &["PushBlob", "PushDirectory"]),
    (
        "google.longrunning.Operations",
        &["ListOperations", "GetOperation", "DeleteOperation", "CancelOperation", "WaitOperation"],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch", "List"]),
    (
        "distbuild.admin.v1.Admin",
        &["ListBlobs", "GetStoreStatus", "VerifyBlobs", "ListWorkers", "GetSchedulerStatus", "SetWorkerDraining"],
    ),
    ("distbuild.worker.v1.WorkerGateway", &["Session"]),
];

/// The gRPC families.
pub struct GrpcMetrics {
    requests: Family<Labels3, Counter>,
    latency: Family<Labels2, Histogram>,
    received: Family<Labels2, Counter>,
    sent: Family<Labels2, Counter>,
}

impl GrpcMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = GrpcMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            received: Family::default(),
            sent: Family::default(),
        };
        registry.register(
            "grpc_requests",
            "gRPC calls by service, method and status code (counted when the call ends)",
            m.requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "gRPC call latency, from the request to the end of the response (a stream's whole life)",
            m.latency.clone(),
        );
        registry.register(
            "grpc_received_bytes",
            "Bytes of gRPC request bodies (messages with their framing) by service and method",
            m.received.clone(),
        );
        registry.register(
            "grpc_sent_bytes",
            "Bytes of gRPC response bodies (messages with their framing) by service and method",
            m.sent.clone(),
        );
        m
    }
}

/// The layer; `None` records nothing and wraps nothing but a branch.
#[derive(Clone)]
pub struct GrpcLayer(Option<Arc<super::Metrics>>);

/// The layer for the server's builder.
pub fn layer(metrics: Option<Arc<super::Metrics>>) -> GrpcLayer {
    GrpcLayer(metrics)
}

impl<S> Layer<S> for GrpcLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Option<Arc<super::Metrics>>,
}

impl<S, B> Service<http::Request<tonic::body::Body>> for Metered<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
{
    type Response = http::Response<MeteredBody<B>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(metrics) = &self.metrics else {
            return MeteredFuture { inner: Box::pin(self.inner.call(request)), call: None };
        };
        let (service, method) = labels(request.uri().path());
        let key = [("service", service), ("method", method)];
        let call = Call {
            metrics: metrics.clone(),
            service,
            method,
            start: Instant::now(),
            sent: metrics.grpc.sent.get_or_create(&key).clone(),
        };
        let received = metrics.grpc.received.get_or_create(&key).clone();
        let request = request.map(|body| tonic::body::Body::new(CountingBody { inner: body, counter: received }));
        MeteredFuture { inner: Box::pin(self.inner.call(request)), call: Some(call) }
    }
}

/// The service and method of a call path `/package.Service/Method`, from
/// the fixed list.
fn labels(path: &str) -> (&'static str, &'static str) {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return ("other", "other");
    };
    match KNOWN.iter().find(|(s, _)| *s == service) {
        Some((s, methods)) => (s, methods.iter().find(|m| **m == method).copied().unwrap_or("other")),
        None => ("other", "other"),
    }
}

/// One call being measured.
struct Call {
    metrics: Arc<super::Metrics>,
    service: &'static str,
    method: &'static str,
    start: Instant,
    sent: Counter,
}

impl Call {
    fn finish(self, code: &'static str) {
        let grpc = &self.metrics.grpc;
        grpc.requests.get_or_create(&[("service", self.service), ("method", self.method), ("code", code)]).inc();
        grpc.latency
            .get_or_create(&[("service", self.service), ("method", self.method)])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

pub struct MeteredFuture<F> {
    /// Boxed to be polled without a pin projection (one small allocation
    /// per call).
    inner: Pin<Box<F>>,
    call: Option<Call>,
}

impl<F, B, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<MeteredBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = ready!(self.inner.as_mut().poll(cx));
        let call = self.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response carries the status in its headers.
                let code = call.as_ref().and_then(|_| grpc_status(response.headers()));
                Ok(response.map(|inner| MeteredBody { inner, call, code }))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.finish("Internal");
                }
                Err(e)
            }
        })
    }
}

/// The response body: counts bytes, finds the status and records the call
/// at its end (or when dropped before it).
pub struct MeteredBody<B> {
    inner: B,
    call: Option<Call>,
    code: Option<&'static str>,
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(call) = &this.call {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        call.sent.inc_by(data.len() as u64);
                    } else if let Some(trailers) = f.trailers_ref() {
                        this.code = grpc_status(trailers).or(this.code);
                    }
                }
                Some(Err(_)) => this.code = Some("Internal"),
                None => {}
            }
            if frame.is_none() || this.inner.is_end_stream() {
                let call = this.call.take().expect("checked");
                call.finish(this.code.unwrap_or("OK"));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            // Unread to its end: a trailers-only response whose (empty) body
            // nobody polled, or a client that went away mid-stream.
            call.finish(self.code.unwrap_or("Canceled"));
        }
    }
}

/// A request body that counts its bytes as the service reads them.
struct CountingBody {
    inner: tonic::body::Body,
    counter: Counter,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            self.counter.inc_by(data.len() as u64);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a header map, as its code name.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(code_name(value))
}

/// The code names gRPC's own libraries use (Go's `codes.Code.String()`),
/// which dashboards built for other gRPC servers expect.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code).ok().and_then(|i| NAMES.get(i)).copied().unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_the_fixed_list() {
        assert_eq!(
            labels("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"),
            ("build.bazel.remote.execution.v2.ActionCache", "GetActionResult")
        );
        assert_eq!(
            labels("/build.bazel.remote.execution.v2.ActionCache/Invented"),
            ("build.bazel.remote.execution.v2.ActionCache", "other")
        );
        assert_eq!(labels("/evil.Service/X"), ("other", "other"));
        assert_eq!(labels("/"), ("other", "other"));
        assert_eq!(labels(""), ("other", "other"));
    }

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(5), "NotFound");
        assert_eq!(code_name(16), "Unauthenticated");
        assert_eq!(code_name(17), "Unknown");
        assert_eq!(code_name(-1), "Unknown");
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&h), Some("Unavailable"));
    }
}
