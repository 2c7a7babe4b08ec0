//! Authentication: what the username asks for (a job, or a GitHub login for
//! jump mode), whose key was offered, the failure budgets, and admitting an
//! authenticated connection (its login's connection cap; in job mode, the
//! durable `session_start`, the session count and the runner login).

use futures::StreamExt;
use russh::keys::PublicKey;
use russh::server::{Auth, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Disconnect, MethodKind, MethodSet};
use tracing::{debug, info, warn};

use crate::access;
use crate::ids::{GithubLogin, Target};
use crate::metrics::Refusal;
use crate::registry::{unix_now, Lookup, SessionInfo};
use crate::ssh::handler::{Connection, Identity, State};

/// People whose keys one login attempt fetches at once.
const KEY_FETCHES_PER_LOGIN: usize = 8;

/// Refusal banners sent on one connection at most.
const MAX_REFUSAL_BANNERS: u8 = 4;

/// Why [`Connection::identify`] found nobody: what the refusal banner says.
pub(super) enum Unmatched {
    /// The key is none of the candidates' keys.
    NoKey,
    /// Jump mode: GitHub has no such account.
    NoAccount,
    /// GitHub did not answer for a candidate whose keys are not cached.
    Unreachable,
    /// This source spent its GitHub lookups.
    OverBudget(std::time::Duration),
    /// The connection is refused or not a person's.
    Closed,
}

impl Connection {
    /// Parses the username and looks the job up, once per connection.
    pub(super) async fn resolve(&mut self, user: &str) {
        if !matches!(self.state, State::Fresh) {
            return;
        }
        if let Ok(Target::Job(job) | Target::Tunnel(job)) = Target::parse_user(user) {
            // With replicas, a job registered a moment ago through another
            // one may not have reached this one's copy yet.
            if self.gw.auth_limits.check(self.peer.ip(), user).is_ok() {
                self.gw.registry.lookup_fresh(job).await;
            }
        }
        self.user = crate::audit::shown(user);
        if let Err(blocked) = self.gw.auth_limits.check(self.peer.ip(), user) {
            self.gw.metrics.refused(blocked.kind());
            info!(conn = self.id, peer = %self.peer, "refused: {blocked}");
            self.disconnect_later(format!("ci-gateway: {blocked}"));
            self.state = State::Refused;
            return;
        }
        let refuse = |this: &mut Self, reason: String| {
            // Guessing job ids or sending garbage spends the failure budget.
            let _ = this.gw.auth_limits.failed(this.peer.ip(), user);
            info!(conn = this.id, peer = %this.peer, "refused: {reason}");
            this.audit_refusal("refused", &reason);
            this.disconnect_later(format!("ci-gateway: {reason}"));
            this.state = State::Refused;
        };
        match Target::parse_user(user) {
            Err(e) => {
                let shown = crate::audit::shown(user);
                refuse(
                    self,
                    format!("bad username \"{shown}\": a job id (digits, or job-<digits>) or a GitHub login was expected ({e})"),
                )
            }
            Ok(Target::Jump(login)) => {
                self.state = State::Jump {
                    login,
                    identity: None,
                }
            }
            Ok(Target::Tunnel(job)) => match self.gw.registry.lookup(job) {
                Lookup::Active(job, live) if job.tunnel => {
                    self.state = State::Tunnel {
                        job,
                        live,
                        proven: false,
                        down: tokio::sync::watch::Sender::new(false),
                    }
                }
                Lookup::Active(job, _) => refuse(
                    self,
                    format!("job {} was not registered with --tunnel: the gateway dials its runner", job.job_id),
                ),
                Lookup::Ended(reason) => refuse(self, reason),
                Lookup::Unknown => refuse(
                    self,
                    format!("job {job} is not registered with this gateway"),
                ),
            },
            Ok(Target::Relay(job)) => {
                if self.gw.registry.shared().is_some() {
                    self.state = State::Relay { job, proven: false };
                } else {
                    refuse(self, "relays are taken only between replicas".into());
                }
            }
            Ok(Target::Job(job)) => match self.gw.registry.lookup(job) {
                Lookup::Active(job, live) => {
                    self.state = State::Job {
                        job,
                        live,
                        identity: None,
                    }
                }
                Lookup::Ended(reason) => refuse(self, reason),
                Lookup::Unknown => refuse(
                    self,
                    format!("job {job} is not registered with this gateway (unknown job id, or the job has not started yet)"),
                ),
            },
        }
    }

