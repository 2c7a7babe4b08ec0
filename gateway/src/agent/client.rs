//! The runner API from the runner's side: JSON over HTTP(S) with a bearer
//! token, every call bounded by a timeout. HTTPS trusts the system's roots,
//! plus a PEM file given with `--ca-cert` for a gateway with a private CA.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::api::{Deregistered, JobStatus, RegisterRequest, RegisterResponse};
use crate::secret::Secret;

/// One request's bound: connect, send, and read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A long poll (`GET ?wait=`) waits this much longer than it asked for.
const POLL_SLACK: Duration = Duration::from_secs(15);
/// Answers are small JSON; a bigger one is not the gateway's.
const MAX_ANSWER: usize = 1 << 20;
/// A busy gateway (429, 5xx) is asked again this many times per call.
const BUSY_RETRIES: u32 = 6;
/// The longest wait before asking again, whatever `Retry-After` says.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// How the agent proves itself to the gateway.
#[derive(Clone)]
pub enum Credential {
    /// A registration token (or none, for public endpoints).
    Token(Secret<String>),
    /// A fresh GitHub Actions OIDC token for each request, from the job's
    /// token endpoint (`ACTIONS_ID_TOKEN_REQUEST_URL`/`_TOKEN`).
    ActionsOidc {
        url: String,
        request_token: Secret<String>,
        audience: String,
    },
}

pub struct Api {
    base: String,
    credential: Credential,
    http: Client<Https, Full<Bytes>>,
    connector: Https,
}

type Https = hyper_rustls::HttpsConnector<Connect>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP to the gateway, or through the proxy the environment names for its
/// URL (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, read as curl
/// reads them) with an HTTP CONNECT tunnel.
#[derive(Clone)]
pub enum Connect {
    Direct(HttpConnector),
    Proxied(hyper_util::client::legacy::connect::proxy::Tunnel<HttpConnector>),
}

impl Connect {
    /// The way to `base`, deciding once: the agent talks to one host.
    fn to(base: &str, http: HttpConnector) -> Connect {
        let matcher = hyper_util::client::proxy::matcher::Matcher::from_env();
        let proxy = base
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|uri| matcher.intercept(&uri));
        match proxy {
            None => Connect::Direct(http),
            Some(proxy) => {
                let mut tunnel = hyper_util::client::legacy::connect::proxy::Tunnel::new(
                    proxy.uri().clone(),
                    http,
                );
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Connect::Proxied(tunnel)
            }
        }
    }
}

impl tower::Service<hyper::Uri> for Connect {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            Connect::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Connect::Proxied(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        match self {
            Connect::Direct(c) => {
                let connecting = c.call(uri);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Connect::Proxied(c) => {
                let connecting = c.call(uri);
                Box::pin(async move {
                    connecting
                        .await
                        .map_err(|e| format!("through the proxy: {e:?}").into())
                })
            }
        }
    }
}

/// What went wrong, for the CI log.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The gateway answered with an error status.
    #[error("the gateway answered {status}: {message}")]
    Status {
        status: StatusCode,
        message: String,
        /// The `Retry-After` of a 429 or 503, capped.
        retry_after: Option<Duration>,
    },
    /// No answer (network, TLS, timeout); worth retrying.
    #[error("cannot reach the gateway at {base}: {reason}")]
    Transport { base: String, reason: String },
    /// An answer that is not what the call promises (another server, or a
    /// gateway of another version).
    #[error("the answer from {base} is not understood: {reason}")]
    Answer { base: String, reason: String },
}

/// Why a client could not be set up (before any request).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--gateway {0:?}: expected the API's URL, http(s)://host:port")]
    NotAUrl(String),
    #[error("{option} {path}: {source}")]
    CaFile {
        option: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{option} {path}: {source}")]
    CaCert {
        option: &'static str,
        path: String,
        source: rustls::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[source] rustls::Error),
}

