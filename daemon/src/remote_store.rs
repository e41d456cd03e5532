//! Stores that answer Nix's protocols, as substituters (`cairn_cache::remote`): `ssh://HOST`
//! (Nix's legacy SSH protocol, `nix-store --serve` — what NixOS's `nix.sshServe` offers),
//! `ssh-ng://HOST` (the worker protocol, `nix-daemon --stdio`) and `unix://SOCKET`. They are
//! reached as remote builders are (`cairn_build::remote::connect`): the system's `ssh` in batch
//! mode as the daemon's user, the URL's `ssh-key`, `base64-ssh-public-host-key`,
//! `remote-program`, `remote-store` and `compress`, `NIX_SSHOPTS`, and `localhost` without SSH.
//!
//! Sessions are kept for the next question: at most `max-connections` at once (Nix's setting,
//! default 1), an idle one closed when it has waited a minute. A session that fails is closed; one
//! that had been idle is tried again once on a new session (the remote end may have gone away
//! meanwhile). Every question is bounded by `connect-timeout` + `stalled-download-timeout`
//! (waiting for a free session included), and a NAR by `stalled-download-timeout` between
//! chunks: a question given up — timed out, or its asker gone — has its session ended, and a
//! store that did not answer or could not be reached is not asked again for a minute, so a
//! closure's thousand lookups do not each wait for it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cairn_build::remote::connect::{self, Conn, Session, Stopper, Target};
use cairn_cache::remote::{RemoteAnswer, RemoteStore};
use cairn_cache::NetOptions;
use cairn_nix::{StoreDir, StorePath};
use cairn_store::PathInfo;
use cairn_worker::ClientError;
use tokio::sync::Semaphore;

/// How long a session may wait unused before it is closed instead of reused.
const IDLE: Duration = Duration::from_secs(60);

/// A remote store as a substituter's backend.
pub struct ProtocolStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// As shown in messages (without parameters).
    shown: String,
    target: Target,
    store_dir: StoreDir,
    ssh_dir: PathBuf,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<(Conn, Instant)>>,
    /// Until when it is not asked (it did not answer, or could not be reached).
    down_until: Mutex<Option<Instant>>,
    /// Longest wait for an answer, and for the next chunk of a NAR.
    answer_within: Duration,
    stall: Duration,
}

/// The session a question is on, for ending it from outside: when the question is given up
/// (timed out, or its asker gone), the session is stopped, and so is any session opened for it
/// after that.
#[derive(Default)]
struct Watch {
    state: Mutex<(Option<Stopper>, bool)>,
}

type StopSlot = Arc<Watch>;

/// Puts the session now in use in `slot` (`None`: none), or stops it at once if the question
/// was given up.
fn set(slot: &StopSlot, stopper: Option<Stopper>) {
    let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    match (&stopper, state.1) {
        (Some(s), true) => s.stop(),
        _ => state.0 = stopper,
    }
}

/// Gives the question up: its session is stopped, and no other is opened for it.
fn stop(slot: &StopSlot) {
    let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.1 = true;
    if let Some(s) = state.0.take() {
        s.stop();
    }
}

fn given_up(slot: &StopSlot) -> bool {
    slot.state.lock().unwrap_or_else(PoisonError::into_inner).1
}

/// Gives a question up when its asker stops waiting for it.
struct GiveUpOnDrop(StopSlot);

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        stop(&self.0);
    }
}

/// How long a store that did not answer is not asked again (Nix disables a binary cache that
/// failed for as long).
const DOWN_FOR: Duration = Duration::from_secs(60);

impl ProtocolStore {
    /// The store `url` names, reached from this daemon with `ssh_dir` for SSH's master sockets
    /// and known-hosts files. Nothing is connected until the first question.
    pub fn open(url: &str, store_dir: &StoreDir, ssh_dir: &Path, net: &NetOptions) -> Result<ProtocolStore, String> {
        let bad = |problem: &dyn std::fmt::Display| format!("substituter '{url}': {problem}");
        let machines = cairn_nix::machines::parse(url, "-", &mut |_: &str| Ok(None)).map_err(|e| bad(&e))?;
        let [machine] = &machines[..] else { return Err(bad(&"one store URL expected")) };
        let target = Target::of(machine).map_err(|e| bad(&e.problem))?;
        let (shown, params) = cairn_cache::backend::split_params(url);
        let connections = match params.iter().find(|(k, _)| k == "max-connections") {
            None => 1,
            Some((_, v)) => match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad(&format_args!("max-connections '{v}' is not a positive number"))),
            },
        };
        let inner = Arc::new(Inner {
            shown: shown.to_owned(),
            target,
            store_dir: store_dir.clone(),
            ssh_dir: ssh_dir.to_owned(),
            slots: Arc::new(Semaphore::new(connections)),
            idle: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
            answer_within: net.connect_timeout + net.stall_timeout,
            stall: net.stall_timeout,
        });
        // Idle sessions are closed when they have waited a minute, by a thread that ends with
        // the store.
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("remote-store-idle".into())
            .spawn(move || loop {
                std::thread::sleep(IDLE / 2);
                match weak.upgrade() {
                    Some(inner) => drop(inner.stale()),
                    None => return,
                }
            })
            .map_err(|e| bad(&format_args!("cannot start a thread: {e}")))?;
        Ok(ProtocolStore { inner })
    }
}

