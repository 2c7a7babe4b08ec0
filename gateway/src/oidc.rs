//! GitHub Actions OIDC tokens as registration credentials (DESIGN §4).
//!
//! A token is accepted when it is a JWT signed with RS256 by a key of the
//! configured issuer (JWKS located through the issuer's
//! `/.well-known/openid-configuration`, cached, refetched on an unknown
//! `kid`), its `iss` is the issuer, its `aud` contains the audience, it has
//! not expired (60 s leeway), and its `repository` matches one of the allowed
//! patterns. Only RS256 is accepted: no `none`, no HMAC, no algorithm the
//! token chooses for us. The identity (actor, repository, run, job) comes
//! from the claims, never from the request body.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::agent::client::Api;
use crate::secret::Secret;

const LEEWAY: u64 = 60;
/// A key set older than this is refetched before use.
const MAX_AGE: Duration = Duration::from_secs(3600);
/// A token longer than this is not a GitHub OIDC token.
const MAX_TOKEN: usize = 16 * 1024;

/// The claims the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub actor: String,
    pub repository: String,
    pub run_id: Option<u64>,
    /// The numeric job id (github.com and GHE Cloud).
    pub check_run_id: Option<u64>,
}

/// Why a token was refused, or the issuer's keys could not be had. The text
/// never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("token too long")]
    TooLong,
    #[error("not a JWT")]
    NotJwt,
    #[error("not base64url")]
    NotBase64,
    #[error("bad JWT header")]
    Header(#[source] serde_json::Error),
    #[error("algorithm {0:?} is not accepted (RS256 only)")]
    Algorithm(String),
    #[error("the token names no key (kid)")]
    NoKeyId,
    #[error("bad signature")]
    Signature,
    #[error("the token's key is not one of the issuer's")]
    UnknownKey,
    #[error("bad JWT claims")]
    Claims(#[source] serde_json::Error),
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("the token has no expiry")]
    NoExpiry,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no {0}")]
    MissingClaim(&'static str),
    #[error("repository {0} may not register jobs here")]
    Repository(String),
    #[error("OIDC discovery: {0}")]
    Discovery(#[source] crate::agent::client::ApiError),
    #[error("OIDC discovery: no jwks_uri")]
    NoJwksUri,
    #[error("OIDC discovery: jwks_uri is not on the issuer")]
    JwksElsewhere,
    #[error("OIDC keys: {0}")]
    Keys(#[source] crate::agent::client::ApiError),
    #[error("the issuer's client: {0}")]
    Setup(#[from] crate::agent::client::SetupError),
}

/// Why an OIDC setting was refused; each names the text it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("{0:?} is not a URL")]
    NotAUrl(String),
    #[error("{0:?}: plain http:// is accepted only on loopback")]
    PlainHttp(String),
    #[error("{0:?}: expected an https:// URL")]
    NotHttps(String),
    #[error("{0:?}: expected an owner/repo pattern such as \"acme/*\"")]
    Pattern(String),
}

/// `http://` only for loopback issuers (tests); otherwise `https://`.
pub fn check_issuer_url(url: &str) -> Result<(), SettingError> {
    let uri: axum::http::Uri = url.parse().map_err(|_| SettingError::NotAUrl(url.into()))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(()),
        Some("http") => {
            let ip: Option<std::net::IpAddr> = host.trim_matches(['[', ']']).parse().ok();
            if ip.is_some_and(|ip| ip.is_loopback()) || host == "localhost" {
                Ok(())
            } else {
                Err(SettingError::PlainHttp(url.into()))
            }
        }
        _ => Err(SettingError::NotHttps(url.into())),
    }
}

/// `owner/repo` with `*` wildcards inside a segment.
pub fn check_pattern(p: &str) -> Result<(), SettingError> {
    let ok = p.split('/').count() == 2
        && p.split('/').all(|s| !s.is_empty())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b'*'));
    if ok {
        Ok(())
    } else {
        Err(SettingError::Pattern(p.into()))
    }
}

