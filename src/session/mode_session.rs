//! Session pooling: the client gets its server at login, with its startup settings applied,
//! and keeps it until it leaves; then the server is reset for the next client.

use super::client_loop::{ClientLoop, Setup};
use super::io::ClientIo;
use super::login::Login;
use super::params::ClientSettings;
use super::stream::ClientStream;
use super::{SessionError, params};
use crate::app::App;
use crate::clients::Client;
use crate::config::{Config, PoolMode};
use crate::pool::{Pool, Pooled, Release};
use crate::proto::build;
use crate::server::ServerConn;
use std::sync::Arc;

pub(super) async fn run(
    app: &Arc<App>,
    cfg: &Config,
    io: &mut ClientIo<ClientStream>,
    login: Box<Login>,
    pool: Arc<Pool>,
    client: Arc<Client>,
) -> Result<(), SessionError> {
    let since = tokio::time::Instant::now();
    client.set_state(crate::clients::State::Waiting);
    // Boxed, as the other rare awaits of a session: its future lives as long as the client.
    let checkout = Box::pin(pool.checkout(cfg.broker.query_wait_timeout)).await;
    crate::session::accounting::Accounting::waited(&pool.counters, &pool.settings().metrics, Some(since));
    let mut server = checkout.map_err(|e| SessionError::fatal(e.sqlstate(), crate::error::chain(&e)))?;
    // Until the startup settings are applied and the relay knows the state, close on drop.
    server.release = Release::Close;
    let mut startup = params::startup_settings(&login.startup);
    let own_name = super::keep_fleet_tag(cfg, &mut startup);
    Box::pin(apply_settings(&mut server, &startup)).await?;
    server.release = Release::Reset;

    let registration = app.cancels.register();
    welcome(io, &server, own_name.as_deref(), registration.key.pid, registration.key.secret);
    io.flush().await?;
    let setup = Setup {
        mode: PoolMode::Session,
        pool,
        defaults: Default::default(),
        settings: ClientSettings::default(),
        registration,
        server: Some(server),
        // The client keeps its server: its statements and LISTENs stay where it made them.
        prepared: None,
        listens: None,
        client,
    };
    ClientLoop::new(app.clone(), setup).run(io).await
}

/// Applies the client's startup parameters to its server session.
async fn apply_settings(server: &mut Pooled, startup: &[(String, String)]) -> Result<(), SessionError> {
    let Some(sql) = params::set_config_sql(startup) else {
        return Ok(());
    };
    match server.simple_query(&sql).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            // The server is fine; only the client's setting was refused, as PostgreSQL
            // refuses a bad startup parameter.
            server.release = Release::Reset;
            Err(SessionError::fatal(e.code, e.message))
        }
        Err(e) => Err(SessionError::fatal(e.sqlstate(), crate::error::chain(&e))),
    }
}

/// ParameterStatus for every reported setting (the client's own application_name in fleet
/// mode), our BackendKeyData, ReadyForQuery.
fn welcome(io: &mut ClientIo<ClientStream>, server: &ServerConn, own_name: Option<&str>, pid: i32, secret: i32) {
    for (name, value) in &server.params {
        build::parameter_status(&mut io.wbuf, name, super::reported(own_name, name, value));
    }
    build::backend_key_data(&mut io.wbuf, pid, secret);
    build::ready_for_query(&mut io.wbuf, b'I');
}
