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
            warn_if_other_settings(&client, &v, settings, args).await;
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

/// Says on stderr, in one line, when the running daemon's effective settings are not the ones
/// this command would start it with (a config file edited, or another one named, since it
/// started): the daemon keeps what it started with until `cairn daemon restart`.
async fn warn_if_other_settings(client: &Client, v: &cairn_api::VersionInfo, settings: &Settings, args: &StoreArgs) {
    if let Some(line) = other_settings(client, v, settings, args).await {
        eprintln!("cairn: warning: {line}");
    }
}

/// The warning [`warn_if_other_settings`] gives, if any.
pub async fn other_settings(
    client: &Client,
    v: &cairn_api::VersionInfo,
    settings: &Settings,
    args: &StoreArgs,
) -> Option<String> {
    // An older daemon does not say; a matching one needs no more requests.
    if v.settings_fingerprint.is_empty() || v.settings_fingerprint == settings.fingerprint() {
        return None;
    }
    let keys = match client.daemon_config().await {
        Ok(theirs) => settings.differing_keys(&theirs).join(", "),
        Err(_) => String::new(),
    };
    let (pid, theirs) = match client.daemon_status().await {
        Ok(s) => (s.pid.to_string(), config_name(s.config_file.as_deref())),
        Err(_) => ("?".to_owned(), "?".to_owned()),
    };
    let ours = config_name(args.config_file().as_deref().map(|p| p.to_string_lossy()).as_deref());
    let keys = if keys.is_empty() { "its settings".to_owned() } else { keys };
    Some(format!(
        "the running cairnd (pid {pid}, config {theirs}) differs from this command's settings (config {ours}) in {keys}; `cairn daemon restart` applies them"
    ))
}

/// A config file as status lines and warnings name it.
pub fn config_name(file: Option<&str>) -> String {
    match file {
        Some(f) => format!("'{f}'"),
        None => "none".to_owned(),
    }
}

/// The running daemon's version answer, or `None` when none listens; never starts one.
pub async fn probe(settings: &Settings) -> anyhow::Result<Option<(Client, cairn_api::VersionInfo)>> {
    let client = Client::new(&settings.socket);
    match client.version().await {
        Ok(v) => Ok(Some((client, v))),
        Err(e) if e.is_no_daemon() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn start(settings: &Settings, args: &StoreArgs, client: Client) -> anyhow::Result<Client> {
    let (client, pid, log_path) = spawn(settings, args, client).await?;
    eprintln!(
        "cairn: no daemon was listening; started cairnd (pid {pid}) on '{}', log in '{}'",
        settings.socket.display(),
        log_path.display()
    );
    Ok(client)
}

/// Starts `cairn daemon` with `settings` (detached, logging to `<state>/cairnd.log`) and waits
/// until it answers on its socket; returns the client, its pid and its log.
pub async fn spawn(
    settings: &Settings,
    args: &StoreArgs,
    client: Client,
) -> anyhow::Result<(Client, u32, std::path::PathBuf)> {
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
        .args(StoreArgs::to_daemon_args(settings, args.config_file().as_ref()))
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
                return Ok((client, child.id(), log_path));
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
