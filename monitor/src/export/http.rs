//! HTTP routes: the metrics (at `--web.telemetry-path`, `/metrics` by default, gzip when the
//! scraper asks), `/healthz`, `/api/v1/snapshot`, the `/api/v1/trace` stream and a small index
//! page. The listener they run under (timeouts, connection limit, shutdown) is in `serve`.
use std::{convert::Infallible, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use tokio::sync::Semaphore;
use tower_http::compression::CompressionLayer;

use crate::{
    Agent,
    export::{
        trace::{Filter, MAX_CLIENTS},
        webconfig::WebConfig,
    },
};

/// What the routes share.
#[derive(Clone)]
struct Web {
    agent: Arc<Agent>,
    /// Scrapes (and snapshots) running at once, at most `--web.max-requests`.
    scrapes: Arc<Semaphore>,
    telemetry_path: Arc<str>,
    config: WebConfig,
}

pub fn router(agent: Arc<Agent>, opts: &crate::Web) -> Router {
    let path = opts.telemetry_path.as_str();
    let web = Web {
        agent,
        scrapes: Arc::new(Semaphore::new(opts.max_requests)),
        telemetry_path: path.into(),
        config: opts.config.clone(),
    };
    let mut router =
        Router::new().route("/healthz", get(healthz)).route("/api/v1/snapshot", get(snapshot));
    router = router.route(path, get(metrics));
    if path != "/" {
        router = router.route("/", get(index));
    }
    router
        .layer(CompressionLayer::new().gzip(true))
        // After the compression layer, which would hold lines back to fill its blocks.
        .route("/api/v1/trace", get(trace))
        .layer(middleware::from_fn_with_state(web.clone(), guard))
        .with_state(web)
}

/// Basic authentication (`basic_auth_users`) for every route but `/healthz`, which says only
/// whether the agent works and must answer a probe that has no password; then the configured
/// response headers.
async fn guard(State(web): State<Web>, req: Request, next: Next) -> Response {
    if !web.config.users.is_empty() && req.uri().path() != "/healthz" {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let config = web.config.clone();
        // bcrypt takes milliseconds on purpose: off the async threads.
        let ok = tokio::task::spawn_blocking(move || config.authorized(given.as_deref()))
            .await
            .unwrap_or(false);
        if !ok {
            web.agent.metrics.http_refused.with_label_values(&["unauthorized"]).inc();
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"twmon\"")],
                "Unauthorized\n",
            )
                .into_response();
        }
    }
    let mut response = next.run(req).await;
    for (name, value) in web.config.headers.iter() {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// A 503 when `--web.max-requests` scrapes are running already, as node_exporter answers.
fn busy(web: &Web) -> Response {
    web.agent.metrics.http_refused.with_label_values(&["requests"]).inc();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "too many scrapes at once (--web.max-requests); retry later\n",
    )
        .into_response()
}

async fn index(State(web): State<Web>) -> Html<String> {
    let path = web.telemetry_path.trim_start_matches('/');
    Html(format!(
        "<!doctype html><html><head><title>twmon</title></head><body><h1>twmon {}</h1>\
         <p>How TCP connections end: teardown states, TIME_WAIT, retransmitted FINs.</p>\
         <ul><li><a href=\"{path}\">metrics</a></li><li><a href=\"healthz\">healthz</a></li>\
         <li><a href=\"api/v1/snapshot\">api/v1/snapshot</a></li>\
         <li><a href=\"api/v1/trace\">api/v1/trace</a> (a stream)</li></ul></body></html>",
        env!("CARGO_PKG_VERSION")
    ))
}

async fn metrics(State(web): State<Web>) -> Response {
    let Ok(_permit) = web.scrapes.clone().try_acquire_owned() else { return busy(&web) };
    let agent = web.agent.clone();
    match tokio::task::spawn_blocking(move || agent.render()).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Ok(Err(e)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("collecting metrics: {e}\n"))
            .into_response(),
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

/// Teardown events as they happen, one JSON line each, those passing the query's filter
/// (`port`, `address`, `netns`, `state`, `comm`): see `export::trace`.
async fn trace(State(web): State<Web>, Query(filter): Query<Filter>) -> Response {
    let Some(client) = web.agent.trace(filter.port) else {
        web.agent.metrics.http_refused.with_label_values(&["requests"]).inc();
        let why = format!("{MAX_CLIENTS} traces are running already; retry later\n");
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    };
    let lines = futures_util::stream::unfold(
        (client, filter, web),
        |(mut client, filter, web)| async move {
            use tokio::sync::broadcast::error::RecvError;
            let line = loop {
                match client.lines.recv().await {
                    Ok(line) if filter.matches(&line) => {
                        break serde_json::to_string(&*line).unwrap_or_default();
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        web.agent.metrics.trace_lines_lost.inc_by(n);
                        break format!("{{\"lost\":{n}}}");
                    }
                    Err(RecvError::Closed) => return None,
                }
            };
            Some((Ok::<_, Infallible>(bytes::Bytes::from(line + "\n")), (client, filter, web)))
        },
    );
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(lines)).into_response()
}

/// 200 while the kernel programs are attached and events are being consumed. Answered from
/// atomics: it never waits for a scrape, a reconcile or the kernel maps.
async fn healthz(State(web): State<Web>) -> Response {
    match web.agent.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}
