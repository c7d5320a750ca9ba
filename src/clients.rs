//! Connected clients, for the admin console (SHOW CLIENTS, KILL) and health: who is
//! connected, to which pool, in which state.

use crate::flag::Flag;
use crate::pool::PoolKey;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// What a client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Holds no server.
    Idle = 0,
    /// Holds a server.
    Active = 1,
    /// Waits for a server.
    Waiting = 2,
}

impl State {
    /// The admin console's name for it (PgBouncer's).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Active => "active",
            State::Waiting => "waiting",
        }
    }
}

/// Why a client keeps its server between transactions in transaction mode: session state
/// that cannot follow it to another server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    /// A session-level advisory lock is held.
    AdvisoryLock = 0,
    /// A `WITH HOLD` cursor is open.
    Cursor = 1,
    /// A temporary table exists.
    TempTable = 2,
    /// A statement prepared with SQL `PREPARE` exists.
    Prepare = 3,
    /// The server session LISTENs (a `LISTEN` sent inside a transaction block).
    Listen = 4,
}

impl PinReason {
    /// Every reason, in the order they are listed.
    pub const ALL: [PinReason; 5] =
        [PinReason::AdvisoryLock, PinReason::Cursor, PinReason::TempTable, PinReason::Prepare, PinReason::Listen];

    /// The name SHOW CLIENTS and `/metrics` give it.
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::Cursor => "cursor",
            PinReason::TempTable => "temp_table",
            PinReason::Prepare => "prepare",
            PinReason::Listen => "listen",
        }
    }
}

/// A set of pin reasons; empty when the client is not pinned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pins(u8);

impl Pins {
    /// The set with `reason` added.
    pub fn with(self, reason: PinReason) -> Pins {
        Pins(self.0 | 1 << reason as u8)
    }

    /// True if `reason` is in the set.
    pub fn has(self, reason: PinReason) -> bool {
        self.0 & 1 << reason as u8 != 0
    }

    /// True when the client is not pinned.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The reasons' names, comma-separated (empty when not pinned).
    pub fn names(self) -> String {
        let names: Vec<&str> = PinReason::ALL.iter().filter(|r| self.has(**r)).map(|r| r.as_str()).collect();
        names.join(",")
    }
}

/// One connected client.
#[derive(Debug)]
pub struct Client {
    /// Session id.
    pub id: u64,
    /// Client-facing user.
    pub user: String,
    /// Client-facing database.
    pub database: String,
    /// The pool it uses (`None` for the admin console).
    pub pool: Option<PoolKey>,
    /// Peer address.
    pub addr: SocketAddr,
    /// When it connected.
    pub connect_time: SystemTime,
    /// Its application_name at login.
    pub application_name: String,
    /// Raised to disconnect it at once (KILL).
    pub kill: Flag,
    /// Raised to disconnect it at its next transaction boundary (shutdown, database
    /// removed); the reason it is told is in `drain_reason`.
    pub drain: Flag,
    drain_reason: std::sync::OnceLock<String>,
    state: AtomicU8,
    /// Why it keeps its server between transactions (`Pins` bits).
    pins: AtomicU8,
    /// Unix microseconds of the last state change.
    since_us: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Client {
    /// Changes its state.
    #[inline]
    pub fn set_state(&self, s: State) {
        if self.state.swap(s as u8, Relaxed) != s as u8 {
            self.since_us.store(now_us(), Relaxed);
        }
    }

    /// Its state.
    pub fn state(&self) -> State {
        match self.state.load(Relaxed) {
            1 => State::Active,
            2 => State::Waiting,
            _ => State::Idle,
        }
    }

    /// Records why it keeps its server (empty: it does not).
    pub fn set_pins(&self, pins: Pins) {
        self.pins.store(pins.0, Relaxed);
    }

    /// Why it keeps its server between transactions.
    pub fn pins(&self) -> Pins {
        Pins(self.pins.load(Relaxed))
    }

    /// Asks the client to leave at its next transaction boundary, telling it `reason`.
    pub fn drain(&self, reason: &str) {
        let _ = self.drain_reason.set(reason.to_string());
        self.drain.raise();
    }

    /// Why it was asked to leave.
    pub fn drain_reason(&self) -> &str {
        self.drain_reason.get().map_or("pgbroker is shutting down", String::as_str)
    }

    /// Microseconds in the current state.
    pub fn in_state_us(&self) -> u64 {
        now_us().saturating_sub(self.since_us.load(Relaxed))
    }
}

/// Every connected client.
#[derive(Default)]
pub struct Clients {
    map: Mutex<HashMap<u64, Arc<Client>>>,
    /// Set once a graceful stop began: new clients are drained from birth.
    draining: std::sync::OnceLock<String>,
}

/// A client's registration; dropping it unregisters the client.
pub struct Registered {
    clients: Arc<Clients>,
    /// The client.
    pub client: Arc<Client>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.clients.lock();
        map.remove(&self.client.id);
        if let Some(room) = crate::memory::shrink_to(map.len(), map.capacity()) {
            map.shrink_to(room);
        }
    }
}

/// What a client registers with.
pub struct NewClient {
    /// Session id.
    pub id: u64,
    /// User.
    pub user: String,
    /// Database.
    pub database: String,
    /// Pool.
    pub pool: Option<PoolKey>,
    /// Peer.
    pub addr: SocketAddr,
    /// application_name at login.
    pub application_name: String,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Client>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a logged-in client.
    pub fn register(self: &Arc<Self>, c: NewClient) -> Registered {
        // Read under the map's lock: a drain that starts meanwhile either is seen here or
        // finds this client in the map.
        let mut map = self.lock();
        let late = self.draining.get().cloned();
        let client = Arc::new(Client {
            drain: Flag::default(),
            drain_reason: std::sync::OnceLock::new(),
            id: c.id,
            user: c.user,
            database: c.database,
            pool: c.pool,
            addr: c.addr,
            connect_time: SystemTime::now(),
            application_name: c.application_name,
            kill: Flag::default(),
            state: AtomicU8::new(State::Idle as u8),
            pins: AtomicU8::new(0),
            since_us: AtomicU64::new(now_us()),
        });
        if let Some(reason) = late {
            client.drain(&reason);
        }
        map.insert(client.id, client.clone());
        drop(map);
        Registered { clients: self.clone(), client }
    }

    /// Every client, by id.
    pub fn all(&self) -> Vec<Arc<Client>> {
        let mut v: Vec<Arc<Client>> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Asks every client to leave at its next transaction boundary; clients that log in from
    /// now on get one transaction and leave too.
    pub fn drain_all(&self, reason: &str) {
        let _ = self.draining.set(reason.to_string());
        for c in self.all() {
            c.drain(reason);
        }
    }

    /// Asks the clients of `database` to leave at their next transaction boundary.
    pub fn drain_database(&self, database: &str, reason: &str) {
        for c in self.all().into_iter().filter(|c| c.database == database) {
            c.drain(reason);
        }
    }

    /// Disconnects every client of `database`; returns how many.
    pub fn kill_database(&self, database: &str) -> usize {
        let victims: Vec<Arc<Client>> = self.lock().values().filter(|c| c.database == database).cloned().collect();
        for c in &victims {
            c.kill.raise();
        }
        victims.len()
    }
}
