//! The operator's API under `/v1/admin` (what `ci-gateway admin` calls):
//! list jobs and sessions, close a session, end a job. Only an admin token
//! from `api.admin_tokens` opens it, and an admin token opens nothing else
//! (the runner routes never compare against them). Every action is in the
//! audit trail with the token's name; no secret is.

use std::collections::BTreeMap;

use axum::extract::Query;

use super::*;
use crate::registry::directory::is_session_id;
use crate::registry::KickedWhere;

/// The operator behind a request: the name of the admin token it showed.
#[derive(Debug, Clone)]
pub struct Operator(pub Arc<str>);

/// The longest reason an operator may give (it is shown on SSH clients).
const MAX_REASON: usize = 200;

pub fn router(gw: Arc<Gateway>) -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/admin/jobs", get(list_jobs))
        .route("/v1/admin/jobs/{job_id}/end", post(end_job))
        .route("/v1/admin/sessions", get(list_sessions))
        .route("/v1/admin/sessions/{session}/kick", post(kick_session))
        .layer(middleware::from_fn_with_state(gw, require_admin))
}

/// Admits a request that shows one of `api.admin_tokens` (compared in
/// constant time, every one of them). A wrong token spends the source's
/// wrong-token budget like any other.
async fn require_admin(
    State(gw): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    let source = source_of(&request);
    if let Some(refused) = blocked(&gw, source) {
        return refused;
    }
    let presented = bearer(&request).unwrap_or_default().to_string();
    let same = |secret: &Secret<String>| {
        crate::secret::constant_time_eq(secret.expose().as_bytes(), presented.as_bytes())
    };
    let operator = gw.admin_tokens.iter().fold(None, |found, t| {
        found.or(same(&t.secret).then_some(&t.name))
    });
    if let Some(name) = operator {
        let name: Arc<str> = name.as_str().into();
        let key = format!("admin:{name}");
        if let Err((wait, kind)) = gw.api_limits.request(Spender::Shared(&key), source) {
            return too_many(&gw, kind, wait, "this admin token is over its request rate");
        }
        request.extensions_mut().insert(Operator(name));
        return next.run(request).await;
    }
    let registration = gw.tokens.iter().fold(false, |found, t| found | same(t));
    let reason = if gw.admin_tokens.is_empty() {
        "no admin tokens are configured (api.admin_tokens)"
    } else if registration {
        "a registration token is not an admin token (api.admin_tokens)"
    } else if presented.is_empty() {
        "missing bearer token: an admin token (api.admin_tokens) is needed"
    } else {
        "not an admin token (api.admin_tokens)"
    };
    tracing::info!(source = ?source, "admin request refused: {reason}");
    if let Some(refused) = spend_bad_token(&gw, source) {
        return refused;
    }
    let status = if presented.is_empty() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    ApiError(status, reason.into()).into_response()
}

/// One job as `admin jobs` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminJob {
    pub job_id: String,
    pub repository: Option<String>,
    pub actor: String,
    /// running, paused, holding.
    pub state: String,
    pub sessions: usize,
    pub registered_at: u64,
    /// Where the runner is: `host:port`, or `tunnel` (and whether it is up).
    pub runner: String,
    pub os: Os,
}

/// One session as `admin sessions` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminSession {
    pub id: String,
    pub login: String,
    pub mode: String,
    /// The jobs it is on (jump mode: every job it forwards to).
    pub jobs: Vec<String>,
    pub since: u64,
    /// Whether this replica holds it (else another replica does).
    pub here: bool,
}

async fn list_jobs(State(gw): State<Arc<Gateway>>) -> Json<Vec<AdminJob>> {
    let mut jobs: Vec<AdminJob> = gw
        .registry
        .active()
        .into_iter()
        .map(|(reg, live)| AdminJob {
            job_id: reg.job_id.to_string(),
            repository: reg.repository.clone(),
            actor: reg.actor.to_string(),
            state: job_state(&reg).into(),
            sessions: live.active_sessions(),
            registered_at: reg.registered_at,
            runner: if reg.tunnel {
                let up = if live.tunnel().is_some() {
                    "up"
                } else {
                    "down"
                };
                format!("tunnel ({up})")
            } else {
                SocketAddr::new(reg.host, reg.port).to_string()
            },
            os: reg.os,
        })
        .collect();
    jobs.sort_by_key(|j| j.registered_at);
    Json(jobs)
}

fn job_state(reg: &Registration) -> &'static str {
    if reg.finished_at.is_some() {
        "holding"
    } else if reg.paused_at.is_some() {
        "paused"
    } else {
        "running"
    }
}

#[derive(Debug, Deserialize)]
struct SessionsQuery {
    job: Option<String>,
}

