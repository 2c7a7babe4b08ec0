//! `/healthz`: whether the store answers, the audit writer writes, GitHub
//! is reachable and (when on) recordings can be made, each with a reason.
//!
//! - `failing` (HTTP 503): the store or the audit trail cannot be used, or
//!   a required recording cannot be made: sessions are refused, so a load
//!   balancer should send people to another replica.
//! - `degraded` (HTTP 200): GitHub does not answer (cached keys are served
//!   for `github.stale_for`) or the audit queue is backing up. Taking every
//!   replica out of rotation because GitHub is down would help nobody.
//!
//! The runner API's `/healthz` is reachable from the internet: it says each
//! check's state and our own reason, never the underlying error (which can
//! name internal hosts). The metrics listener's `/healthz`, which only the
//! operator reaches, adds the cause.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::audit::AuditState;
use crate::Gateway;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
    Failing,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub status: Status,
    /// Ours: safe to show anyone.
    pub reason: String,
    /// The underlying error, or details (operator's view only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl Check {
    fn ok(reason: impl Into<String>) -> Check {
        Check {
            status: Status::Ok,
            reason: reason.into(),
            cause: None,
        }
    }

    fn not(status: Status, reason: impl Into<String>, cause: impl Into<String>) -> Check {
        Check {
            status,
            reason: reason.into(),
            cause: Some(cause.into()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: Status,
    pub checks: BTreeMap<&'static str, Check>,
}

/// Runs every check (each bounded: the store's in 3 s, GitHub's by
/// `github.fetch_timeout` and at most one probe per 30 s).
pub async fn report(gw: &Gateway) -> Report {
    let mut checks = BTreeMap::new();
    let store = match gw.registry.check().await {
        // How many jobs, which replica: the operator's to know.
        Ok(how) => Check {
            cause: Some(how),
            ..Check::ok("answers")
        },
        Err(e) => Check::not(
            Status::Failing,
            "the registry store does not answer: logins and registrations fail",
            e.to_string(),
        ),
    };
    checks.insert("store", store);
    let audit = match gw.audit.state() {
        AuditState::Writing { queued } => Check::ok(format!("writing; {queued} events queued")),
        AuditState::Slow { queued, of } => Check::not(
            Status::Degraded,
            "the audit trail's disk is slow: sessions wait for their records",
            format!("{queued} of {of} events queued"),
        ),
        AuditState::Failing(e) => Check::not(
            Status::Failing,
            "the audit trail cannot be written: sessions are refused",
            e,
        ),
    };
    checks.insert("audit", audit);
    let github = match gw.keys.health().await {
        Ok(how) => Check::ok(how),
        Err(e) => Check::not(
            Status::Degraded,
            "GitHub does not answer: logins use cached keys until github.stale_for",
            e,
        ),
    };
    checks.insert("github", github);
    if gw.config.recording.enabled {
        checks.insert("recording", recording(gw).await);
    }
    let status = checks
        .values()
        .map(|c| c.status)
        .max()
        .unwrap_or(Status::Ok);
    Report { status, checks }
}

/// Whether a recording can be made now: a probe file made and removed.
async fn recording(gw: &Gateway) -> Check {
    let dir = gw.config.recording_dir();
    let required = gw.config.recording.required;
    let probe = dir.join(format!(".healthz-{:016x}", rand::random::<u64>()));
    let made = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    match made {
        Ok(()) => Check::ok("the recordings directory is writable"),
        Err(e) if required => Check::not(
            Status::Failing,
            "recordings cannot be written: pty sessions are refused (recording.required)",
            e.to_string(),
        ),
        Err(e) => Check::not(
            Status::Degraded,
            "recordings cannot be written: pty sessions run unrecorded",
            e.to_string(),
        ),
    }
}

/// The report as a response: 503 when failing. `detailed` keeps causes.
pub async fn respond(gw: &Gateway, detailed: bool) -> Response {
    let mut report = report(gw).await;
    if !detailed {
        for check in report.checks.values_mut() {
            check.cause = None;
        }
    }
    let code = match report.status {
        Status::Failing => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::OK,
    };
    (code, Json(report)).into_response()
}
