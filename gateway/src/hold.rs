//! The hold window (DESIGN §5) and registration expiry.
//!
//! After a job finishes, its runner is held only while someone is connected:
//! with nobody connected once `hold.connect_grace` has passed, the hold is
//! released at once; otherwise it lasts until the last session closes or
//! `hold.max` after the finish, with warnings `hold.warn_before` the deadline.
//! Every ending removes the job with a reason (sessions are kicked with it,
//! later users and the runner's `wait` read it). One task per finished job
//! makes these decisions, woken by session changes and its own deadlines.
//!
//! A registration not refreshed within `registration.ttl` (the runner died)
//! is expired by [`sweep`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::ids::JobId;
use crate::registry::{unix_now, Lookup, Registration};
use crate::Gateway;

/// Where a finished job's hold stands at `now` (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldState {
    /// The job's steps are still running.
    Running,
    /// Finished; held for the sessions (or the connect grace).
    Holding,
    /// Finished, nobody connected: the runner may go.
    Released,
    /// The hold deadline passed.
    Expired,
}

impl HoldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Running => "running",
            HoldState::Holding => "holding",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }
}

/// The pure hold decision.
pub fn state(
    finished_at: Option<u64>,
    sessions: usize,
    now: u64,
    max: Duration,
    grace: Duration,
) -> HoldState {
    let Some(finished) = finished_at else {
        return HoldState::Running;
    };
    if now >= finished + max.as_secs() {
        HoldState::Expired
    } else if sessions > 0 || now < finished + grace.as_secs() {
        HoldState::Holding
    } else {
        HoldState::Released
    }
}

/// The hold state of a job as the API shows it.
pub fn describe(gw: &Gateway, job: &Registration, sessions: usize) -> crate::api::HoldView {
    let now = unix_now();
    let hold = &gw.config.hold;
    let state = state(job.finished_at, sessions, now, hold.max, hold.connect_grace);
    let Some(finished) = job.finished_at else {
        return crate::api::HoldView {
            state,
            max_seconds: Some(hold.max.as_secs()),
            finished_at: None,
            deadline: None,
            remaining_seconds: None,
        };
    };
    let deadline = finished + hold.max.as_secs();
    crate::api::HoldView {
        state,
        max_seconds: None,
        finished_at: Some(finished),
        deadline: Some(deadline),
        remaining_seconds: Some(deadline.saturating_sub(now)),
    }
}

fn at(unix: u64) -> tokio::time::Instant {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let target = Duration::from_secs(unix);
    tokio::time::Instant::now() + target.saturating_sub(now_unix)
}

/// Starts the hold of a finished job: the API calls it at the finish, `run`
/// at start, and the sweeper for a hold no live replica runs. With
/// PostgreSQL the replica first takes the job's hold lease; one that a live
/// replica holds is left to it. One task per job per replica at most.
pub fn start(gw: Arc<Gateway>, job: JobId) {
    let fresh = gw
        .holds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(job);
    if !fresh {
        return;
    }
    let tasks = gw.tasks.clone();
    tasks.spawn(
        "hold",
        tasks.until_stopped(async move {
            let _running = Running(gw.clone(), job);
            match gw.registry.acquire_hold(job).await {
                Ok(true) => hold(gw.clone(), job).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(job = %job, "taking the hold lease: {e}"),
            }
        }),
    );
}

/// Forgets a hold task when it ends, however it ends.
struct Running(Arc<Gateway>, JobId);

