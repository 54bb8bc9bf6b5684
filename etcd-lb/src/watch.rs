//! Watching a slow attempt of a retryable call: slow is not dead. Past its
//! per-try bound an attempt is not given up but its connection is probed
//! with a health check; only a probe with no answer (a silent connection)
//! ends it. A connection the server is draining (GOAWAY) is never probed:
//! its calls run to their own deadline. Where the GOAWAY cannot be seen (a
//! TLS endpoint's tonic `Channel`), a probe refused at once is taken for a
//! drain, not for silence.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::conn::Conn;

/// How a watched attempt ended.
pub(crate) enum Watched<T> {
    /// It finished (well or not) on its own.
    Done(T),
    /// The call's deadline passed first; nothing is known against the
    /// endpoint.
    DeadlineExceeded,
    /// It passed its per-try bound and a health check on the same
    /// connection got no answer: the connection is silent.
    Silent(String),
}

/// Waits for `attempt`; each time it passes `bound`, probes `conn` (the
/// attempt's own connection) with a health check while still waiting for
/// the attempt. Gives up only when the probe gets no answer, or at the
/// call's deadline. A slow server answers its health checks, so a call
/// that merely takes long is never abandoned, and its endpoint is never
/// marked down for it.
///
/// A connection the server sent GOAWAY on is draining: it takes no new
/// stream, so a probe there is refused whatever the server's health, and
/// that proves nothing. Its calls run to their own deadline; a peer that
/// really died still ends them, through the connection's keepalive (an
/// unanswered PING closes it, and the attempt fails as lost).
///
/// `started` is when the attempt was sent: its first bound counts from
/// there (the clock is not read again for it).
pub(crate) async fn watch<F: Future>(
    attempt: F,
    conn: Conn,
    started: Instant,
    bound: Duration,
    deadline: Option<Instant>,
) -> Watched<F::Output> {
    let mut attempt = std::pin::pin!(attempt);
    let mut since = started;
    loop {
        // One timer while waiting: the per-try bound or the deadline,
        // whichever comes first, not one for each (every call of a
        // client that sets a timeout would register both).
        let bound_at = since + bound;
        let wake = deadline.map_or(bound_at, |d| d.min(bound_at));
        tokio::select! {
            biased;
            out = &mut attempt => return Watched::Done(out),
            () = tokio::time::sleep_until(wake) => {}
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Watched::DeadlineExceeded;
        }
        let at_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        if conn.draining() {
            return draining(attempt, at_deadline).await;
        }
        // Boxed: rarely run, and large; inline, it made every retryable
        // call's future (and its copies) larger.
        let probed_at = Instant::now();
        let probe = Box::pin(etcd_lb_registry::health::check(conn.clone(), bound));
        let at_deadline = std::pin::pin!(at_deadline);
        tokio::select! {
            biased;
            out = &mut attempt => return Watched::Done(out),
            () = at_deadline => return Watched::DeadlineExceeded,
            outcome = probe => {
                if let etcd_lb_registry::health::Outcome::Failed(why) = outcome {
                    // Refused because the server is draining the
                    // connection (GOAWAY came meanwhile): not evidence.
                    // Nor is a fast refusal on a connection that hides its
                    // GOAWAY (a `Channel` reconnects by itself, and a
                    // draining server's listener is closed): silence is
                    // what a probe exists to find, and silence takes the
                    // whole bound.
                    let refused = probed_at.elapsed() < bound;
                    if conn.draining() || (refused && conn.hides_goaway()) {
                        return draining(attempt, async {
                            match deadline {
                                Some(d) => tokio::time::sleep_until(d).await,
                                None => std::future::pending().await,
                            }
                        })
                        .await;
                    }
                    return Watched::Silent(format!("a health check on its connection got none ({why})"));
                }
                debug!(bound = ?bound, "attempt past its per-try bound; the server answers health checks, still waiting");
            }
        }
        since = Instant::now();
    }
}

/// Waits for an attempt on a draining connection: to its end, or the
/// call's deadline.
async fn draining<F: Future>(
    attempt: std::pin::Pin<&mut F>,
    at_deadline: impl Future<Output = ()>,
) -> Watched<F::Output> {
    debug!("attempt on a draining connection (GOAWAY); waiting for it to its deadline");
    tokio::select! {
        biased;
        out = attempt => Watched::Done(out),
        () = at_deadline => Watched::DeadlineExceeded,
    }
}
