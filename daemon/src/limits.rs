//! Connection limits, request-head timeouts and accept back-off for both listeners.
//!
//! Every connection costs the daemon a file descriptor, and the socket is open to every local
//! user. Without limits a few hundred idle or byte-trickling connections from one user used up
//! the descriptors; `accept` then failed with EMFILE at once on every turn of the loop, which spun
//! writing a warning each time (gigabytes of log) and served nobody. Four measures together keep
//! the daemon reachable:
//!
//! - [`raise_nofile_limit`]: the soft `RLIMIT_NOFILE` is raised to the hard limit at start (the
//!   soft default of 1024 is far below what a busy daemon needs; the hard one is the host's
//!   decision).
//! - [`Connections`]: at most `max-connections` per listener and `max-connections-per-user` per
//!   [`PeerKey`] (a uid on the socket, a client address on `listen`). A connection over a limit is
//!   answered `503` with a one-line error as soon as its request head is in, and closed (one
//!   that sends no head within a second is closed unanswered, and at most 64 are waited for at a
//!   time: beyond that they are closed at once), so refusing costs next to nothing. The daemon's
//!   own user is never refused, so the administrator can always reach the daemon. The socket and
//!   `listen` are counted apart: remote clients cannot lock local users out.
//! - [`http1`]: hyper's header-read timeout, which runs while the daemon waits for a request
//!   head — from the accept, and again after each answer on a kept-alive connection — and is
//!   stopped once the head is read. It thereby closes both connections that send nothing and
//!   those that trickle their head, and never a request under way: a download, push or build
//!   may take any time once its head is in. (Hyper starts its timer when it starts waiting, so
//!   an "idle" and a "head" timeout would be one timer; there is one setting.)
//! - `send_timeout`'s [`SendDeadline`](crate::send_timeout::SendDeadline) around every
//!   connection: an answer the client takes none of for `send-timeout` closes the connection, so
//!   a download nobody reads does not hold its producer (a thread, temporary roots) for ever.
//! - [`AcceptErrors`]: a failed `accept` because descriptors or memory ran out backs off (10 ms,
//!   doubling to 1 s) instead of spinning, and every warning here goes through [`LogEvery`], at
//!   most one line per interval with a count of what it left out.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cairn_api::config::Settings;
use hyper_util::rt::TokioTimer;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Refused connections waited for (to answer them) at once per listener; more are closed at once.
const MAX_ANSWERING: usize = 64;
/// How long a refused connection is kept to answer it: long enough for its client to send its
/// request head, short enough that refusals cost few descriptors.
const ANSWER_TIME: Duration = Duration::from_secs(1);
/// The most of a refused connection's request read (and thrown away) before it is closed.
const ANSWER_READ_MAX: usize = 64 * 1024;

/// How often a repeated warning (refusals, accept failures) is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The first and the longest pause after an accept that failed for want of resources.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Raises the soft limit on open files to the hard limit; returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
                return hard;
            }
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    soft
}

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_total: usize,
    /// Connections open at once per [`PeerKey`].
    pub max_per_peer: usize,
    /// How long a request head may take (`None`: no limit).
    pub header_read_timeout: Option<Duration>,
    /// How long an answer may wait for a client that takes none of it (`None`: no limit; see
    /// `send_timeout`).
    pub send_timeout: Option<Duration>,
    /// How long an upload may send nothing (`body-read-timeout`; see [`crate::stream::body_reader`]).
    pub body_read_timeout: Option<Duration>,
}

impl Limits {
    /// The configured limits, `max-connections` lowered to a quarter of `nofile` (each of the two
    /// listeners may use a quarter; the rest is the store's, the builds' and the clients of
    /// substituters').
    pub fn from_settings(settings: &Settings, nofile: u64) -> Limits {
        let fit = usize::try_from(nofile / 4).unwrap_or(usize::MAX).max(16);
        let mut max_total = settings.max_connections;
        if max_total > fit {
            tracing::warn!(
                "max-connections = {max_total} does not fit the open-file limit {nofile}; using {fit} \
                 (raise the hard limit, e.g. LimitNOFILE= in the service unit)"
            );
            max_total = fit;
        }
        Limits {
            max_total,
            max_per_peer: settings.max_connections_per_user.min(max_total),
            header_read_timeout: (settings.header_read_timeout > 0)
                .then(|| Duration::from_secs(settings.header_read_timeout)),
            send_timeout: (settings.send_timeout > 0).then(|| Duration::from_secs(settings.send_timeout)),
            body_read_timeout: (settings.body_read_timeout > 0)
                .then(|| Duration::from_secs(settings.body_read_timeout)),
        }
    }
}

/// The HTTP/1.1 server settings of every connection: `half_close`, so that a client that shuts
/// down its sending side after the request still gets its answer, and the header-read timeout.
pub fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    // The timer must be set whenever a timeout is (hyper panics otherwise); it always is.
    b.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).half_close(true);
    b
}

