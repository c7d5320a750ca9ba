//! Cancel keys: the key a client got from the broker maps to whichever server runs its query now.

use crate::proto::startup::CancelKey;
use crate::server::CancelTarget;
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long forwarding one CancelRequest may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

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
    next_pid: AtomicI32,
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
        self.registry.lock().remove(&self.key);
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
            // The pid only needs to be distinct; the random secret is what protects the key.
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & i32::MAX;
            let key = CancelKey { pid, secret: rand::random() };
            if !keys.contains_key(&key) {
                break key;
            }
        };
        keys.insert(key, slot.clone());
        Registration { key, slot, registry: self.clone() }
    }

    /// Forwards a client's CancelRequest to the server running its query. Unknown keys and
    /// idle clients are ignored silently, as PostgreSQL does.
    pub async fn cancel(&self, key: CancelKey) {
        let target = self.lock().get(&key).and_then(|slot| slot.get());
        let Some(target) = target else {
            tracing::debug!(pid = key.pid, "cancel request for an unknown or idle client ignored");
            return;
        };
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
