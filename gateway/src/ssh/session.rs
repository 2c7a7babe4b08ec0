//! What lives as long as a user's connection: its audit records
//! (`session_start` on disk before the session runs, `forward`, and
//! `session_end` when the connection is dropped), the job-mode runner login
//! in a task of its own, and the watchers that close it when the job is
//! kicked or show the job's notices.

use std::sync::Arc;

use tracing::{info, warn};

use crate::ids::JobId;
use crate::registry::{Live, Registration};
use crate::ssh::handler::{Connection, State};
use crate::ssh::open::{say_goodbye, show_notice};
use crate::ssh::upstream::{self, RunnerLink};

impl Drop for Connection {
    fn drop(&mut self) {
        self.detach_tunnel();
        let Some((started, login)) = self.session.take() else {
            return;
        };
        let usage = self.usage.total();
        let (mode, jobs): (&str, Vec<String>) = match &self.state {
            State::Job { job, .. } => ("job", vec![job.job_id.to_string()]),
            _ => ("jump", self.guards.keys().map(|j| j.to_string()).collect()),
        };
        self.gw.audit.record(
            "session_end",
            serde_json::json!({
                "session": self.session_id,
                "conn": self.id,
                "login": login,
                "mode": mode,
                "jobs": jobs,
                "source": self.peer.to_string(),
                "bytes_to_runner": usage.to_runner,
                "bytes_to_user": usage.to_user,
                "duration_seconds": started.elapsed().as_secs_f64(),
                "exit_status": usage.exit_status,
                "recordings": self.usage.recordings(),
            }),
        );
    }
}

impl Connection {
    /// Sends the disconnect with `reason` once the session loop is free.
    pub(super) fn disconnect_later(&self, reason: String) {
        if let Some(handle) = self.handle.get().cloned() {
            self.gw.tasks.spawn("ssh disconnect", async move {
                say_goodbye(&handle, reason).await;
            });
        }
    }

    /// Writes `session_start` durably; the session proceeds only after that.
    pub(super) async fn audit_session_start(
        &mut self,
        login: &str,
        job: JobId,
        mode: &str,
    ) -> Result<(), crate::audit::AuditError> {
        self.gw
            .audit
            .record_durable(
                "session_start",
                serde_json::json!({
                    "session": self.session_id,
                    "conn": self.id,
                    "login": login,
                    "job": job.to_string(),
                    "mode": mode,
                    "source": self.peer.to_string(),
                    // Where a pty channel of this session is recorded.
                    "recording": (mode == "job" && self.gw.config.recording.enabled).then(|| {
                        self.gw
                            .config
                            .recording_dir()
                            .join(format!("{}{}", self.session_id, crate::recording::SUFFIX))
                            .display()
                            .to_string()
                    }),
                }),
            )
            .await?;
        if self.session.is_none() {
            self.session = Some((std::time::Instant::now(), login.to_string()));
            let (listed, kicked) = self.gw.registry.directory().enter(&self.session_id);
            self.listed = Some(listed);
            self.watch_operator_kick(kicked);
        }
        Ok(())
    }

