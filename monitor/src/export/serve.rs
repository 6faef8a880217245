//! The HTTP listener around the routes of `http`: how connections are accepted, bounded, timed
//! out and shut down. `axum::serve` has neither a header timeout nor a connection limit, and a
//! scrape target reachable from the network needs both: a client that sends nothing, or a byte
//! now and then, must not keep a connection, and many of them must not take every file
//! descriptor the agent has.
use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;

/// How the listener treats its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, also while a kept-alive connection waits
    /// for its next request: slow and idle clients are closed after it.
    pub read_header_timeout: Duration,
    /// On shutdown, time in-flight requests get before their connections are dropped.
    pub shutdown_grace: Duration,
}

/// What the listener counts, for the agent's own metrics.
pub trait Counters: Send + Sync + 'static {
    /// A connection refused because `max_connections` were open.
    fn refused(&self);
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for at most `limits.shutdown_grace` and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    counters: Arc<dyn Counters>,
    shutdown: impl Future<Output = ()>,
) {
    let tls = tls.map(TlsAcceptor::from);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut conns = JoinSet::new();
    let mut warned = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and the like: say it once, back off, keep serving.
                        if !warned {
                            tracing::warn!("accepting a connection failed: {e}; raise LimitNOFILE \
                                            or lower --web.max-connections");
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    counters.refused();
                    drop(stream);
                    continue;
                };
                let (app, stopped, tls) = (app.clone(), stopped.clone(), tls.clone());
                conns.spawn(async move {
                    match tls {
                        None => connection(stream, app, limits, stopped).await,
                        // The handshake gets the same time as a request's headers.
                        Some(tls) => match timeout(limits.read_header_timeout, tls.accept(stream)).await {
                            Ok(Ok(stream)) => connection(stream, app, limits, stopped).await,
                            Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        },
                    }
                    drop(permit);
                });
            }
        }
    }
    let _ = stop.send(true);
    let drained =
        timeout(limits.shutdown_grace, async { while conns.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::info!(grace = ?limits.shutdown_grace, "dropping connections still open after the \
                                                        shutdown grace period");
    }
    conns.abort_all();
}

/// One HTTP/1.1 connection, until the client leaves, a timeout closes it, or shutdown.
async fn connection<IO>(io: IO, app: Router, limits: Limits, mut stopped: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.read_header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