    /// Whose key is `key`, among the people this connection may be, or
    /// why nobody's.
    pub(super) async fn identify(&self, key: &PublicKey) -> Result<GithubLogin, Unmatched> {
        let mut why = Unmatched::NoKey;
        let named = match &self.state {
            State::Job { job, .. } => access::named_people(job, &self.gw.policy),
            // The login is the peer's choice: a lookup GitHub must answer
            // (not cached) spends the source's lookup budget, so made-up
            // names cannot spend the gateway's GitHub rate limit.
            State::Jump { login, .. } => {
                if !self.gw.keys.is_fresh(login).await {
                    if let Some(wait) = self.gw.github_lookups.spend(self.peer.ip()) {
                        self.gw.metrics.refused(Refusal::GithubLookups);
                        warn!(conn = self.id, peer = %self.peer, "GitHub key lookup refused: this source is over its budget for {}s", wait.as_secs());
                        return Err(Unmatched::OverBudget(wait));
                    }
                }
                vec![login.clone()]
            }
            State::Fresh | State::Refused | State::Tunnel { .. } | State::Relay { .. } => {
                return Err(Unmatched::Closed)
            }
        };
        let jump = matches!(self.state, State::Jump { .. });
        let keys = &self.gw.keys;
        // Whether `answer` has the key; else what it says of the refusal.
        let judge = |login: &GithubLogin,
                     answer: Result<crate::github::Account, _>|
         -> Result<(), Option<Unmatched>> {
            match answer {
                Ok(account) if account.keys.iter().any(|k| crate::keys::same_key(k, key)) => Ok(()),
                Ok(account) if !account.exists && jump => Err(Some(Unmatched::NoAccount)),
                Ok(_) => Err(None),
                Err(e) => {
                    warn!(conn = self.id, %login, "{e}");
                    Err(Some(Unmatched::Unreachable))
                }
            }
        };
        // The named people one by one: usually the first is the one, and
        // neither anyone else's keys nor the roles are asked of GitHub.
        for login in &named {
            match judge(login, keys.account(login).await) {
                Ok(()) => return Ok(login.clone()),
                Err(Some(reason)) => why = reason,
                Err(None) => {}
            }
        }
        let State::Job { job, .. } = &self.state else {
            return Err(why);
        };
        // Then the people a role admits, a few at a time, so a team's
        // uncached keys come together.
        let roles = keys.roles(&self.gw.policy, job.repository.as_deref()).await;
        if roles.incomplete {
            why = Unmatched::Unreachable;
        }
        let by_role: Vec<GithubLogin> = roles
            .people
            .into_iter()
            .filter(|login| !named.contains(login))
            .collect();
        let mut answers = futures::stream::iter(by_role)
            .map(|login| async move {
                let answer = keys.account(&login).await;
                (login, answer)
            })
            .buffered(KEY_FETCHES_PER_LOGIN);
        while let Some((login, answer)) = answers.next().await {
            match judge(&login, answer) {
                Ok(()) => return Ok(login),
                Err(Some(reason)) => why = reason,
                Err(None) => {}
            }
        }
        Err(why)
    }

    /// Queues the banner for an RSA key signed with SHA-1, once.
    fn explain_sha1(&mut self) {
        if self.refusals_explained == 0 {
            self.refusals_explained = 1;
            self.refusal_banner = Some("ci-gateway: ssh-rsa signatures (SHA-1) are refused; use a client that signs with rsa-sha2-256/512 (OpenSSH 7.2 or later), or an ed25519 key\r\n".into());
        }
    }