    /// Closes this connection with the operator's reason (`admin kick`).
    fn watch_operator_kick(&self, mut kicked: tokio::sync::watch::Receiver<Option<String>>) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let mut alive = self.alive.subscribe();
        let conn = self.id;
        self.gw.tasks.spawn("operator kick watch", async move {
            let reason = tokio::select! {
                changed = kicked.wait_for(Option::is_some) => match changed {
                    Ok(reason) => reason.clone().unwrap_or_default(),
                    Err(_) => return,
                },
                _ = alive.changed() => return,
            };
            {
                info!(conn, "closing: an operator ended the session: {reason}");
                say_goodbye(
                    &handle,
                    format!("ci-gateway: an operator ended this session: {reason}"),
                )
                .await;
            }
        });
    }

    pub(super) fn audit_forward(&self, job: JobId, mode: &str, destination: &str) {
        let login = self.session.as_ref().map(|(_, l)| l.as_str());
        self.gw.audit.record(
            "forward",
            serde_json::json!({
                "conn": self.id,
                "login": login,
                "job": job.to_string(),
                "mode": mode,
                "destination": destination,
            }),
        );
    }

    /// Logs in to `job`'s runner in a task of its own; channels wait for it
    /// in theirs. A runner that cannot be reached, or that goes away later,
    /// ends the user's connection with the reason.
    pub(super) fn connect_runner(&mut self, job: Arc<Registration>, login: String) {
        let (outcome, link) = tokio::sync::watch::channel(None);
        self.runner = Some(RunnerLink(link));
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let gw = self.gw.clone();
        let mut alive = self.alive.subscribe();
        let conn = self.id;
        self.gw.tasks.spawn("runner login", async move {
            let job_id = job.job_id;
            let started = std::time::Instant::now();
            // Boxed: the login's future is large and done with once the
            // runner is connected; the task then only waits for its close.
            let connected = tokio::select! {
                connected = Box::pin(upstream::connect(&gw, &job, &login)) => connected,
                // The user left first: nothing to connect for.
                _ = alive.changed() => return,
            };
            let reason = match connected {
                Ok(runner) => {
                    gw.metrics.upstream_connected(started.elapsed());
                    info!(conn, job = %job_id, %login, "connected to runner");
                    let mut closed = runner.closed.clone();
                    let tunnel_down = runner.tunnel_down.clone();
                    outcome.send_replace(Some(Ok(Arc::new(runner))));
                    let ended = tokio::select! {
                        closed = closed.wait_for(|c| *c) => closed.is_ok(),
                        _ = alive.changed() => return,
                    };
                    if !ended {
                        return;
                    }
                    closed_reason(job_id, tunnel_down).await
                }
                Err(e) => {
                    warn!(conn, job = %job_id, %login, "{e}");
                    // The disconnect first: its reason is the line OpenSSH
                    // prints, and a channel refusal sent before it could
                    // end the client without it.
                    let reason = format!("ci-gateway: job {job_id}: {e}");
                    say_goodbye(&handle, reason).await;
                    outcome.send_replace(Some(Err(Arc::new(e))));
                    return;
                }
            };
            say_goodbye(&handle, reason).await;
        });
    }

    /// Closes this connection with `reason` when the job is kicked.
    pub(super) fn watch_kicks(&self, live: &Live) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let mut kick = live.watch_kick();
        let mut alive = self.alive.subscribe();
        let conn = self.id;
        self.gw.tasks.spawn("kick watch", async move {
            loop {
                let reason = kick.borrow_and_update().clone();
                if let Some(reason) = reason {
                    info!(conn, "closing: {reason}");
                    say_goodbye(&handle, format!("ci-gateway: {reason}")).await;
                    return;
                }
                tokio::select! {
                    changed = kick.changed() => if changed.is_err() { return },
                    _ = alive.changed() => return,
                }
            }
        });
    }

    /// Shows the job's notices (hold warnings) on this connection's session
    /// channels, as stderr lines: visible on a terminal, and outside the data
    /// stream of scp, sftp and other protocols.
    pub(super) fn watch_notices(&self, live: &Live) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let mut notices = live.watch_notices();
        let mut alive = self.alive.subscribe();
        let channels = self.session_channels.clone();
        self.gw.tasks.spawn("notice watch", async move {
            loop {
                tokio::select! {
                    changed = notices.changed() => if changed.is_err() { return },
                    _ = alive.changed() => return,
                }
                let Some(line) = notices.borrow_and_update().clone() else {
                    continue;
                };
                show_notice(&handle, &channels, &line).await;
            }
        });
    }
}

/// Why the runner connection of `job` closed: its tunnel dropped, or the
/// runner closed it.
async fn closed_reason(
    job: JobId,
    tunnel_down: Option<tokio::sync::watch::Receiver<bool>>,
) -> String {
    if let Some(mut down) = tunnel_down {
        if crate::ssh::tunnel::dropped(&mut down).await {
            return crate::ssh::tunnel::dropped_line(job);
        }
    }
    format!("ci-gateway: the runner of job {job} closed the connection")
}
