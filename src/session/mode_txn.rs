//! Transaction and statement pooling: login without a server (the pool's defaults describe
//! one), then the client loop attaches a server per transaction (or statement).

use super::SessionError;
use super::client_loop::{ClientLoop, Setup};
use super::io::ClientIo;
use super::listen::Listens;
use super::login::Login;
use super::params::{self, ClientSettings};
use super::prepared::Prepared;
use super::stream::ClientStream;
use crate::app::App;
use crate::clients::Client;
use crate::config::{Config, PoolMode};
use crate::error::{SqlState, chain};
use crate::pool::{Defaults, Pool, Release};
use crate::proto::build;
use std::sync::Arc;

pub(super) async fn run(
    app: &Arc<App>,
    cfg: &Config,
    io: &mut ClientIo<ClientStream>,
    login: Box<Login>,
    pool: Arc<Pool>,
    statement: bool,
    client: Arc<Client>,
) -> Result<(), SessionError> {
    let defaults = pool_defaults(&pool, cfg).await?;
    let client_loop = welcome(app, cfg, io, login, pool, statement, client, defaults);
    io.flush().await?;
    client_loop.run(io).await
}

/// Writes the client's welcome (settings, key, ReadyForQuery) and makes its loop. Not async:
/// what it moves into the loop would otherwise keep a place in the client's future.
#[allow(clippy::too_many_arguments)]
fn welcome(
    app: &Arc<App>,
    cfg: &Config,
    io: &mut ClientIo<ClientStream>,
    login: Box<Login>,
    pool: Arc<Pool>,
    statement: bool,
    client: Arc<Client>,
    defaults: Arc<Defaults>,
) -> Box<ClientLoop> {
    let mut startup = params::startup_settings(&login.startup);
    let own_name = super::keep_fleet_tag(cfg, &mut startup);
    let settings = ClientSettings::new(defaults.all(), &startup, &cfg.broker.track_extra_parameters);
    drop(startup);
    let listens = Some(Listens::new(app.clone(), login.database.clone()));
    // The login (startup packet, database settings) is not needed past this point and would
    // otherwise stay allocated for the life of the client.
    drop(login);
    let registration = app.cancels.register();
    // One allocation for the whole welcome rather than one per growth.
    io.wbuf.reserve(defaults.reported.iter().map(|(n, v)| n.len() + v.len() + 7).sum::<usize>() + 32);
    for (name, default) in &defaults.reported {
        let value = super::reported(own_name.as_deref(), name, settings.get(name).unwrap_or(default));
        build::parameter_status(&mut io.wbuf, name, value);
    }
    drop(own_name);
    build::backend_key_data(&mut io.wbuf, registration.key.pid, registration.key.secret);
    build::ready_for_query(&mut io.wbuf, b'I');
    let mode = if statement { PoolMode::Statement } else { PoolMode::Transaction };
    let max = cfg.broker.max_prepared_statements;
    let prepared = (max > 0).then(|| Prepared::new(app.statements.clone(), max));
    let setup = Setup { mode, pool, defaults, settings, registration, server: None, prepared, listens, client };
    ClientLoop::new(app.clone(), setup)
}

/// The pool's defaults; the first client of a pool opens a server to learn them.
async fn pool_defaults(pool: &Arc<Pool>, cfg: &Config) -> Result<Arc<Defaults>, SessionError> {
    if let Some(d) = pool.defaults() {
        return Ok(d);
    }
    let mut server = Box::pin(pool.checkout(cfg.broker.query_wait_timeout))
        .await
        .map_err(|e| SessionError::fatal(e.sqlstate(), chain(&e)))?;
    server.release = Release::Reuse;
    drop(server);
    pool.defaults().ok_or_else(|| SessionError::fatal(SqlState::SYSTEM_ERROR, "server defaults unknown after login"))
}