    /// Queues the authentication banner that explains why `key` was
    /// refused (sent before the failure, DESIGN §3): the whole reason for
    /// the first key, one line for each of the next few, and nothing that
    /// says who is allowed.
    pub(super) fn explain_refusal(&mut self, key: &PublicKey, why: &Unmatched) {
        // One explanation of an outage or a budget is enough; key lines stop
        // after a few so an agent with many keys does not fill the screen.
        let repeats = matches!(
            why,
            Unmatched::Unreachable | Unmatched::OverBudget(_) | Unmatched::NoAccount
        );
        if self.refusals_explained >= MAX_REFUSAL_BANNERS
            || (repeats && self.refusals_explained > 0)
        {
            return;
        }
        let fp = crate::keys::fingerprint(key);
        let key = format!("{fp} ({})", key.algorithm().as_str());
        let text = match (&self.state, why) {
            (_, Unmatched::Closed) => return,
            (_, Unmatched::OverBudget(wait)) => format!(
                "ci-gateway: too many GitHub key lookups from your address; try again in {}s\r\n",
                wait.as_secs().max(1)
            ),
            (_, Unmatched::Unreachable) => "ci-gateway: GitHub cannot be reached to check SSH keys or roles, and no recent copy is cached; try again in a minute\r\n".to_string(),
            (State::Jump { login, .. }, Unmatched::NoAccount) if !self.gw.keys.enabled() => format!(
                "ci-gateway: {login} is not in this gateway's key table: a job id (digits, or job-<digits>) or a login it knows was expected as the user name\r\n"
            ),
            (State::Jump { login, .. }, Unmatched::NoAccount) => format!(
                "ci-gateway: GitHub has no account {login}: a job id (digits, or job-<digits>) or your GitHub login was expected as the user name\r\n"
            ),
            (State::Jump { login, .. }, _) if self.refusals_explained > 0 => {
                format!("ci-gateway: key {key} is not one of {login}'s either\r\n")
            }
            (State::Jump { login, .. }, _) => format!(
                "ci-gateway: key {key} is not one of the SSH keys on GitHub account {login} (https://github.com/{login}.keys)\r\n"
            ),
            (State::Job { job, .. }, _) if self.refusals_explained > 0 => format!(
                "ci-gateway: key {key} belongs to nobody allowed on job {} either\r\n",
                job.job_id
            ),
            (State::Job { job, .. }, _) => format!(
                "ci-gateway: key {key} belongs to nobody allowed on job {}.\r\n\
                 ci-gateway: the gateway knows people by the SSH keys on their GitHub accounts (https://github.com/settings/keys).\r\n",
                job.job_id
            ),
            _ => return,
        };
        self.refusals_explained += 1;
        self.refusal_banner = Some(text);
    }

    /// Counts a failed login; once the source or username is out of budget
    /// the connection is closed with the reason.
    pub(super) fn spend_failure(&mut self, user: &str) {
        if let Err(blocked) = self.gw.auth_limits.failed(self.peer.ip(), user) {
            self.gw.metrics.refused(blocked.kind());
            info!(conn = self.id, peer = %self.peer, "closing: {blocked}");
            self.audit_refusal("rate_limited", &blocked.to_string());
            self.disconnect_later(format!("ci-gateway: {blocked}"));
            self.state = State::Refused;
        }
    }

    /// Records why this connection was refused (`event`: `refused`,
    /// `rate_limited`).
    fn audit_refusal(&self, event: &str, reason: &str) {
        self.gw.audit.record(
            event,
            serde_json::json!({
                "conn": self.id,
                "source": self.peer.to_string(),
                "user": self.user,
                "reason": reason,
            }),
        );
    }

    /// Records an authentication attempt (the key's fingerprint, never the key).
    pub(super) fn audit_auth(
        &self,
        result: &'static str,
        key: &PublicKey,
        login: Option<&GithubLogin>,
    ) {
        self.gw.metrics.auth(result);
        self.gw.audit.record(
            "auth",
            serde_json::json!({
                "conn": self.id,
                "result": result,
                "source": self.peer.to_string(),
                "user": self.user,
                "login": login.map(|l| l.as_str()),
                "key_type": key.algorithm().as_str(),
                "key_fingerprint": crate::keys::fingerprint(key).to_string(),
            }),
        );
    }

