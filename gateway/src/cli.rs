//! The `ci-gateway` command line: arguments, logging, config, signals. No
//! protocol logic lives here; see [`crate::run`] and [`crate::agent`]. The
//! binary's `main` is just [`main`] (and so is the test crate's copy, which
//! the end-to-end tests run as a real process).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::Config;
use clap::{Parser, Subcommand};

/// The free memory each allocator arena may keep at its top while serving
/// (glibc's trim threshold; 128 KiB by default). 4 MiB holds a few windows'
/// worth of packet buffers; at most 16 arenas on 2 cores, 64 MiB at worst,
/// and all of it is given back after a large drop in load.
const KEEP_FREE_TOP: usize = 4 << 20;

/// `EX_USAGE` from sysexits.h: the configuration is wrong.
const EX_USAGE: u8 = 64;
/// `EX_UNAVAILABLE`: a service the gateway needs (PostgreSQL) is down.
const EX_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "ci-gateway",
    version,
    about = "SSH bastion for debugging CI jobs",
    // The last of a repeated option wins (scripts can append overrides).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (SSH and the runner API).
    Serve {
        /// TOML config; without it, loopback-only development defaults.
        #[arg(long, env = "CI_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The runner's side: register a job, wait out its hold, deregister.
    Runner {
        #[command(subcommand)]
        command: crate::agent::Command,
    },
    /// The operator's commands: list jobs and sessions, kick a session, end
    /// a job (needs an admin token from the gateway's api.admin_tokens).
    Admin(crate::admin::AdminArgs),
    /// Session recordings on this host: list them, replay one.
    Recordings(crate::admin::RecordingsArgs),
    /// Validate a config and exit (0 if valid, 64 if not; with PostgreSQL,
    /// 69 if the database cannot be reached).
    CheckConfig {
        #[arg(long, env = "CI_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply the PostgreSQL schema's pending migrations and exit (`serve`
    /// also applies them at start).
    Migrate {
        #[arg(long, env = "CI_GATEWAY_CONFIG")]
        config: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,russh=warn".into()),
        )
        // One record, one line: peer-supplied text cannot forge a line or
        // send escapes to a terminal (see logline).
        .with_writer(crate::logline::stderr)
        .with_ansi(false)
        .init();
    match cli.command {
        Command::Runner { command } => crate::agent::run(command),
        Command::Admin(args) => crate::admin::run(args),
        Command::Recordings(args) => crate::admin::recordings(args),
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(config) => {
                println!("config is valid");
                if config.storage.backend == crate::config::Backend::Postgres {
                    return with_database(&config, false);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Migrate { config } => {
            match Config::load(config.as_deref()) {
                Ok(config) if config.storage.backend == crate::config::Backend::Postgres => {
                    with_database(&config, true)
                }
                Ok(_) => {
                    eprintln!("storage.backend is \"redb\": nothing to migrate (redb needs no migrations)");
                    ExitCode::from(EX_USAGE)
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EX_USAGE)
                }
            }
        }
        Command::Serve { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            // Before the runtime's threads: the relay's packet buffers stop
            // paging in and out (alloc-trim's `keep_free_top`).
            alloc_trim::keep_free_top(KEEP_FREE_TOP);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ci-gateway: {e:#}");
                    let down = e
                        .downcast_ref::<crate::registry::OpenError>()
                        .is_some_and(|e| matches!(e, crate::registry::OpenError::Unreachable(_)));
                    ExitCode::from(if down { EX_UNAVAILABLE } else { 1 })
                }
            }
        }
    }
}

/// `check-config` (reachable, and the schema's version) or `migrate` on
/// the PostgreSQL database.
fn with_database(config: &Config, migrate: bool) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let st = &config.storage;
    runtime.block_on(async {
        let connector = match crate::pg::Connector::new(st.postgres_url.expose(), &st.postgres_ca) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("storage.postgres_url: {e}");
                return ExitCode::from(EX_USAGE);
            }
        };
        let mut client = match connector.connect(None).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        let latest = crate::pg::MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if migrate {
            match crate::pg::migrate(&mut client).await {
                Ok((latest, applied)) if applied.is_empty() => {
                    println!(
                        "{}: the schema is at version {latest}; nothing to apply",
                        connector.place()
                    );
                    ExitCode::SUCCESS
                }
                Ok((latest, applied)) => {
                    println!(
                        "{}: applied migrations {applied:?}; the schema is at version {latest}",
                        connector.place()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", connector.place());
                    ExitCode::FAILURE
                }
            }
        } else {
            match crate::pg::schema_version(&client).await {
                Ok(v) => {
                    let state = match v.cmp(&latest) {
                        std::cmp::Ordering::Equal => "current".to_string(),
                        std::cmp::Ordering::Less => {
                            format!(
                                "{} to apply at start or by `ci-gateway migrate`",
                                latest - v
                            )
                        }
                        std::cmp::Ordering::Greater => {
                            "NEWER than this binary: run the newer ci-gateway".to_string()
                        }
                    };
                    println!(
                        "PostgreSQL at {} is reachable; schema version {v} of {latest} ({state})",
                        connector.place()
                    );
                    if v > latest {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("{}: {e}", connector.place());
                    ExitCode::FAILURE
                }
            }
        }
    })
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let ssh_addr = config.ssh.listen;
    let api_addr = config.api.listen;
    let data_dir = config.storage.data_dir.clone();
    let gw = Arc::new(crate::Gateway::new(config).await?);
    let ssh = tokio::net::TcpListener::bind(ssh_addr)
        .await
        .map_err(|e| anyhow::anyhow!("ssh.listen {ssh_addr}: {e}"))?;
    let api = tokio::net::TcpListener::bind(api_addr)
        .await
        .map_err(|e| anyhow::anyhow!("api.listen {api_addr}: {e}"))?;
    let scheme = if gw.config.api.tls_cert.as_os_str().is_empty() {
        "http"
    } else {
        "https"
    };
    eprintln!("ci-gateway {}", env!("CARGO_PKG_VERSION"));
    eprintln!("  ssh:  {}", ssh.local_addr()?);
    eprintln!("  api:  {scheme}://{}", api.local_addr()?);
    eprintln!(
        "  data: {}",
        std::fs::canonicalize(&data_dir)
            .unwrap_or(data_dir)
            .display()
    );
    // Users check these on their first connection instead of trusting it
    // (`ssh-keyscan <host> | ssh-keygen -lf -` prints the same).
    for key in &gw.host_keys {
        eprintln!(
            "  host key: {} {}",
            crate::keys::fingerprint(key.public_key()),
            key.algorithm().as_str()
        );
    }
    if let Some(path) = &gw.generated_token_file {
        // The operator needs this token to register runners; it is printed
        // once at start, never logged through tracing.
        if let Some(token) = gw.tokens.first() {
            eprintln!(
                "  registration token: {} (kept in {})",
                token.expose(),
                path.display()
            );
        }
    }
    let metrics = match gw.config.metrics.listen_addr() {
        Ok(Some(addr)) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?,
        ),
        _ => None,
    };
    if let Some(m) = &metrics {
        eprintln!("  metrics: http://{}/metrics", m.local_addr()?);
    }
    let listeners = crate::Listeners { ssh, api, metrics };
    crate::run(gw, listeners, shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
