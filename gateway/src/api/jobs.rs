//! The job handlers: register or refresh (`PUT`), look at or wait on
//! (`GET`), finish (`POST …/finished`), deregister (`DELETE`); and the pure
//! validation of a registration body and the commands people copy.

use super::*;

/// The commands a user copies from the CI log; pure.
pub fn user_commands(
    public: &crate::config::PublicAddress,
    job: &Registration,
) -> (String, String, String, Option<String>) {
    let id = job.job_id;
    let p = public.port_flag();
    let host = &public.host;
    let ssh = format!("ssh {p}{id}@{host}");
    // `job-<id>`: OpenSSH would read a bare number up to 2^32 as an IPv4 address.
    let jump = format!(
        "ssh -J {}@{} {}@job-{id}",
        job.actor,
        public.jump_spec(),
        job.user
    );
    let config = format!(
        "Host job-*\n  User {}\n  ProxyJump {}@{}\n",
        job.user,
        job.actor,
        public.jump_spec()
    );
    let rdp =
        (job.os == Os::Windows).then(|| format!("ssh {p}-N -L 3389:localhost:3389 {id}@{host}"));
    (ssh, jump, config, rdp)
}

/// Checks a registration body (a creation when `previous` is `None`, else a
/// refresh of `previous`); pure, so it is unit-tested without a server. The
/// result has no token hash: the caller sets it at creation.
pub fn validate(
    job: JobId,
    body: RegisterRequest,
    source: IpAddr,
    now: u64,
    networks: &[crate::address::Cidr],
    previous: Option<&Registration>,
) -> Result<Registration, Invalid> {
    let actor = GithubLogin::parse(body.actor.as_deref().ok_or("actor: required")?)
        .map_err(|e| format!("actor: {e}"))?;
    if !valid_runner_user(&body.user) {
        return Err("user: not a valid account name".into());
    }
    let named = match body.host.as_deref() {
        None | Some("") => None,
        Some(h) => Some(
            h.parse::<IpAddr>()
                .map_err(|_| "host: must be an IP address".to_string())?
                .to_canonical(),
        ),
    };
    let host = match (body.tunnel, named, previous) {
        // The gateway never dials a tunnel registration: it has no address,
        // and the address rules do not apply to it (DESIGN §10).
        (true, Some(_), _) => {
            return Err(
                "host: a tunnel registration names no address (the gateway reaches the \
                        runner through the agent's tunnel, never by dialing)"
                    .into(),
            )
        }
        (true, None, _) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        // A refresh that names no host, or the same one, keeps it (it was
        // checked when the job was created).
        (false, None, Some(p)) => p.host,
        (false, Some(h), Some(p)) if h == p.host => p.host,
        (false, _, _) => crate::address::registration_host(named, source, networks)
            .map_err(|e| format!("host: {e}"))?,
    };
    let port = match (body.port, previous) {
        (None, Some(p)) => p.port,
        (port, _) => port.unwrap_or(22),
    };
    if port == 0 {
        return Err("port: must be 1..=65535".into());
    }
    if body.host_keys.is_empty() || body.host_keys.len() > 16 {
        return Err("host_keys: give 1 to 16 keys".into());
    }
    let mut host_keys = Vec::with_capacity(body.host_keys.len());
    for (i, k) in body.host_keys.iter().enumerate() {
        let key = crate::keys::parse_public_key(k).map_err(|e| format!("host_keys[{i}]: {e}"))?;
        host_keys.push(crate::keys::openssh_line(&key));
    }
    if body.allowed_users.len() > 64 {
        return Err("allowed_users: at most 64".into());
    }
    let allowed_users = body
        .allowed_users
        .iter()
        .map(|u| GithubLogin::parse(u).map_err(|e| format!("allowed_users: {u:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(repo) = &body.repository {
        let ok = repo.len() <= 200
            && repo.split('/').count() == 2
            && repo
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !ok {
            return Err("repository: expected owner/name".into());
        }
    }
    let os = body.os.unwrap_or_default();
    let runner_login = body.runner_login.unwrap_or(match os {
        Os::Windows => RunnerLogin::Key,
        Os::Linux | Os::Macos => RunnerLogin::Certificate,
    });
    let next = Registration {
        job_id: job,
        actor,
        host,
        port,
        user: body.user,
        host_keys,
        repository: body.repository,
        run_id: body.run_id,
        os,
        allowed_users,
        registered_at: previous.map(|p| p.registered_at).unwrap_or(now),
        refreshed_at: now,
        finished_at: previous.and_then(|p| p.finished_at),
        paused_at: previous.and_then(|p| p.paused_at),
        runner_login,
        token_hash: previous.map(|p| p.token_hash.clone()).unwrap_or_default(),
        version: previous.map(|p| p.version).unwrap_or(0),
        tunnel: body.tunnel,
    };
    if let Some(p) = previous {
        unchanged(p, &next).map_err(Invalid::Changed)?;
    }
    Ok(next)
}

/// A refresh cannot change what the job is (DESIGN §4): names the first
/// field that differs. Pure.
pub fn unchanged(previous: &Registration, next: &Registration) -> Result<(), Changed> {
    let fixed = |field: &'static str, was: String, now: String| {
        if was == now {
            Ok(())
        } else {
            Err(Changed::Value { field, was, now })
        }
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    fixed(
        "tunnel",
        previous.tunnel.to_string(),
        next.tunnel.to_string(),
    )?;
    fixed("host", previous.host.to_string(), next.host.to_string())?;
    fixed("port", previous.port.to_string(), next.port.to_string())?;
    if previous.host_keys != next.host_keys {
        return Err(Changed::HostKeys);
    }
    fixed("user", previous.user.clone(), next.user.clone())?;
    fixed("os", format!("{:?}", previous.os), format!("{:?}", next.os))?;
    fixed("actor", previous.actor.to_string(), next.actor.to_string())?;
    fixed(
        "repository",
        opt(&previous.repository),
        opt(&next.repository),
    )?;
    fixed(
        "run_id",
        format!("{:?}", previous.run_id),
        format!("{:?}", next.run_id),
    )?;
    fixed(
        "runner_login",
        format!("{:?}", previous.runner_login),
        format!("{:?}", next.runner_login),
    )
}

/// `PUT /v1/jobs/{id}`: creates a job (registration token, or the job's own
/// OIDC token) and answers `201` with its job token; or refreshes it (job
/// token or OIDC token of this job), answering `200`.
pub(super) async fn put_job(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let job = job_id(&raw)?;
    let Json(mut body) = body?;
    if let Caller::Oidc(claims) = &caller {
        apply_claims(job, &mut body, claims)
            .map_err(|e| ApiError(StatusCode::FORBIDDEN, e.to_string()))?;
    }
    let networks = &gw.config.registration.runner_networks;
    let now = unix_now();
    let (registration, job_token) = match gw.registry.lookup_fresh(job).await {
        // Job ids are not reused (a re-run gets new ones): an ended job stays
        // ended, so a late refresh cannot bring a released runner back.
        Lookup::Ended(reason) => return Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Active(previous, _) => {
            authorize(&gw, &caller, &previous)?;
            let next =
                validate(job, body, peer.ip(), now, networks, Some(&previous)).map_err(invalid)?;
            let reg = gw
                .registry
                .update(job, move |current| {
                    // Against the record as it is at the write, not as read.
                    unchanged(current, &next)
                        .map_err(|c| crate::registry::StoreError::Conflict(c.to_string()))?;
                    let mut updated = current.clone();
                    updated.refreshed_at = now;
                    updated.allowed_users = next.allowed_users;
                    Ok(updated)
                })
                .await
                .map_err(store_error)?;
            (reg, None)
        }
        Lookup::Unknown => {
            match &caller {
                Caller::Token(_) => {}
                Caller::Oidc(claims) => confirm_unclaimed_job(&gw, job, claims).await?,
                Caller::JobToken(..) => return Err(unknown_job(&gw, &caller, job)),
            }
            let mut reg = validate(job, body, peer.ip(), now, networks, None).map_err(invalid)?;
            if !reg.tunnel {
                gw.dialable(SocketAddr::new(reg.host, reg.port))
                    .map_err(|e| ApiError::bad(format!("host: {e}")))?;
            }
            let (token, hash) = crate::secret::new_job_token();
            reg.token_hash = hash.to_hex();
            let key = match reg.runner_login {
                RunnerLogin::Certificate => None,
                RunnerLogin::Key => Some(
                    russh::keys::PrivateKey::random(
                        &mut rand::rng(),
                        russh::keys::Algorithm::Ed25519,
                    )
                    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
                ),
            };
            let reg = gw.registry.create(reg, key).await.map_err(store_error)?;
            (reg, Some(token))
        }
    };
    let created = job_token.is_some();
    tracing::info!(job = %job, actor = %registration.actor, host = %registration.host, port = registration.port, created, "job registered");
    if created {
        gw.audit.record(
            "job_registered",
            json!({
                "job": job.to_string(),
                "actor": registration.actor.as_str(),
                "allowed_users": registration.allowed_users.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
                "host": registration.host.to_string(),
                "port": registration.port,
                "user": registration.user,
                "os": registration.os,
                "runner_login": registration.runner_login,
                "tunnel": registration.tunnel,
                "repository": registration.repository,
                "run_id": registration.run_id,
                "source": peer.ip().to_string(),
                "credential": match &caller {
                    Caller::Token(i) => format!("token #{i}"),
                    Caller::Oidc(_) => "oidc".to_string(),
                    Caller::JobToken(..) => "job token".to_string(),
                },
            }),
        );
    }
    let authorized_keys = authorized_keys(&gw, &registration, peer.ip()).await;
    let (ssh_command, jump_command, ssh_config, rdp_command) =
        user_commands(&gw.config.public_address(), &registration);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(RegisterResponse {
            job_id: job.to_string(),
            job_token: job_token.map(|t| t.expose().clone()),
            authorized_keys,
            ssh_command,
            jump_command,
            ssh_config,
            known_hosts: known_hosts(&gw, &registration),
            rdp_command,
            refresh_seconds: (gw.config.registration.ttl.as_secs() / 3).max(1),
            hold_max_seconds: gw.config.hold.max.as_secs(),
            tunnel: registration.tunnel.then(|| tunnel_info(&gw, job)),
        }),
    ))
}

