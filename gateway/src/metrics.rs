//! Prometheus metrics (`[metrics] listen`), in the OpenMetrics text format,
//! from one explicit registry. Labels are small closed sets: no job id,
//! login or address ever becomes a label, so cardinality stays bounded.

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a call to GitHub's API ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NotFound,
    Error,
    Timeout,
}

/// Label values in Prometheus' snake_case, from the variant names.
fn snake(name: &str, out: &mut LabelValueEncoder) -> std::fmt::Result {
    use std::fmt::Write;
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.write_char('_')?;
        }
        out.write_char(c.to_ascii_lowercase())?;
    }
    Ok(())
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, out: &mut LabelValueEncoder) -> std::fmt::Result {
        snake(&format!("{self:?}"), out)
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, out: &mut LabelValueEncoder) -> std::fmt::Result {
        snake(&format!("{self:?}"), out)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

/// Which budget refused something.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// SSH: a source out of failed-login budget.
    SshSource,
    /// SSH: a username attacked from many sources.
    SshUser,
    /// SSH: a login holding its maximum of connections.
    LoginConnections,
    /// SSH: a connection or login holding its maximum of channels.
    Channels,
    /// SSH: the gateway holding its limit of runner sockets.
    UpstreamSockets,
    /// SSH: a job-mode login that waited its connect timeout in the line of
    /// logins to one runner.
    RunnerHandshakes,
    /// A source over its GitHub key-lookup budget.
    GithubLookups,
    /// API: a token (a job, or a shared token from one source) over its rate.
    ApiToken,
    /// API: a source over its rate over all tokens.
    ApiSource,
    /// API: a source over its wrong-token budget.
    ApiBadToken,
    /// API: a source over its agent download budget.
    AgentDownloads,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Refusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

/// `job` or `jump`: how a session reaches the runner.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabel {
    mode: &'static str,
    /// `to_runner` or `to_user`.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    /// `running`, `paused` (at a breakpoint) or `holding` (finished).
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    /// The audit trail's `auth` results: `success`, `failure`,
    /// `key_not_accepted`; and `tunnel_success`, `tunnel_failure`.
    result: &'static str,
}

/// One mode's byte counters, resolved once (an atomic add per chunk).
#[derive(Clone, Debug)]
pub struct Flow {
    pub to_runner: Counter,
    pub to_user: Counter,
}

/// What the gauges show, read from the gateway at each scrape.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub job_sessions: i64,
    pub jump_sessions: i64,
    pub running: i64,
    pub paused: i64,
    pub holding: i64,
    pub audit_queue: i64,
}