    pub(super) fn reject() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    /// The refusal that names what may follow: a password (the job token)
    /// for a tunnel username only, so people are never asked for one.
    pub(super) fn rejection(&self) -> Auth {
        match self.state {
            State::Tunnel { .. } => Auth::Reject {
                proceed_with_methods: Some(MethodSet::from(&[MethodKind::Password][..])),
                partial_success: false,
            },
            _ => Self::reject(),
        }
    }

    /// A password: only a tunnel username takes one, and only its job's
    /// token (compared as a hash, in constant time). Anything else spends
    /// the failure budgets like a wrong key.
    pub(super) async fn password(&mut self, user: &str, password: &str) -> Auth {
        self.resolve(user).await;
        let proven = match &mut self.state {
            State::Tunnel { job, proven, .. } if job.token_matches(password) => {
                *proven = true;
                Some(job.job_id)
            }
            _ => None,
        };
        let result = if proven.is_some() {
            "success"
        } else {
            "failure"
        };
        if !matches!(self.state, State::Refused) {
            self.gw.metrics.auth(if proven.is_some() {
                "tunnel_success"
            } else {
                "tunnel_failure"
            });
            self.gw.audit.record(
                "tunnel_auth",
                serde_json::json!({
                    "conn": self.id,
                    "result": result,
                    "source": self.peer.to_string(),
                    "user": self.user,
                }),
            );
        }
        match proven {
            Some(job) => {
                info!(conn = self.id, peer = %self.peer, %job, "tunnel authenticated");
                Auth::Accept
            }
            None => {
                info!(conn = self.id, peer = %self.peer, user = %self.user, "password refused");
                if !matches!(self.state, State::Refused) {
                    self.spend_failure(user);
                }
                self.rejection()
            }
        }
    }

    /// A key offered before signing: accepted if it is one of the people
    /// this connection may be; a key nobody here has spends the budgets.
    pub(super) async fn offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Auth {
        self.resolve(user).await;
        if matches!(self.state, State::Tunnel { .. }) {
            return self.rejection();
        }
        if matches!(self.state, State::Relay { .. }) {
            return self.relay_key(user, offer.public_key, false);
        }
        if crate::ssh::is_sha1_rsa(offer.algorithm) && !self.gw.config.ssh.allow_sha1_rsa {
            debug!(
                conn = self.id,
                "ssh-rsa (SHA-1) offer refused; rsa-sha2-256/512 are taken"
            );
            self.explain_sha1();
            return Self::reject();
        }
        match self.identify(offer.public_key).await {
            Ok(_) => Auth::Accept,
            Err(why) => {
                if !matches!(self.state, State::Refused) {
                    self.explain_refusal(offer.public_key, &why);
                    self.audit_auth("key_not_accepted", offer.public_key, None);
                    self.spend_failure(user);
                }
                Self::reject()
            }
        }
    }