/// The `known_hosts` lines of [`RegisterResponse::known_hosts`].
pub fn known_hosts(gw: &Gateway, job: &Registration) -> Vec<String> {
    let name = gw.config.public_address().known_hosts_name();
    let gateway = gw
        .host_keys
        .iter()
        .map(|k| format!("{name} {}", crate::keys::openssh_line(k.public_key())));
    let runner = job
        .host_keys
        .iter()
        .map(|k| format!("job-{} {k}", job.job_id));
    gateway.chain(runner).collect()
}

/// Where the agent of a tunnel registration connects, and the gateway
/// host keys it pins for that connection.
pub fn tunnel_info(gw: &Gateway, job: JobId) -> TunnelInfo {
    let public = gw.config.public_address();
    let ssh_address = if public.host.contains(':') {
        format!("[{}]:{}", public.host, public.port)
    } else {
        format!("{}:{}", public.host, public.port)
    };
    TunnelInfo {
        user: crate::ids::tunnel_user(job),
        ssh_address,
        host_keys: gw
            .host_keys
            .iter()
            .map(|k| crate::keys::openssh_line(k.public_key()))
            .collect(),
        ports: gw
            .policy
            .jump_ports
            .iter()
            .copied()
            .filter(|p| *p != 22)
            .collect(),
    }
}

