//! HTTP routes: the metrics (at `--web.telemetry-path`, `/metrics` by default, gzip when the
//! scraper asks), `/healthz`, `/api/v1/snapshot` and a small index page. The listener they run
//! under (timeouts, connection limit, shutdown) is in `serve`.
use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use tokio::sync::Semaphore;
use tower_http::compression::CompressionLayer;

use crate::Agent;

/// What the routes share.
#[derive(Clone)]
struct Web {
    agent: Arc<Agent>,
    /// Scrapes (and snapshots) running at once, at most `--web.max-requests`.
    scrapes: Arc<Semaphore>,
    telemetry_path: Arc<str>,
}

pub fn router(agent: Arc<Agent>, telemetry_path: &str, max_requests: usize) -> Router {
    let web = Web { agent, scrapes: Arc::new(Semaphore::new(max_requests)), telemetry_path: telemetry_path.into() };
    let mut router = Router::new().route("/healthz", get(healthz)).route("/api/v1/snapshot", get(snapshot));
    router = router.route(telemetry_path, get(metrics));
    if telemetry_path != "/" {
        router = router.route("/", get(index));
    }
    router.layer(CompressionLayer::new().gzip(true)).with_state(web)
}

/// A 503 when `--web.max-requests` scrapes are running already, as node_exporter answers.
fn busy(web: &Web) -> Response {
    web.agent.metrics.http_refused.with_label_values(&["requests"]).inc();
    (StatusCode::SERVICE_UNAVAILABLE, "too many scrapes at once (--web.max-requests); retry later\n").into_response()
}

async fn index(State(web): State<Web>) -> Html<String> {
    let path = web.telemetry_path.trim_start_matches('/');
    Html(format!(
        "<!doctype html><html><head><title>twmon</title></head><body><h1>twmon {}</h1>\
         <p>How TCP connections end: teardown states, TIME_WAIT, retransmitted FINs.</p>\
         <ul><li><a href=\"{path}\">metrics</a></li><li><a href=\"healthz\">healthz</a></li>\
         <li><a href=\"api/v1/snapshot\">api/v1/snapshot</a></li></ul></body></html>",
        env!("CARGO_PKG_VERSION")
    ))
}

async fn metrics(State(web): State<Web>) -> Response {
    let Ok(_permit) = web.scrapes.clone().try_acquire_owned() else { return busy(&web) };
    let agent = web.agent.clone();
    match tokio::task::spawn_blocking(move || agent.render()).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("collecting metrics: {e}\n")).into_response(),
    }
}

/// Current per-state counts, top ports and destinations, namespaces and leaks, as JSON.
async fn snapshot(State(web): State<Web>) -> Response {
    let Ok(_permit) = web.scrapes.clone().try_acquire_owned() else { return busy(&web) };
    let agent = web.agent.clone();
    match tokio::task::spawn_blocking(move || agent.snapshot()).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("snapshot: {e}\n")).into_response(),
    }
}

/// 200 while the kernel programs are attached and events are being consumed. Answered from
/// atomics: it never waits for a scrape, a reconcile or the kernel maps.
async fn healthz(State(web): State<Web>) -> Response {
    match web.agent.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}
