//! `/metrics` over HTTP: on the status listener (behind its authentication)
//! and alone on `[server] metrics_listen` (open: Prometheus scrapes it
//! without credentials, and it shows no names of actions or blobs).
//!
//! The Prometheus text format 0.0.4 by default; OpenMetrics to a scraper
//! that asks for it in `Accept` (Prometheus does). With metrics off, 404.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `/metrics` answer.
pub async fn respond(metrics: Option<&Metrics>, headers: &HeaderMap) -> Response {
    let Some(metrics) = metrics else {
        return (StatusCode::NOT_FOUND, "metrics are off ([server] metrics = false)\n").into_response();
    };
    metrics.read_scheduler().await;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let openmetrics = accept.contains("application/openmetrics-text");
    let content_type =
        if openmetrics { OPENMETRICS } else { prometheus_client::encoding::prometheus_text::CONTENT_TYPE };
    ([(header::CONTENT_TYPE, content_type)], metrics.encode(openmetrics)).into_response()
}

/// The router of `[server] metrics_listen`: `/metrics` and nothing else.
pub fn router(metrics: Option<Arc<Metrics>>) -> Router {
    Router::new().route("/metrics", get(serve)).with_state(metrics)
}

async fn serve(State(metrics): State<Option<Arc<Metrics>>>, headers: HeaderMap) -> Response {
    respond(metrics.as_deref(), &headers).await
}