pub(super) fn invalid(e: Invalid) -> ApiError {
    match e {
        Invalid::Bad(m) => ApiError::bad(m),
        Invalid::Changed(c) => ApiError(StatusCode::CONFLICT, c.to_string()),
    }
}

/// An OIDC token without `check_run_id` (GitHub Enterprise Server) creates
/// a job only when GitHub's API confirms the job belongs to the token's
/// repository and run (DESIGN §4).
pub(super) async fn confirm_unclaimed_job(
    gw: &Gateway,
    job: JobId,
    claims: &crate::oidc::Claims,
) -> Result<(), ApiError> {
    if claims.check_run_id.is_some() {
        return Ok(()); // apply_claims checked it is this job
    }
    let refused = |why: String| {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "the OIDC token has no check_run_id and {why}; a job is only registered when \
                 GitHub confirms it belongs to the token's run"
            ),
        )
    };
    let Some(run) = claims.run_id else {
        return Err(refused("no run_id".into()));
    };
    match gw.keys.job_run(&claims.repository, job).await {
        Ok(Some(found)) if found == run => Ok(()),
        Ok(Some(other)) => Err(refused(format!(
            "GitHub says job {job} is in run {other}, not {run}"
        ))),
        Ok(None) => Err(refused(format!(
            "GitHub knows no job {job} in {}",
            claims.repository
        ))),
        Err(e) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot confirm job {job} with GitHub: {e}"),
        )),
    }
}

