//! The hold window (DESIGN §5) and registration expiry: after a job finishes,
//! its runner is held only while someone is connected, for at most
//! `hold.max`; a registration not refreshed within `registration.ttl` is gone.
//! Both end in a kick with a reason. Liveness is `Live`'s session count.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::registry::{unix_now, Lookup, Registration};
use crate::Gateway;

/// The hold state of a job as the API shows it.
pub fn describe(gw: &Gateway, job: &Registration, sessions: usize) -> Value {
    let Some(finished) = job.finished_at else {
        return json!({ "state": "running" });
    };
    let deadline = finished + gw.config.hold.max.as_secs();
    let grace_end = finished + gw.config.hold.connect_grace.as_secs();
    let now = unix_now();
    let state = if now >= deadline {
        "expired"
    } else if sessions > 0 || now < grace_end {
        "holding"
    } else {
        "released"
    };
    json!({ "state": state, "finished_at": finished, "deadline": deadline })
}

/// Ends holds past their deadline and registrations past their TTL, checking
/// every `tick`.
pub async fn sweep(gw: Arc<Gateway>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = unix_now();
        let ttl = gw.config.registration.ttl.as_secs();
        for job in gw.registry.stale_jobs(now.saturating_sub(ttl)) {
            let Lookup::Active(reg, _) = gw.registry.lookup(job) else {
                continue;
            };
            // A finished job is not refreshed any more; its hold rules it.
            if reg.finished_at.is_some() {
                continue;
            }
            let reason =
                format!("job {job} expired: its runner stopped refreshing the registration");
            tracing::info!(job = %job, "{reason}");
            if let Err(e) = gw.registry.remove(job, reason).await {
                tracing::error!(job = %job, "expiring: {e}");
            }
        }
        for job in gw.registry.finished_jobs() {
            let Lookup::Active(reg, _) = gw.registry.lookup(job) else {
                continue;
            };
            let Some(finished) = reg.finished_at else {
                continue;
            };
            if now >= finished + gw.config.hold.max.as_secs() {
                let reason = format!(
                    "job {job}: the hold window of {} after the job finished is over",
                    humantime::format_duration(gw.config.hold.max)
                );
                tracing::info!(job = %job, "{reason}");
                if let Err(e) = gw.registry.remove(job, reason).await {
                    tracing::error!(job = %job, "ending hold: {e}");
                }
            }
        }
    }
}
