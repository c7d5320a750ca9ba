//! pgbroker: a sidecar connection broker for PostgreSQL.
//!
//! Each app instance talks to its own pgbroker on loopback; pgbroker multiplexes those client
//! connections onto few server connections, never more than its budget.
//!
//! # Layout
//! - [`proto`]: wire protocol framing, startup packets and message builders (pure, fuzzed).
//! - [`config`]: the TOML file, validated into typed settings.
//! - [`auth`]: client authentication against the auth file (trust, md5, SCRAM-SHA-256).
//! - [`server`]: one upstream connection: connect, log in, the broker's own queries.
//! - [`pool`]: servers per (database, user), checkout with FIFO waiting, RAII return,
//!   shared limits (the budget).
//! - [`budget`]: the per-instance server connection budget and its derivation.
//! - [`session`]: the task serving one client: login, then the relay loop of its pool mode.
//! - [`cancel`]: client cancel keys mapped to the server running their query.
//! - [`notify`]: LISTEN/NOTIFY fan-out to WebSocket clients and pooled SQL clients.
//! - [`http`]: the HTTP listener (WebSocket bridge).
//! - [`logline`]: log lines that stay one line whatever peers put in them.
//! - [`admin`]: the admin console (virtual database `pgbroker`).
//! - [`stats`], [`clients`]: counters and the client registry behind it.
//! - [`app`]: wiring, accept loop and signals.
//! - [`cluster`]: a throwaway PostgreSQL cluster for `pgbroker demo`, tests and benchmarks.

pub mod admission;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cancel;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod error;
pub mod events;
pub mod flag;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod histogram;
pub mod init;
pub mod logline;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod pool;
pub mod proto;
pub mod registry;
pub mod sdnotify;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod stats;
pub mod tls;