/// The lines the runner installs: the gateway's CA restricted to this job's
/// principal (or this job's own key), then the allowed people's own keys
/// (jump mode).
pub(super) async fn authorized_keys(
    gw: &Gateway,
    job: &Registration,
    source: IpAddr,
) -> Vec<String> {
    let mut lines = Vec::new();
    match job.runner_login {
        RunnerLogin::Key => {
            if let Some(key) = gw.registry.runner_key(job.job_id) {
                lines.push(format!(
                    "no-agent-forwarding,no-X11-forwarding {} {}",
                    crate::keys::openssh_line(key.public_key()),
                    job.principal()
                ));
            }
        }
        RunnerLogin::Certificate => lines.push(format!(
            "cert-authority,principals=\"{}\" {} ci-gateway",
            job.principal(),
            crate::keys::openssh_line(gw.ca.public_key())
        )),
    }
    for login in access::named_people(job, &gw.policy) {
        // The actor and the admins always; a listed user's uncached keys
        // spend the caller's lookup budget, so a body of 64 made-up names
        // cannot spend the gateway's GitHub rate limit on every PUT.
        let listed = login != job.actor && !gw.policy.admins.contains(&login);
        if listed && !gw.keys.is_fresh(&login).await {
            if let Some(wait) = gw.github_lookups.spend(source) {
                gw.metrics.refused(Refusal::GithubLookups);
                tracing::warn!(job = %job.job_id, %login, "jump-mode keys left out: the caller's GitHub lookup budget is spent for {}s", wait.as_secs());
                continue;
            }
        }
        match gw.keys.keys(&login).await {
            Ok(keys) => {
                for key in keys.iter() {
                    lines.push(format!("{} {login}", crate::keys::openssh_line(key)));
                }
            }
            Err(e) => tracing::warn!(job = %job.job_id, "jump-mode keys left out: {e}"),
        }
    }
    lines
}

pub(super) async fn get_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    query: Result<axum::extract::Query<GetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobStatus>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job).await?;
    let axum::extract::Query(query) = query.map_err(|e| ApiError::bad(e.body_text()))?;
    if let (Some(wait), Lookup::Active(_, live)) = (query.wait, gw.registry.lookup(job)) {
        let mut sessions = live.watch_sessions();
        let mut kick = live.watch_kick();
        let limit = std::time::Duration::from_secs(wait.min(MAX_WAIT_SECONDS));
        let stopping = gw.tasks.stopping();
        // A change of the count, a kick (the job ended), the time is up, or
        // the gateway is stopping (the answer goes out before it closes).
        let _ = tokio::time::timeout(limit, async {
            if kick.borrow_and_update().is_some() {
                return;
            }
            tokio::select! {
                _ = sessions.changed() => {}
                _ = kick.changed() => {}
                _ = stopping => {}
            }
        })
        .await;
        // Let the hold task act on the change before answering.
        tokio::task::yield_now().await;
    }
    match gw.registry.lookup(job) {
        Lookup::Active(reg, live) => Ok(Json(job_status(&gw, &reg, &live))),
        Lookup::Ended(reason) => Err(ApiError(StatusCode::GONE, reason)),
        Lookup::Unknown => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("job {job} is not registered"),
        )),
    }
}

