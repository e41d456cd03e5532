//! The event streams of builds (`POST /v1/realise`, `POST /v1/oci/build`) for clients slower
//! than the builds they report on.
//!
//! The builds must never wait for the client. Each stream's forwarding loop used to await every
//! event's place in the answer's channel: a client that stopped reading (a stalled
//! `cairn realise`, a log follower gone quiet) stopped the loop at the first full channel, and
//! with it the realisation the loop also polls — no further derivation was scheduled — while the
//! builder's log lines piled up without bound in the channel behind it. [`forward`] now keeps
//! driving the work and puts each event in an [`Outbox`], which it empties into the channel as
//! the client makes room. The outbox keeps every event the client must see (a few per
//! derivation) and log lines up to a byte budget; past it, log lines are counted and dropped (the
//! build log keeps them all: `cairn log`, and a failure's event carries the log's tail), and the
//! client then reads how many it missed. A
//! client that reads nothing at all is disconnected after `send-timeout`, which ends the stream;
//! the builds go on and register.

use std::collections::VecDeque;
use std::future::Future;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Log bytes an outbox holds for a slow client before it drops log lines.
pub(crate) const LOG_BUDGET: usize = 1 << 20;

/// One line of a stream, as [`forward`]'s caller converted an event.
pub(crate) enum Line {
    /// An event the client must see (a plan, a start, a result).
    Event(Bytes),
    /// A line of `drv`'s build log: dropped when the client is too far behind.
    Log { drv: String, line: Bytes },
}

/// The line telling a client that `n` log lines of `drv` were dropped, in the stream's format.
pub(crate) type Note = fn(drv: String, n: u64) -> Bytes;

/// The text of a [`Note`].
pub(crate) fn dropped_text(n: u64) -> String {
    format!("cairnd: {n} log lines were not sent while the client was not reading (the build log has them)")
}

/// Lines waiting for the client, in order.
pub(crate) struct Outbox {
    /// Each line, and whether it is a log line (counted against the budget).
    queue: VecDeque<(Bytes, bool)>,
    log_bytes: usize,
    budget: usize,
    note: Note,
    /// Log lines dropped since the last note, and the derivation of the last of them.
    dropped: u64,
    dropped_drv: String,
}

impl Outbox {
    pub(crate) fn new(budget: usize, note: Note) -> Outbox {
        Outbox { queue: VecDeque::new(), log_bytes: 0, budget, note, dropped: 0, dropped_drv: String::new() }
    }

    /// Queues a line: always, unless it is a log line over the budget. Before the first line
    /// queued after dropped ones comes a note saying how many.
    pub(crate) fn push(&mut self, line: Line) {
        match line {
            Line::Event(l) => {
                self.note_dropped();
                self.queue.push_back((l, false));
            }
            Line::Log { drv, line } => {
                if self.log_bytes + line.len() > self.budget {
                    self.dropped += 1;
                    self.dropped_drv = drv;
                    return;
                }
                self.note_dropped();
                self.log_bytes += line.len();
                self.queue.push_back((line, true));
            }
        }
    }

    /// Queues the note of the log lines dropped since the last one, if any (over the budget:
    /// it is one line).
    fn note_dropped(&mut self) {
        if self.dropped == 0 {
            return;
        }
        let note = (self.note)(std::mem::take(&mut self.dropped_drv), std::mem::take(&mut self.dropped));
        self.log_bytes += note.len();
        self.queue.push_back((note, true));
    }

    /// The next line for the client.
    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        let (line, log) = self.queue.pop_front()?;
        if log {
            self.log_bytes -= line.len();
        }
        Some(line)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Forgets everything queued: the client is gone.
    fn clear(&mut self) {
        self.queue.clear();
        self.log_bytes = 0;
        self.dropped = 0;
    }
}

