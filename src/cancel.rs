//! Cancel keys: the key a client got from the broker maps to whichever server runs its query now.

use crate::proto::startup::CancelKey;
use crate::server::CancelTarget;
use bytes::BytesMut;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long forwarding one CancelRequest may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// CancelRequests taken from one host (as [`crate::net::peer_key`] groups addresses) per
/// second; more are dropped unread, as unknown keys are. An app cancels a handful of queries
/// a second at most; a key guesser gets 100 guesses of 63 bits a second.
pub const CANCELS_PER_SECOND: u32 = 100;

/// Hosts whose cancel rate is tracked at most; past it the map is swept of past seconds.
const MAX_TRACKED: usize = 65_536;

/// The server a client's query is running on, if any. Updated on attach and detach, twice
/// a transaction, and read only by a CancelRequest: an uncontended mutex is cheaper here than
/// an `ArcSwap`, whose store walks every thread's debt list.
#[derive(Default)]
pub struct CancelSlot {
    current: Mutex<Option<Arc<CancelTarget>>>,
}

impl CancelSlot {
    /// Points the client's key at a server (or at none).
    pub fn set(&self, target: Option<Arc<CancelTarget>>) {
        let old = std::mem::replace(&mut *self.current.lock().unwrap_or_else(|e| e.into_inner()), target);
        // The last reference to a closed server's target is dropped outside the lock.
        drop(old);
    }

    /// The server to cancel now, if any.
    fn get(&self) -> Option<Arc<CancelTarget>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// All live client keys.
#[derive(Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<CancelKey, Arc<CancelSlot>>>,
    /// CancelRequests this second per host: (second's start, count).
    rates: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// CancelRequests forwarded, for unknown or idle keys, and dropped past the rate.
    pub forwarded: AtomicU64,
    /// See `forwarded`.
    pub unknown: AtomicU64,
    /// See `forwarded`.
    pub rate_limited: AtomicU64,
}

/// A client's registered key; dropping it unregisters the key.
pub struct Registration {
    /// The key sent to the client in BackendKeyData.
    pub key: CancelKey,
    /// Where cancels for this key go.
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        map.remove(&self.key);
        if let Some(room) = crate::memory::shrink_to(map.len(), map.capacity()) {
            map.shrink_to(room);
        }
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, Arc<CancelSlot>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues a fresh, unguessable key for a client.
    pub fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        let mut keys = self.lock();
        let key = loop {
            // Both halves random: a guesser cannot learn the pid from a key of its own.
            let pid = rand::random::<i32>() & i32::MAX;
            let key = CancelKey { pid, secret: rand::random() };
            if !keys.contains_key(&key) {
                break key;
            }
        };
        keys.insert(key, slot.clone());
        Registration { key, slot, registry: self.clone() }
    }

    /// True if a CancelRequest from `ip` is within [`CANCELS_PER_SECOND`] for its host.
    fn within_rate(&self, ip: IpAddr) -> bool {
        let key = crate::net::peer_key(ip);
        let now = Instant::now();
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if rates.len() >= MAX_TRACKED && !rates.contains_key(&key) {
            rates.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
        }
        let (start, count) = rates.entry(key).or_insert((now, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *count) = (now, 0);
        }
        *count += 1;
        *count <= CANCELS_PER_SECOND
    }

    /// Forwards a CancelRequest from `ip` to the server running the key's query. Unknown keys
    /// and idle clients are ignored silently, as PostgreSQL does, and so are requests past
    /// the host's rate.
    pub async fn cancel(&self, ip: IpAddr, key: CancelKey) {
        if !self.within_rate(ip) {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let target = self.lock().get(&key).and_then(|slot| slot.get());
        let Some(target) = target else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pid = key.pid, "cancel request for an unknown or idle client ignored");
            return;
        };
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(CANCEL_TIMEOUT, send_cancel(&target)).await {
            Ok(Ok(())) => tracing::debug!(server_pid = target.pid, "cancel request forwarded"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, addr = %target.target.addr(), "cannot forward cancel request")
            }
            Err(_) => tracing::warn!(addr = %target.target.addr(), "cancel request timed out"),
        }
    }

    /// Number of registered keys (connected clients past login).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no client is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a CancelRequest for the query running on `target`, bounded in time; failures are
/// logged.
pub async fn send(target: &CancelTarget) {
    match tokio::time::timeout(CANCEL_TIMEOUT, send_cancel(target)).await {
        Ok(Ok(())) => tracing::debug!(server_pid = target.pid, "cancel request forwarded"),
        Ok(Err(e)) => tracing::warn!(error = %e, addr = %target.target.addr(), "cannot forward cancel request"),
        Err(_) => tracing::warn!(addr = %target.target.addr(), "cancel request timed out"),
    }
}

async fn send_cancel(target: &CancelTarget) -> Result<(), crate::server::ServerError> {
    let mut stream = target.target.open().await?;
    let mut buf = BytesMut::with_capacity(16);
    postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
    stream.write_all(&buf).await?;
    // The server closes the connection once it has read the request; waiting for that keeps
    // the cancel from racing the client's next query.
    let mut sink = [0u8; 16];
    let _ = stream.read(&mut sink).await;
    Ok(())
}
