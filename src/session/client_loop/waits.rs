//! What the relay loop waits on besides the two sockets: the drain, and notifications.

use crate::clients::Client;
use crate::notify::Event;
use crate::session::listen::Listens;

/// How long a client that has not run anything yet may take to send its first request once
/// a drain has started.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves when `client` should leave: its drain started, and it has been served once or
/// its grace for a first request is over.
pub(super) async fn drained(client: &Client, served: bool, logged_in: tokio::time::Instant) {
    client.drain.cancelled().await;
    if !served {
        tokio::time::sleep_until(logged_in + FIRST_REQUEST_GRACE).await;
    }
}

/// The next event of a listening client; pending forever for one that does not listen.
pub(super) async fn next_event(listens: &mut Option<Listens>) -> Option<Event> {
    match listens.as_mut() {
        Some(l) if l.is_active() => l.next().await,
        _ => std::future::pending().await,
    }
}
