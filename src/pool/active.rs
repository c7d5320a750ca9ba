//! Servers checked out of a pool, for the admin console (SHOW SERVERS) and for cancelling
//! what runs on them at shutdown. Updated under the pool's lock on every checkout and
//! checkin, so the map is keyed cheaply.

use super::Pool;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use tokio::time::Instant;

/// A checked-out server as the admin console shows it.
#[derive(Debug, Clone)]
pub struct ActiveServer {
    /// Server id.
    pub id: u64,
    /// Its backend process id.
    pub pid: i32,
    /// How to cancel its running query.
    pub cancel: Arc<crate::server::CancelTarget>,
    /// When it connected.
    pub connected_at: std::time::SystemTime,
    /// When it was checked out.
    pub since: Instant,
}

/// Hashes server ids, which are sequential, with one multiplication: the map is touched
/// twice a transaction, and SipHash's defence against chosen keys buys nothing here.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Checked-out servers by id.
pub(super) type Active = HashMap<u64, ActiveServer, BuildHasherDefault<IdHasher>>;

impl Pool {
    pub(super) fn track_active(&self, conn: &crate::server::ServerConn) {
        Self::track_in(&mut self.lock(), conn, Instant::now());
    }

    /// Records `conn` as checked out since `now`, under a pool lock the caller holds.
    pub(super) fn track_in(inner: &mut super::Inner, conn: &crate::server::ServerConn, now: Instant) {
        let a = ActiveServer {
            id: conn.id,
            pid: conn.cancel.pid,
            cancel: conn.cancel.clone(),
            connected_at: conn.connected_at,
            since: now,
        };
        inner.active.insert(conn.id, a);
    }

    /// Cancels the query running on every checked-out server (shutdown after the timeout).
    pub async fn cancel_active(&self) {
        let targets: Vec<_> = self.lock().active.values().map(|a| a.cancel.clone()).collect();
        for t in targets {
            crate::cancel::send(&t).await;
        }
    }

    pub(super) fn untrack_active(&self, id: u64) {
        self.lock().active.remove(&id);
    }
}
