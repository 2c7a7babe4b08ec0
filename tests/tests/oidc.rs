//! Registration with GitHub Actions OIDC tokens, against a fake issuer on
//! loopback with its own RSA key: valid tokens register (identity from the
//! claims), and expired, wrong-audience, wrong-issuer, unknown-kid, tampered,
//! `alg: none`, HMAC-confused and foreign-repository tokens do not. The agent
//! gets its token from a fake Actions token endpoint.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use common::*;
use russh::keys::signature::Signer;
use russh::keys::HashAlg;
use serde_json::{json, Value};

const AUDIENCE: &str = "ci-gateway";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An RSA signing key (made by ssh-keygen) and its JWK.
struct SigningKey {
    key: russh::keys::PrivateKey,
    kid: String,
}

impl SigningKey {
    fn new(dir: &std::path::Path, kid: &str) -> SigningKey {
        let pair = keygen(dir, kid, "rsa");
        let key = russh::keys::load_secret_key(&pair.path, None).expect("rsa key");
        SigningKey {
            key,
            kid: kid.to_string(),
        }
    }

    fn jwk(&self) -> Value {
        let rsa = self.key.key_data().rsa().expect("rsa");
        let public = rsa.public();
        json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
            "n": b64(public.n().as_positive_bytes().expect("n")),
            "e": b64(public.e().as_positive_bytes().expect("e")),
        })
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rsa = self.key.key_data().rsa().expect("rsa");
        let sig = (rsa, Some(HashAlg::Sha256))
            .try_sign(message)
            .expect("sign");
        sig.as_bytes().to_vec()
    }

    fn token(&self, claims: &Value) -> String {
        jwt(
            &json!({"alg": "RS256", "typ": "JWT", "kid": self.kid}),
            claims,
            |m| self.sign(m),
        )
    }
}

fn jwt(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = sign(signed.as_bytes());
    format!("{signed}.{}", b64(&signature))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs()
}

/// The fake issuer: discovery, keys, and the Actions token endpoint.
struct Issuer {
    url: String,
    jwks: Arc<Mutex<Vec<Value>>>,
    jwks_hits: Arc<AtomicUsize>,
    /// What the Actions token endpoint hands out.
    actions_token: Arc<Mutex<String>>,
}

impl Issuer {
    async fn start() -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let jwks: Arc<Mutex<Vec<Value>>> = Arc::default();
        let jwks_hits: Arc<AtomicUsize> = Arc::default();
        let actions_token: Arc<Mutex<String>> = Arc::default();
        let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/.well-known/jwks")});
        let (keys, hits, token) = (jwks.clone(), jwks_hits.clone(), actions_token.clone());
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move { Json(discovery) }),
            )
            .route(
                "/.well-known/jwks",
                get(move || async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    Json(json!({ "keys": *keys.lock().expect("lock") }))
                }),
            )
            .route(
                "/actions-token",
                get(move |headers: axum::http::HeaderMap, query: axum::extract::RawQuery| async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    if auth != "Bearer the-runner-request-token" {
                        return (axum::http::StatusCode::UNAUTHORIZED, Json(json!({}))).into_response();
                    }
                    assert!(query.0.unwrap_or_default().contains(&format!("audience={AUDIENCE}")));
                    (axum::http::StatusCode::OK, Json(json!({"value": *token.lock().expect("lock")}))).into_response()
                }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Issuer {
            url,
            jwks,
            jwks_hits,
            actions_token,
        }
    }
}

