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
use axum::{Json, Router};
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
        .with_state(gw)
}

async fn require_token(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| {
        gw.tokens
            .iter()
            .any(|t| crate::secret::constant_time_eq(t.expose().as_bytes(), p.as_bytes()))
    });
    if !ok {
        return ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or unknown bearer token".into(),
        )
        .into_response();
    }
    next.run(request).await
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
    pub actor: String,
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
    pub ssh_command: String,
    pub hold_max_seconds: u64,
}

/// Checks a registration body; pure, so it is unit-tested without a server.
pub fn validate(
    job: JobId,
    body: RegisterRequest,
    source: IpAddr,
    now: u64,
    previous: Option<&Registration>,
) -> Result<Registration, String> {
    let actor = GithubLogin::parse(&body.actor).map_err(|e| format!("actor: {e}"))?;
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
    Path(raw): Path<String>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let job = job_id(&raw)?;
    let Json(body) = body?;
    let previous = match gw.registry.lookup(job) {
        Lookup::Active(reg, _) => Some(reg),
        _ => None,
    };
    let registration =
        validate(job, body, peer.ip(), unix_now(), previous.as_deref()).map_err(ApiError::bad)?;
    let registration = gw
        .registry
        .put(registration)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(job = %job, actor = %registration.actor, host = %registration.host, port = registration.port, refresh = previous.is_some(), "job registered");
    let authorized_keys = authorized_keys(&gw, &registration).await;
    Ok(Json(RegisterResponse {
        job_id: job.to_string(),
        authorized_keys,
        ssh_command: format!("ssh {job}@{}", gw.config.ssh.public_host),
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

async fn get_job(
    State(gw): State<Arc<Gateway>>,
    Path(raw): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = job_id(&raw)?;
    match gw.registry.lookup(job) {
        Lookup::Active(reg, live) => {
            let mut value = serde_json::to_value(&*reg)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            let sessions = live.active_sessions();
            value["active_sessions"] = json!(sessions);
            value["hold"] = crate::hold::describe(&gw, &reg, sessions);
            Ok(Json(value))
        }
        Lookup::Ended(reason) => Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("job {job} is not registered"),
        )),
    }
}

async fn finish_job(
    State(gw): State<Arc<Gateway>>,
    Path(raw): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = job_id(&raw)?;
    let reg = gw
        .registry
        .mark_finished(job)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("job {job} is not registered"),
            )
        })?;
    let sessions = match gw.registry.lookup(job) {
        Lookup::Active(_, live) => live.active_sessions(),
        _ => 0,
    };
    tracing::info!(job = %job, sessions, "job finished; hold decision follows");
    Ok(Json(json!({
        "job_id": job.to_string(),
        "active_sessions": sessions,
        "hold": crate::hold::describe(&gw, &reg, sessions),
    })))
}

async fn delete_job(
    State(gw): State<Arc<Gateway>>,
    Path(raw): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = job_id(&raw)?;
    let reason = format!("job {job} ended: the runner deregistered it");
    let existed = gw
        .registry
        .remove(job, reason)
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