pub(super) fn job_status(
    gw: &Gateway,
    reg: &Registration,
    live: &crate::registry::Live,
) -> JobStatus {
    let who = live.sessions();
    JobStatus {
        job: JobView::of(reg),
        active_sessions: who.len(),
        hold: crate::hold::describe(gw, reg, who.len()),
        sessions: who.iter().map(SessionView::from).collect(),
        paused: reg.paused_at.is_some(),
        pause: reg.paused_at.map(|since| {
            let hold = &gw.config.hold;
            let (ssh_command, jump_command, _, _) =
                crate::api::user_commands(&gw.config.public_address(), reg);
            PauseView {
                since,
                deadline: since + hold.max.as_secs(),
                connect_grace_seconds: hold.connect_grace.as_secs(),
                ssh_command,
                jump_command,
            }
        }),
        tunnel: reg.tunnel.then(|| {
            let link = live.tunnel();
            TunnelView {
                up: link.is_some(),
                since: link.map(|l| l.since),
                connects: live.tunnel_connects(),
            }
        }),
    }
}

pub(super) async fn finish_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job).await?;
    let (reg, newly) = gw.registry.mark_finished(job).await.map_err(store_error)?;
    let Lookup::Active(_, live) = gw.registry.lookup(job) else {
        return Err(ApiError(StatusCode::GONE, format!("job {job} ended")));
    };
    // The answer is computed before the hold task runs, so a runner with
    // nobody connected reads "released" here and need not poll at all.
    let status = job_status(&gw, &reg, &live);
    if newly {
        tracing::info!(job = %job, sessions = live.active_sessions(), "job finished; hold starts");
        gw.audit.record(
            "job_finished",
            json!({"job": job.to_string(), "sessions": live.active_sessions(), "hold": status.hold.state.as_str()}),
        );
        crate::hold::start(gw.clone(), job);
    }
    Ok(Json(status))
}

/// `POST /v1/jobs/{id}/pause` and `…/resume`: the job waits at a
/// breakpoint, or goes on. A finished job is not paused (its hold runs).
pub(super) async fn pause_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    set_paused(gw, caller, raw, true).await
}

pub(super) async fn resume_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    set_paused(gw, caller, raw, false).await
}

async fn set_paused(
    gw: Arc<Gateway>,
    caller: Caller,
    raw: String,
    paused: bool,
) -> Result<Json<JobStatus>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job).await?;
    if paused {
        if let Lookup::Active(reg, _) = gw.registry.lookup(job) {
            if reg.finished_at.is_some() {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("job {job} has finished; its hold is running, so it cannot pause"),
                ));
            }
        }
    }
    let (reg, changed) = gw
        .registry
        .set_paused(job, paused)
        .await
        .map_err(store_error)?;
    let Lookup::Active(_, live) = gw.registry.lookup(job) else {
        return Err(ApiError(StatusCode::GONE, format!("job {job} ended")));
    };
    if changed {
        let event = if paused { "job_paused" } else { "job_resumed" };
        tracing::info!(job = %job, sessions = live.active_sessions(), "{event}");
        gw.audit.record(
            event,
            json!({"job": job.to_string(), "sessions": live.active_sessions()}),
        );
    }
    Ok(Json(job_status(&gw, &reg, &live)))
}

pub(super) async fn delete_job(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<Deregistered>, ApiError> {
    let job = job_id(&raw)?;
    authorized(&gw, &caller, job).await?;
    let reason = format!("job {job} ended: the runner deregistered it");
    let existed = gw
        .end_job(job, "deregistered", reason)
        .await
        .map_err(store_error)?;
    if !existed {
        // It ended between the check and the removal (a hold, an expiry).
        return Err(match gw.registry.lookup(job) {
            Lookup::Ended(reason) => ApiError(StatusCode::GONE, reason),
            _ => not_registered(job),
        });
    }
    tracing::info!(job = %job, "job deregistered");
    Ok(Json(Deregistered {
        job_id: job.to_string(),
        deregistered: existed,
    }))
}