/// A TLS client trusting the system's roots plus the PEM certificates in
/// `ca_cert` (named `option` in errors): the agent's API client, and the
/// gateway's PostgreSQL connections.
pub fn tls_client_config(
    ca_cert: Option<&Path>,
    option: &'static str,
) -> Result<rustls::ClientConfig, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_cert {
        use rustls::pki_types::pem::PemObject;
        let shown = || path.display().to_string();
        let file = |source| SetupError::CaFile {
            option,
            path: shown(),
            source,
        };
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(file)? {
            roots
                .add(cert.map_err(file)?)
                .map_err(|source| SetupError::CaCert {
                    option,
                    path: shown(),
                    source,
                })?;
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(SetupError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

impl ApiError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            ApiError::Transport { .. } | ApiError::Answer { .. } => None,
        }
    }

    /// A busy or failing gateway (429, 5xx): worth asking again later.
    pub fn is_busy(&self) -> bool {
        self.status()
            .is_some_and(|s| s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error())
    }

    /// How long to wait before asking again: the gateway's `Retry-After`,
    /// else `fallback`.
    pub fn retry_in(&self, fallback: Duration) -> Duration {
        match self {
            ApiError::Status {
                retry_after: Some(d),
                ..
            } => *d,
            _ => fallback,
        }
    }
}

impl Api {
    pub fn new(
        base: &str,
        token: Secret<String>,
        ca_cert: Option<&Path>,
    ) -> Result<Api, SetupError> {
        Self::with_credential(base, Credential::Token(token), ca_cert)
    }

