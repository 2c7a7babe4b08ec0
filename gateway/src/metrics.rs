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

/// The gateway's metrics; cheap to update from anywhere.
pub struct Metrics {
    registry: Registry,
    github_calls: Family<OutcomeLabel, Counter>,
    refusals: Family<KindLabel, Counter>,
    /// Given to [`crate::tasks::Tasks`], which counts panicked tasks in it.
    pub task_panics: Counter,
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
        Metrics {
            registry,
            github_calls,
            refusals,
            task_panics,
        }
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

/// `GET /metrics`; everything else is 404.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
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
    }
}
