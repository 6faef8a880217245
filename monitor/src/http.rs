//! HTTP routes: `/metrics` (Prometheus text format), `/healthz`, and a small index page.
use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::Agent;

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/api/v1/snapshot", get(snapshot))
        .with_state(agent)
}

async fn index() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><html><head><title>twmon</title></head><body>",
        "<h1>twmon ",
        env!("CARGO_PKG_VERSION"),
        "</h1><p>How TCP connections end: teardown states, TIME_WAIT, retransmitted FINs.</p>",
        "<ul><li><a href=\"metrics\">metrics</a></li><li><a href=\"healthz\">healthz</a></li>",
        "<li><a href=\"api/v1/snapshot\">api/v1/snapshot</a></li></ul>",
        "</body></html>"
    ))
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    match tokio::task::spawn_blocking(move || agent.render()).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("collecting metrics: {e}\n")).into_response(),
    }
}

/// Current per-state counts, top ports and destinations, namespaces and leaks, as JSON.
async fn snapshot(State(agent): State<Arc<Agent>>) -> Response {
    match tokio::task::spawn_blocking(move || agent.snapshot()).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("snapshot: {e}\n")).into_response(),
    }
}

/// 200 while the kernel programs are attached and events are being consumed.
async fn healthz(State(agent): State<Arc<Agent>>) -> Response {
    match agent.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}
