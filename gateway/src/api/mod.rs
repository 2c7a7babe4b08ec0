//! The runner API (DESIGN §4): JSON over HTTP(S) under `/v1`, bearer tokens.
//! Calls the registry; never touches SSH. A bad request changes nothing and
//! gets `{"error": "..."}` with a 4xx status.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::access;
use crate::ids::{valid_runner_user, GithubLogin, JobId};
use crate::limits::Spender;
use crate::metrics::Refusal;
use crate::registry::{unix_now, Lookup, Os, Registration, RunnerLogin};
use crate::secret::Secret;
use crate::Gateway;

pub mod serve;

/// An API error: a status and one line.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = match r {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        let text: String = r.body_text().chars().take(300).collect();
        ApiError(status, text)
    }
}

/// Who is calling: a configured registration token (by index), a verified
/// OIDC token, or a job token (checked against the job it names, with the
/// request's source for the wrong-token budget).
#[derive(Debug, Clone)]
pub enum Caller {
    Token(usize),
    Oidc(Arc<crate::oidc::Claims>),
    JobToken(Secret<String>, Option<IpAddr>),
}

/// With an OIDC caller, the identity comes from the token: the body may
/// repeat it but not contradict it. Pure.
pub fn apply_claims(
    job: JobId,
    body: &mut RegisterRequest,
    claims: &crate::oidc::Claims,
) -> Result<(), String> {
    if let Some(check_run) = claims.check_run_id {
        if check_run != job.get() {
            return Err(format!("the token is for job {check_run}, not job {job}"));
        }
    }
    if let Some(actor) = &body.actor {
        if !actor.eq_ignore_ascii_case(&claims.actor) {
            return Err(format!("actor: the token says {}", claims.actor));
        }
    }
    if let Some(repo) = &body.repository {
        if !repo.eq_ignore_ascii_case(&claims.repository) {
            return Err(format!("repository: the token says {}", claims.repository));
        }
    }
    if let (Some(run), Some(token_run)) = (body.run_id, claims.run_id) {
        if run != token_run {
            return Err(format!("run_id: the token says {token_run}"));
        }
    }
    body.actor = Some(claims.actor.clone());
    body.repository = Some(claims.repository.clone());
    body.run_id = claims.run_id.or(body.run_id);
    Ok(())
}

/// Whether `caller` may act on the registered `job` (DESIGN §4): its job
/// token, or an OIDC token whose `check_run_id` is this job. A registration
/// token may only create jobs.
fn authorize(gw: &Gateway, caller: &Caller, job: &Registration) -> Result<(), ApiError> {
    let id = job.job_id;
    match caller {
        Caller::JobToken(token, source) => {
            if job.token_matches(token.expose()) {
                return Ok(());
            }
            tracing::info!(job = %id, source = ?source, "API request refused: a job token that is not this job's");
            if let Some(wait) = source.and_then(|ip| gw.api_limits.bad_token(ip)) {
                return Err(ApiError(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many requests with a wrong token from your address; retry in {}s",
                        wait.as_secs().max(1)
                    ),
                ));
            }
            Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("this job token is not job {id}'s"),
            ))
        }
        Caller::Oidc(claims) if claims.check_run_id == Some(id.get()) => Ok(()),
        Caller::Oidc(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this OIDC token is not for job {id} (its check_run_id differs or is missing); use the job token"),
        )),
        Caller::Token(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "job {id} is registered: a registration token may only create jobs; calls on a job \
                 need its job token (the agent keeps it in its state file)"
            ),
        )),
    }
}

/// The registered job `job`, if `caller` may act on it; `404` for an unknown
/// job and `410` for an ended one (nothing changes either way).
fn authorized(
    gw: &Gateway,
    caller: &Caller,
    job: JobId,
) -> Result<(Arc<Registration>, Arc<crate::registry::Live>), ApiError> {
    match gw.registry.lookup(job) {
        Lookup::Active(reg, live) => {
            authorize(gw, caller, &reg)?;
            Ok((reg, live))
        }
        Lookup::Ended(reason) => Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => Err(unknown_job(gw, caller, job)),
    }
}

/// `404` for a job nobody registered. A job token naming such a job cannot
/// be anyone's, so it spends the source's wrong-token budget (else forged
/// tokens over many ids would cost nothing).
fn unknown_job(gw: &Gateway, caller: &Caller, job: JobId) -> ApiError {
    if let Caller::JobToken(_, Some(source)) = caller {
        let _ = gw.api_limits.bad_token(*source);
    }
    not_registered(job)
}

fn not_registered(job: JobId) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("job {job} is not registered"),
    )
}

