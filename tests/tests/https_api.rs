//! The runner API over HTTPS (rustls) with a certificate from a private CA:
//! the agent registers with `--ca-cert`, refuses the gateway without it, and
//! plain HTTP to the TLS port gets nowhere.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files.
fn certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    let (ca_pem, cert_pem, key_pem) =
        (dir.join("ca.pem"), dir.join("api.crt"), dir.join("api.key"));
    std::fs::write(&ca_pem, ca.pem()).expect("write");
    std::fs::write(&cert_pem, cert.pem()).expect("write");
    std::fs::write(&key_pem, key.serialize_pem()).expect("write");
    (ca_pem, cert_pem, key_pem)
}

async fn agent(args: &[&str]) -> Run {
    let mut cmd = agent_command();
    cmd.args(args).env("CI_GATEWAY_TOKEN", TOKEN);
    finish(cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_and_the_agent_verifies_it() {
    let certs = tempdir();
    let (ca, cert, key) = certificates(certs.path());
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let w = World::unregistered(
        "127.0.0.78",
        "9876543278",
        &[
            ("CI_GATEWAY__API__TLS_CERT", &cert_s),
            ("CI_GATEWAY__API__TLS_KEY", &key_s),
        ],
    )
    .await;
    let url = format!("https://127.0.0.1:{}", w.gateway.api.port());
    let host_key = w
        .runner
        .dir
        .join("ssh_host_ed25519_key.pub")
        .display()
        .to_string();
    let keys_file = w.runner.authorized_keys.display().to_string();
    let port = w.runner.addr.port().to_string();
    let state = w.dir.path().join("state").display().to_string();
    let register = |ca: Option<&str>| {
        let mut args = vec![
            "runner",
            "register",
            "--gateway",
            &url,
            "--job-id",
            &w.job,
            "--actor",
            "octocat",
            "--user",
            &w.runner.user,
            "--host",
            "127.0.0.78",
            "--port",
            &port,
            "--host-key",
            &host_key,
            "--authorized-keys",
            &keys_file,
            "--state-dir",
            &state,
            "--no-refresh",
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
        if let Some(ca) = ca {
            args.extend(["--ca-cert".to_string(), ca.to_string()]);
        }
        args
    };
    // Without the private CA the agent does not trust the gateway.
    let args = register(None);
    let refused = agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("certificate") || refused.stderr.contains("UnknownIssuer"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&w.runner.authorized_keys).expect("read"),
        ""
    );
    // With it, everything works over TLS.
    let ca_s = ca.display().to_string();
    let args = register(Some(&ca_s));
    let ok = agent(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(ok.code, 0, "{ok:?}");
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo", "over-tls"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "over-tls", "{r:?}");
    // Plain HTTP to the TLS port: no answer a client could take for one.
    let (status, _) = w.gateway.job(&w.job).await;
    assert_eq!(status, 0, "plain HTTP was answered on the HTTPS port");
    let dereg = agent(&[
        "runner",
        "deregister",
        "--gateway",
        &url,
        "--job-id",
        &w.job,
        "--ca-cert",
        &ca_s,
        "--state-dir",
        &state,
        "--authorized-keys",
        &keys_file,
    ])
    .await;
    assert_eq!(dereg.code, 0, "{dereg:?}");
    assert!(dereg.stdout.contains("deregistered"), "{}", dereg.stdout);
}