    /// A signed key: the login it belongs to becomes the connection's.
    pub(super) async fn verified(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Auth {
        self.resolve(user).await;
        if matches!(self.state, State::Tunnel { .. }) {
            return self.rejection();
        }
        if matches!(self.state, State::Relay { .. }) {
            return self.relay_key(user, key.public_key, true);
        }
        if crate::ssh::is_sha1_rsa(key.algorithm) && !self.gw.config.ssh.allow_sha1_rsa {
            info!(conn = self.id, peer = %self.peer, "ssh-rsa (SHA-1) signature refused");
            self.explain_sha1();
            return Self::reject();
        }
        let login = match self.identify(key.public_key).await {
            Ok(login) => login,
            Err(why) => {
                info!(conn = self.id, peer = %self.peer, user, key = %crate::keys::fingerprint(key.public_key), "authentication failed");
                self.explain_refusal(key.public_key, &why);
                self.audit_auth("failure", key.public_key, None);
                self.spend_failure(user);
                return Self::reject();
            }
        };
        let who = Identity {
            login: login.clone(),
        };
        match &mut self.state {
            State::Job { identity, .. } | State::Jump { identity, .. } => *identity = Some(who),
            State::Fresh | State::Refused | State::Tunnel { .. } | State::Relay { .. } => {
                return Self::reject()
            }
        }
        info!(conn = self.id, peer = %self.peer, %login, user, key = %crate::keys::fingerprint(key.public_key), "authenticated");
        self.audit_auth("success", key.public_key, Some(&login));
        Auth::Accept
    }

    /// A replica relaying to a tunnel this one holds: only the replicas'
    /// shared ed25519 host key is accepted (`verified`: it signed).
    fn relay_key(&mut self, user: &str, key: &PublicKey, verified: bool) -> Auth {
        let ours = self.gw.host_keys.iter().any(|k| {
            crate::keys::same_key(k.public_key(), key)
                && k.algorithm() == russh::keys::Algorithm::Ed25519
        });
        if !ours {
            info!(conn = self.id, peer = %self.peer, "relay refused: not the replicas' host key");
            self.spend_failure(user);
            return Self::reject();
        }
        if verified {
            if let State::Relay { job, proven } = &mut self.state {
                *proven = true;
                info!(conn = self.id, peer = %self.peer, job = %job, "a replica relays to this job's tunnel");
            }
        }
        Auth::Accept
    }

    /// Runs once authenticated: the login's connection cap, then in job mode
    /// the session starts (on disk first) and the runner login begins.
    pub(super) async fn admit(&mut self, session: &mut Session) -> Result<(), russh::Error> {
        self.authenticated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let State::Tunnel { proven: true, .. } = self.state {
            self.attach_tunnel();
            return Ok(());
        }
        // One login's connections are bounded (each may hold channels and
        // upstream sockets), so one person cannot take the gateway's share.
        let who = match &self.state {
            State::Job { identity, .. } | State::Jump { identity, .. } => {
                identity.as_ref().map(|i| i.login.to_string())
            }
            State::Fresh | State::Refused | State::Tunnel { .. } | State::Relay { .. } => None,
        };
        if let Some(login) = who {
            let max = self.gw.config.ssh.max_connections_per_login;
            match self.gw.logins.take(login.to_lowercase(), max) {
                Some(slot) => {
                    self.login_slot = Some(slot);
                    let _ = self.open_channels.login.set(self.gw.login_channels(&login));
                }
                None => {
                    self.gw.metrics.refused(Refusal::LoginConnections);
                    info!(conn = self.id, %login, "refused: {max} connections of this login are open");
                    session.disconnect(
                        Disconnect::ByApplication,
                        &format!(
                            "ci-gateway: {login} already has {max} connections open through the gateway; close some and try again"
                        ),
                        "en",
                    )?;
                    self.state = State::Refused;
                    return Ok(());
                }
            }
        }
        let State::Job {
            job,
            live,
            identity,
        } = &self.state
        else {
            return Ok(());
        };
        let (job, live) = (job.clone(), live.clone());
        let login = identity
            .as_ref()
            .map(|i| i.login.to_string())
            .unwrap_or_default();
        // On disk before anything reaches the runner.
        if let Err(e) = self.audit_session_start(&login, job.job_id, "job").await {
            session.disconnect(
                Disconnect::ByApplication,
                &format!("ci-gateway: cannot record the session ({e}); refusing it"),
                "en",
            )?;
            return Ok(());
        }
        // Counted from now on: an open connection keeps the runner held even
        // while it is still connecting or only forwarding ports.
        self.guards.insert(
            job.job_id,
            live.enter(SessionInfo {
                id: self.session_id.clone(),
                login: login.clone(),
                mode: "job",
                since: unix_now(),
            }),
        );
        self.watch_kicks(&live);
        self.watch_notices(&live);
        let _ = self.usage.flow.set(self.gw.metrics.flow("job"));
        self.connect_runner(job, login);
        Ok(())
    }
}
