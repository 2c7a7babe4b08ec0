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
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::access;
use crate::ids::{valid_runner_user, GithubLogin, JobId};
use crate::limits::Spender;
use crate::metrics::Refusal;
use crate::registry::{unix_now, Lookup, Os, Registration, RunnerLogin};
use crate::secret::Secret;
use crate::Gateway;

pub mod admin;
mod auth;
pub mod downloads;
mod jobs;
pub mod serve;
mod tunnel;
mod wire;

use auth::*;
use jobs::*;
pub use jobs::{unchanged, user_commands, validate};
pub use wire::*;

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

/// `404` for a job nobody registered. A job token naming such a job cannot
/// be anyone's, so it spends the source's wrong-token budget (else forged
/// tokens over many ids would cost nothing).
fn unknown_job(gw: &Gateway, caller: &Caller, job: JobId) -> ApiError {
    if let Caller::JobToken(_, Some(source)) = caller {
        let _ = gw.api_limits.bad_token(*source);
    }
    not_registered(job)
}

fn not_registered(job: JobId) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("job {job} is not registered"),
    )
}

fn store_error(e: crate::registry::StoreError) -> ApiError {
    use crate::registry::StoreError as E;
    match e {
        E::Ended(reason) => ApiError(StatusCode::GONE, reason),
        E::Unknown(job) => not_registered(job),
        E::Exists(job) => ApiError(
            StatusCode::CONFLICT,
            format!("job {job} is already registered; a refresh needs its job token"),
        ),
        E::Conflict(field) => ApiError(StatusCode::CONFLICT, field),
        E::Full(_) | E::Db(_) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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
        .route("/v1/jobs/{job_id}/pause", post(jobs::pause_job))
        .route("/v1/jobs/{job_id}/resume", post(jobs::resume_job))
        .route("/v1/jobs/{job_id}/tunnel", get(tunnel::tunnel_websocket))
        .layer(middleware::from_fn_with_state(gw.clone(), require_token))
        // Their own credential: an admin token, which the routes above never take.
        .merge(admin::router(gw.clone()))
        // Each check's state and our reason, never the cause (docs/operations.md).
        .route(
            "/healthz",
            get(|State(gw): State<Arc<Gateway>>| async move {
                crate::health::respond(&gw, false).await
            }),
        )
        // No credential: the binary is no secret; a budget per source.
        .route("/v1/agent/{target}", get(downloads::get_agent))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(gw.clone(), deadline))
        .with_state(gw)
}