/// The gateway's metrics; cheap to update from anywhere.
pub struct Metrics {
    registry: Registry,
    github_calls: Family<OutcomeLabel, Counter>,
    refusals: Family<KindLabel, Counter>,
    /// Given to [`crate::tasks::Tasks`], which counts panicked tasks in it.
    pub task_panics: Counter,
    auths: Family<ResultLabel, Counter>,
    bytes: Family<BytesLabel, Counter>,
    sessions: Family<ModeLabel, Gauge>,
    jobs: Family<StateLabel, Gauge>,
    holds: Gauge,
    audit_queue: Gauge,
    upstream_connect: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ci_gateway");
        let github_calls = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "github_api_calls",
            "Calls made to GitHub's API, by outcome",
            github_calls.clone(),
        );
        let refusals = Family::<KindLabel, Counter>::default();
        registry.register(
            "rate_limit_refusals",
            "Requests, logins, connections or channels refused by a budget or cap, by kind",
            refusals.clone(),
        );
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running build", build);
        let task_panics = Counter::default();
        registry.register(
            "task_panics",
            "Tasks (a connection, a channel, a request) that ended in a panic",
            task_panics.clone(),
        );
        let auths = Family::<ResultLabel, Counter>::default();
        registry.register(
            "authentications",
            "Authentication attempts, by result",
            auths.clone(),
        );
        let bytes = Family::<BytesLabel, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed between users and runners, by mode and direction",
            bytes.clone(),
        );
        let sessions = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "sessions",
            "Open user connections to jobs, by mode",
            sessions.clone(),
        );
        let jobs = Family::<StateLabel, Gauge>::default();
        registry.register("jobs", "Registered jobs, by state", jobs.clone());
        let holds = Gauge::default();
        registry.register(
            "holds",
            "Finished jobs whose runner is held for someone connected",
            holds.clone(),
        );
        let audit_queue = Gauge::default();
        registry.register(
            "audit_queue_depth",
            "Audit events waiting for the writer",
            audit_queue.clone(),
        );
        let upstream_connect = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "upstream_connect_seconds",
            "Time to reach a job-mode runner: TCP, SSH handshake and login",
            upstream_connect.clone(),
        );
        Metrics {
            registry,
            github_calls,
            refusals,
            task_panics,
            auths,
            bytes,
            sessions,
            jobs,
            holds,
            audit_queue,
            upstream_connect,
        }
    }

    /// An authentication attempt's result (a closed set: see [`ResultLabel`]).
    pub fn auth(&self, result: &'static str) {
        self.auths.get_or_create(&ResultLabel { result }).inc();
    }

    /// The byte counters of `mode` (`job` or `jump`), for
    /// [`crate::ssh::channel::Usage::flow`].
    pub fn flow(&self, mode: &'static str) -> Flow {
        let counter = |direction| {
            self.bytes
                .get_or_create(&BytesLabel { mode, direction })
                .clone()
        };
        Flow {
            to_runner: counter("to_runner"),
            to_user: counter("to_user"),
        }
    }

    pub fn upstream_connected(&self, took: std::time::Duration) {
        self.upstream_connect.observe(took.as_secs_f64());
    }

    /// Sets the gauges from `now`.
    pub fn show(&self, now: &Snapshot) {
        for (mode, n) in [("job", now.job_sessions), ("jump", now.jump_sessions)] {
            self.sessions.get_or_create(&ModeLabel { mode }).set(n);
        }
        for (state, n) in [
            ("running", now.running),
            ("paused", now.paused),
            ("holding", now.holding),
        ] {
            self.jobs.get_or_create(&StateLabel { state }).set(n);
        }
        self.holds.set(now.holding);
        self.audit_queue.set(now.audit_queue);
    }

    pub fn github_call(&self, outcome: Outcome) {
        self.github_calls
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn refused(&self, kind: Refusal) {
        self.refusals.get_or_create(&KindLabel { kind }).inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The gauges' values now: sessions and jobs from the registry (bounded by
/// `registration.max_jobs`), the audit queue.
pub fn snapshot(gw: &crate::Gateway) -> Snapshot {
    let mut now = Snapshot {
        audit_queue: gw.audit.queued() as i64,
        ..Snapshot::default()
    };
    for (reg, live) in gw.registry.active() {
        for session in live.sessions() {
            match session.mode {
                "jump" => now.jump_sessions += 1,
                _ => now.job_sessions += 1,
            }
        }
        if reg.finished_at.is_some() {
            now.holding += 1;
        } else if reg.paused_at.is_some() {
            now.paused += 1;
        } else {
            now.running += 1;
        }
    }
    now
}

/// `GET /metrics`, and `/healthz` with the causes (this listener is the
/// operator's); everything else is 404.
pub fn router(gw: Arc<crate::Gateway>) -> Router {
    let health = gw.clone();
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let gw = health.clone();
                async move { crate::health::respond(&gw, true).await }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let gw = gw.clone();
                async move {
                    let metrics = &gw.metrics;
                    metrics.show(&snapshot(&gw));
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                        .into_response()
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_closed_labels() {
        let m = Metrics::new();
        m.github_call(Outcome::NotFound);
        m.github_call(Outcome::NotFound);
        m.refused(Refusal::GithubLookups);
        let text = m.render();
        assert!(
            text.contains("ci_gateway_github_api_calls_total{outcome=\"not_found\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ci_gateway_rate_limit_refusals_total{kind=\"github_lookups\"} 1"),
            "{text}"
        );
        assert!(text.contains("ci_gateway_build_info{version="), "{text}");
        m.auth("success");
        m.flow("jump").to_user.inc_by(20);
        m.show(&Snapshot {
            job_sessions: 2,
            holding: 1,
            ..Snapshot::default()
        });
        m.upstream_connected(std::time::Duration::from_millis(30));
        let text = m.render();
        for line in [
            "ci_gateway_authentications_total{result=\"success\"} 1",
            "ci_gateway_bytes_total{mode=\"jump\",direction=\"to_user\"} 20",
            "ci_gateway_sessions{mode=\"job\"} 2",
            "ci_gateway_jobs{state=\"holding\"} 1",
            "ci_gateway_holds 1",
            "ci_gateway_upstream_connect_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