fn claims(issuer: &str, job: &str) -> Value {
    json!({
        "iss": issuer, "aud": AUDIENCE, "sub": "repo:acme/widgets:ref:refs/heads/main",
        "iat": now(), "nbf": now() - 5, "exp": now() + 300,
        "actor": "octocat", "repository": "acme/widgets", "run_id": "4242",
        "check_run_id": job,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_register_their_own_job_and_nothing_else() {
    let issuer = Issuer::start().await;
    let keys_dir = tempdir();
    let k1 = SigningKey::new(keys_dir.path(), "k1");
    let k2 = SigningKey::new(keys_dir.path(), "k2");
    let stranger = SigningKey::new(keys_dir.path(), "k1-impostor");
    issuer.jwks.lock().expect("lock").push(k1.jwk());
    let w = World::unregistered(
        "127.0.0.81",
        "9876543281",
        &[
            ("CI_GATEWAY__REGISTRATION__OIDC_ISSUER", &issuer.url),
            ("CI_GATEWAY__REGISTRATION__OIDC_AUDIENCE", AUDIENCE),
            ("CI_GATEWAY__REGISTRATION__ALLOWED_REPOSITORIES", "acme/*"),
            ("CI_GATEWAY__REGISTRATION__OIDC_JWKS_REFETCH", "0s"),
        ],
    )
    .await;
    let job = w.job.clone();
    let path = format!("/v1/jobs/{job}");
    let mut body = registration(&w.runner, "octocat");
    for k in ["actor", "repository", "run_id"] {
        body.as_object_mut().expect("object").remove(k);
    }
    let put = |token: String, body: Value| {
        let path = path.clone();
        let api = w.gateway.api;
        async move {
            http_raw(
                api,
                "PUT",
                &path,
                Some(&token),
                Some(body.to_string().into_bytes()),
            )
            .await
        }
    };

    // Refused, each with a reason and nothing registered.
    let good = claims(&issuer.url, &job);
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let none_alg = jwt(
        &json!({"alg": "none", "typ": "JWT", "kid": "k1"}),
        &good,
        |_| Vec::new(),
    );
    let hmac = {
        // The classic confusion: HS256 keyed with the public key's bytes.
        let secret = k1.jwk().to_string();
        jwt(
            &json!({"alg": "HS256", "typ": "JWT", "kid": "k1"}),
            &good,
            |m| {
                let key = ring_hmac(secret.as_bytes(), m);
                key
            },
        )
    };
    let tampered = {
        let t = k1.token(&good);
        let parts: Vec<&str> = t.split('.').collect();
        let evil = with("actor", json!("mallory"));
        format!(
            "{}.{}.{}",
            parts[0],
            b64(evil.to_string().as_bytes()),
            parts[2]
        )
    };
    let refused: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            k1.token(&with("exp", json!(now() - 3600))),
            "expired",
        ),
        (
            "wrong audience",
            k1.token(&with("aud", json!("someone-else"))),
            "audience",
        ),
        (
            "wrong issuer",
            k1.token(&with("iss", json!("https://evil.example.com"))),
            "issuer",
        ),
        (
            "unknown kid",
            SigningKey {
                key: stranger.key.clone(),
                kid: "k9".into(),
            }
            .token(&good),
            "key",
        ),
        (
            "impostor signed as k1",
            SigningKey {
                key: stranger.key.clone(),
                kid: "k1".into(),
            }
            .token(&good),
            "signature",
        ),
        ("tampered claims", tampered, "signature"),
        ("alg none", none_alg, "algorithm"),
        ("HS256 confusion", hmac, "algorithm"),
        (
            "foreign repository",
            k1.token(&with("repository", json!("evil/repo"))),
            "repository",
        ),
    ];
    for (what, token, says) in refused {
        let (status, answer) = put(token, body.clone()).await;
        assert_eq!(status, 401, "{what}: {answer}");
        assert!(answer.contains(says), "{what}: {answer}");
        assert_eq!(
            w.gateway.job(&job).await.0,
            404,
            "{what} registered something"
        );
    }
    // A body contradicting the token, or a token for another job: 403.
    let mut liar = body.clone();
    liar["actor"] = json!("mallory");
    let (status, answer) = put(k1.token(&good), liar).await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = put(k1.token(&claims(&issuer.url, "1234567890")), body.clone()).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(w.gateway.job(&job).await.0, 404);

    // A good token registers, with the identity from its claims.
    let (status, answer) = put(k1.token(&good), body.clone()).await;
    assert_eq!(status, 201, "{answer}");
    w.gateway.job_tokens.lock().expect("lock").insert(
        job.clone(),
        serde_json::from_str::<Value>(&answer).expect("json")["job_token"]
            .as_str()
            .expect("job token")
            .to_string(),
    );
    let (_, reg) = w.gateway.job(&job).await;
    assert_eq!(reg["actor"], "octocat");
    assert_eq!(reg["repository"], "acme/widgets");
    assert_eq!(reg["run_id"], 4242);
    // Key rotation: a token under a new key is taken after a refetch.
    let hits = issuer.jwks_hits.load(Ordering::SeqCst);
    issuer.jwks.lock().expect("lock").push(k2.jwk());
    let (status, answer) = put(k2.token(&good), body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(issuer.jwks_hits.load(Ordering::SeqCst), hits + 1);

    // Another run's token cannot touch this job.
    let other = {
        let mut c = claims(&issuer.url, "1234567891");
        c["run_id"] = json!("9999");
        k1.token(&c)
    };
    let (status, _) = http_raw(w.gateway.api, "DELETE", &path, Some(&other), None).await;
    assert_eq!(status, 403);
    let (status, _) = http_raw(w.gateway.api, "GET", &path, Some(&other), None).await;
    assert_eq!(status, 403);
    assert_eq!(w.gateway.job(&job).await.0, 200);

    // The agent, with no token: it asks the Actions endpoint for one.
    *issuer.actions_token.lock().expect("lock") = k1.token(&good);
    let mut cmd = agent_command();
    let state = w.dir.path().join("state");
    cmd.args([
        "runner",
        "deregister",
        "--gateway",
        &format!("http://{}", w.gateway.api),
        "--job-id",
        &job,
    ])
    .arg("--state-dir")
    .arg(&state)
    .env("CI_GATEWAY_OIDC_AUDIENCE", AUDIENCE)
    .env(
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        format!("{}/actions-token?api-version=2.0", issuer.url),
    )
    .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "the-runner-request-token");
    let out = finish(cmd).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("deregistered"), "{}", out.stdout);
    assert_eq!(w.gateway.job(&job).await.0, 410);
}