impl Drop for Running {
    fn drop(&mut self) {
        self.0
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// Whether this replica still runs `job`'s hold; waits out a database
/// outage (deciding nothing meanwhile) rather than give the hold up.
async fn still_ours(gw: &Gateway, job: JobId) -> bool {
    loop {
        match gw.registry.owns_hold(job).await {
            Ok(ours) => return ours,
            Err(e) => {
                tracing::warn!(job = %job, "checking the hold lease: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn hold(gw: Arc<Gateway>, job: JobId) {
    let Lookup::Active(reg, live) = gw.registry.lookup(job) else {
        return;
    };
    let Some(finished) = reg.finished_at else {
        return;
    };
    let cfg = gw.config.hold.clone();
    let deadline = finished + cfg.max.as_secs();
    let grace_end = finished + cfg.connect_grace.as_secs();
    // Warnings whose time is still ahead, latest-first order of firing.
    let mut warnings: Vec<Duration> = cfg
        .warn_before
        .iter()
        .copied()
        .filter(|w| !w.is_zero() && *w < cfg.max)
        .collect();
    warnings.sort_by(|a, b| b.cmp(a));
    let now = unix_now();
    warnings.retain(|w| deadline.saturating_sub(w.as_secs()) > now);
    let mut sessions = live.watch_sessions();
    let mut kick = live.watch_kick();
    let mut had_sessions = false;
    loop {
        if kick.borrow_and_update().is_some() {
            return; // deregistered or expired elsewhere
        }
        let now = unix_now();
        let count = *sessions.borrow_and_update();
        had_sessions |= count > 0;
        let ending = match state(Some(finished), count, now, cfg.max, cfg.connect_grace) {
            HoldState::Running | HoldState::Holding => None,
            HoldState::Expired => Some((
                "hold_over",
                format!(
                    "job {job}: the hold of {} after the job finished is over",
                    humantime::format_duration(cfg.max)
                ),
            )),
            HoldState::Released if had_sessions => Some((
                "released",
                format!("job {job} finished and its last session closed; the runner was released"),
            )),
            HoldState::Released => Some((
                "released",
                format!("job {job} finished with nobody connected; the runner was released"),
            )),
        };
        if (ending.is_some()
            || warnings
                .first()
                .is_some_and(|w| deadline.saturating_sub(w.as_secs()) <= now))
            && !still_ours(&gw, job).await
        {
            tracing::info!(job = %job, "another replica took over this hold");
            return;
        }
        if let Some((kind, reason)) = ending {
            tracing::info!(job = %job, "{reason}");
            if let Err(e) = gw.end_job(job, kind, reason).await {
                tracing::error!(job = %job, "ending the hold: {e}");
            }
            return;
        }
        while let Some(w) = warnings.first().copied() {
            if deadline.saturating_sub(w.as_secs()) > now {
                break;
            }
            warnings.remove(0);
            let left = deadline.saturating_sub(now);
            let line = format!(
                "this runner is released in {} (the hold of job {job} ends at its {} limit); save your work",
                humantime::format_duration(Duration::from_secs(left)),
                humantime::format_duration(cfg.max)
            );
            tracing::info!(job = %job, sessions = count, "hold warning: {} left", left);
            gw.audit.record(
                "hold_warning",
                json!({"job": job.to_string(), "seconds_left": left, "sessions": count}),
            );
            live.notify(line);
        }
        let mut wake = deadline;
        if now < grace_end {
            wake = wake.min(grace_end);
        }
        if let Some(w) = warnings.first() {
            wake = wake.min(deadline.saturating_sub(w.as_secs()));
        }
        tokio::select! {
            changed = sessions.changed() => if changed.is_err() { return },
            changed = kick.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(at(wake)) => {}
        }
    }
}

/// Expires registrations whose runner stopped refreshing them, checking
/// every `tick`. A finished job is not refreshed any more: it ends by
/// `hold.max` (its hold task ends it sooner when nobody is connected).
pub async fn sweep(gw: Arc<Gateway>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        // Holds whose replica died (PostgreSQL): take them over.
        match gw.registry.orphaned_holds().await {
            Ok(jobs) => {
                for job in jobs {
                    start(gw.clone(), job);
                }
            }
            Err(e) => tracing::warn!("looking for holds to take over: {e}"),
        }
        let ttl = gw.config.registration.ttl.as_secs();
        for job in gw.registry.stale_jobs(unix_now().saturating_sub(ttl)) {
            let Lookup::Active(reg, _) = gw.registry.lookup(job) else {
                continue;
            };
            if let Some(finished) = reg.finished_at {
                // A finished job is not refreshed; its hold task rules it.
                // Should that task be gone, the deadline still holds here.
                let max = gw.config.hold.max;
                if unix_now() < finished + max.as_secs() {
                    continue;
                }
                let reason = format!(
                    "job {job}: the hold of {} after the job finished is over",
                    humantime::format_duration(max)
                );
                if let Err(e) = gw.end_job(job, "hold_over", reason).await {
                    tracing::error!(job = %job, "ending a hold: {e}");
                }
                continue;
            }
            let reason =
                format!("job {job} expired: its runner stopped refreshing the registration");
            tracing::info!(job = %job, "{reason}");
            if let Err(e) = gw.end_job(job, "expired", reason).await {
                tracing::error!(job = %job, "expiring: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(100);

    #[test]
    fn the_hold_decision() {
        let none = Duration::ZERO;
        let grace = Duration::from_secs(10);
        assert_eq!(state(None, 0, 50, MAX, none), HoldState::Running);
        assert_eq!(state(Some(0), 0, 0, MAX, none), HoldState::Released);
        assert_eq!(state(Some(0), 1, 0, MAX, none), HoldState::Holding);
        assert_eq!(state(Some(0), 0, 5, MAX, grace), HoldState::Holding);
        assert_eq!(state(Some(0), 0, 10, MAX, grace), HoldState::Released);
        assert_eq!(state(Some(0), 3, 99, MAX, none), HoldState::Holding);
        assert_eq!(state(Some(0), 3, 100, MAX, none), HoldState::Expired);
        assert_eq!(state(Some(0), 0, 500, MAX, grace), HoldState::Expired);
    }
}
