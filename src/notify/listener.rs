//! The hub's listener connection: LISTEN/UNLISTEN as subscribers come and go, notifications
//! in, reconnection with backoff (re-LISTENing everything and telling subscribers), and a
//! check every `listener_check_interval` that the connection still receives: a NOTIFY on a
//! private channel must come back within `listener_check_timeout`, or the connection is
//! replaced. A stalled backend or a path that silently drops packets shows no error of its
//! own; only a round trip proves the listener alive.

use super::{CHECK_CHANNEL, Cmd, Hub};
use crate::pool::Release;
use crate::server::{ServerConn, ServerError};
use postgres_protocol::escape::escape_identifier;
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Runs until `shutdown` or until the hub is gone.
pub(super) async fn run(hub: Weak<Hub>, mut cmds: mpsc::UnboundedReceiver<Cmd>, shutdown: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    let mut connected_before = false;
    // Subscribers waiting for a LISTEN queued while disconnected: answered once the wanted
    // set (which covers their channels) is LISTENed, so none is told it is subscribed before
    // its notifications can arrive.
    let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    loop {
        let Some(pool) = hub.upgrade().map(|h| h.pool.clone()) else { return };
        let checkout = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pool.checkout(Duration::from_secs(30)) => r,
        };
        let error = match checkout {
            Ok(mut server) => {
                server.release = Release::Close;
                backoff = FIRST_BACKOFF;
                // Commands queued while disconnected are covered by LISTENing on the wanted set.
                while let Ok(cmd) = cmds.try_recv() {
                    if let Cmd::Listen(_, Some(ack)) = cmd {
                        // Only subscribers still waiting: the list cannot outgrow them.
                        waiting.retain(|a| !a.is_closed());
                        waiting.push(ack);
                    }
                }
                let Some(h) = hub.upgrade() else { return };
                let wanted = h.wanted();
                drop(h);
                let mut result = command(&hub, &mut server, "LISTEN", CHECK_CHANNEL).await;
                for ch in &wanted {
                    if result.is_err() {
                        break;
                    }
                    result = command(&hub, &mut server, "LISTEN", ch).await;
                }
                match result {
                    Ok(()) => {
                        // What arrived during the LISTENs on channels that were waiting for
                        // theirs was sent before them.
                        if deliver(&hub, &mut server).is_none() {
                            return;
                        }
                        if let Some(h) = hub.upgrade() {
                            h.listened(None);
                        }
                        for ack in waiting.drain(..) {
                            let _ = ack.send(());
                        }
                        if let Some(h) = hub.upgrade() {
                            tracing::info!(database = %h.database, channels = wanted.len(), "notification listener connected");
                            if connected_before {
                                h.stats.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                h.resync("the listener connection was re-established; notifications sent meanwhile may have been missed");
                            }
                        }
                        connected_before = true;
                        match serve(&hub, &mut server, &mut cmds, &shutdown).await {
                            None => return,
                            Some(e) => e,
                        }
                    }
                    Err(e) => crate::error::chain(&e),
                }
            }
            Err(e) => crate::error::chain(&e),
        };
        let database = hub.upgrade().map(|h| h.database.clone()).unwrap_or_default();
        tracing::warn!(%database, error = %error, retry_in = ?backoff, "notification listener lost its connection");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Relays commands and notifications, and checks the connection, until it fails
/// (`Some(why)`) or the broker stops (`None`).
async fn serve(
    hub: &Weak<Hub>,
    server: &mut ServerConn,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut next_check = next_check(hub)?;
    loop {
        deliver(hub, server)?;
        let result = tokio::select! {
            () = sleep_until(next_check), if next_check.is_some() => {
                let (_, within) = hub.upgrade()?.check_settings();
                if let Err(failed) = check(hub, server, within).await {
                    let why = failed.to_string();
                    let h = hub.upgrade()?;
                    h.stats.check_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    (h.emit)("listener_replaced", serde_json::json!({"database": h.database, "reason": why}));
                    return Some(why);
                }
                next_check = self::next_check(hub)?;
                Ok(())
            }
            _ = shutdown.cancelled() => return None,
            cmd = cmds.recv() => match cmd {
                None => return None,
                Some(Cmd::Listen(ch, ack)) => {
                    let r = command(hub, server, "LISTEN", &ch).await;
                    if r.is_ok() {
                        // Read before the LISTEN was done, so sent before it: dropped for `ch`
                        // (still pending), delivered for the others.
                        deliver(hub, server)?;
                        hub.upgrade()?.listened(Some(&ch));
                    }
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                    r
                }
                Some(Cmd::Unlisten(ch)) => command(hub, server, "UNLISTEN", &ch).await,
            },
            n = server.next_notification() => n.map(|n| server.notifications.push_front(n)),
        };
        if let Err(e) = result {
            return Some(e.to_string());
        }
    }
}

/// When the next listener check is due (`None` inside: checks are off); `None` if the hub
/// is gone.
fn next_check(hub: &Weak<Hub>) -> Option<Option<tokio::time::Instant>> {
    let (every, _) = hub.upgrade()?.check_settings();
    Some((!every.is_zero()).then(|| tokio::time::Instant::now() + every))
}

/// Waits until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a listener check failed: the listener is replaced.
#[derive(Debug, thiserror::Error)]
enum CheckFailed {
    /// Nothing came back in time.
    #[error("listener check: no answer within {0:?} (listener_check_timeout)")]
    Timeout(Duration),
    /// The connection failed.
    #[error("listener check: {0}")]
    Server(#[from] ServerError),
    /// The server refused the NOTIFY.
    #[error("listener check: NOTIFY refused: {0}")]
    Refused(String),
    /// The NOTIFY ran but its notification never arrived.
    #[error("listener check: its own notification did not come back")]
    NotReceived,
}

/// Sequence of the check notifications, so that each check waits for its own.
static CHECKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Proves the connection receives: a NOTIFY on `CHECK_CHANNEL` sent on it must come back to
/// it (a session gets its own notifications) within `within`. Other notifications that
/// arrive meanwhile go to the hub as usual.
async fn check(hub: &Weak<Hub>, server: &mut ServerConn, within: Duration) -> Result<(), CheckFailed> {
    let token = CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string();
    let sql = format!("NOTIFY {}, '{token}'", escape_identifier(CHECK_CHANNEL));
    let h = hub.upgrade();
    let mut seen = false;
    let server_pid = server.cancel.pid;
    let mut notified = |n: crate::server::Notification| {
        if n.channel == CHECK_CHANNEL && n.payload == token && n.pid == server_pid {
            seen = true;
        } else if let Some(h) = &h {
            h.dispatch(n.pid, n.channel, n.payload);
        }
    };
    match tokio::time::timeout(within, server.simple_query_notifying(&sql, &mut notified)).await {
        Err(_) => Err(CheckFailed::Timeout(within)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Err(e))) => Err(CheckFailed::Refused(e.message)),
        Ok(Ok(Ok(()))) if seen => Ok(()),
        Ok(Ok(Ok(()))) => Err(CheckFailed::NotReceived),
    }
}

/// Hands queued notifications to the hub; `None` if the hub is gone.
fn deliver(hub: &Weak<Hub>, server: &mut ServerConn) -> Option<()> {
    if server.notifications.is_empty() {
        return Some(());
    }
    let h = hub.upgrade()?;
    while let Some(n) = server.notifications.pop_front() {
        h.dispatch(n.pid, n.channel, n.payload);
    }
    Some(())
}

/// Runs `LISTEN "ch"` or `UNLISTEN "ch"` (the name quoted as an identifier), handing the
/// notifications that arrive meanwhile to the hub as they come.
async fn command(hub: &Weak<Hub>, server: &mut ServerConn, verb: &str, channel: &str) -> Result<(), ServerError> {
    let sql = format!("{verb} {}", escape_identifier(channel));
    let h = hub.upgrade();
    let mut notified = |n: crate::server::Notification| {
        if let Some(h) = &h {
            h.dispatch(n.pid, n.channel, n.payload);
        }
    };
    match server.simple_query_notifying(&sql, &mut notified).await? {
        Ok(()) => Ok(()),
        Err(e) => {
            // A refused channel name is the subscriber's problem, not the connection's.
            tracing::warn!(channel, error = %e.message, "{verb} refused");
            Ok(())
        }
    }
}