/// Whom a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A local user on the socket (SO_PEERCRED).
    Uid(u32),
    /// A client address on `listen`: IPv4 as is, IPv6 by its /64 (one host holds a whole /64).
    Ip(IpAddr),
}

impl PeerKey {
    pub fn of_ip(ip: IpAddr) -> PeerKey {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::Ip(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    PeerKey::Ip(IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
            v4 => PeerKey::Ip(v4),
        }
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Uid(uid) => match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid)).ok().flatten() {
                Some(u) => write!(f, "user '{}'", u.name),
                None => write!(f, "uid {uid}"),
            },
            PeerKey::Ip(IpAddr::V6(a)) => write!(f, "address {a}/64"),
            PeerKey::Ip(a) => write!(f, "address {a}"),
        }
    }
}

/// Why a connection was refused; the text is what the client reads.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("cairnd has too many connections (max-connections = {max}); try again later")]
    Total { max: usize },
    #[error("too many connections from {key} (max-connections-per-user = {max}); close some and try again")]
    PerPeer { key: PeerKey, max: usize },
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
}

/// The connections open on one listener.
pub struct Connections {
    /// `socket` or `listen`, for the log.
    name: &'static str,
    limits: Limits,
    /// Never refused, never counted: the daemon's own user.
    exempt: Option<PeerKey>,
    counts: Mutex<Counts>,
    refusals: LogEvery,
    /// Refused connections being answered now.
    answering: Arc<Semaphore>,
}

impl Connections {
    pub fn new(name: &'static str, limits: Limits, exempt: Option<PeerKey>) -> Arc<Connections> {
        Arc::new(Connections {
            name,
            limits,
            exempt,
            counts: Mutex::new(Counts::default()),
            refusals: LogEvery::new(LOG_EVERY),
            answering: Arc::new(Semaphore::new(MAX_ANSWERING)),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts a new connection of `key`, or says why it may not be opened (and logs that, at
    /// most once per interval). The slot gives the connection back when dropped.
    pub fn admit(self: &Arc<Self>, key: PeerKey) -> Result<Slot, Refusal> {
        if self.exempt == Some(key) {
            return Ok(Slot { owner: None, key });
        }
        let refusal = {
            let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            let mine = c.per_peer.get(&key).copied().unwrap_or(0);
            if mine >= self.limits.max_per_peer {
                Some(Refusal::PerPeer { key, max: self.limits.max_per_peer })
            } else if c.total >= self.limits.max_total {
                Some(Refusal::Total { max: self.limits.max_total })
            } else {
                c.total += 1;
                *c.per_peer.entry(key).or_insert(0) += 1;
                None
            }
        };
        match refusal {
            None => Ok(Slot { owner: Some(self.clone()), key }),
            Some(r) => {
                if let Some(more) = self.refusals.tick() {
                    tracing::warn!(
                        "{}: refused a connection: {r} ({more} more refused since the last report)",
                        self.name
                    );
                }
                Err(r)
            }
        }
    }

    /// Answers a refused connection with `503` and the reason (`json`: as the socket API's error
    /// body, else one text line), then closes it, in a task of its own. The answer follows the
    /// client's request head (waited for [`ANSWER_TIME`] at most): closed earlier, the client's
    /// write of its request would fail, and an answer sent before the request is one an HTTP
    /// client (hyper's) takes for a broken connection, so either way it would never show the
    /// reason. At most [`MAX_ANSWERING`] are kept at a time; a flood beyond that is closed
    /// without an answer, so refusing never costs more than a few descriptors.
    pub fn refuse<S>(&self, mut stream: S, refusal: &Refusal, json: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.answering.clone().try_acquire_owned() else { return };
        let answer = refusal_response(refusal, json);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(ANSWER_TIME, async {
                read_head(&mut stream).await?;
                stream.write_all(&answer).await?;
                stream.shutdown().await
            })
            .await;
        });
    }

    /// Connections open now: in all, and of `key`.
    #[cfg(test)]
    fn open(&self, key: PeerKey) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        (c.total, c.per_peer.get(&key).copied().unwrap_or(0))
    }
}

/// One admitted connection; dropping it (when the connection ends) frees its place.
pub struct Slot {
    owner: Option<Arc<Connections>>,
    key: PeerKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(owner) = &self.owner else { return };
        let mut c = owner.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_peer.remove(&self.key);
            }
        }
    }
}

