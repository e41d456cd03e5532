//! cairnd: the process that owns a store and serves cairn's API on a Unix socket.
//!
//! [`args`] turns flags, environment and the config file into settings; [`serve`] opens the
//! store, binds the socket and runs the accept loop until SIGTERM or SIGINT; `api` maps API
//! routes (one module per group) onto `cairn_store::LocalStore` calls, which are blocking and run
//! on tokio's blocking pool through `stream`; `state` is what the routes share; `listen` holds the
//! binary cache and OCI registry listeners; `auth` decides what each connection may do from its
//! peer credentials (SO_PEERCRED); `limits` bounds the connections each user (or client address)
//! may hold and how long a request head may take; `send_timeout` how long an answer may wait for
//! a client that reads none of it; `outbox` keeps builds from waiting for the clients of their
//! event streams; `tag_owners` decides who may move or remove an image tag.
//!
//! **Architecture invariant:** only this crate (with `cairn-client`) knows the wire format, and
//! only through `cairn-api`'s types; the store below it knows nothing of HTTP or JSON.

mod activation;
mod api;
pub mod args;
mod auth;
mod convert;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handover;
mod limits;
mod listen;
mod outbox;
mod remote_store;
mod send_timeout;
mod serve;
mod server;
mod state;
mod stream;
mod tag_owners;

pub use serve::run_serve;
pub use server::{limit_allocator_arenas, serve, serve_with_config};

/// Formats an error and its causes on one line, each cause once: a message that already ends with
/// (or contains) its cause's text — an error type that embeds `{source}` and also reports it as
/// its source — does not repeat it. Control characters are escaped, so that an error quoting
/// user input stays on one line. Used by `cairnd` and `cairn` alike.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        let msg = msg.trim();
        if msg.is_empty() || last.contains(msg) || out.contains(msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(msg);
        last = msg.to_owned();
    }
    out.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
}

/// `cairnd --stdio`: one session of Nix's daemon protocol on standard input and output, as
/// `nix-daemon --stdio` (what `ssh-ng://host?remote-program=cairnd` runs). When a cairnd already
/// serves the store, the bytes are relayed to its `nix-daemon-socket`, so the session is that
/// daemon's (one store has one owner) and its rights are those of whoever runs this; otherwise
/// the store is opened here and the caller, who could open it, is trusted.
pub fn run_stdio(args: &args::StoreArgs) -> anyhow::Result<()> {
    let settings = args.settings(true)?;
    stdio_logging();
    if let Some(path) = &settings.nix_daemon_socket {
        let at = cairn_api::socket::SocketAddress::of(path);
        if let Ok(stream) = at.and_then(|at| std::os::unix::net::UnixStream::connect(at.path())) {
            return relay(stream);
        }
    }
    let (rt, state) = open_here(args, &settings)?;
    listen::nix::serve_stdio(state, rt.handle().clone())
}

/// Logging for the modes whose standard output is a protocol's: to standard error, quietly by
/// default.
fn stdio_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::io::stderr).try_init();
}

/// Opens the store in this process (no daemon serves it), on a runtime of its own.
fn open_here(
    args: &args::StoreArgs,
    settings: &cairn_api::config::Settings,
) -> anyhow::Result<(tokio::runtime::Runtime, std::sync::Arc<state::AppState>)> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let control = std::sync::Arc::new(state::Control::new(settings.clone(), args.config_file()));
    let state = rt.block_on(server::open_state(settings, control))?;
    Ok((rt, state))
}

/// Copies standard input to `stream` and `stream` to standard output until both ends close.
fn relay(stream: std::os::unix::net::UnixStream) -> anyhow::Result<()> {
    let mut to_daemon = stream.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_daemon);
        let _ = to_daemon.shutdown(std::net::Shutdown::Write);
    });
    let mut from_daemon = stream;
    let mut out = std::io::stdout().lock();
    // Standard output is line-buffered: each chunk is flushed, or a reply without a newline
    // would wait in the buffer while the client waits for it.
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match std::io::Read::read(&mut from_daemon, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        std::io::Write::write_all(&mut out, &buf[..n])?;
        std::io::Write::flush(&mut out)?;
    }
    drop(upstream);
    Ok(())
}

/// Resolves settings, sets up logging, and runs the daemon on a fresh runtime until it is told
/// to stop. Shared by `cairnd` and `cairn daemon`.
pub fn run(args: &args::StoreArgs) -> anyhow::Result<()> {
    let settings = args.settings(true)?;
    let config_file = args.config_file();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file (the auto-started daemon's) stays greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve_with_config(settings, config_file))
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[derive(Debug, thiserror::Error)]
    #[error("talking to cairnd: {source}")]
    struct Embeds {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::other("connection closed before message completed");
        let e = anyhow::Error::new(Embeds { source: io }).context("cannot add 'x'");
        assert_eq!(error_line(&e), "cannot add 'x': talking to cairnd: connection closed before message completed");
        let plain = anyhow::Error::new(std::io::Error::from_raw_os_error(17)).context("cannot create 'y'");
        assert_eq!(error_line(&plain), "cannot create 'y': File exists (os error 17)");
        assert_eq!(error_line(&anyhow::anyhow!("two\nlines")), "two\\nlines");
    }
}