impl Inner {
    /// The idle sessions that have waited too long, taken out (closed when dropped, outside
    /// the lock: a closing session waits for its process).
    fn stale(&self) -> Vec<(Conn, Instant)> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let (kept, stale) = std::mem::take(&mut *idle).into_iter().partition(|(_, since)| since.elapsed() <= IDLE);
        *idle = kept;
        stale
    }

    /// A session: an idle one that has not waited too long, else a new one (whose stopper is
    /// put in `on` while it greets). True: reused. A store that cannot be reached is down for
    /// a while.
    fn take(&self, on: &StopSlot) -> Result<(Conn, bool), String> {
        drop(self.stale());
        let reused = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        if let Some((conn, _)) = reused {
            return Ok((conn, true));
        }
        self.check_up()?;
        connect::open_stoppable(&self.target, &self.store_dir, &self.ssh_dir, &mut |s| set(on, Some(s)))
            .map(|c| (c, false))
            .map_err(|e| {
                self.mark_down();
                format!("cannot reach '{}': {e}", self.shown)
            })
    }

    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + DOWN_FOR);
    }

    fn check_up(&self) -> Result<(), String> {
        match *self.down_until.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(until) if Instant::now() < until => Err(format!(
                "'{}' did not answer a moment ago; it is not asked again for {} s",
                self.shown,
                DOWN_FOR.as_secs()
            )),
            _ => Ok(()),
        }
    }

    fn give_back(&self, conn: Conn) {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).push((conn, Instant::now()));
    }

    /// Runs `op` on a session on a blocking thread, within the time allowed for an answer
    /// (waiting for a free session included). A question given up ends its session.
    async fn ask<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl Fn(&mut Session) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, String> {
        self.check_up()?;
        let on = StopSlot::default();
        let _give_up = GiveUpOnDrop(on.clone());
        let (inner, on_thread) = (self.clone(), on.clone());
        let asked = async move {
            let _slot =
                inner.slots.clone().acquire_owned().await.map_err(|_| "the substituter is closed".to_owned())?;
            let worker = inner.clone();
            let job = tokio::task::spawn_blocking(move || loop {
                let (mut conn, reused) = worker.take(&on_thread)?;
                set(&on_thread, Some(conn.stopper()));
                let answer = op(&mut conn.session);
                set(&on_thread, None);
                match answer {
                    Ok(v) => {
                        worker.give_back(conn);
                        return Ok(v);
                    }
                    // A session that had waited may have ended at the other end: once more,
                    // anew, unless the question was given up.
                    Err(ClientError::Protocol(_)) if reused && !given_up(&on_thread) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            });
            match job.await {
                Ok(answer) => answer,
                Err(e) => Err(format!("the question to '{}' failed: {e}", inner.shown)),
            }
        };
        match tokio::time::timeout(self.answer_within, asked).await {
            Ok(answer) => answer,
            Err(_) => {
                self.mark_down();
                Err(format!("'{}' did not answer within {} s", self.shown, self.answer_within.as_secs()))
            }
        }
    }

    /// Streams `path`'s NAR into `tx`, on the calling (blocking) thread.
    fn send_nar(&self, path: &StorePath, tx: SyncSender<Result<Vec<u8>, String>>, on: &StopSlot) {
        let mut out = ChunkSender { tx: &tx, buf: Vec::new(), sent: 0, last: Instant::now() };
        let failed = loop {
            let (mut conn, reused) = match self.take(on) {
                Ok(c) => c,
                Err(e) => break e,
            };
            set(on, Some(conn.stopper()));
            let copied = conn.session.nar_from_path(path, |r| {
                cairn_nix::nar::copy_one(r, &mut out, cairn_nix::nar::Limits::default())
                    .and_then(|_| out.flush().map_err(cairn_nix::nar::NarError::Io))
            });
            set(on, None);
            match copied {
                Ok(Ok(())) => {
                    self.give_back(conn);
                    return;
                }
                // Nothing of it was passed on yet: once more on a new session, as a question.
                Err(ClientError::Protocol(_)) if reused && out.sent == 0 && !given_up(on) => {
                    out.buf.clear();
                    continue;
                }
                Err(e) => break e.to_string(),
                // The receiver gone (the substitution refused it) or the NAR broken: the
                // session is out of step either way, and is closed.
                Ok(Err(e)) => {
                    break format!("the NAR of '{}' from '{}': {e}", self.store_dir.display(path), self.shown)
                }
            }
        };
        let _ = tx.send(Err(failed));
    }
}