/// Drives `work` to its end while its `events`, converted by `convert` (`None`: not shown),
/// leave through an outbox for `tx`'s client at the client's pace; then sends what is left (at
/// the client's pace: the work is over) and returns the work's result. The client going away
/// stops nothing.
pub(crate) async fn forward<T, E>(
    work: impl Future<Output = T>,
    mut events: mpsc::UnboundedReceiver<E>,
    tx: &mpsc::Sender<Bytes>,
    mut convert: impl FnMut(E) -> Option<Line>,
    note: Note,
) -> T {
    tokio::pin!(work);
    let mut outbox = Outbox::new(LOG_BUDGET, note);
    let (mut done, mut events_open, mut client_gone) = (None, true, false);
    let mut take = |e: E, outbox: &mut Outbox, client_gone: bool| {
        if let Some(l) = convert(e) {
            if !client_gone {
                outbox.push(l);
            }
        }
    };
    while done.is_none() {
        tokio::select! {
            r = &mut work => done = Some(r),
            permit = tx.reserve(), if !outbox.is_empty() && !client_gone => match permit {
                Ok(permit) => {
                    if let Some(l) = outbox.pop() {
                        permit.send(l);
                    }
                }
                Err(_) => {
                    client_gone = true;
                    outbox.clear();
                }
            },
            e = events.recv(), if events_open => match e {
                Some(e) => take(e, &mut outbox, client_gone),
                None => events_open = false,
            },
        }
    }
    // Events sent just before the work ended, and the count of lines dropped last.
    while let Ok(e) = events.try_recv() {
        take(e, &mut outbox, client_gone);
    }
    outbox.note_dropped();
    while let Some(l) = outbox.pop() {
        if client_gone || tx.send(l).await.is_err() {
            break;
        }
    }
    done.expect("the loop ends when the work does")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> Line {
        Line::Log { drv: "/store/x.drv".into(), line: Bytes::from(format!("line {n:04}\n")) }
    }

    fn note(drv: String, n: u64) -> Bytes {
        Bytes::from(format!("{drv}: {}\n", dropped_text(n)))
    }

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn log_lines_past_the_budget_are_dropped_and_counted_and_other_events_kept() {
        let mut o = Outbox::new("line 0000\n".len() * 3, note);
        o.push(Line::Event(Bytes::from_static(b"started\n")));
        for n in 0..10 {
            o.push(log(n));
        }
        let got: Vec<String> = std::iter::from_fn(|| o.pop()).map(text).collect();
        assert_eq!(got, ["started\n", "line 0000\n", "line 0001\n", "line 0002\n"]);
        assert_eq!(o.log_bytes, 0);
        // Room again: the client first reads how many lines it missed.
        o.push(log(10));
        assert_eq!(text(o.pop().unwrap()), format!("/store/x.drv: {}\n", dropped_text(7)));
        assert_eq!(text(o.pop().unwrap()), "line 0010\n");
        // Lines dropped at the end of a build are noted before the event that follows them.
        for n in 11..20 {
            o.push(log(n));
        }
        o.push(Line::Event(Bytes::from_static(b"built\n")));
        let got: Vec<String> = std::iter::from_fn(|| o.pop()).map(text).collect();
        assert_eq!(got[3..], [format!("/store/x.drv: {}\n", dropped_text(6)), "built\n".to_owned()]);
    }

    #[test]
    fn the_work_goes_on_while_the_client_reads_nothing() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            // A channel of one line, not read until the work is over: the work still runs to its
            // end, and what waited for the client stays within the budget.
            let (tx, mut rx) = mpsc::channel::<Bytes>(1);
            let (etx, erx) = mpsc::unbounded_channel::<usize>();
            let ended = AtomicBool::new(false);
            let work = async {
                for n in 0..100_000 {
                    let _ = etx.send(n);
                    if n % 1000 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                ended.store(true, Ordering::SeqCst);
                "done"
            };
            let reader = async {
                while !ended.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let mut lines = Vec::new();
                while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                    lines.push(text(l));
                }
                lines
            };
            let (result, lines) = tokio::join!(forward(work, erx, &tx, |n| Some(log(n)), note), reader);
            assert_eq!(result, "done");
            let bytes: usize = lines.iter().map(String::len).sum();
            assert!(bytes <= LOG_BUDGET + 200, "{bytes} bytes kept for a client that read nothing");
            let last = lines.last().expect("lines");
            assert!(last.contains("log lines were not sent"), "the stream ends with the count of what was dropped");
        });
    }
}
