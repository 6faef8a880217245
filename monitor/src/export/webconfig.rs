//! `--web.config.file`: TLS, client certificates, basic authentication and response headers, in
//! the format of the Prometheus exporter-toolkit, so that a file written for node_exporter works
//! unchanged. Relative paths are relative to the file's directory, as there. What twmon does not
//! implement is refused by name rather than ignored.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::http::{HeaderName, HeaderValue};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("--web.config.file {path}: {message}")]
pub struct WebConfigError {
    path: String,
    message: String,
}

/// The file as written (exporter-toolkit's keys).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<Tls>,
    #[serde(default)]
    http_server_config: Option<HttpServer>,
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpServer {
    /// HTTP/2 is not served (scrapes are HTTP/1.1); accepted so that existing files load.
    #[serde(default)]
    #[allow(dead_code)]
    http2: Option<bool>,
    #[serde(default)]
    headers: HashMap<String, String>,
}

/// The web configuration in force.
#[derive(Clone, Default)]
pub struct WebConfig {
    /// TLS, when `tls_server_config` is given.
    pub tls: Option<Arc<ServerConfig>>,
    /// User name to bcrypt hash; empty: no authentication.
    pub users: Arc<HashMap<String, String>>,
    /// Added to every response.
    pub headers: Arc<Vec<(HeaderName, HeaderValue)>>,
}

/// Says what is configured, never the hashes.
impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.len())
            .field("headers", &self.headers.len())
            .finish()
    }
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let err = |message: String| WebConfigError { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: File = serde_norway::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = file.tls_server_config.map(|t| tls_config(&t, base)).transpose().map_err(err)?;
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                return Err(err(format!(
                    "basic_auth_users.{user}: not a bcrypt hash (htpasswd -nBC 10 {user})"
                )));
            }
        }
        let mut headers = Vec::new();
        for (k, v) in file.http_server_config.map(|h| h.headers).unwrap_or_default() {
            let name =
                HeaderName::try_from(k.as_str()).map_err(|e| err(format!("header {k}: {e}")))?;
            let value =
                HeaderValue::try_from(v.as_str()).map_err(|e| err(format!("header {k}: {e}")))?;
            headers.push((name, value));
        }
        Ok(Self { tls, users: Arc::new(file.basic_auth_users), headers: Arc::new(headers) })
    }

    /// Whether `authorization` (the header's value) names a user with the right password.
    /// bcrypt is slow on purpose: call it off the async runtime.
    pub fn authorized(&self, authorization: Option<&str>) -> bool {
        use base64::Engine as _;
        let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(pair) = String::from_utf8(decoded) else { return false };
        let Some((user, password)) = pair.split_once(':') else { return false };
        self.users.get(user).is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false))
    }
}

fn tls_config(t: &Tls, base: &Path) -> Result<Arc<ServerConfig>, String> {
    let resolve = |p: &PathBuf| if p.is_absolute() { p.clone() } else { base.join(p) };
    let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) else {
        return Err("tls_server_config needs cert_file and key_file".into());
    };
    let (cert, key) = (resolve(cert), resolve(key));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("cert_file {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| format!("key_file {}: {e}", key.display()))?;

    let versions: Vec<&'static rustls::SupportedProtocolVersion> = {
        let rank = |v: &Option<String>, default: u8| match v.as_deref() {
            None => Ok(default),
            Some("TLS12") => Ok(12),
            Some("TLS13") => Ok(13),
            Some(other) => Err(format!("TLS version {other}: twmon serves TLS12 and TLS13")),
        };
        let (min, max) = (rank(&t.min_version, 12)?, rank(&t.max_version, 13)?);
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect()
    };
    if versions.is_empty() {
        return Err("min_version is above max_version".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;

    let auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let roots = || -> Result<Arc<RootCertStore>, String> {
        let Some(ca) = &t.client_ca_file else {
            return Err(format!("client_auth_type {auth} needs client_ca_file"));
        };
        let ca = resolve(ca);
        let mut store = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca)
            .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?
        {
            store
                .add(c.map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?)
                .map_err(|e| e.to_string())?;
        }
        Ok(Arc::new(store))
    };
    let verifier = match auth {
        "NoClientCert" => None,
        "RequireAndVerifyClientCert" => {
            Some(WebPkiClientVerifier::builder_with_provider(roots()?, provider))
        }
        "VerifyClientCertIfGiven" => Some(
            WebPkiClientVerifier::builder_with_provider(roots()?, provider).allow_unauthenticated(),
        ),
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(format!(
                "client_auth_type {auth}: a certificate that is not verified proves nothing; use \
                 RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file"
            ));
        }
        other => {
            return Err(format!("client_auth_type {other}: not one of exporter-toolkit's types"));
        }
    };
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?),
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder.with_single_cert(chain, key).map_err(|e| format!("cert_file and key_file: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
