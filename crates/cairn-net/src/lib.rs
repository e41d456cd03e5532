//! The HTTP client setup shared by binary caches (`cairn-cache`: `http(s)://` backends and the
//! `tcp://` push client) and registries (`cairn-image`'s distribution client).
//!
//! Each of them once built its own `reqwest` client, and they drifted: one hard-coded its
//! timeouts instead of taking the daemon's `connect-timeout` and `stalled-download-timeout`.
//! [`client_builder`] is now the one place a client is configured from [`NetOptions`]; callers
//! add only what is theirs (a pool size, `--tls-verify=false`). [`with_causes`] is the one way an
//! HTTP error is put into a message.
//!
//! A small crate of its own so that the image crate need not link the binary-cache crate (and
//! its compressors and S3 client) for it, and so the layering stays a tree: `cairn-cache` and
//! `cairn-image` both sit above it and neither above the other.
//!
//! **Architecture Invariant:** no cairn crate calls `reqwest::Client::builder()` but this one,
//! except `cairn-build`'s `builtin:fetchurl`, which follows Nix's downloader (no certificate
//! checks — the output's hash is — and the build environment's proxies).

pub mod netrc;

use std::sync::Arc;
use std::time::Duration;

pub use netrc::Netrc;

/// How the network is used: the daemon's `connect-timeout` and `stalled-download-timeout`, and
/// its `netrc-file`'s credentials for binary caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// Time allowed to connect and to receive a response's headers.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a body before the download fails.
    pub stall_timeout: Duration,
    /// Credentials sent to HTTP(S) binary caches, by host.
    pub netrc: Option<Arc<Netrc>>,
}

impl NetOptions {
    /// From the settings' seconds (`connect-timeout`, `stalled-download-timeout`).
    pub fn from_secs(connect_timeout: u64, stalled_download_timeout: u64) -> NetOptions {
        NetOptions {
            connect_timeout: Duration::from_secs(connect_timeout),
            stall_timeout: Duration::from_secs(stalled_download_timeout),
            netrc: None,
        }
    }

    /// The same, with the credentials of a netrc file (a missing file gives none).
    pub fn with_netrc_file(mut self, path: Option<&std::path::Path>) -> std::io::Result<NetOptions> {
        if let Some(p) = path {
            match std::fs::read_to_string(p) {
                Ok(text) => self.netrc = Some(Arc::new(Netrc::parse(&text))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self)
    }

    /// The login and password to send to `url`'s host, if the netrc file names it.
    pub fn credentials_for(&self, url: &str) -> Option<(&str, &str)> {
        let host = url.split_once("://")?.1.split(['/', '?']).next()?;
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.split(':').next().unwrap_or(host),
        };
        self.netrc.as_ref()?.credentials(host)
    }
}

impl Default for NetOptions {
    /// The settings' defaults: 10 s to connect, 300 s without bytes.
    fn default() -> Self {
        NetOptions::from_secs(10, 300)
    }
}

/// The `User-Agent` cairn sends.
pub const USER_AGENT: &str = concat!("cairn/", env!("CARGO_PKG_VERSION"));

/// A client builder with `opts`' timeouts (connect, and every read of a body) and cairn's user
/// agent.
pub fn client_builder(opts: &NetOptions) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.stall_timeout)
        .user_agent(USER_AGENT)
}

/// An error and its causes on one line, each cause once: reqwest's own message ("error sending
/// request") says little without the connection or TLS error under it.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_are_said_once() {
        let e = E("sending: refused", Some(Box::new(E("refused", Some(Box::new(E("os error 111", None)))))));
        assert_eq!(with_causes(&e), "sending: refused: os error 111");
    }

    #[test]
    fn defaults_are_the_settings_defaults() {
        assert_eq!(NetOptions::default(), NetOptions::from_secs(10, 300));
        assert!(client_builder(&NetOptions::default()).build().is_ok());
    }
}
