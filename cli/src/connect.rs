//! Finding the daemon, and starting one when none is listening.
//!
//! A user on a fresh machine types `cairn add ./file` and expects it to work. When nothing
//! answers on the socket (no such file, or connection refused), `cairn` starts `cairn daemon`
//! with the very settings it resolved (same root, store directory, socket, config file),
//! detached from the terminal — a session of its own, so no controlling terminal, stdin on
//! `/dev/null` — with its output in `<state>/cairnd.log`, waits for it to answer, and says so on
//! stderr. A daemon that kept the user's terminal would lend it to everything it starts, and
//! would get the terminal's hangup and interrupt when the shell goes. `--no-auto-start` or `auto-start-daemon = false` turn this off.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_api::config::{state_dir, Settings};
use cairn_client::Client;
use cairn_daemon::args::StoreArgs;

/// How long a freshly started daemon gets to open its store and listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A client connected to a daemon serving `settings`' store, starting it if allowed.
pub async fn connect(settings: &Settings, args: &StoreArgs) -> anyhow::Result<Client> {
    let client = Client::new(&settings.socket);
    match client.version().await {
        Ok(v) => {
            check(&v, settings)?;
            Ok(client)
        }
        Err(e) if e.is_no_daemon() && settings.auto_start_daemon => start(settings, args, client).await,
        Err(e) if e.is_no_daemon() => bail!(
            "no cairnd is listening on '{}'; start one with `cairn daemon` (or drop --no-auto-start)",
            settings.socket.display()
        ),
        Err(e) => Err(e.into()),
    }
}

fn check(v: &cairn_api::VersionInfo, settings: &Settings) -> anyhow::Result<()> {
    if v.api_version != cairn_api::API_VERSION {
        bail!(
            "cairnd speaks API version {} but this cairn speaks {}; restart the daemon with this version",
            v.api_version,
            cairn_api::API_VERSION
        );
    }
    if v.store_dir != settings.store_dir {
        bail!(
            "the cairnd on '{}' serves store '{}', not '{}'; pass --socket to reach another daemon",
            settings.socket.display(),
            v.store_dir,
            settings.store_dir
        );
    }
    Ok(())
}

async fn start(settings: &Settings, args: &StoreArgs, client: Client) -> anyhow::Result<Client> {
    let state = state_dir(&settings.root);
    std::fs::create_dir_all(&state).with_context(|| format!("cannot create '{}'", state.display()))?;
    let log_path = state.join("cairnd.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open '{}'", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the cairn executable to start the daemon")?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("daemon")
        .args(StoreArgs::to_daemon_args(settings, args.config.as_ref()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: between fork and exec the hook makes one async-signal-safe system call and
    // allocates nothing. The child is not a process group leader (no `process_group` is
    // asked), so setsid cannot fail with EPERM.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = command.spawn().context("cannot start the daemon")?;
    let started = Instant::now();
    loop {
        match client.version().await {
            Ok(v) => {
                check(&v, settings)?;
                eprintln!(
                    "cairn: no daemon was listening; started cairnd (pid {}) on '{}', log in '{}'",
                    child.id(),
                    settings.socket.display(),
                    log_path.display()
                );
                return Ok(client);
            }
            Err(e) if !e.is_no_daemon() => return Err(e.into()),
            Err(_) => {}
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(empty log)");
            bail!("the daemon cairn started exited ({status}): {last}");
        }
        if started.elapsed() > START_TIMEOUT {
            bail!("the daemon cairn started did not answer within {START_TIMEOUT:?}; see '{}'", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
