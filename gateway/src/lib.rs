//! ci-gateway: an SSH bastion for debugging CI jobs.
//!
//! # Layout
//!
//! - [`cli`] — arguments, logging, config, signals; calls [`run`] (the binary
//!   is `main.rs`, one line).
//! - [`config`] — serde types, layering (defaults, file, env) and validation.
//! - [`gateway`] — the shared state every connection and request uses.
//! - [`ids`] — `JobId`, `GithubLogin`, and the SSH username grammar.
//! - [`registry`] — registered jobs, persisted in redb or PostgreSQL; each
//!   job's live state (`registry::sync`: the replicas' side).
//! - [`github`] — people's SSH keys from GitHub (octocrab), cached.
//! - [`access`] — who may reach which job: one pure function.
//! - [`address`] — where a runner may be, and what the gateway may dial.
//! - [`keys`] — host key, CA and certificates the gateway owns.
//! - [`limits`] — failed-login and API rate limits (governor).
//! - [`logline`] — the log writer: one record, one line, controls escaped.
//! - [`metrics`] — Prometheus metrics (`[metrics] listen`).
//! - [`oidc`] — GitHub Actions OIDC tokens as registration credentials.
//! - [`pg`] — PostgreSQL for replicas: connections, TLS, schema, rows.
//! - [`api`] — the runner HTTP API (`auth`: callers and limits; `jobs`: the
//!   handlers and validation; `wire`: bodies and views, shared with the
//!   agent; `downloads`: the agent binary for runners); calls the registry,
//!   never SSH.
//! - [`audit`] — the append-only JSON-lines audit trail.
//! - [`ssh`] — accept loop, per-connection handler, runner client, the job-mode channel task, the jump splice.
//! - [`hold`] — hold window after a job finishes, registration expiry.
//! - [`tasks`] — the task tracker and the one stop signal (shutdown).
//! - [`agent`] — `ci-gateway runner …`, the runner's side of the API (one file
//!   per command, `state` for its state file).
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and pass the listeners in; it binds nothing itself.

#![forbid(unsafe_code)]

pub mod access;
pub mod address;
pub mod admin;
pub mod agent;
pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod github;
pub mod health;
pub mod hold;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod logline;
pub mod metrics;
pub mod oidc;
pub mod pg;
pub mod recording;
pub mod registry;
pub mod secret;
pub mod ssh;
pub mod tasks;
pub mod wsbridge;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use crate::gateway::Gateway;

/// The warning for an API without TLS, unless it listens on loopback only.
pub fn plain_http_warning(addr: std::net::SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "THE RUNNER API SERVES PLAIN HTTP ON {addr}, A NON-LOOPBACK ADDRESS: registration tokens \
             cross the network in clear. Set api.tls_cert and api.tls_key."
        )
    })
}

/// The sockets [`run`] serves, bound by the caller.
pub struct Listeners {
    pub ssh: TcpListener,
    pub api: TcpListener,
    /// `/metrics`, when `[metrics] listen` is set.
    pub metrics: Option<TcpListener>,
}