/// Reads (and throws away) a request head: up to its blank line, the end of the stream, or
/// [`ANSWER_READ_MAX`] bytes.
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut tail = [0u8; 4];
    let mut total = 0;
    while total < ANSWER_READ_MAX {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
        for &b in &buf[..n] {
            tail = [tail[1], tail[2], tail[3], b];
            if &tail == b"\r\n\r\n" {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The answer to a refused connection: `503` and the reason, as one JSON error for the socket's
/// clients (`cairn` shows the message as it is) or one text line on `listen`.
pub fn refusal_response(r: &Refusal, json: bool) -> Vec<u8> {
    let (kind, body) = if json {
        let e = cairn_api::ErrorBody { kind: cairn_api::ErrorKind::Internal, message: r.to_string() };
        ("application/json", serde_json::to_string(&e).unwrap_or_default())
    } else {
        ("text/plain; charset=utf-8", format!("{r}\n"))
    };
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nretry-after: 1\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A warning that may recur many times a second, logged at most once per interval.
pub struct LogEvery {
    every: Duration,
    /// When it was last logged, and how many times it was left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    pub fn new(every: Duration) -> LogEvery {
        LogEvery { every, state: Mutex::new((None, 0)) }
    }

    /// `Some(n)` when the warning should be logged now, `n` being how many were left out since
    /// the last one; `None` when it should be left out.
    pub fn tick(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let more = std::mem::take(&mut s.1);
                s.0 = Some(now);
                Some(more)
            }
        }
    }
}

/// What an accept loop does when `accept` fails.
pub struct AcceptErrors {
    name: &'static str,
    backoff: Duration,
    log: LogEvery,
}

impl AcceptErrors {
    pub fn new(name: &'static str) -> AcceptErrors {
        AcceptErrors { name, backoff: BACKOFF_MIN, log: LogEvery::new(LOG_EVERY) }
    }

    /// After a successful accept: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// Logs (at most once per interval) and, when descriptors or memory ran out, waits before
    /// the loop accepts again: the pending connection stays queued, and accepting again at once
    /// would fail again at once.
    pub async fn failed(&mut self, e: io::Error) {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
        );
        if let Some(more) = self.log.tick() {
            if exhausted {
                tracing::warn!(
                    "{}: cannot accept connections: {e}; pausing (max-connections may be above what the open-file \
                     limit allows; {more} more failures since the last report)",
                    self.name
                );
            } else {
                tracing::debug!("{}: accept failed: {e} ({more} more since the last report)", self.name);
            }
        }
        if exhausted {
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> Limits {
        Limits {
            max_total: total,
            max_per_peer: per,
            header_read_timeout: None,
            send_timeout: None,
            body_read_timeout: None,
        }
    }

    #[test]
    fn a_peer_over_its_share_is_refused_and_others_are_not() {
        let c = Connections::new("test", limits(3, 2), None);
        let (a, b) = (PeerKey::Uid(1000), PeerKey::Uid(1001));
        let s1 = c.admit(a).unwrap();
        let _s2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).err(), Some(Refusal::PerPeer { key: a, max: 2 }));
        let _s3 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).err(), Some(Refusal::Total { max: 3 }));
        drop(s1);
        assert_eq!(c.open(a), (2, 1));
        let _s4 = c.admit(b).unwrap();
        assert_eq!(c.open(b), (3, 2));
    }

    #[test]
    fn the_exempt_peer_is_never_refused_nor_counted() {
        let own = PeerKey::Uid(0);
        let c = Connections::new("test", limits(1, 1), Some(own));
        let _s = c.admit(PeerKey::Uid(1)).unwrap();
        let kept: Vec<_> = (0..10).map(|_| c.admit(own).unwrap()).collect();
        assert_eq!(c.open(own), (1, 0));
        drop(kept);
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(PeerKey::of_ip(a), PeerKey::of_ip(b));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(PeerKey::of_ip(mapped), PeerKey::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(PeerKey::of_ip(mapped).to_string(), "address 127.0.0.1");
    }

    #[test]
    fn repeated_warnings_are_counted_not_logged() {
        let l = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(l.tick(), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.tick(), None);
        }
        let l = LogEvery::new(Duration::ZERO);
        assert_eq!(l.tick(), Some(0));
        assert_eq!(l.tick(), Some(0));
    }

    #[test]
    fn accept_backs_off_when_descriptors_run_out_and_not_otherwise() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let mut errors = AcceptErrors::new("test");
            let start = Instant::now();
            errors.failed(io::Error::from_raw_os_error(nix::libc::ECONNABORTED)).await;
            assert!(start.elapsed() < BACKOFF_MIN, "no pause for a connection that went away");
            let start = Instant::now();
            for _ in 0..3 {
                errors.failed(io::Error::from_raw_os_error(nix::libc::EMFILE)).await;
            }
            assert!(start.elapsed() >= BACKOFF_MIN * 7, "10 + 20 + 40 ms: {:?}", start.elapsed());
            assert_eq!(errors.backoff, BACKOFF_MIN * 8);
            errors.succeeded();
            assert_eq!(errors.backoff, BACKOFF_MIN);
        });
    }

    #[test]
    fn the_refusal_is_one_http_answer_with_a_one_line_message() {
        let r = Refusal::PerPeer { key: PeerKey::Ip("10.0.0.1".parse().unwrap()), max: 4 };
        let text = String::from_utf8(refusal_response(&r, true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let e: cairn_api::ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(
            e.message,
            "too many connections from address 10.0.0.1 (max-connections-per-user = 4); close some and try again"
        );
        assert!(!e.message.contains('\n'));
    }
}
