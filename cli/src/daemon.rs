//! `cairn daemon status|show-config|stop|restart`: the running daemon, seen and steered.
//!
//! A daemon `cairn` started on its own keeps the settings it started with; these verbs show
//! which daemon answers on the socket (pid, socket, store, root, config file, uptime, version),
//! its effective settings, whether they are the ones this command would start it with, and stop
//! or restart it. None of them starts a daemon (but `restart` starts the new one).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_api::DaemonStatus;
use cairn_client::Client;
use clap::Subcommand;

use crate::connect::{config_name, other_settings, probe};
use crate::ctx::{print_json, Ctx};
use clap::Args;

/// How long a stopping daemon gets to finish its requests (its own grace is 30 s) and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

#[derive(Subcommand)]
pub enum DaemonCommand {
    /// Show the running daemon: pid, socket, store directory, root, config file, uptime,
    /// version, and whether its settings are the ones this command would start it with.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the running daemon's effective settings, as a config file (TOML) would set them.
    ShowConfig {
        /// Print them as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running daemon gracefully (running requests finish) and wait until it is gone.
    Stop,
    /// Stop the running daemon, if any, and start one with this command's settings.
    Restart,
}

pub async fn run(ctx: &Ctx, cmd: DaemonCommand) -> anyhow::Result<()> {
    match cmd {
        DaemonCommand::Status { json } => {
            let (client, v) = running(ctx).await?;
            let s = client.daemon_status().await?;
            let differs = other_settings(&client, &v, &ctx.settings, &ctx.cli_store).await;
            if json {
                let mut value = serde_json::to_value(&s)?;
                value["settingsMatch"] = serde_json::Value::Bool(differs.is_none());
                print_json(&value)?;
            } else {
                println!("pid:      {}", s.pid);
                println!("version:  cairnd {} (API {})", s.version, s.api_version);
                println!("socket:   {}", s.socket);
                println!("store:    {}", s.store_dir);
                println!("root:     {}", s.root);
                println!("config:   {}", config_name(s.config_file.as_deref()));
                println!("uptime:   {}", uptime(s.uptime_seconds));
                match differs {
                    None => println!("settings: as this command would start it"),
                    Some(d) => println!("settings: {d}"),
                }
                if let Some(m) = s.memory {
                    println!(
                        "memory:   page cache {:.1} of {:.0} MiB, graph of {} paths in {} rows",
                        m.page_cache_bytes as f64 / 1048576.0,
                        m.page_cache_limit as f64 / 1048576.0,
                        m.graph_paths,
                        m.graph_rows
                    );
                }
            }
        }
        DaemonCommand::ShowConfig { json } => {
            let (client, _) = running(ctx).await?;
            let settings = client.daemon_config().await?;
            if json {
                print_json(&settings)?;
            } else {
                let s = client.daemon_status().await?;
                println!(
                    "# effective settings of cairnd (pid {}, config {})",
                    s.pid,
                    config_name(s.config_file.as_deref())
                );
                print!("{}", settings.to_toml().context("cannot write the settings as TOML")?);
            }
        }
        DaemonCommand::Stop => {
            let Some(s) = stop(&ctx.settings.socket).await? else {
                bail!("no cairnd is listening on '{}'", ctx.settings.socket.display());
            };
            eprintln!("stopped cairnd (pid {}) on '{}'", s.pid, s.socket);
        }
        DaemonCommand::Restart => {
            let old = stop(&ctx.settings.socket).await?;
            let (_, pid, log) =
                crate::connect::spawn(&ctx.settings, &ctx.cli_store, Client::new(&ctx.settings.socket)).await?;
            let was =
                old.map(|s| format!("pid {} stopped; ", s.pid)).unwrap_or_else(|| "none was running; ".to_owned());
            eprintln!(
                "restarted cairnd ({was}pid {pid} on '{}', config {}, log in '{}')",
                ctx.settings.socket.display(),
                config_name(ctx.cli_store.config_file().as_deref().map(|p| p.to_string_lossy()).as_deref()),
                log.display()
            );
        }
    }
    Ok(())
}

/// The daemon listening on the socket, or an error saying none is.
async fn running(ctx: &Ctx) -> anyhow::Result<(Client, cairn_api::VersionInfo)> {
    probe(&ctx.settings)
        .await?
        .with_context(|| format!("no cairnd is listening on '{}'", ctx.settings.socket.display()))
}

/// Asks the daemon on `socket` to stop and waits until its socket is gone and its process has
/// exited (so that its store lock is free for the next one). `None`: no daemon was listening.
async fn stop(socket: &Path) -> anyhow::Result<Option<DaemonStatus>> {
    let client = Client::new(socket);
    let status = match client.daemon_stop().await {
        Ok(s) => s,
        Err(e) if e.is_no_daemon() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let started = Instant::now();
    let mut said = false;
    while socket.symlink_metadata().is_ok() || alive(status.pid) {
        if started.elapsed() > STOP_TIMEOUT {
            bail!("cairnd (pid {}) did not stop within {STOP_TIMEOUT:?}", status.pid);
        }
        // A daemon lets running requests (builds among them) finish for up to 30 s: said, so
        // that the wait is not a silent one.
        if !said && started.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "cairnd (pid {}) is stopping: its running requests get up to 30 s to finish, then are cut off",
                status.pid
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(status))
}

/// Whether process `pid` runs (a zombie, waiting for its parent to reap it, does not: it holds
/// no files and no locks).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => {
            stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()).is_some_and(|c| c != 'Z' && c != 'X')
        }
        Err(_) => false,
    }
}

/// Seconds as `2d 3h`, `3h 5m`, `4m 10s` or `7s`.
pub(crate) fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, ..) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[derive(Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub action: Option<DaemonCommand>,
    /// Shadows the global flag, which means nothing here (`cairn daemon` is the daemon).
    #[arg(long, hide = true)]
    pub no_auto_start: bool,
}

#[derive(Args)]
pub struct VersionArgs {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl VersionArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let VersionArgs { json } = self;
        // Never starts a daemon: the client's version, and the running daemon's if any.
        let v = crate::connect::probe(&ctx.settings).await?.map(|(_, v)| v);
        if json {
            print_json(&serde_json::json!({ "client": env!("CARGO_PKG_VERSION"), "daemon": v }))?;
        } else {
            println!("cairn {}", env!("CARGO_PKG_VERSION"));
            match v {
                Some(v) => println!(
                    "cairnd {} (API {}), store {}, {}",
                    v.daemon_version,
                    v.api_version,
                    v.store_dir,
                    if v.trusted { "trusted" } else { "not trusted" }
                ),
                None => println!("cairnd: not running on '{}'", ctx.settings.socket.display()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_as_people_say_them() {
        assert_eq!(uptime(7), "7s");
        assert_eq!(uptime(250), "4m 10s");
        assert_eq!(uptime(3 * 3600 + 5 * 60 + 9), "3h 5m");
        assert_eq!(uptime(2 * 86400 + 3 * 3600), "2d 3h");
    }

    #[test]
    fn this_process_is_alive_and_a_free_pid_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
