//! The admin console: the virtual database `pgbroker` (alias `pgbouncer`), answering
//! PgBouncer's SHOW commands with ordinary result sets and running RELOAD, PAUSE, RESUME,
//! KILL, UPGRADE and SHUTDOWN. It never reaches a real server.

mod show;

use crate::app::App;
use crate::clients::Client;
use crate::error::SqlState;
use crate::net::{ClientIo, ClientStream};
use crate::proto::build::{self, ColumnType, Severity};
use crate::proto::{split_cstr, tag};
use crate::session::SessionError;
use bytes::BytesMut;
use std::sync::{Arc, Weak};

/// Largest query the console reads.
const MAX_COMMAND: usize = 64 * 1024;

/// A result set to send: columns, then rows of text values.
pub struct Table {
    columns: Vec<(&'static str, ColumnType)>,
    rows: Vec<Vec<Option<String>>>,
    tag: String,
}

impl Table {
    fn new(columns: &[(&'static str, ColumnType)]) -> Table {
        Table { columns: columns.to_vec(), rows: Vec::new(), tag: "SHOW".to_string() }
    }

    fn row(&mut self, values: Vec<Option<String>>) {
        self.rows.push(values);
    }

    fn write(&self, out: &mut BytesMut) {
        build::row_description(out, &self.columns);
        for r in &self.rows {
            build::data_row(out, r);
        }
        build::command_complete(out, &self.tag);
    }
}

/// What a command produced.
enum Reply {
    Rows(Table),
    Done(String),
    Error(SqlState, String),
    /// The console session ends after the reply (SHUTDOWN).
    Shutdown,
}

/// The console as client sessions reach it (a weak handle: the broker owns the sessions'
/// view, which holds this).
pub(super) struct Console(pub(super) Weak<App>);

impl crate::session::Console for Console {
    fn serve<'a>(
        &'a self,
        io: &'a mut ClientIo<ClientStream>,
        user: &'a str,
        client: &'a Arc<Client>,
    ) -> crate::session::ConsoleFuture<'a> {
        Box::pin(async move {
            let Some(app) = self.0.upgrade() else { return Err(SessionError::Disconnected) };
            serve(&app, io, user, client).await
        })
    }
}

/// Serves one console session until the client leaves.
pub async fn serve(
    app: &Arc<App>,
    io: &mut ClientIo<ClientStream>,
    user: &str,
    client: &Arc<Client>,
) -> Result<(), SessionError> {
    for (k, v) in [
        ("server_version", "15.0 (pgbroker)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", client.application_name.as_str()),
    ] {
        build::parameter_status(&mut io.wbuf, k, v);
    }
    build::backend_key_data(&mut io.wbuf, 0, rand::random());
    build::ready_for_query(&mut io.wbuf, crate::proto::TxnStatus::Idle);
    io.flush().await?;
    let mut extended_error = false;
    loop {
        let (t, body) = tokio::select! {
            m = io.read_message(MAX_COMMAND) => m?,
            _ = client.kill.wait() => return Err(SessionError::fatal(SqlState::ADMIN_SHUTDOWN, "terminated by the administrator")),
            _ = client.drain.wait() => return Err(SessionError::fatal(SqlState::ADMIN_SHUTDOWN, client.drain_reason().to_string())),
        };
        match t {
            tag::TERMINATE => return Ok(()),
            tag::QUERY => {
                // Rights as the live config has them: a RELOAD that takes a user off
                // admin_users takes effect at its next command, not its next login.
                let cfg = app.config();
                let admin = cfg.auth.admin_users.iter().any(|u| u == user);
                if !admin && !cfg.auth.stats_users.iter().any(|u| u == user) {
                    return Err(SessionError::fatal(
                        SqlState::INVALID_AUTHORIZATION,
                        format!(
                            "user \"{user}\" is no longer allowed on the admin console (auth.admin_users, auth.stats_users)"
                        ),
                    ));
                }
                let text = split_cstr(&body).map(|(q, _)| String::from_utf8_lossy(q).into_owned()).unwrap_or_default();
                let reply = run(app, admin, &text).await;
                let shutdown = matches!(reply, Reply::Shutdown);
                write_reply(&mut io.wbuf, reply);
                build::ready_for_query(&mut io.wbuf, crate::proto::TxnStatus::Idle);
                io.flush().await?;
                if shutdown {
                    // The process (app::run) sees the drain start and stops gracefully.
                    app.shutdown().begin_drain();
                    return Ok(());
                }
            }
            tag::SYNC => {
                extended_error = false;
                build::ready_for_query(&mut io.wbuf, crate::proto::TxnStatus::Idle);
                io.flush().await?;
            }
            _ if !extended_error => {
                extended_error = true;
                build::error_response(
                    &mut io.wbuf,
                    Severity::Error,
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the admin console accepts simple queries only",
                    None,
                );
            }
            _ => {}
        }
    }
}

fn write_reply(out: &mut BytesMut, reply: Reply) {
    match reply {
        Reply::Rows(t) => t.write(out),
        Reply::Done(tag) => build::command_complete(out, &tag),
        Reply::Error(code, message) => build::error_response(out, Severity::Error, code, &message, None),
        Reply::Shutdown => build::command_complete(out, "SHUTDOWN"),
    }
}

/// Runs one console command. Stats users may only SHOW.
async fn run(app: &Arc<App>, admin: bool, text: &str) -> Reply {
    let text = text.trim().trim_end_matches(';').trim();
    let words: Vec<String> = text.split_whitespace().map(str::to_ascii_lowercase).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    if words.is_empty() {
        return Reply::Done("EMPTY".into());
    }
    if words[0] != "show" && !admin {
        return Reply::Error(SqlState::INSUFFICIENT_PRIVILEGE, "only auth.admin_users may run this command".into());
    }
    let arg = || text.split_whitespace().nth(1).map(|s| s.trim_matches('"').to_string());
    match words.as_slice() {
        ["show", what] => match show::table(app, what) {
            Some(t) => Reply::Rows(t),
            None => Reply::Error(SqlState::SYNTAX_ERROR, format!("unknown SHOW {what}; try SHOW HELP")),
        },
        ["reload"] => match app.reload().await {
            Ok(()) => Reply::Done("RELOAD".into()),
            Err(e) => Reply::Error(e.sqlstate(), crate::error::chain(&e)),
        },
        ["pause"] | ["pause", _] => {
            let db = if words.len() == 2 { arg() } else { None };
            match app.registry().pause(db.as_deref()).await {
                Ok(()) => Reply::Done("PAUSE".into()),
                Err(e) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, e.to_string()),
            }
        }
        ["resume"] | ["resume", _] => {
            let db = if words.len() == 2 { arg() } else { None };
            app.registry().resume(db.as_deref());
            Reply::Done("RESUME".into())
        }
        ["kill", _] => {
            let Some(db) = arg() else { return Reply::Error(SqlState::SYNTAX_ERROR, "KILL needs a database".into()) };
            if !app.config().databases.contains_key(&db) {
                return Reply::Error(SqlState::INVALID_CATALOG_NAME, format!("database \"{db}\" is not configured"));
            }
            let n = app.registry().kill(&db, app.clients());
            tracing::warn!(database = %db, clients = n, "KILL from the admin console");
            Reply::Done("KILL".into())
        }
        ["upgrade"] => match app.upgrade().await {
            Ok(pid) => {
                tracing::warn!(pid, "UPGRADE from the admin console: the new process serves; this one drains");
                Reply::Done("UPGRADE".into())
            }
            Err(e) => Reply::Error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, crate::error::chain(&e)),
        },
        ["shutdown"] => {
            tracing::warn!("SHUTDOWN from the admin console");
            Reply::Shutdown
        }
        _ => Reply::Error(SqlState::SYNTAX_ERROR, format!("unknown admin command {text:?}; try SHOW HELP")),
    }
}
