//! Client admission: the counts behind `max_client_conn` and `max_client_conn_per_ip`, the
//! connections still logging in, hibernating clients, refusals by reason and the login
//! throttle. The accept loop takes a slot here for each client; dropping it gives it back.

pub mod logins;

use crate::auth::throttle::LoginThrottle;
use crate::config::Config;
use crate::net::{IpSlot, PerIp};
use crate::stats::Refusals;
use logins::LoggingIn;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Connections accepted past `max_client_conn` for admin console logins only.
pub const ADMIN_RESERVE: usize = 3;

/// Who is connected or connecting, and who was turned away.
#[derive(Default)]
pub struct Admission {
    /// Clients connected now, including those logging in (for `max_client_conn`).
    open: AtomicUsize,
    /// Connections still logging in (the oldest make room for newcomers when full).
    logging_in: Arc<LoggingIn>,
    /// Clients hibernating now (quiet, their relay state freed).
    hibernating: AtomicUsize,
    /// Clients per IP address, for `max_client_conn_per_ip`.
    per_ip: Arc<PerIp>,
    /// Refused client connections by reason.
    refusals: Refusals,
    /// Failed logins per address (`auth.max_failures_per_ip`).
    throttle: LoginThrottle,
}

/// Why a connection was turned away at the door (the client is told this, with 53300).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// `max_client_conn` clients are connected.
    #[error("no more connections allowed (max_client_conn = {0})")]
    MaxClientConn(usize),
    /// `max_client_conn_per_ip` clients are connected from this address.
    #[error("too many connections from {host} (max_client_conn_per_ip = {limit})")]
    PerIp {
        /// The address (IPv6 addresses by their /64).
        host: IpAddr,
        /// The limit.
        limit: usize,
    },
}

/// A client let in: its slots, released when dropped.
pub struct Admitted {
    /// Admitted on the admin reserve: only a console login may stay.
    pub admin_only: bool,
    _slot: ClientSlot,
    _per_ip: Option<IpSlot>,
}

impl Admission {
    /// Counts a new connection from `peer` against the limits of `cfg`, or says why not
    /// (the refusal is counted).
    pub fn admit(self: &Arc<Self>, cfg: &Config, peer: SocketAddr) -> Result<Admitted, Refused> {
        let limit = cfg.broker.max_client_conn + ADMIN_RESERVE;
        let full = self.open.load(Relaxed) >= cfg.broker.max_client_conn;
        // When full, a connection logging in for too long makes room for this one.
        let slot = match full.then(|| self.logging_in.evict_oldest()).flatten() {
            Some(admin_only) => Some((admin_only, ClientSlot::force(self))),
            None => ClientSlot::take(self, limit).map(|slot| (slot.1 >= cfg.broker.max_client_conn, slot)),
        };
        let Some((admin_only, slot)) = slot else {
            self.refusals.max_client_conn.fetch_add(1, Relaxed);
            tracing::warn!(%peer, "max_client_conn reached; refusing client");
            return Err(Refused::MaxClientConn(cfg.broker.max_client_conn));
        };
        let host = crate::net::peer_key(peer.ip());
        let limit = cfg.broker.max_client_conn_per_ip;
        // 0: no limit, nothing counted.
        let per_ip = match (limit > 0).then(|| self.per_ip.take(host, limit, usize::MAX)) {
            None => None,
            Some(Some(slot)) => Some(slot),
            Some(None) => {
                self.refusals.max_client_conn_per_ip.fetch_add(1, Relaxed);
                tracing::warn!(%peer, "max_client_conn_per_ip reached; refusing client");
                return Err(Refused::PerIp { host, limit });
            }
        };
        Ok(Admitted { admin_only, _slot: slot, _per_ip: per_ip })
    }

    /// Clients connected now (including those still logging in).
    pub fn client_count(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Clients hibernating now: quiet for a moment with nothing in flight, holding only
    /// their session's small state until they speak again.
    pub fn hibernating_clients(&self) -> usize {
        self.hibernating.load(Relaxed)
    }

    /// Counts one hibernating client while the guard lives.
    pub fn hibernate(&self) -> Hibernating<'_> {
        self.hibernating.fetch_add(1, Relaxed);
        Hibernating(&self.hibernating)
    }

    /// Takes a console session out of the `max_client_conn` count while the guard lives,
    /// so an operator can always get in (accepting one when full is what the admin reserve
    /// is for); the client's slot then releases the count.
    pub fn uncount_console(&self) -> Uncounted<'_> {
        self.open.fetch_sub(1, Relaxed);
        Uncounted(&self.open)
    }

    /// The connections logging in now.
    pub fn logging_in(&self) -> &Arc<LoggingIn> {
        &self.logging_in
    }

    /// Refused client connections by reason.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// The failed-login throttle.
    pub fn throttle(&self) -> &LoginThrottle {
        &self.throttle
    }
}

/// One hibernating client in the count, however the wait ends.
pub struct Hibernating<'a>(&'a AtomicUsize);

impl Drop for Hibernating<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A console session out of the `max_client_conn` count; gives the count back on drop.
pub struct Uncounted<'a>(&'a AtomicUsize);

impl Drop for Uncounted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Relaxed);
    }
}

/// One client's count against `max_client_conn` (and how many were open before it);
/// released on drop.
struct ClientSlot(Arc<Admission>, usize);

impl ClientSlot {
    /// Counts a client if fewer than `limit` are open.
    fn take(a: &Arc<Admission>, limit: usize) -> Option<ClientSlot> {
        let counted = a.open.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1));
        counted.ok().map(|before| ClientSlot(a.clone(), before))
    }

    /// A slot past the limit, for a newcomer an evicted login made room for: counted over
    /// it until that login is gone (at most `logins::MAX_EVICTING` at once).
    fn force(a: &Arc<Admission>) -> ClientSlot {
        ClientSlot(a.clone(), a.open.fetch_add(1, Relaxed))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}