fn store_error(e: crate::registry::StoreError) -> ApiError {
    use crate::registry::StoreError as E;
    match e {
        E::Ended(reason) => ApiError(StatusCode::GONE, reason),
        E::Unknown(job) => not_registered(job),
        E::Exists(job) => ApiError(
            StatusCode::CONFLICT,
            format!("job {job} is already registered; a refresh needs its job token"),
        ),
        E::Conflict(field) => ApiError(StatusCode::CONFLICT, field),
        E::Full(_) | E::Db(_) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

pub fn router(gw: Arc<Gateway>) -> Router {
    let max_body = gw.config.api.max_body_bytes;
    Router::new()
        .route(
            "/v1/jobs/{job_id}",
            get(get_job).put(put_job).delete(delete_job),
        )
        .route("/v1/jobs/{job_id}/finished", post(finish_job))
        .layer(middleware::from_fn_with_state(gw.clone(), require_token))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(gw.clone(), deadline))
        .with_state(gw)
}

/// Every request, body included, is done within `api.request_timeout` (plus
/// the long-poll wait for a GET), so a client trickling a body cannot hold a
/// connection.
async fn deadline(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let mut limit = gw.config.api.request_timeout;
    if request.method() == axum::http::Method::GET {
        limit += std::time::Duration::from_secs(MAX_WAIT_SECONDS);
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request took longer than {}s", limit.as_secs()),
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

async fn require_token(
    State(gw): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(wait) = source.and_then(|ip| gw.api_limits.source_blocked(ip)) {
        return too_many(
            &gw,
            Refusal::ApiBadToken,
            wait,
            "too many requests with a wrong token from your address",
        );
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Every token is compared (constant time each), so the time taken does
    // not say which one nearly matched.
    let matched = presented.and_then(|p| {
        gw.tokens.iter().enumerate().fold(None, |found, (i, t)| {
            let eq = crate::secret::constant_time_eq(t.expose().as_bytes(), p.as_bytes());
            found.or(eq.then_some(i))
        })
    });
    let caller = match (matched, presented, &gw.oidc) {
        (Some(index), _, _) => Ok(Caller::Token(index)),
        (None, Some(p), _) if p.starts_with(crate::secret::JOB_TOKEN_PREFIX) && p.len() < 100 => {
            Ok(Caller::JobToken(Secret::new(p.to_string()), source))
        }
        (None, Some(p), Some(verifier)) if crate::oidc::Verifier::looks_like_jwt(p) => {
            match verifier.verify(p).await {
                Ok(claims) => Ok(Caller::Oidc(Arc::new(claims))),
                Err(reason) => Err(format!("OIDC token refused: {reason}")),
            }
        }
        _ => Err("missing or unknown bearer token".to_string()),
    };
    let caller = match caller {
        Ok(c) => c,
        Err(reason) => {
            tracing::info!(source = ?source, "API request refused: {reason}");
            if let Some(wait) = source.and_then(|ip| gw.api_limits.bad_token(ip)) {
                return too_many(
                    &gw,
                    Refusal::ApiBadToken,
                    wait,
                    "too many requests with a wrong token from your address",
                );
            }
            return ApiError(StatusCode::UNAUTHORIZED, reason).into_response();
        }
    };
    let key;
    let spender = match &caller {
        Caller::Token(i) => {
            key = format!("token-{i}");
            Spender::Shared(&key)
        }
        Caller::Oidc(c) => {
            key = format!("oidc:{}", c.repository.to_lowercase());
            Spender::Shared(&key)
        }
        // Keyed by the job the path names (an id, so the key space is what
        // the wrong-token budget per source already bounds).
        Caller::JobToken(..) => {
            key = request
                .uri()
                .path()
                .trim_start_matches("/v1/jobs/")
                .split('/')
                .next()
                .unwrap_or_default()
                .chars()
                .take(24)
                .collect();
            Spender::Job(&key)
        }
    };
    if let Err((wait, kind)) = gw.api_limits.request(spender, source) {
        let why = match kind {
            Refusal::ApiSource => "your address is over its request rate",
            _ => "this token is over its request rate",
        };
        return too_many(&gw, kind, wait, why);
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn too_many(gw: &Gateway, kind: Refusal, wait: std::time::Duration, what: &str) -> Response {
    gw.metrics.refused(kind);
    let secs = wait.as_secs().max(1);
    let mut response = ApiError(
        StatusCode::TOO_MANY_REQUESTS,
        format!("{what}; retry in {secs}s"),
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(secs),
    );
    response
}

fn job_id(raw: &str) -> Result<JobId, ApiError> {
    JobId::parse(raw).map_err(|e| ApiError::bad(format!("job id {:?}: {e}", truncate(raw))))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The body of `PUT /v1/jobs/{job_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Required with a static token; with an OIDC token it comes from the
    /// token (and must agree if given).
    #[serde(default)]
    pub actor: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    pub user: String,
    pub host_keys: Vec<String>,
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub run_id: Option<u64>,
    #[serde(default)]
    pub os: Option<Os>,
    #[serde(default)]
    pub allowed_users: Vec<String>,
    /// How the gateway logs in to the runner in job mode; default `key` for
    /// Windows, `certificate` otherwise.
    #[serde(default)]
    pub runner_login: Option<RunnerLogin>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub job_id: String,
    /// Only in the answer that created the job (`201`): every later call on
    /// the job needs it. Shown once; the gateway keeps only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_token: Option<String>,
    pub authorized_keys: Vec<String>,
    /// Job mode: `ssh <job>@gateway`.
    pub ssh_command: String,
    /// Jump mode for the job's actor (others put their own login).
    pub jump_command: String,
    /// An `~/.ssh/config` block that makes `ssh job-<id>` work.
    pub ssh_config: String,
    /// The RDP forward, for Windows runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdp_command: Option<String>,
    /// Re-register at least this often, or the registration expires.
    pub refresh_seconds: u64,
    pub hold_max_seconds: u64,
}

/// The commands a user copies from the CI log; pure.
pub fn user_commands(
    public: &crate::config::PublicAddress,
    job: &Registration,
) -> (String, String, String, Option<String>) {
    let id = job.job_id;
    let p = public.port_flag();
    let host = &public.host;
    let ssh = format!("ssh {p}{id}@{host}");
    // `job-<id>`: OpenSSH would read a bare number up to 2^32 as an IPv4 address.
    let jump = format!(
        "ssh -J {}@{} {}@job-{id}",
        job.actor,
        public.jump_spec(),
        job.user
    );
    let config = format!(
        "Host job-*\n  User {}\n  ProxyJump {}@{}\n",
        job.user,
        job.actor,
        public.jump_spec()
    );
    let rdp =
        (job.os == Os::Windows).then(|| format!("ssh {p}-N -L 3389:localhost:3389 {id}@{host}"));
    (ssh, jump, config, rdp)
}

/// Why a registration body is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    /// `400`: a field is malformed or not allowed; names the field.
    Bad(String),
    /// `409`: a refresh tried to change a field fixed at creation.
    Changed(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Bad(m) | Invalid::Changed(m) => f.write_str(m),
        }
    }
}

impl From<String> for Invalid {
    fn from(s: String) -> Invalid {
        Invalid::Bad(s)
    }
}

impl From<&str> for Invalid {
    fn from(s: &str) -> Invalid {
        Invalid::Bad(s.to_string())
    }
}

/// Checks a registration body (a creation when `previous` is `None`, else a
/// refresh of `previous`); pure, so it is unit-tested without a server. The
/// result has no token hash: the caller sets it at creation.
pub fn validate(
    job: JobId,
    body: RegisterRequest,
    source: IpAddr,
    now: u64,
    networks: &[crate::address::Cidr],
    previous: Option<&Registration>,
) -> Result<Registration, Invalid> {
    let actor = GithubLogin::parse(body.actor.as_deref().ok_or("actor: required")?)
        .map_err(|e| format!("actor: {e}"))?;
    if !valid_runner_user(&body.user) {
        return Err("user: not a valid account name".into());
    }
    let named = match body.host.as_deref() {
        None | Some("") => None,
        Some(h) => Some(
            h.parse::<IpAddr>()
                .map_err(|_| "host: must be an IP address".to_string())?
                .to_canonical(),
        ),
    };
    let host = match (named, previous) {
        // A refresh that names no host, or the same one, keeps it (it was
        // checked when the job was created).
        (None, Some(p)) => p.host,
        (Some(h), Some(p)) if h == p.host => p.host,
        _ => crate::address::registration_host(named, source, networks)
            .map_err(|e| format!("host: {e}"))?,
    };
    let port = match (body.port, previous) {
        (None, Some(p)) => p.port,
        (port, _) => port.unwrap_or(22),
    };
    if port == 0 {
        return Err("port: must be 1..=65535".into());
    }
    if body.host_keys.is_empty() || body.host_keys.len() > 16 {
        return Err("host_keys: give 1 to 16 keys".into());
    }
    let mut host_keys = Vec::with_capacity(body.host_keys.len());
    for (i, k) in body.host_keys.iter().enumerate() {
        let key = crate::keys::parse_public_key(k).map_err(|e| format!("host_keys[{i}]: {e}"))?;
        host_keys.push(crate::keys::openssh_line(&key));
    }
    if body.allowed_users.len() > 64 {
        return Err("allowed_users: at most 64".into());
    }
    let allowed_users = body
        .allowed_users
        .iter()
        .map(|u| GithubLogin::parse(u).map_err(|e| format!("allowed_users: {u:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(repo) = &body.repository {
        let ok = repo.len() <= 200
            && repo.split('/').count() == 2
            && repo
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !ok {
            return Err("repository: expected owner/name".into());
        }
    }
    let os = body.os.unwrap_or_default();
    let runner_login = body.runner_login.unwrap_or(match os {
        Os::Windows => RunnerLogin::Key,
        Os::Linux | Os::Macos => RunnerLogin::Certificate,
    });
    let next = Registration {
        job_id: job,
        actor,
        host,
        port,
        user: body.user,
        host_keys,
        repository: body.repository,
        run_id: body.run_id,
        os,
        allowed_users,
        registered_at: previous.map(|p| p.registered_at).unwrap_or(now),
        refreshed_at: now,
        finished_at: previous.and_then(|p| p.finished_at),
        runner_login,
        token_hash: previous.map(|p| p.token_hash.clone()).unwrap_or_default(),
        version: previous.map(|p| p.version).unwrap_or(0),
    };
    if let Some(p) = previous {
        unchanged(p, &next).map_err(Invalid::Changed)?;
    }
    Ok(next)
}

/// A refresh cannot change what the job is (DESIGN §4): names the first
/// field that differs. Pure.
pub fn unchanged(previous: &Registration, next: &Registration) -> Result<(), String> {
    let fixed = |field: &str, was: String, now: String| {
        if was == now {
            Ok(())
        } else {
            Err(format!(
                "{field}: fixed when the job was registered ({was}); a refresh cannot change it to {now}"
            ))
        }
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    fixed("host", previous.host.to_string(), next.host.to_string())?;
    fixed("port", previous.port.to_string(), next.port.to_string())?;
    if previous.host_keys != next.host_keys {
        return Err(
            "host_keys: fixed when the job was registered; a refresh cannot change them".into(),
        );
    }
    fixed("user", previous.user.clone(), next.user.clone())?;
    fixed("os", format!("{:?}", previous.os), format!("{:?}", next.os))?;
    fixed("actor", previous.actor.to_string(), next.actor.to_string())?;
    fixed(
        "repository",
        opt(&previous.repository),
        opt(&next.repository),
    )?;
    fixed(
        "run_id",
        format!("{:?}", previous.run_id),
        format!("{:?}", next.run_id),
    )?;
    fixed(
        "runner_login",
        format!("{:?}", previous.runner_login),
        format!("{:?}", next.runner_login),
    )
}

/// `PUT /v1/jobs/{id}`: creates a job (registration token, or the job's own
/// OIDC token) and answers `201` with its job token; or refreshes it (job
/// token or OIDC token of this job), answering `200`.
async fn put_job(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let job = job_id(&raw)?;
    let Json(mut body) = body?;
    if let Caller::Oidc(claims) = &caller {
        apply_claims(job, &mut body, claims).map_err(|e| ApiError(StatusCode::FORBIDDEN, e))?;
    }
    let networks = &gw.config.registration.runner_networks;
    let now = unix_now();
    let (registration, job_token) = match gw.registry.lookup(job) {
        // Job ids are not reused (a re-run gets new ones): an ended job stays
        // ended, so a late refresh cannot bring a released runner back.
        Lookup::Ended(reason) => return Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Active(previous, _) => {
            authorize(&gw, &caller, &previous)?;
            let next =
                validate(job, body, peer.ip(), now, networks, Some(&previous)).map_err(invalid)?;
            let reg = gw
                .registry
                .update(job, move |current| {
                    // Against the record as it is at the write, not as read.
                    unchanged(current, &next).map_err(crate::registry::StoreError::Conflict)?;
                    let mut updated = current.clone();
                    updated.refreshed_at = now;
                    updated.allowed_users = next.allowed_users;
                    Ok(updated)
                })
                .await
                .map_err(store_error)?;
            (reg, None)
        }
        Lookup::Unknown => {
            match &caller {
                Caller::Token(_) => {}
                Caller::Oidc(claims) => confirm_unclaimed_job(&gw, job, claims).await?,
                Caller::JobToken(..) => return Err(unknown_job(&gw, &caller, job)),
            }
            let mut reg = validate(job, body, peer.ip(), now, networks, None).map_err(invalid)?;
            gw.dialable(SocketAddr::new(reg.host, reg.port))
                .map_err(|e| ApiError::bad(format!("host: {e}")))?;
            let (token, hash) = crate::secret::new_job_token();
            reg.token_hash = hash.to_hex();
            let key = match reg.runner_login {
                RunnerLogin::Certificate => None,
                RunnerLogin::Key => Some(
                    russh::keys::PrivateKey::random(
                        &mut rand::rng(),
                        russh::keys::Algorithm::Ed25519,
                    )
                    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
                ),
            };
            let reg = gw.registry.create(reg, key).await.map_err(store_error)?;
            (reg, Some(token))
        }
    };
    let created = job_token.is_some();
    tracing::info!(job = %job, actor = %registration.actor, host = %registration.host, port = registration.port, created, "job registered");
    if created {
        gw.audit.record(
            "job_registered",
            json!({
                "job": job.to_string(),
                "actor": registration.actor.as_str(),
                "allowed_users": registration.allowed_users.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
                "host": registration.host.to_string(),
                "port": registration.port,
                "user": registration.user,
                "os": registration.os,
                "runner_login": registration.runner_login,
                "repository": registration.repository,
                "run_id": registration.run_id,
                "source": peer.ip().to_string(),
                "credential": match &caller {
                    Caller::Token(i) => format!("token #{i}"),
                    Caller::Oidc(_) => "oidc".to_string(),
                    Caller::JobToken(..) => "job token".to_string(),
                },
            }),
        );
    }
    let authorized_keys = authorized_keys(&gw, &registration, peer.ip()).await;
    let (ssh_command, jump_command, ssh_config, rdp_command) =
        user_commands(&gw.config.public_address(), &registration);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(RegisterResponse {
            job_id: job.to_string(),
            job_token: job_token.map(|t| t.expose().clone()),
            authorized_keys,
            ssh_command,
            jump_command,
            ssh_config,
            rdp_command,
            refresh_seconds: (gw.config.registration.ttl.as_secs() / 3).max(1),
            hold_max_seconds: gw.config.hold.max.as_secs(),
        }),
    ))
}

fn invalid(e: Invalid) -> ApiError {
    match e {
        Invalid::Bad(m) => ApiError::bad(m),
        Invalid::Changed(m) => ApiError(StatusCode::CONFLICT, m),
    }
}

/// An OIDC token without `check_run_id` (GitHub Enterprise Server) creates
/// a job only when GitHub's API confirms the job belongs to the token's
/// repository and run (DESIGN §4).
async fn confirm_unclaimed_job(
    gw: &Gateway,
    job: JobId,
    claims: &crate::oidc::Claims,
) -> Result<(), ApiError> {
    if claims.check_run_id.is_some() {
        return Ok(()); // apply_claims checked it is this job
    }
    let refused = |why: String| {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "the OIDC token has no check_run_id and {why}; a job is only registered when \
                 GitHub confirms it belongs to the token's run"
            ),
        )
    };
    let Some(run) = claims.run_id else {
        return Err(refused("no run_id".into()));
    };
    match gw.keys.job_run(&claims.repository, job).await {
        Ok(Some(found)) if found == run => Ok(()),
        Ok(Some(other)) => Err(refused(format!(
            "GitHub says job {job} is in run {other}, not {run}"
        ))),
        Ok(None) => Err(refused(format!(
            "GitHub knows no job {job} in {}",
            claims.repository
        ))),
        Err(e) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot confirm job {job} with GitHub: {e}"),
        )),
    }
}

/// The lines the runner installs: the gateway's CA restricted to this job's
/// principal (or this job's own key), then the allowed people's own keys
/// (jump mode).
async fn authorized_keys(gw: &Gateway, job: &Registration, source: IpAddr) -> Vec<String> {
    let mut lines = Vec::new();
    match job.runner_login {
        RunnerLogin::Key => {
            if let Some(key) = gw.registry.runner_key(job.job_id) {
                lines.push(format!(
                    "no-agent-forwarding,no-X11-forwarding {} {}",
                    crate::keys::openssh_line(key.public_key()),
                    job.principal()
                ));
            }
        }
        RunnerLogin::Certificate => lines.push(format!(
            "cert-authority,principals=\"{}\" {} ci-gateway",
            job.principal(),
            crate::keys::openssh_line(gw.ca.public_key())
        )),
    }
    for login in access::allowed_people(job, &gw.policy) {
        // The actor and the admins always; a listed user's uncached keys
        // spend the caller's lookup budget, so a body of 64 made-up names
        // cannot spend the gateway's GitHub rate limit on every PUT.
        let listed = login != job.actor && !gw.policy.admins.contains(&login);
        if listed && !gw.keys.is_fresh(&login).await {
            if let Some(wait) = gw.github_lookups.spend(source) {
                gw.metrics.refused(Refusal::GithubLookups);
                tracing::warn!(job = %job.job_id, %login, "jump-mode keys left out: the caller's GitHub lookup budget is spent for {}s", wait.as_secs());
                continue;
            }
        }
        match gw.keys.keys(&login).await {
            Ok(keys) => {
                for key in keys.iter() {
                    lines.push(format!("{} {login}", crate::keys::openssh_line(key)));
                }
            }
            Err(e) => tracing::warn!(job = %job.job_id, "jump-mode keys left out: {e}"),
        }
    }
    lines
}

/// `GET /v1/jobs/{id}?wait=N`: with `wait`, answers when the job's sessions
/// or hold change, or after N seconds (at most [`MAX_WAIT_SECONDS`]): the
/// runner's `wait` long-polls instead of hammering the API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    #[serde(default)]
    wait: Option<u64>,
}

pub const MAX_WAIT_SECONDS: u64 = 25;

async fn get_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    query: Result<axum::extract::Query<GetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job)?;
    let axum::extract::Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    if let (Some(wait), Lookup::Active(_, live)) = (query.wait, gw.registry.lookup(job)) {
        let mut sessions = live.watch_sessions();
        let mut kick = live.watch_kick();
        let limit = std::time::Duration::from_secs(wait.min(MAX_WAIT_SECONDS));
        // A change of the count, a kick (the job ended), or the time is up.
        let _ = tokio::time::timeout(limit, async {
            if kick.borrow_and_update().is_some() {
                return;
            }
            tokio::select! {
                _ = sessions.changed() => {}
                _ = kick.changed() => {}
            }
        })
        .await;
        // Let the hold task act on the change before answering.
        tokio::task::yield_now().await;
    }
    match gw.registry.lookup(job) {
        Lookup::Active(reg, live) => Ok(Json(job_json(&gw, &reg, &live)?)),
        Lookup::Ended(reason) => Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("job {job} is not registered"),
        )),
    }
}

/// What `GET` shows of a job to its own runner: the registration without
/// the token hash or the store's version.
#[derive(Serialize)]
struct JobView<'a> {
    job_id: JobId,
    actor: &'a GithubLogin,
    host: IpAddr,
    port: u16,
    user: &'a str,
    host_keys: &'a [String],
    repository: Option<&'a str>,
    run_id: Option<u64>,
    os: Os,
    runner_login: RunnerLogin,
    allowed_users: &'a [GithubLogin],
    registered_at: u64,
    refreshed_at: u64,
    finished_at: Option<u64>,
}

impl<'a> JobView<'a> {
    fn of(r: &'a Registration) -> JobView<'a> {
        JobView {
            job_id: r.job_id,
            actor: &r.actor,
            host: r.host,
            port: r.port,
            user: &r.user,
            host_keys: &r.host_keys,
            repository: r.repository.as_deref(),
            run_id: r.run_id,
            os: r.os,
            runner_login: r.runner_login,
            allowed_users: &r.allowed_users,
            registered_at: r.registered_at,
            refreshed_at: r.refreshed_at,
            finished_at: r.finished_at,
        }
    }
}

fn job_json(
    gw: &Gateway,
    reg: &Registration,
    live: &crate::registry::Live,
) -> Result<serde_json::Value, ApiError> {
    let mut value = serde_json::to_value(JobView::of(reg))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let who = live.sessions();
    value["active_sessions"] = json!(who.len());
    value["sessions"] = json!(who);
    value["hold"] = crate::hold::describe(gw, reg, who.len());
    Ok(value)
}

async fn finish_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job)?;
    let (reg, newly) = gw.registry.mark_finished(job).await.map_err(store_error)?;
    let Lookup::Active(_, live) = gw.registry.lookup(job) else {
        return Err(ApiError(StatusCode::GONE, format!("job {job} ended")));
    };
    // The answer is computed before the hold task runs, so a runner with
    // nobody connected reads "released" here and need not poll at all.
    let value = job_json(&gw, &reg, &live)?;
    if newly {
        tracing::info!(job = %job, sessions = live.active_sessions(), "job finished; hold starts");
        gw.audit.record(
            "job_finished",
            json!({"job": job.to_string(), "sessions": live.active_sessions(), "hold": value["hold"]["state"]}),
        );
        crate::hold::start(gw.clone(), job);
    }
    Ok(Json(value))
}

async fn delete_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job)?;
    let reason = format!("job {job} ended: the runner deregistered it");
    let existed = gw
        .end_job(job, "deregistered", reason)
        .await
        .map_err(store_error)?;
    if !existed {
        // It ended between the check and the removal (a hold, an expiry).
        return Err(match gw.registry.lookup(job) {
            Lookup::Ended(reason) => ApiError(StatusCode::GONE, reason),
            _ => not_registered(job),
        });
    }
    tracing::info!(job = %job, "job deregistered");
    Ok(Json(
        json!({ "job_id": job.to_string(), "deregistered": existed }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl host";

    fn body(json: serde_json::Value) -> RegisterRequest {
        serde_json::from_value(json).expect("shape")
    }

    fn job() -> JobId {
        JobId::parse("42").expect("id")
    }

    #[test]
    fn minimal_registration_takes_defaults_from_the_request() {
        let reg = validate(
            job(),
            body(json!({"actor": "OctoCat", "user": "runner", "host_keys": [KEY]})),
            "10.0.0.9".parse().expect("ip"),
            100,
            &[],
            None,
        )
        .expect("valid");
        assert_eq!(reg.actor.as_str(), "octocat");
        assert_eq!(reg.host.to_string(), "10.0.0.9");
        assert_eq!(reg.port, 22);
        assert_eq!(reg.os, Os::Linux);
        assert!(!reg.host_keys[0].ends_with("host"), "comment is dropped");
    }

    #[test]
    fn bad_fields_are_named() {
        let src: IpAddr = "10.0.0.9".parse().expect("ip");
        let cases = [
            (
                json!({"actor": "-x", "user": "runner", "host_keys": [KEY]}),
                "actor",
            ),
            (
                json!({"actor": "a", "user": "a b", "host_keys": [KEY]}),
                "user",
            ),
            (
                json!({"actor": "a", "user": "r", "host_keys": []}),
                "host_keys",
            ),
            (
                json!({"actor": "a", "user": "r", "host_keys": ["nope"]}),
                "host_keys[0]",
            ),
            (
                json!({"actor": "a", "user": "r", "host_keys": [KEY], "host": "example.com"}),
                "host",
            ),
            (
                json!({"actor": "a", "user": "r", "host_keys": [KEY], "host": "0.0.0.0"}),
                "host",
            ),
            (
                json!({"actor": "a", "user": "r", "host_keys": [KEY], "allowed_users": ["no way"]}),
                "allowed_users",
            ),
            (
                json!({"actor": "a", "user": "r", "host_keys": [KEY], "repository": "../../etc"}),
                "repository",
            ),
        ];
        for (json, field) in cases {
            let err = validate(job(), body(json.clone()), src, 1, &[], None).expect_err("invalid");
            assert!(err.to_string().starts_with(field), "{json}: {err}");
        }
    }

    #[test]
    fn user_commands_follow_the_public_address_and_os() {
        use crate::config::PublicAddress;
        let mut reg = validate(
            job(),
            body(json!({"actor": "octocat", "user": "runner", "host_keys": [KEY]})),
            "10.0.0.9".parse().expect("ip"),
            1,
            &[],
            None,
        )
        .expect("valid");
        let default_port = PublicAddress::parse("gw.example.com").expect("addr");
        let (ssh, jump, config, rdp) = user_commands(&default_port, &reg);
        assert_eq!(ssh, "ssh 42@gw.example.com");
        assert_eq!(jump, "ssh -J octocat@gw.example.com runner@job-42");
        assert_eq!(
            config,
            "Host job-*\n  User runner\n  ProxyJump octocat@gw.example.com\n"
        );
        assert_eq!(rdp, None);
        reg.os = Os::Windows;
        let other = PublicAddress::parse("[::1]:2222").expect("addr");
        let (ssh, jump, _, rdp) = user_commands(&other, &reg);
        assert_eq!(ssh, "ssh -p 2222 42@::1");
        assert_eq!(jump, "ssh -J octocat@[::1]:2222 runner@job-42");
        assert_eq!(
            rdp.as_deref(),
            Some("ssh -p 2222 -N -L 3389:localhost:3389 42@::1")
        );
    }

    #[test]
    fn oidc_claims_rule_the_identity() {
        let claims = crate::oidc::Claims {
            actor: "octocat".into(),
            repository: "acme/widgets".into(),
            run_id: Some(77),
            check_run_id: Some(42),
        };
        // Nothing in the body: taken from the token.
        let mut b = body(json!({"user": "runner", "host_keys": [KEY]}));
        apply_claims(job(), &mut b, &claims).expect("ok");
        assert_eq!(b.actor.as_deref(), Some("octocat"));
        assert_eq!(b.repository.as_deref(), Some("acme/widgets"));
        assert_eq!(b.run_id, Some(77));
        // The same, repeated (any case): fine.
        let mut b = body(
            json!({"actor": "OctoCat", "repository": "acme/widgets", "run_id": 77, "user": "r", "host_keys": [KEY]}),
        );
        apply_claims(job(), &mut b, &claims).expect("agreeing body");
        // Anything contradicting the token is refused, naming the field.
        for (json, field) in [
            (
                json!({"actor": "mallory", "user": "r", "host_keys": [KEY]}),
                "actor",
            ),
            (
                json!({"repository": "evil/repo", "user": "r", "host_keys": [KEY]}),
                "repository",
            ),
            (
                json!({"run_id": 1, "user": "r", "host_keys": [KEY]}),
                "run_id",
            ),
        ] {
            let mut b = body(json);
            let err = apply_claims(job(), &mut b, &claims).expect_err("contradiction");
            assert!(err.starts_with(field), "{err}");
        }
        let mut b = body(json!({"user": "r", "host_keys": [KEY]}));
        let other_job = JobId::parse("43").expect("id");
        let err = apply_claims(other_job, &mut b, &claims).expect_err("other job");
        assert!(err.contains("job 42"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<RegisterRequest, _> = serde_json::from_value(
            json!({"actor": "a", "user": "r", "host_keys": [KEY], "admin": true}),
        );
        assert!(r.is_err());
    }

    #[test]
    fn a_refresh_keeps_the_first_registration_time() {
        let src: IpAddr = "10.0.0.9".parse().expect("ip");
        let first = validate(
            job(),
            body(json!({"actor": "a", "user": "r", "host_keys": [KEY]})),
            src,
            5,
            &[],
            None,
        )
        .expect("ok");
        let again = validate(
            job(),
            body(json!({"actor": "a", "user": "r", "host_keys": [KEY]})),
            src,
            9,
            &[],
            Some(&first),
        )
        .expect("ok");
        assert_eq!(again.registered_at, 5);
        assert_eq!(again.refreshed_at, 9);
    }

    #[test]
    fn a_refresh_cannot_change_what_the_job_is() {
        let src: IpAddr = "127.0.0.1".parse().expect("ip");
        let nets = [crate::address::Cidr::parse("127.0.0.0/8").expect("net")];
        let base = json!({"actor": "octocat", "user": "runner", "host_keys": [KEY],
            "host": "127.0.0.5", "port": 2022, "repository": "acme/widgets", "run_id": 7});
        let first = validate(job(), body(base.clone()), src, 1, &nets, None).expect("ok");
        const OTHER_KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDt0Qq0bUv7fN6VUWUF1oVqzLRmIJVYyV4h4eF3t7kNL x";
        let changes = [
            ("host", json!("127.0.0.6")),
            ("port", json!(22)),
            ("host_keys", json!([OTHER_KEY])),
            ("user", json!("root")),
            ("os", json!("windows")),
            ("actor", json!("mallory")),
            ("repository", json!("evil/repo")),
            ("run_id", json!(8)),
            ("runner_login", json!("key")),
        ];
        for (field, value) in changes {
            let mut changed = base.clone();
            changed[field] = value;
            match validate(job(), body(changed), src, 2, &nets, Some(&first)) {
                Err(Invalid::Changed(m)) => assert!(m.starts_with(field), "{field}: {m}"),
                other => panic!("{field}: expected a 409, got {other:?}"),
            }
        }
        // The same again, or with host and port left out, is a refresh.
        let same = validate(job(), body(base.clone()), src, 3, &nets, Some(&first)).expect("same");
        assert_eq!(same.refreshed_at, 3);
        let mut bare = base.clone();
        bare.as_object_mut().expect("obj").remove("host");
        bare.as_object_mut().expect("obj").remove("port");
        let kept = validate(
            job(),
            body(bare),
            "10.9.9.9".parse().expect("ip"),
            4,
            &nets,
            Some(&first),
        )
        .expect("omitted fields are kept");
        assert_eq!((kept.host, kept.port), (first.host, first.port));
        // Who else may enter is the job's own runner's to change.
        let mut more = base.clone();
        more["allowed_users"] = json!(["hubot"]);
        let r = validate(job(), body(more), src, 5, &nets, Some(&first)).expect("mutable");
        assert_eq!(r.allowed_users[0].as_str(), "hubot");
    }

    #[test]
    fn the_registered_host_follows_the_address_rules() {
        let src: IpAddr = "127.0.0.1".parse().expect("ip");
        let nets = [crate::address::Cidr::parse("127.0.0.0/8").expect("net")];
        for bad in [
            "::1",
            "169.254.169.254",
            "fe80::1",
            "10.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            let b = body(json!({"actor": "a", "user": "r", "host_keys": [KEY], "host": bad}));
            match validate(job(), b, src, 1, &nets, None) {
                Err(Invalid::Bad(m)) => assert!(m.starts_with("host: "), "{bad}: {m}"),
                other => panic!("{bad}: expected a 400, got {other:?}"),
            }
        }
        let b = body(
            json!({"actor": "a", "user": "r", "host_keys": [KEY], "host": "::ffff:127.0.0.5"}),
        );
        let reg = validate(job(), b, src, 1, &nets, None).expect("mapped loopback is in 127/8");
        assert_eq!(reg.host.to_string(), "127.0.0.5");
    }

    #[test]
    fn the_login_method_defaults_by_os() {
        let src: IpAddr = "10.0.0.9".parse().expect("ip");
        let base = json!({"actor": "a", "user": "r", "host_keys": [KEY]});
        for (extra, expected) in [
            (json!({}), RunnerLogin::Certificate),
            (json!({"os": "windows"}), RunnerLogin::Key),
            (json!({"os": "macos"}), RunnerLogin::Certificate),
            (json!({"runner_login": "key"}), RunnerLogin::Key),
            (
                json!({"os": "windows", "runner_login": "certificate"}),
                RunnerLogin::Certificate,
            ),
        ] {
            let mut b = base.clone();
            for (k, v) in extra.as_object().expect("obj") {
                b[k] = v.clone();
            }
            let reg = validate(job(), body(b), src, 1, &[], None).expect("ok");
            assert_eq!(reg.runner_login, expected, "{extra}");
            assert_eq!(reg.principal(), "ci-gateway-job-42");
        }
    }

    #[test]
    fn the_job_view_never_shows_the_token_hash() {
        let src: IpAddr = "10.0.0.9".parse().expect("ip");
        let mut reg = validate(
            job(),
            body(json!({"actor": "a", "user": "r", "host_keys": [KEY]})),
            src,
            1,
            &[],
            None,
        )
        .expect("ok");
        let (token, hash) = crate::secret::new_job_token();
        reg.token_hash = hash.to_hex();
        let text = serde_json::to_string(&JobView::of(&reg)).expect("json");
        assert!(!text.contains(&reg.token_hash), "{text}");
        assert!(!text.contains(token.expose().as_str()));
        assert!(!text.contains("token"), "{text}");
        assert!(reg.token_matches(token.expose()));
        let (other, _) = crate::secret::new_job_token();
        assert!(!reg.token_matches(other.expose()));
    }
}
