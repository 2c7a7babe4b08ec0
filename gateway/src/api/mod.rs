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
use crate::registry::{unix_now, Lookup, Os, Registration};
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

/// Who is calling: a configured token (by index) or a verified OIDC token.
#[derive(Debug, Clone)]
pub enum Caller {
    Token(usize),
    Oidc(Arc<crate::oidc::Claims>),
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

/// Whether `caller` may act on the registered `job`: any configured token
/// may; an OIDC token only on its own job (same job id, or same repository
/// and run).
fn authorize(caller: &Caller, job: &Registration) -> Result<(), ApiError> {
    let Caller::Oidc(claims) = caller else {
        return Ok(());
    };
    let same_job = claims.check_run_id == Some(job.job_id.get());
    let same_run = job
        .repository
        .as_deref()
        .is_some_and(|r| r.eq_ignore_ascii_case(&claims.repository))
        && job.run_id.is_some()
        && job.run_id == claims.run_id;
    if same_job || same_run {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this token is not for job {}", job.job_id),
        ))
    }
}

/// Looks the job up and checks that `caller` may act on it.
fn authorized(gw: &Gateway, caller: &Caller, job: JobId) -> Result<(), ApiError> {
    if let Lookup::Active(reg, _) = gw.registry.lookup(job) {
        authorize(caller, &reg)?;
    }
    Ok(())
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
                    wait,
                    "too many requests with a wrong token from your address",
                );
            }
            return ApiError(StatusCode::UNAUTHORIZED, reason).into_response();
        }
    };
    let budget = match &caller {
        Caller::Token(i) => format!("token-{i}"),
        Caller::Oidc(c) => format!("oidc:{}", c.repository.to_lowercase()),
    };
    if let Err(wait) = gw.api_limits.request(&budget) {
        return too_many(wait, "this token is over its request rate");
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn too_many(wait: std::time::Duration, what: &str) -> Response {
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
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub job_id: String,
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

/// Checks a registration body; pure, so it is unit-tested without a server.
pub fn validate(
    job: JobId,
    body: RegisterRequest,
    source: IpAddr,
    now: u64,
    previous: Option<&Registration>,
) -> Result<Registration, String> {
    let actor = GithubLogin::parse(body.actor.as_deref().ok_or("actor: required")?)
        .map_err(|e| format!("actor: {e}"))?;
    if !valid_runner_user(&body.user) {
        return Err("user: not a valid account name".into());
    }
    let host = match body.host.as_deref() {
        None | Some("") => source,
        Some(h) => h
            .parse::<IpAddr>()
            .map_err(|_| "host: must be an IP address".to_string())?,
    };
    if host.is_unspecified() || host.is_multicast() {
        return Err("host: not a unicast address".into());
    }
    let port = body.port.unwrap_or(22);
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
    Ok(Registration {
        job_id: job,
        actor,
        host,
        port,
        user: body.user,
        host_keys,
        repository: body.repository,
        run_id: body.run_id,
        os: body.os.unwrap_or_default(),
        allowed_users,
        registered_at: previous.map(|p| p.registered_at).unwrap_or(now),
        refreshed_at: now,
        finished_at: previous.and_then(|p| p.finished_at),
    })
}

async fn put_job(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let job = job_id(&raw)?;
    let Json(mut body) = body?;
    if let Caller::Oidc(claims) = &caller {
        apply_claims(job, &mut body, claims).map_err(|e| ApiError(StatusCode::FORBIDDEN, e))?;
    }
    authorized(&gw, &caller, job)?;
    let previous = match gw.registry.lookup(job) {
        Lookup::Active(reg, _) => Some(reg),
        // Job ids are not reused (a re-run gets new ones): an ended job stays
        // ended, so a late refresh cannot bring a released runner back.
        Lookup::Ended(reason) => return Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => None,
    };
    let registration =
        validate(job, body, peer.ip(), unix_now(), previous.as_deref()).map_err(ApiError::bad)?;
    let registration = gw
        .registry
        .put(registration)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(job = %job, actor = %registration.actor, host = %registration.host, port = registration.port, refresh = previous.is_some(), "job registered");
    // A refresh that changes nothing is not news; one that does is.
    let changed = previous.as_deref().is_none_or(|p| {
        let mut p = p.clone();
        p.refreshed_at = registration.refreshed_at;
        p != *registration
    });
    if changed {
        gw.audit.record(
        if previous.is_some() { "job_changed" } else { "job_registered" },
        json!({
            "job": job.to_string(),
            "actor": registration.actor.as_str(),
            "allowed_users": registration.allowed_users.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            "host": registration.host.to_string(),
            "port": registration.port,
            "user": registration.user,
            "os": registration.os,
            "repository": registration.repository,
            "run_id": registration.run_id,
            "source": peer.ip().to_string(),
            "credential": match &caller {
                Caller::Token(i) => format!("token #{i}"),
                Caller::Oidc(_) => "oidc".to_string(),
            },
        }),
    );
    }
    let authorized_keys = authorized_keys(&gw, &registration).await;
    let (ssh_command, jump_command, ssh_config, rdp_command) =
        user_commands(&gw.config.public_address(), &registration);
    Ok(Json(RegisterResponse {
        job_id: job.to_string(),
        authorized_keys,
        ssh_command,
        jump_command,
        ssh_config,
        rdp_command,
        refresh_seconds: (gw.config.registration.ttl.as_secs() / 3).max(1),
        hold_max_seconds: gw.config.hold.max.as_secs(),
    }))
}

/// The lines the runner installs: the gateway's CA (job mode; the plain
/// gateway key on Windows) and the allowed people's own keys (jump mode).
async fn authorized_keys(gw: &Gateway, job: &Registration) -> Vec<String> {
    let mut lines = Vec::new();
    match job.os {
        Os::Windows => lines.push(format!(
            "{} ci-gateway",
            crate::keys::openssh_line(gw.client_key.public_key())
        )),
        Os::Linux | Os::Macos => lines.push(format!(
            "cert-authority,principals=\"{}\" {} ci-gateway",
            job.user,
            crate::keys::openssh_line(gw.ca.public_key())
        )),
    }
    for login in access::allowed_people(job, &gw.policy) {
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

fn job_json(
    gw: &Gateway,
    reg: &Registration,
    live: &crate::registry::Live,
) -> Result<serde_json::Value, ApiError> {
    let mut value = serde_json::to_value(reg)
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
    let (reg, newly) = match gw.registry.mark_finished(job).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return Err(match gw.registry.lookup(job) {
                Lookup::Ended(reason) => ApiError(StatusCode::GONE, reason),
                _ => ApiError(
                    StatusCode::NOT_FOUND,
                    format!("job {job} is not registered"),
                ),
            })
        }
        Err(e) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
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
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(job = %job, existed, "job deregistered");
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
            let err = validate(job(), body(json.clone()), src, 1, None).expect_err("invalid");
            assert!(err.starts_with(field), "{json}: {err}");
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
            None,
        )
        .expect("ok");
        let again = validate(
            job(),
            body(json!({"actor": "a", "user": "r", "host_keys": [KEY]})),
            src,
            9,
            Some(&first),
        )
        .expect("ok");
        assert_eq!(again.registered_at, 5);
        assert_eq!(again.refreshed_at, 9);
    }
}