/// GitHub Enterprise Server tokens carry no `check_run_id`. Such a token used
/// to register any unregistered id; now only a job GitHub's API confirms is
/// in the token's repository and run, and it acts on no other job after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oidc_token_without_check_run_id_creates_only_a_job_github_confirms() {
    let issuer = Issuer::start().await;
    let keys_dir = tempdir();
    let k1 = SigningKey::new(keys_dir.path(), "k1");
    issuer.jwks.lock().expect("lock").push(k1.jwk());
    let w = World::unregistered(
        "127.0.0.82",
        "9876543282",
        &[
            ("CI_GATEWAY__REGISTRATION__OIDC_ISSUER", &issuer.url),
            ("CI_GATEWAY__REGISTRATION__OIDC_AUDIENCE", AUDIENCE),
            ("CI_GATEWAY__REGISTRATION__ALLOWED_REPOSITORIES", "acme/*"),
        ],
    )
    .await;
    let mut ghes = claims(&issuer.url, &w.job);
    ghes.as_object_mut().expect("obj").remove("check_run_id");
    let token = k1.token(&ghes);
    let mut body = registration(&w.runner, "octocat");
    for k in ["actor", "repository", "run_id"] {
        body.as_object_mut().expect("object").remove(k);
    }
    let put = |job: &str| {
        let api = w.gateway.api;
        let path = format!("/v1/jobs/{job}");
        let token = token.clone();
        let body = body.to_string().into_bytes();
        async move { http_raw(api, "PUT", &path, Some(&token), Some(body)).await }
    };
    // The attack: someone else's unregistered id, which GitHub does not
    // place in this token's run. Refused, nothing left behind.
    let victim = "9876543999";
    let (status, answer) = put(victim).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("check_run_id"), "{answer}");
    w.github
        .job_runs
        .lock()
        .expect("lock")
        .insert(("acme/widgets".into(), 9876543999), 1);
    let (status, answer) = put(victim).await;
    assert_eq!(status, 403, "a job of another run: {answer}");
    assert!(answer.contains("run 1"), "{answer}");
    // Its own job, confirmed by GitHub: created, with a job token.
    w.github
        .job_runs
        .lock()
        .expect("lock")
        .insert(("acme/widgets".into(), w.job.parse().expect("id")), 4242);
    let (status, answer) = put(&w.job).await;
    assert_eq!(status, 201, "{answer}");
    let answer: Value = serde_json::from_str(&answer).expect("json");
    assert!(answer["job_token"]
        .as_str()
        .is_some_and(|t| t.starts_with("cgj_")));
    // Without check_run_id the token cannot act on the job afterwards (a
    // sibling job of the same run would hold the same claims): the job
    // token does.
    let path = format!("/v1/jobs/{}", w.job);
    let (status, _) = http_raw(w.gateway.api, "GET", &path, Some(&token), None).await;
    assert_eq!(status, 403);
    let (status, _) = http_raw(w.gateway.api, "DELETE", &path, Some(&token), None).await;
    assert_eq!(status, 403);
    let job_token = answer["job_token"].as_str().expect("token");
    let (status, _) = http_raw(w.gateway.api, "GET", &path, Some(job_token), None).await;
    assert_eq!(status, 200);
    // The victim's id is still free for its own runner.
    let (status, _) = w.gateway.job(victim).await;
    assert_eq!(status, 404);
}

/// HMAC-SHA256, to forge the algorithm-confusion token.
fn ring_hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, message).as_ref().to_vec()
}