/// Whether `repo` matches the glob `pattern` (case-insensitive, `*` does not
/// cross `/`).
pub fn matches(pattern: &str, repo: &str) -> bool {
    fn seg(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| seg(rest, &s[i..])),
            Some((c, rest)) => s
                .split_first()
                .is_some_and(|(d, tail)| c.eq_ignore_ascii_case(d) && seg(rest, tail)),
        }
    }
    let (p, r) = (pattern.split('/'), repo.split('/'));
    let (p, r): (Vec<&str>, Vec<&str>) = (p.collect(), r.collect());
    p.len() == 2
        && r.len() == 2
        && p.iter()
            .zip(&r)
            .all(|(p, r)| seg(p.as_bytes(), r.as_bytes()))
}

fn b64(part: &str) -> Result<Vec<u8>, OidcError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| OidcError::NotBase64)
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

struct KeySet {
    keys: HashMap<String, RsaKey>,
    fetched: Instant,
}

pub struct Verifier {
    issuer: String,
    audience: String,
    allowed: Vec<String>,
    api: Api,
    keys: tokio::sync::RwLock<Option<KeySet>>,
    refetch: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl Verifier {
    pub fn new(
        issuer: &str,
        audience: &str,
        allowed: &[String],
        min_refetch: Duration,
    ) -> Result<Verifier, OidcError> {
        Ok(Verifier {
            issuer: issuer.trim_end_matches('/').to_string(),
            audience: audience.to_string(),
            allowed: allowed.to_vec(),
            api: Api::new(issuer, Secret::new(String::new()), None)?,
            keys: tokio::sync::RwLock::new(None),
            refetch: tokio::sync::Mutex::new(None),
            min_refetch,
        })
    }

    /// Whether `token` has the shape of a JWT (three base64url parts).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.len() <= MAX_TOKEN && token.split('.').count() == 3 && token.starts_with("eyJ")
    }