    pub fn with_credential(
        base: &str,
        credential: Credential,
        ca_cert: Option<&Path>,
    ) -> Result<Api, SetupError> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(SetupError::NotAUrl(base));
        }
        let tls = tls_client_config(ca_cert, "--ca-cert")?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Connect::to(&base, http));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(20))
            .build(connector.clone());
        Ok(Api {
            base,
            credential,
            http,
            connector,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A WebSocket to `path` on the gateway (the tunnel's HTTPS transport):
    /// the same TLS roots, proxy and credential as every call.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            hyper_util::rt::TokioIo<
                hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>,
            >,
        >,
        ApiError,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tower::Service;
        let transport = |reason: String| ApiError::Transport {
            base: self.base.clone(),
            reason,
        };
        let url = format!("{}{path}", self.base);
        let uri: hyper::Uri = url.parse().map_err(|e| transport(format!("{e}")))?;
        let ws_url = url.replacen("http", "ws", 1);
        let mut request = ws_url
            .into_client_request()
            .map_err(|e| transport(e.to_string()))?;
        let bearer = self.bearer().await?;
        let value = format!("Bearer {}", bearer.expose())
            .parse()
            .map_err(|_| transport("the token is not a valid header value".into()))?;
        request
            .headers_mut()
            .insert(hyper::header::AUTHORIZATION, value);
        let connect = async {
            let mut connector = self.connector.clone();
            let stream = tower::ServiceExt::ready(&mut connector)
                .await
                .map_err(|e| transport(e.to_string()))?
                .call(uri)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(crate::wsbridge::MAX_MESSAGE))
                .max_frame_size(Some(crate::wsbridge::MAX_MESSAGE));
            tokio_tungstenite::client_async_with_config(
                request,
                hyper_util::rt::TokioIo::new(stream),
                Some(config),
            )
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(response) => ApiError::Status {
                    status: response.status(),
                    message: response
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).chars().take(200).collect())
                        .unwrap_or_default(),
                    retry_after: None,
                },
                other => transport(other.to_string()),
            })
        };
        let (ws, _) = tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .map_err(|_| {
                transport(format!(
                    "no WebSocket within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            })??;
        Ok(ws)
    }

    /// One call; a busy gateway (429, 5xx) is asked again, up to
    /// [`BUSY_RETRIES`] times, after its `Retry-After` or a doubling backoff.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let mut backoff = Duration::from_secs(1);
        let mut tries = 0;
        loop {
            match self.call_once(method.clone(), path, body, timeout).await {
                Err(e) if e.is_busy() && tries < BUSY_RETRIES => {
                    tries += 1;
                    let wait = e.retry_in(backoff);
                    eprintln!(
                        "ci-gateway runner: {e}; asking again in {}s",
                        wait.as_secs().max(1)
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_RETRY_WAIT);
                }
                other => return other,
            }
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let transport = |reason: String| ApiError::Transport {
            base: self.base.clone(),
            reason,
        };
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| transport(e.to_string()))?),
            None => Bytes::new(),
        };
        let bearer = self.bearer().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(
                hyper::header::USER_AGENT,
                concat!("ci-gateway-runner/", env!("CARGO_PKG_VERSION")),
            );
        if !bearer.expose().is_empty() {
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", bearer.expose()),
            );
        }
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(bytes))
            .map_err(|e| transport(e.to_string()))?;
        let (status, retry_after, body) = self.exchange(request, timeout).await?;
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        Err(ApiError::Status {
            status,
            message,
            retry_after,
        })
    }

    /// The bearer for the next request.
    async fn bearer(&self) -> Result<Secret<String>, ApiError> {
        let (url, request_token, audience) = match &self.credential {
            Credential::Token(t) => return Ok(t.clone()),
            Credential::ActionsOidc {
                url,
                request_token,
                audience,
            } => (url, request_token, audience),
        };
        let failed = |reason: String| ApiError::Transport {
            base: "the Actions OIDC token endpoint".into(),
            reason,
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{url}{separator}audience={audience}"))
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", request_token.expose()),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| failed(e.to_string()))?;
        let (status, _, body) = self
            .exchange(request, REQUEST_TIMEOUT)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match value["value"].as_str() {
            Some(token) if status.is_success() => Ok(Secret::new(token.to_string())),
            _ => Err(failed(format!("answered {status} without a token (does the job have `permissions: id-token: write`?)"))),
        }
    }

    /// Sends `request`; returns the status, a `Retry-After` (seconds, capped
    /// at [`MAX_RETRY_WAIT`]) and the (bounded) body.
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Option<Duration>, Bytes), ApiError> {
        let transport = |reason: String| ApiError::Transport {
            base: self.base.clone(),
            reason,
        };
        let answer = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| transport(error_chain(&e)))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.max(1)).min(MAX_RETRY_WAIT));
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            Ok::<_, ApiError>((status, retry_after, body))
        };
        tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| transport(format!("no answer within {}s", timeout.as_secs())))?
    }

    pub async fn register(
        &self,
        job: &str,
        body: &RegisterRequest,
    ) -> Result<RegisterResponse, ApiError> {
        let body = serde_json::to_value(body).map_err(|e| self.not_understood(e))?;
        let path = format!("/v1/jobs/{job}");
        self.request(Method::PUT, &path, Some(&body), REQUEST_TIMEOUT)
            .await
    }

    pub async fn finish(&self, job: &str) -> Result<JobStatus, ApiError> {
        let path = format!("/v1/jobs/{job}/finished");
        self.request(Method::POST, &path, None, REQUEST_TIMEOUT)
            .await
    }

    /// `POST …/pause` (`paused`) or `…/resume`: the job's breakpoint.
    pub async fn set_paused(&self, job: &str, paused: bool) -> Result<JobStatus, ApiError> {
        let verb = if paused { "pause" } else { "resume" };
        let path = format!("/v1/jobs/{job}/{verb}");
        self.request(Method::POST, &path, None, REQUEST_TIMEOUT)
            .await
    }

    /// The job's state; with `wait`, after its sessions or hold change (or
    /// `wait` passes).
    pub async fn get(&self, job: &str, wait: Option<Duration>) -> Result<JobStatus, ApiError> {
        let (path, timeout) = match wait {
            None => (format!("/v1/jobs/{job}"), REQUEST_TIMEOUT),
            Some(w) => (
                format!("/v1/jobs/{job}?wait={}", w.as_secs()),
                w + POLL_SLACK,
            ),
        };
        self.request(Method::GET, &path, None, timeout).await
    }

    /// Any GET, read as `T` (the GitHub job-id lookup, OIDC discovery).
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ApiError> {
        self.request(Method::GET, path, None, REQUEST_TIMEOUT).await
    }

    /// An operator's call (`ci-gateway admin`).
    pub async fn admin<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ApiError> {
        self.request(method, path, body, REQUEST_TIMEOUT).await
    }

    pub async fn deregister(&self, job: &str) -> Result<Deregistered, ApiError> {
        let path = format!("/v1/jobs/{job}");
        self.request(Method::DELETE, &path, None, REQUEST_TIMEOUT)
            .await
    }

    /// One call whose successful answer is read as the type it promises.
    pub(crate) async fn request<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let answer = self.call(method, path, body, timeout).await?;
        serde_json::from_value(answer).map_err(|e| self.not_understood(e))
    }

    fn not_understood(&self, e: serde_json::Error) -> ApiError {
        ApiError::Answer {
            base: self.base.clone(),
            reason: e.to_string(),
        }
    }
}

/// A hyper error says little at the top; its sources say what happened.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
