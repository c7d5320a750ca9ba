//! What the relay loop waits on besides the two sockets: the drain, and notifications.

use crate::notify::Event;
use crate::session::listen::Listens;

/// How long a client that has not run anything yet may take to send its first request once
/// a drain has started.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Once a client's drain started, resolves when it should leave: it has been served once or
/// its grace for a first request is over.
pub(super) async fn drained(served: bool, logged_in: tokio::time::Instant) {
    if !served {
        tokio::time::sleep_until(logged_in + FIRST_REQUEST_GRACE).await;
    }
}

/// The next event of a listening client; pending forever for one that does not listen.
/// While the client's replies back up (`backed_up`) no event is taken, so notifications stay
/// in the hub's bounded queue (a client that never reads would otherwise move them all into
/// its unbounded outgoing buffer): only the hub cutting the client off (`None`) is seen.
pub(super) async fn next_event(listens: &mut Option<Listens>, backed_up: bool) -> Option<Event> {
    match listens.as_mut() {
        Some(l) if l.is_active() && backed_up => l.kicked().await,
        Some(l) if l.is_active() => l.next().await,
        _ => std::future::pending().await,
    }
}