impl RemoteStore for ProtocolStore {
    fn path_info<'a>(&'a self, path: &'a StorePath) -> RemoteAnswer<'a, Option<PathInfo>> {
        let path = path.clone();
        Box::pin(async move {
            let asked = path.clone();
            let info = self.inner.ask(move |s| s.query_path_info(&asked)).await?;
            Ok(info.map(|info| crate::convert::store_info(cairn_worker::ValidPathInfo { path, info })))
        })
    }

    fn nar<'a>(&'a self, path: &'a StorePath) -> RemoteAnswer<'a, cairn_cache::backend::FileReader> {
        let path = path.clone();
        Box::pin(async move {
            self.inner.check_up()?;
            let waited = tokio::time::timeout(self.inner.answer_within, self.inner.slots.clone().acquire_owned());
            let slot = match waited.await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) => return Err("the substituter is closed".to_owned()),
                Err(_) => return Err(format!("no session with '{}' was free in time", self.inner.shown)),
            };
            let (tx, rx) = std::sync::mpsc::sync_channel(16);
            let (inner, on) = (self.inner.clone(), StopSlot::default());
            let on_thread = on.clone();
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                inner.send_nar(&path, tx, &on_thread);
            });
            Ok(Box::new(Incoming { rx, chunk: Vec::new(), at: 0, on, stall: self.inner.stall })
                as cairn_cache::backend::FileReader)
        })
    }
}

/// The NAR's bytes on their way to the substitution, in chunks of up to 256 KiB.
/// What has waited a second is passed on however little it is, so that a slow remote that keeps
/// sending is not taken for a stalled one.
struct ChunkSender<'a> {
    tx: &'a SyncSender<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    sent: u64,
    last: Instant,
}

const CHUNK: usize = 256 << 10;

impl Write for ChunkSender<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK || self.last.elapsed() >= Duration::from_secs(1) {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.sent += chunk.len() as u64;
        self.last = Instant::now();
        self.tx
            .send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the substitution stopped reading"))
    }
}

/// The reader the substitution restores from: the chunks as they come, an error if the sender
/// failed or nothing came for the stall timeout. Its session is ended when it gives up, or is
/// dropped before the end (the sender then stops too, and lets go of its session's slot).
struct Incoming {
    rx: Receiver<Result<Vec<u8>, String>>,
    chunk: Vec<u8>,
    at: usize,
    on: StopSlot,
    stall: Duration,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        stop(&self.on);
    }
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv_timeout(self.stall) {
                Ok(Ok(c)) => (self.chunk, self.at) = (c, 0),
                Ok(Err(e)) => return Err(io::Error::other(e)),
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => {
                    stop(&self.on);
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no data for {} s (stalled-download-timeout)", self.stall.as_secs()),
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetOptions {
        NetOptions::from_secs(5, 5)
    }

    #[test]
    fn urls_are_read_as_nix_reads_store_urls() {
        let dir = StoreDir::new("/nix/store").unwrap();
        let tmp = std::env::temp_dir();
        let s =
            ProtocolStore::open("ssh://alice@big?remote-program=cairnd&max-connections=3", &dir, &tmp, &net()).unwrap();
        assert_eq!(s.inner.shown, "ssh://alice@big");
        assert_eq!(s.inner.slots.available_permits(), 3);
        let Target::Ssh(t) = &s.inner.target else { panic!() };
        assert!(t.serve && t.command == "cairnd --serve --write", "{t:?}");
        let Target::Ssh(t) = ProtocolStore::open("ssh-ng://h", &dir, &tmp, &net()).unwrap().inner.target.clone() else {
            panic!()
        };
        assert!(!t.serve && t.command == "nix-daemon --stdio");
        for (url, why) in [
            ("ssh://h?max-connections=0", "max-connections"),
            ("ssh://-oProxyCommand=x", "cannot start with '-'"),
            ("ssh://", "HOST"),
        ] {
            let e = ProtocolStore::open(url, &dir, &tmp, &net()).err().unwrap();
            assert!(e.contains(why) && e.contains("substituter"), "{url}: {e}");
        }
    }

    #[test]
    fn a_nar_cut_short_is_an_error_and_a_silent_sender_times_out() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(Ok(b"abc".to_vec())).unwrap();
        tx.send(Err("the NAR broke".to_owned())).unwrap();
        let mut r = Incoming { rx, chunk: Vec::new(), at: 0, on: StopSlot::default(), stall: Duration::from_secs(5) };
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert_eq!((got.as_slice(), e.to_string().as_str()), (&b"abc"[..], "the NAR broke"));
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, String>>(4);
        let mut r =
            Incoming { rx, chunk: Vec::new(), at: 0, on: StopSlot::default(), stall: Duration::from_millis(50) };
        assert_eq!(r.read(&mut [0; 8]).unwrap_err().kind(), io::ErrorKind::TimedOut);
        drop(tx);
    }
}
