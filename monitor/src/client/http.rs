//! The agent as these commands reach it: plain HTTP/1.1 with hyper, one connection a request.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, StatusCode, Uri, body::Incoming, header};
use hyper_util::rt::TokioIo;

/// A running agent's address, resolved.
pub struct Agent {
    pub url: String,
    addr: SocketAddr,
    host: String,
}

impl Agent {
    /// `url` is `http://HOST:PORT` (9864 when no port is given).
    pub async fn locate(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--agent {url}: not a URL such as http://127.0.0.1:9864"))?;
        match uri.scheme_str() {
            Some("http") | None => {}
            Some(other) => bail!(
                "--agent {url}: this command speaks plain HTTP; for an agent behind TLS ({other}) \
                 use curl with its /api/v1 paths"
            ),
        }
        let host = uri
            .host()
            .context("--agent: no host; give http://HOST:PORT")?
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(9864);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("--agent {url}: cannot resolve {host}"))?
            .next()
            .with_context(|| format!("--agent {url}: {host} has no address"))?;
        Ok(Self { url: url.to_string(), addr, host: format!("{host}:{port}") })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// GET `path`: the response, once its status is 200.
    pub async fn get(&self, path: &str) -> anyhow::Result<Response<Incoming>> {
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the agent at {} timed out", self.addr))?
        .with_context(|| {
            format!(
                "cannot connect to the agent at {}: is twmon running there (--web.listen-address)?",
                self.addr
            )
        })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request =
            Request::get(path).header(header::HOST, &self.host).body(Empty::<Bytes>::new())?;
        let response =
            sender.send_request(request).await.context("the agent closed the connection")?;
        let status = response.status();
        if status != StatusCode::OK {
            let body =
                response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            bail!(
                "the agent answered {status} to {path}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(response)
    }

    /// GET `path` as JSON.
    pub async fn json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let body = self.get(path).await?.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&body).with_context(|| format!("{path}: not JSON"))
    }
}