async fn list_sessions(
    State(gw): State<Arc<Gateway>>,
    query: Result<Query<SessionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AdminSession>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    let only = query.job.as_deref().map(job_id).transpose()?;
    let directory = gw.registry.directory();
    // One row per session; a jump session on several jobs lists them all.
    let mut by_id: BTreeMap<String, AdminSession> = BTreeMap::new();
    for (reg, live) in gw.registry.active() {
        if only.is_some_and(|j| j != reg.job_id) {
            continue;
        }
        for s in live.sessions() {
            let row = by_id.entry(s.id.clone()).or_insert_with(|| AdminSession {
                here: directory.holds(&s.id),
                id: s.id.clone(),
                login: s.login.clone(),
                mode: s.mode.into(),
                jobs: Vec::new(),
                since: s.since,
            });
            row.jobs.push(reg.job_id.to_string());
        }
    }
    let mut sessions: Vec<AdminSession> = by_id.into_values().collect();
    sessions.sort_by(|a, b| (a.since, &a.id).cmp(&(b.since, &b.id)));
    Ok(Json(sessions))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    #[serde(default)]
    pub reason: Option<String>,
}

/// The operator's reason as one printable line, or why not.
fn reason_line(body: Option<ReasonBody>, required: bool) -> Result<Option<String>, ApiError> {
    let reason = body.and_then(|b| b.reason).map(|r| r.trim().to_string());
    match reason {
        Some(r) if r.chars().count() > MAX_REASON => Err(ApiError::bad(format!(
            "reason: at most {MAX_REASON} characters (it is shown on the user's terminal)"
        ))),
        Some(r) if r.chars().any(char::is_control) => Err(ApiError::bad(
            "reason: one line of printable text (no control characters)",
        )),
        Some(r) if !r.is_empty() => Ok(Some(r)),
        _ if required => Err(ApiError::bad(
            "reason: required; it is shown to the people connected and kept in the audit trail",
        )),
        _ => Ok(None),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Kicked {
    pub session: String,
    /// `here`, or `asked` (another replica holds it and was told).
    pub closed: String,
}

async fn kick_session(
    State(gw): State<Arc<Gateway>>,
    Extension(Operator(operator)): Extension<Operator>,
    Path(session): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Kicked>, ApiError> {
    if !is_session_id(&session) {
        return Err(ApiError::bad(format!(
            "session id {:?}: 16 hex digits were expected (see `ci-gateway admin sessions`)",
            truncate(&session)
        )));
    }
    let body = optional_body(&body)?;
    let reason = reason_line(body, false)?.unwrap_or_else(|| "no reason was given".into());
    let closed = gw
        .registry
        .kick_session(&session, &reason)
        .await
        .map_err(store_error)?;
    let Some(closed) = closed else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no open session has the id {session}"),
        ));
    };
    let closed = match closed {
        KickedWhere::Here => "here",
        KickedWhere::Asked => "asked",
    };
    gw.audit.record(
        "admin",
        json!({
            "action": "kick",
            "token": &*operator,
            "session": session,
            "reason": reason,
            "closed": closed,
        }),
    );
    tracing::info!(operator = %operator, %session, "an operator ended a session");
    Ok(Json(Kicked {
        session,
        closed: closed.into(),
    }))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Ended {
    pub job_id: String,
    pub sessions_closed: usize,
}

async fn end_job(
    State(gw): State<Arc<Gateway>>,
    Extension(Operator(operator)): Extension<Operator>,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Ended>, ApiError> {
    let job = job_id(&raw)?;
    let reason = reason_line(optional_body(&body)?, true)?.unwrap_or_default();
    let sessions = match gw.registry.lookup_fresh(job).await {
        Lookup::Active(_, live) => live.active_sessions(),
        Lookup::Ended(reason) => return Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => return Err(not_registered(job)),
    };
    let shown = format!("job {job} was ended by an operator: {reason}");
    let existed = gw.end_job(job, "admin", shown).await.map_err(store_error)?;
    if !existed {
        return Err(match gw.registry.lookup(job) {
            Lookup::Ended(reason) => ApiError(StatusCode::GONE, reason),
            _ => not_registered(job),
        });
    }
    gw.audit.record(
        "admin",
        json!({
            "action": "end",
            "token": &*operator,
            "job": job.to_string(),
            "reason": reason,
            "sessions_closed": sessions,
        }),
    );
    tracing::info!(operator = %operator, job = %job, "an operator ended a job");
    Ok(Json(Ended {
        job_id: job.to_string(),
        sessions_closed: sessions,
    }))
}

/// A body that may be empty, else JSON (read whatever its content type,
/// so a reason sent without one is not dropped).
fn optional_body(body: &[u8]) -> Result<Option<ReasonBody>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError::bad(format!("body: {e} (expected {{\"reason\": \"...\"}})")))
}