    /// Verifies `token`; the error says what was wrong (never the token).
    pub async fn verify(&self, token: &str) -> Result<Claims, OidcError> {
        if token.len() > MAX_TOKEN {
            return Err(OidcError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(OidcError::NotJwt);
        };
        let header: Header = serde_json::from_slice(&b64(h)?).map_err(OidcError::Header)?;
        if header.alg != "RS256" {
            return Err(OidcError::Algorithm(header.alg.chars().take(16).collect()));
        }
        let kid = header.kid.ok_or(OidcError::NoKeyId)?;
        let signature = b64(s)?;
        let signed = &token[..h.len() + 1 + p.len()];
        self.check_signature(&kid, signed.as_bytes(), &signature)
            .await?;
        let claims: Value = serde_json::from_slice(&b64(p)?).map_err(OidcError::Claims)?;
        let now = now();
        if claims["iss"].as_str() != Some(self.issuer.as_str()) {
            return Err(OidcError::Issuer);
        }
        let aud_ok = match &claims["aud"] {
            Value::String(a) => *a == self.audience,
            Value::Array(list) => list
                .iter()
                .any(|a| a.as_str() == Some(self.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(OidcError::Audience);
        }
        let exp = number(&claims["exp"]).ok_or(OidcError::NoExpiry)?;
        if exp + LEEWAY < now {
            return Err(OidcError::Expired);
        }
        if number(&claims["nbf"]).is_some_and(|nbf| nbf > now + LEEWAY) {
            return Err(OidcError::NotYetValid);
        }
        let text = |k: &'static str| {
            claims[k]
                .as_str()
                .map(str::to_string)
                .ok_or(OidcError::MissingClaim(k))
        };
        let repository = text("repository")?;
        if !self.allowed.iter().any(|p| matches(p, &repository)) {
            return Err(OidcError::Repository(repository));
        }
        // Who started this attempt (a re-run may be someone else), as the
        // agent's default does (DESIGN §9).
        let actor = text("triggering_actor").or_else(|_| text("actor"))?;
        Ok(Claims {
            actor,
            repository,
            run_id: number(&claims["run_id"]),
            check_run_id: number(&claims["check_run_id"]),
        })
    }

    async fn check_signature(
        &self,
        kid: &str,
        signed: &[u8],
        signature: &[u8],
    ) -> Result<(), OidcError> {
        let verify = |set: &KeySet| -> Option<Result<(), OidcError>> {
            let key = set.keys.get(kid)?;
            let public = ring::signature::RsaPublicKeyComponents {
                n: &key.n,
                e: &key.e,
            };
            Some(
                public
                    .verify(
                        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                        signed,
                        signature,
                    )
                    .map_err(|_| OidcError::Signature),
            )
        };
        {
            let keys = self.keys.read().await;
            if let Some(set) = keys.as_ref().filter(|s| s.fetched.elapsed() < MAX_AGE) {
                if let Some(result) = verify(set) {
                    return result;
                }
            }
        }
        // Unknown key (or none yet): refetch, at most every `min_refetch`.
        {
            let mut last = self.refetch.lock().await;
            let stale = last.is_none_or(|t| t.elapsed() >= self.min_refetch);
            let known = self
                .keys
                .read()
                .await
                .as_ref()
                .is_some_and(|s| s.keys.contains_key(kid) && s.fetched.elapsed() < MAX_AGE);
            if stale && !known {
                *last = Some(Instant::now());
                let set = self.fetch().await?;
                *self.keys.write().await = Some(set);
            }
        }
        let keys = self.keys.read().await;
        match keys.as_ref().and_then(verify) {
            Some(result) => result,
            None => Err(OidcError::UnknownKey),
        }
    }

    async fn fetch(&self) -> Result<KeySet, OidcError> {
        #[derive(Deserialize)]
        struct Discovery {
            #[serde(default)]
            jwks_uri: Option<String>,
        }
        let config: Discovery = self
            .api
            .get_json("/.well-known/openid-configuration")
            .await
            .map_err(OidcError::Discovery)?;
        let jwks_uri = config.jwks_uri.ok_or(OidcError::NoJwksUri)?;
        // The key set must come from the issuer itself.
        let path = jwks_uri
            .strip_prefix(&self.issuer)
            .filter(|p| p.starts_with('/'))
            .ok_or(OidcError::JwksElsewhere)?;
        // Read loosely: a member of a kind we do not use is skipped, not an
        // error for the whole set.
        let jwks: Value = self.api.get_json(path).await.map_err(OidcError::Keys)?;
        let mut keys = HashMap::new();
        for k in jwks["keys"].as_array().into_iter().flatten().take(64) {
            if k["kty"] != "RSA" || k["alg"].as_str().is_some_and(|a| a != "RS256") {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) =
                (k["kid"].as_str(), k["n"].as_str(), k["e"].as_str())
            else {
                continue;
            };
            if let (Ok(n), Ok(e)) = (b64(n), b64(e)) {
                keys.insert(kid.to_string(), RsaKey { n, e });
            }
        }
        tracing::info!(keys = keys.len(), "OIDC key set fetched");
        Ok(KeySet {
            keys,
            fetched: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_patterns() {
        assert!(matches("acme/*", "acme/widgets"));
        assert!(matches("ACME/wid*", "acme/Widgets"));
        assert!(matches("*/*", "x/y"));
        assert!(!matches("acme/*", "acme2/widgets"));
        assert!(!matches("acme/*", "acme/widgets/extra"));
        assert!(!matches("acme/w*s", "acme/widget"));
        assert!(check_pattern("acme/*").is_ok());
        for bad in ["acme", "acme/", "a/b/c", "acme/{x}"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn issuer_urls() {
        assert!(check_issuer_url("https://token.actions.githubusercontent.com").is_ok());
        assert!(check_issuer_url("http://127.0.0.1:9000").is_ok());
        assert!(check_issuer_url("http://[::1]:9000").is_ok());
        assert!(check_issuer_url("http://issuer.example.com").is_err());
        assert!(check_issuer_url("ftp://x").is_err());
    }

    #[test]
    fn only_jwt_shapes_are_tried() {
        assert!(Verifier::looks_like_jwt("eyJh.eyJi.c2ln"));
        assert!(!Verifier::looks_like_jwt(
            "test-registration-token-0123456789"
        ));
        assert!(!Verifier::looks_like_jwt("eyJh.eyJi"));
    }
}