fn job_id(raw: &str) -> Result<JobId, ApiError> {
    JobId::parse(raw).map_err(|e| ApiError::bad(format!("job id {:?}: {e}", truncate(raw))))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
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
            &[],
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
            let err = validate(job(), body(json.clone()), src, 1, &[], None).expect_err("invalid");
            assert!(err.to_string().starts_with(field), "{json}: {err}");
        }
    }

    #[test]
    fn user_commands_follow_the_public_address_and_os() {
        use crate::config::PublicAddress;
        let mut reg = validate(
            job(),
            body(json!({"actor": "octocat", "user": "runner", "host_keys": [KEY]})),
            "10.0.0.9".parse().expect("ip"),
            1,
            &[],
            None,
        )
        .expect("valid");
        let default_port = PublicAddress::parse("gw.example.com").expect("addr");
        let (ssh, jump, config, rdp) = user_commands(&default_port, &reg);
        assert_eq!(ssh, "ssh 42@gw.example.com");
        assert_eq!(jump, "ssh -J octocat@gw.example.com runner@job-42");
        assert_eq!(
            config,
            "Host job-*\n  User runner\n  ProxyJump octocat@gw.example.com\n"
        );
        assert_eq!(rdp, None);
        reg.os = Os::Windows;
        let other = PublicAddress::parse("[::1]:2222").expect("addr");
        let (ssh, jump, _, rdp) = user_commands(&other, &reg);
        assert_eq!(ssh, "ssh -p 2222 42@::1");
        assert_eq!(jump, "ssh -J octocat@[::1]:2222 runner@job-42");
        assert_eq!(
            rdp.as_deref(),
            Some("ssh -p 2222 -N -L 3389:localhost:3389 42@::1")
        );
    }

    #[test]
    fn oidc_claims_rule_the_identity() {
        let claims = crate::oidc::Claims {
            actor: "octocat".into(),
            repository: "acme/widgets".into(),
            run_id: Some(77),
            check_run_id: Some(42),
        };
        // Nothing in the body: taken from the token.
        let mut b = body(json!({"user": "runner", "host_keys": [KEY]}));
        apply_claims(job(), &mut b, &claims).expect("ok");
        assert_eq!(b.actor.as_deref(), Some("octocat"));
        assert_eq!(b.repository.as_deref(), Some("acme/widgets"));
        assert_eq!(b.run_id, Some(77));
        // The same, repeated (any case): fine.
        let mut b = body(
            json!({"actor": "OctoCat", "repository": "acme/widgets", "run_id": 77, "user": "r", "host_keys": [KEY]}),
        );
        apply_claims(job(), &mut b, &claims).expect("agreeing body");
        // Anything contradicting the token is refused, naming the field.
        for (json, field) in [
            (
                json!({"actor": "mallory", "user": "r", "host_keys": [KEY]}),
                "actor",
            ),
            (
                json!({"repository": "evil/repo", "user": "r", "host_keys": [KEY]}),
                "repository",
            ),
            (
                json!({"run_id": 1, "user": "r", "host_keys": [KEY]}),
                "run_id",
            ),
        ] {
            let mut b = body(json);
            let err = apply_claims(job(), &mut b, &claims).expect_err("contradiction");
            assert!(
                matches!(&err, ClaimMismatch::Field { field: f, .. } if *f == field),
                "{err}"
            );
            assert!(err.to_string().starts_with(field), "{err}");
        }
        let mut b = body(json!({"user": "r", "host_keys": [KEY]}));
        let other_job = JobId::parse("43").expect("id");
        let err = apply_claims(other_job, &mut b, &claims).expect_err("other job");
        assert!(err.to_string().contains("job 42"), "{err}");
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
            &[],
            None,
        )
        .expect("ok");
        let again = validate(
            job(),
            body(json!({"actor": "a", "user": "r", "host_keys": [KEY]})),
            src,
            9,
            &[],
            Some(&first),
        )
        .expect("ok");
        assert_eq!(again.registered_at, 5);
        assert_eq!(again.refreshed_at, 9);
    }

    #[test]
    fn a_refresh_cannot_change_what_the_job_is() {
        let src: IpAddr = "127.0.0.1".parse().expect("ip");
        let nets = [crate::address::Cidr::parse("127.0.0.0/8").expect("net")];
        let base = json!({"actor": "octocat", "user": "runner", "host_keys": [KEY],
            "host": "127.0.0.5", "port": 2022, "repository": "acme/widgets", "run_id": 7});
        let first = validate(job(), body(base.clone()), src, 1, &nets, None).expect("ok");
        const OTHER_KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDt0Qq0bUv7fN6VUWUF1oVqzLRmIJVYyV4h4eF3t7kNL x";
        let changes = [
            ("host", json!("127.0.0.6")),
            ("port", json!(22)),
            ("host_keys", json!([OTHER_KEY])),
            ("user", json!("root")),
            ("os", json!("windows")),
            ("actor", json!("mallory")),
            ("repository", json!("evil/repo")),
            ("run_id", json!(8)),
            ("runner_login", json!("key")),
        ];
        for (field, value) in changes {
            let mut changed = base.clone();
            changed[field] = value;
            match validate(job(), body(changed), src, 2, &nets, Some(&first)) {
                Err(Invalid::Changed(c)) => {
                    assert_eq!(c.field(), field);
                    assert!(c.to_string().starts_with(field), "{field}: {c}");
                }
                other => panic!("{field}: expected a 409, got {other:?}"),
            }
        }
        // The same again, or with host and port left out, is a refresh.
        let same = validate(job(), body(base.clone()), src, 3, &nets, Some(&first)).expect("same");
        assert_eq!(same.refreshed_at, 3);
        let mut bare = base.clone();
        bare.as_object_mut().expect("obj").remove("host");
        bare.as_object_mut().expect("obj").remove("port");
        let kept = validate(
            job(),
            body(bare),
            "10.9.9.9".parse().expect("ip"),
            4,
            &nets,
            Some(&first),
        )
        .expect("omitted fields are kept");
        assert_eq!((kept.host, kept.port), (first.host, first.port));
        // Who else may enter is the job's own runner's to change.
        let mut more = base.clone();
        more["allowed_users"] = json!(["hubot"]);
        let r = validate(job(), body(more), src, 5, &nets, Some(&first)).expect("mutable");
        assert_eq!(r.allowed_users[0].as_str(), "hubot");
    }

    #[test]
    fn the_registered_host_follows_the_address_rules() {
        let src: IpAddr = "127.0.0.1".parse().expect("ip");
        let nets = [crate::address::Cidr::parse("127.0.0.0/8").expect("net")];
        for bad in [
            "::1",
            "169.254.169.254",
            "fe80::1",
            "10.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            let b = body(json!({"actor": "a", "user": "r", "host_keys": [KEY], "host": bad}));
            match validate(job(), b, src, 1, &nets, None) {
                Err(Invalid::Bad(m)) => assert!(m.starts_with("host: "), "{bad}: {m}"),
                other => panic!("{bad}: expected a 400, got {other:?}"),
            }
        }
        let b = body(
            json!({"actor": "a", "user": "r", "host_keys": [KEY], "host": "::ffff:127.0.0.5"}),
        );
        let reg = validate(job(), b, src, 1, &nets, None).expect("mapped loopback is in 127/8");
        assert_eq!(reg.host.to_string(), "127.0.0.5");
    }

    #[test]
    fn the_login_method_defaults_by_os() {
        let src: IpAddr = "10.0.0.9".parse().expect("ip");
        let base = json!({"actor": "a", "user": "r", "host_keys": [KEY]});
        for (extra, expected) in [
            (json!({}), RunnerLogin::Certificate),
            (json!({"os": "windows"}), RunnerLogin::Key),
            (json!({"os": "macos"}), RunnerLogin::Certificate),
            (json!({"runner_login": "key"}), RunnerLogin::Key),
            (
                json!({"os": "windows", "runner_login": "certificate"}),
                RunnerLogin::Certificate,
            ),
        ] {
            let mut b = base.clone();
            for (k, v) in extra.as_object().expect("obj") {
                b[k] = v.clone();
            }
            let reg = validate(job(), body(b), src, 1, &[], None).expect("ok");
            assert_eq!(reg.runner_login, expected, "{extra}");
            assert_eq!(reg.principal(), "ci-gateway-job-42");
        }
    }

    #[test]
    fn the_job_view_never_shows_the_token_hash() {
        let src: IpAddr = "10.0.0.9".parse().expect("ip");
        let mut reg = validate(
            job(),
            body(json!({"actor": "a", "user": "r", "host_keys": [KEY]})),
            src,
            1,
            &[],
            None,
        )
        .expect("ok");
        let (token, hash) = crate::secret::new_job_token();
        reg.token_hash = hash.to_hex();
        let text = serde_json::to_string(&JobView::of(&reg)).expect("json");
        assert!(!text.contains(&reg.token_hash), "{text}");
        assert!(!text.contains(token.expose().as_str()));
        assert!(!text.contains("token"), "{text}");
        assert!(reg.token_matches(token.expose()));
        let (other, _) = crate::secret::new_job_token();
        assert!(!reg.token_matches(other.expose()));
    }

    /// The agent reads the very types the gateway writes: a status goes
    /// through JSON and back unchanged, with the keys runners' scripts see.
    #[test]
    fn the_status_the_gateway_writes_is_the_one_the_agent_reads() {
        let src: IpAddr = "127.0.0.1".parse().expect("ip");
        let reg = validate(
            job(),
            body(json!({"actor": "octocat", "user": "r", "host_keys": [KEY]})),
            src,
            1,
            &[],
            None,
        )
        .expect("ok");
        let status = JobStatus {
            job: JobView::of(&reg),
            active_sessions: 1,
            sessions: vec![SessionView {
                login: "octocat".into(),
                mode: "job".into(),
                since: 5,
            }],
            hold: HoldView {
                state: crate::hold::HoldState::Holding,
                max_seconds: None,
                finished_at: Some(10),
                deadline: Some(7210),
                remaining_seconds: Some(7000),
            },
            paused: false,
            pause: None,
            tunnel: Some(TunnelView {
                up: true,
                since: Some(3),
                connects: 2,
            }),
        };
        let text = serde_json::to_string(&status).expect("json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["job_id"], "42");
        assert_eq!(v["actor"], "octocat");
        assert_eq!(v["active_sessions"], 1);
        assert_eq!(v["hold"]["state"], "holding");
        assert_eq!(v["hold"]["deadline"], 7210);
        assert!(v["hold"].get("max_seconds").is_none(), "{v}");
        assert_eq!(v["tunnel"]["up"], true);
        assert_eq!(v["tunnel"]["connects"], 2);
        let back: JobStatus = serde_json::from_str(&text).expect("the agent reads it");
        assert_eq!(back.hold, status.hold);
        assert_eq!(back.sessions, status.sessions);
        assert_eq!(back.job.actor, reg.actor);
        assert_eq!(back.job.host_keys, reg.host_keys);
    }

    /// What the agent leaves out is not sent, and what it sends the
    /// gateway's own parser (unknown fields refused) takes.
    #[test]
    fn a_request_sends_only_what_was_set() {
        let request = RegisterRequest {
            user: "runner".into(),
            host_keys: vec![KEY.into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&request).expect("json");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["host_keys", "user"]);
        let full = RegisterRequest {
            actor: Some("octocat".into()),
            port: Some(2222),
            os: Some(Os::Windows),
            runner_login: Some(RunnerLogin::Key),
            allowed_users: vec!["hubot".into()],
            ..request
        };
        let v = serde_json::to_value(&full).expect("json");
        assert_eq!(v["os"], "windows");
        assert_eq!(v["runner_login"], "key");
        let parsed: RegisterRequest = serde_json::from_value(v).expect("the gateway takes it");
        assert_eq!(parsed.allowed_users, ["hubot"]);
        assert_eq!(parsed.port, Some(2222));
    }
}