/// Serves SSH, the API and metrics until `shutdown` resolves, then stops:
/// nothing new is accepted, open SSH connections get `ssh.shutdown_grace`
/// and a disconnect message, and `run` returns once every task has ended
/// (a bounded time after the grace at most).
///
/// A listener or sweeper that ends on its own (a panic) stops the gateway
/// the same way, and `run` returns that as its error: a supervisor sees the
/// failure and restarts a whole gateway, instead of one that lost its SSH
/// port without a word.
pub async fn run(
    gw: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners {
        ssh: ssh_listener,
        api: api_listener,
        metrics: metrics_listener,
    } = listeners;
    let tls = if gw.config.api.tls_cert.as_os_str().is_empty() {
        if let Some(warning) = plain_http_warning(api_listener.local_addr()?) {
            tracing::warn!("{warning}");
        }
        None
    } else {
        Some(api::serve::tls_acceptor(
            &gw.config.api.tls_cert,
            &gw.config.api.tls_key,
        )?)
    };
    gw.listening_on(ssh_listener.local_addr()?);
    if let Some(shared) = gw.registry.shared() {
        shared.set_address(ssh_listener.local_addr()?);
    }
    gw.listening_on(api_listener.local_addr()?);
    let tasks = gw.tasks.clone();
    let api_limits = api::serve::Limits {
        request_timeout: gw.config.api.request_timeout,
        per_source: gw.config.api.max_connections_per_source,
    };
    let mut core = vec![
        (
            "the SSH listener",
            tasks.spawn_core(ssh::server::run(gw.clone(), ssh_listener)),
        ),
        (
            "the API listener",
            tasks.spawn_core(api::serve::run(
                api::router(gw.clone()),
                api_listener,
                tls,
                api_limits,
                tasks.clone(),
            )),
        ),
    ];
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            gw.listening_on(addr);
        }
        core.push((
            "the metrics listener",
            tasks.spawn_core(api::serve::run(
                metrics::router(gw.clone()),
                listener,
                None,
                api_limits,
                tasks.clone(),
            )),
        ));
    }
    if let Some(replication) = gw.registry.replication() {
        core.push((
            "the PostgreSQL follower",
            tasks.spawn_core(tasks.until_stopped(replication)),
        ));
    }
    // Holds that were running when the gateway stopped resume (with
    // PostgreSQL, those no live replica runs).
    for job in gw.registry.finished_jobs() {
        hold::start(gw.clone(), job);
    }
    let tick =
        (gw.config.registration.ttl / 8).clamp(Duration::from_millis(200), Duration::from_secs(5));
    core.push((
        "the registration sweeper",
        tasks.spawn_core(tasks.until_stopped(hold::sweep(gw.clone(), tick))),
    ));
    // Not a core task: with recording off (or kept forever) it ends at once.
    tasks.spawn(
        "recording retention",
        tasks.until_stopped(recording::retention(gw.clone())),
    );
    let limits_gw = gw.clone();
    core.push((
        "the limit sweeper",
        tasks.spawn_core(tasks.until_stopped(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                every.tick().await;
                limits_gw.auth_limits.sweep();
                limits_gw.api_limits.sweep();
                limits_gw.github_lookups.sweep();
                limits_gw.agent_downloads.sweep();
            }
        })),
    ));

    // Until the signal, or until a core task ends early.
    let early = {
        let ends = futures::future::select_all(core.iter_mut().map(|(_, task)| task));
        tokio::select! {
            _ = shutdown => None,
            (ended, index, _) = ends => Some((index, ended)),
        }
    };
    let (early, mut failure) = match early {
        Some((index, ended)) => (Some(index), Some(core_end(core[index].0, ended))),
        None => (None, None),
    };
    let grace = gw.config.ssh.shutdown_grace;
    match &failure {
        Some(e) => tracing::error!("{e}; stopping the gateway"),
        None => tracing::info!(
            ?grace,
            "stopping: no new connections; open ones are closed after the grace"
        ),
    }
    tasks.stop();
    if !tasks.drain(grace + ssh::server::DISCONNECT_WAIT * 2).await {
        tracing::warn!(
            running = tasks.running(),
            "tasks still running after the grace; exiting anyway"
        );
    }
    gw.registry.leave().await;
    for (index, (name, task)) in core.into_iter().enumerate() {
        if Some(index) == early || !task.is_finished() {
            task.abort();
            continue;
        }
        if let Err(e) = task.await {
            if failure.is_none() {
                failure = Some(core_end(name, Err(e)));
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Why a core task ended, as `run`'s error.
fn core_end(name: &str, ended: Result<(), tokio::task::JoinError>) -> anyhow::Error {
    match ended {
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            anyhow::anyhow!("{name} panicked: {}", tasks::panic_message(&*panic))
        }
        Err(e) => anyhow::anyhow!("{name} ended: {e}"),
        Ok(()) => anyhow::anyhow!("{name} stopped on its own"),
    }
}

#[cfg(test)]
mod tests {
    /// A core task's panic becomes `run`'s error with its name and message,
    /// not a silent `let _ =`.
    #[tokio::test]
    async fn a_core_task_that_panics_is_named_in_the_error() {
        let ended = tokio::spawn(async { panic!("the listener broke") }).await;
        let e = super::core_end("the SSH listener", ended).to_string();
        assert_eq!(e, "the SSH listener panicked: the listener broke");
        let e = super::core_end("the API listener", Ok(())).to_string();
        assert_eq!(e, "the API listener stopped on its own");
    }

    #[test]
    fn plain_http_is_flagged_off_loopback_only() {
        for quiet in ["127.0.0.1:8022", "[::1]:8022", "127.9.9.9:1"] {
            assert_eq!(
                super::plain_http_warning(quiet.parse().expect("addr")),
                None
            );
        }
        for loud in ["0.0.0.0:8022", "10.0.0.5:8022", "[::]:8022"] {
            let w = super::plain_http_warning(loud.parse().expect("addr")).expect(loud);
            assert!(
                w.contains("PLAIN HTTP") && w.contains("api.tls_cert"),
                "{w}"
            );
        }
    }
}
