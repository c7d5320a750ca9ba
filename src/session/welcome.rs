//! Every pool mode logs in without a server, as PgBouncer does: the pool's defaults describe
//! one, and the client loop links a server at the client's first message, for a transaction,
//! a statement or (session mode) until the client leaves. Idle clients cost no server.

use super::SessionError;
use super::client_loop::{ClientLoop, Setup};
use super::listen::Listens;
use super::login::Login;
use super::params::{self, ClientSettings};
use super::prepared::{Limits, Prepared};
use crate::clients::Client;
use crate::config::{Config, PoolMode};
use crate::error::SqlState;
use crate::net::{ClientIo, ClientStream};
use crate::pool::{Defaults, Pool, Release};
use crate::proto::build;
use crate::server::Setting;
use crate::session::Shared;
use bytes::{Bytes, BytesMut};
use std::sync::{Arc, Mutex, Weak};

pub(super) async fn run(
    shared: &Arc<Shared>,
    cfg: &Config,
    io: &mut ClientIo<ClientStream>,
    login: Box<Login>,
    pool: Arc<Pool>,
    mode: PoolMode,
    client: Arc<Client>,
) -> Result<(), SessionError> {
    let defaults = pool_defaults(&pool, cfg).await?;
    let client_loop = welcome(shared, cfg, io, login, pool, mode, client, defaults);
    io.flush().await?;
    client_loop.run(io).await
}

/// Writes the client's welcome (settings, key, ReadyForQuery) and makes its loop. Not async:
/// what it moves into the loop would otherwise keep a place in the client's future.
#[allow(clippy::too_many_arguments)]
fn welcome(
    shared: &Arc<Shared>,
    cfg: &Config,
    io: &mut ClientIo<ClientStream>,
    login: Box<Login>,
    pool: Arc<Pool>,
    mode: PoolMode,
    client: Arc<Client>,
    defaults: Arc<Defaults>,
) -> Box<ClientLoop> {
    let mut startup = params::startup_settings(&login.startup);
    let own_name = super::keep_fleet_tag(cfg, &mut startup);
    let settings = ClientSettings::new(defaults.all(), &startup, &cfg.broker.track_extra_parameters);
    drop(startup);
    // In session mode the client keeps its server: its LISTENs and statements stay there.
    let pooled = mode != PoolMode::Session;
    let listens = pooled.then(|| Listens::new(shared.clone(), login.database.clone()));
    // The login (startup packet, database settings) is not needed past this point and would
    // otherwise stay allocated for the life of the client.
    drop(login);
    let registration = shared.cancels.register();
    match own_name {
        // Most clients: the pool's settings overlaid with a list many clients share.
        None => io.wbuf.extend_from_slice(&statuses(&defaults, &settings)),
        Some(own) => write_statuses(&mut io.wbuf, &defaults, &settings, Some(&own)),
    }
    build::backend_key_data(&mut io.wbuf, registration.key.pid, registration.key.secret);
    build::ready_for_query(&mut io.wbuf, crate::proto::TxnStatus::Idle);
    let max = cfg.broker.max_prepared_statements;
    let limits =
        Limits { statements: cfg.broker.max_client_prepared_statements, bytes: cfg.broker.max_client_prepared_bytes };
    let prepared = (pooled && max > 0).then(|| Prepared::new(shared.statements.clone(), max).limit(limits));
    let setup = Setup { mode, pool, defaults, settings, registration, server: None, prepared, listens, client };
    ClientLoop::new(shared.clone(), setup)
}

/// The ParameterStatus messages of a welcome.
fn write_statuses(out: &mut BytesMut, defaults: &Defaults, settings: &ClientSettings, own_name: Option<&str>) {
    // One allocation for the whole welcome rather than one per growth.
    out.reserve(defaults.reported.iter().map(|(n, v)| n.len() + v.len() + 7).sum::<usize>() + 32);
    for (name, default) in &defaults.reported {
        let value = super::reported(own_name, name, settings.get(name).unwrap_or(default));
        build::parameter_status(out, name, value);
    }
}

/// Welcomes written lately, by pool defaults and (interned) client settings.
const WELCOMES: usize = 64;

/// The ParameterStatus messages for `settings` on `defaults`' servers, encoded once for all
/// the clients that share both (an app's connections, mostly) rather than once per login.
fn statuses(defaults: &Arc<Defaults>, settings: &ClientSettings) -> Bytes {
    type Cached = (Weak<Defaults>, Weak<Vec<Setting>>, Bytes);
    static CACHE: Mutex<Vec<Cached>> = Mutex::new(Vec::new());
    let same = |(d, s, _): &Cached| {
        std::ptr::eq(d.as_ptr(), Arc::as_ptr(defaults)) && std::ptr::eq(s.as_ptr(), Arc::as_ptr(settings.shared()))
    };
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    // A dead entry's address may be reused: only live ones count.
    if let Some((_, _, bytes)) = cache.iter().find(|c| same(c) && c.0.strong_count() > 0 && c.1.strong_count() > 0) {
        return bytes.clone();
    }
    let mut out = BytesMut::new();
    write_statuses(&mut out, defaults, settings, None);
    let bytes = out.freeze();
    cache.retain(|(d, s, _)| d.strong_count() > 0 && s.strong_count() > 0);
    if cache.len() >= WELCOMES {
        cache.remove(0);
    }
    cache.push((Arc::downgrade(defaults), Arc::downgrade(settings.shared()), bytes.clone()));
    bytes
}

/// The pool's defaults; the first client of a pool opens a server to learn them.
async fn pool_defaults(pool: &Arc<Pool>, cfg: &Config) -> Result<Arc<Defaults>, SessionError> {
    if let Some(d) = pool.defaults() {
        return Ok(d);
    }
    let mut server = Box::pin(pool.checkout(cfg.broker.query_wait_timeout)).await?;
    server.release = Release::Reuse;
    drop(server);
    pool.defaults().ok_or_else(|| SessionError::fatal(SqlState::SYSTEM_ERROR, "server defaults unknown after login"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn clients_with_the_same_settings_share_one_encoded_welcome_and_others_get_their_own() {
        let defaults = Arc::new(Defaults::new(pairs(&[("TimeZone", "UTC"), ("application_name", "")]), vec![]));
        let settings = |shared: &str| ClientSettings::new(defaults.all(), &pairs(&[("application_name", shared)]), &[]);
        let (a, b, other) = (settings("welcome-test"), settings("welcome-test"), settings("welcome-other"));
        let first = statuses(&defaults, &a);
        assert_eq!(first.as_ptr(), statuses(&defaults, &b).as_ptr(), "encoded once");
        let mut written = BytesMut::new();
        write_statuses(&mut written, &defaults, &a, None);
        assert_eq!(first, written.freeze());
        let theirs = statuses(&defaults, &other);
        assert!(theirs.windows(13).any(|w| w == b"welcome-other"), "{theirs:?}");
    }
}
