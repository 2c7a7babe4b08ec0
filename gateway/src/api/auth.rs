//! Who is calling and whether they may: registration tokens, OIDC tokens,
//! job tokens; the request deadline and the rate limits in front of every
//! handler.

use super::*;

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
) -> Result<(), ClaimMismatch> {
    let says = |field, token_says: &dyn ToString| ClaimMismatch::Field {
        field,
        token_says: token_says.to_string(),
    };
    if let Some(check_run) = claims.check_run_id {
        if check_run != job.get() {
            return Err(ClaimMismatch::OtherJob {
                token: check_run,
                job,
            });
        }
    }
    if let Some(actor) = &body.actor {
        if !actor.eq_ignore_ascii_case(&claims.actor) {
            return Err(says("actor", &claims.actor));
        }
    }
    if let Some(repo) = &body.repository {
        if !repo.eq_ignore_ascii_case(&claims.repository) {
            return Err(says("repository", &claims.repository));
        }
    }
    if let (Some(run), Some(token_run)) = (body.run_id, claims.run_id) {
        if run != token_run {
            return Err(says("run_id", &token_run));
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
pub(super) fn authorize(gw: &Gateway, caller: &Caller, job: &Registration) -> Result<(), ApiError> {
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
pub(super) async fn authorized(
    gw: &Gateway,
    caller: &Caller,
    job: JobId,
) -> Result<(Arc<Registration>, Arc<crate::registry::Live>), ApiError> {
    match gw.registry.lookup_fresh(job).await {
        Lookup::Active(reg, live) => {
            authorize(gw, caller, &reg)?;
            Ok((reg, live))
        }
        Lookup::Ended(reason) => Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => Err(unknown_job(gw, caller, job)),
    }
}

/// Every request, body included, is done within `api.request_timeout` (plus
/// the long-poll wait for a GET), so a client trickling a body cannot hold a
/// connection.
pub(super) async fn deadline(
    State(gw): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
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

pub(super) async fn require_token(
    State(gw): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    let source = source_of(&request);
    if let Some(refused) = blocked(&gw, source) {
        return refused;
    }
    let presented = bearer(&request);
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
            if let Some(refused) = spend_bad_token(&gw, source) {
                return refused;
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

/// The request's source address.
pub(super) fn source_of(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The bearer token the request shows, if any.
pub(super) fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

const WRONG_TOKENS: &str = "too many requests with a wrong token from your address";

/// `429` while `source` is out of its wrong-token budget.
pub(super) fn blocked(gw: &Gateway, source: Option<IpAddr>) -> Option<Response> {
    let wait = source.and_then(|ip| gw.api_limits.source_blocked(ip))?;
    Some(too_many(gw, Refusal::ApiBadToken, wait, WRONG_TOKENS))
}

/// Spends one of `source`'s wrong tokens; `429` once they are spent.
pub(super) fn spend_bad_token(gw: &Gateway, source: Option<IpAddr>) -> Option<Response> {
    let wait = source.and_then(|ip| gw.api_limits.bad_token(ip))?;
    Some(too_many(gw, Refusal::ApiBadToken, wait, WRONG_TOKENS))
}

pub(super) fn too_many(
    gw: &Gateway,
    kind: Refusal,
    wait: std::time::Duration,
    what: &str,
) -> Response {
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
