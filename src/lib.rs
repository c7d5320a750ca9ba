//! pgbroker: a sidecar connection broker for PostgreSQL.
//!
//! Each app instance talks to its own pgbroker on loopback; pgbroker multiplexes those client
//! connections onto few server connections, never more than its budget.
//!
//! # Layout
//! Each module imports only modules below it (the README draws the layers):
//! - [`app`]: the broker (`App`, the composition of the parts below), starting, accepting,
//!   reloading, upgrading, draining, and the operator's surfaces (admin console, HTTP, health).
//! - [`session`]: the task serving one client: login, then the relay loop of its pool mode.
//! - [`admission`]: client counts and slots, logins in progress, refusals.
//! - [`auth`]: client authentication against the auth file (trust, md5, SCRAM-SHA-256).
//! - [`notify`]: LISTEN/NOTIFY fan-out to WebSocket clients and pooled SQL clients.
//! - [`fleet`]: fleet mode, the budget shared live through the database.
//! - [`registry`]: the pools, made from the config with their budgets and shared limits.
//! - [`clients`]: the logged-in clients.
//! - [`pool`]: servers per (database, user), checkout with FIFO waiting, RAII return,
//!   shared limits (the budget).
//! - [`budget`]: the per-instance server connection budget and its derivation.
//! - [`cancel`]: client cancel keys mapped to the server running their query.
//! - [`server`]: one upstream connection: connect, log in, the broker's own queries.
//! - [`net`]: socket setup and a client's connection.
//! - [`config`]: the TOML file, validated into typed settings; the live config.
//! - [`proto`]: wire protocol framing, startup packets and message builders (pure, fuzzed).
//! - [`shutdown`], [`metrics`], [`events`], [`stats`], [`tls`], [`crypto`], [`logline`]:
//!   the shared ground.
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
