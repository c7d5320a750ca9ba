//! Taking a channel's `snapshot_query` for a subscriber (see `hold` for why it is exact):
//! commit the marker, then run the query in a REPEATABLE READ transaction with the
//! transaction ids it sees, on a server of the database's pool as its configured user.

use super::CHECK_CHANNEL;
use super::bridge::Bridge;
use super::hold::{PgSnapshot, Taken};
use crate::config::Config;
use crate::pool::Release;
use crate::server::{QueryError, ServerError};
use postgres_protocol::escape::{escape_identifier, escape_literal};
use serde_json::Value;

/// Commits `marker` on the listener's private channel, then takes `sql`'s value.
pub async fn take(bridge: &Bridge, cfg: &Config, database: &str, sql: &str, marker: &str) -> Taken {
    match run(bridge, cfg, database, sql, marker).await {
        Ok((data, seen)) => Taken { data: Ok(data), seen: Some(seen) },
        Err(e) => {
            tracing::warn!(database, error = %e, "snapshot_query failed");
            Taken { data: Err(e), seen: None }
        }
    }
}

async fn run(
    bridge: &Bridge,
    cfg: &Config,
    database: &str,
    sql: &str,
    marker: &str,
) -> Result<(String, PgSnapshot), String> {
    let pool = bridge.pool(cfg, database).map_err(|e| e.to_string())?;
    let mut server = pool.checkout(cfg.broker.query_wait_timeout).await.map_err(|e| e.to_string())?;
    // Any failure leaves the server mid-transaction or worse: it is not reused.
    server.release = Release::Close;
    let notify = format!("NOTIFY {}, {}", escape_identifier(CHECK_CHANNEL), escape_literal(marker));
    answer(server.simple_query(&notify).await)?;
    answer(server.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await)?;
    let seen = answer(server.query_row("SELECT pg_current_snapshot()::text").await)?;
    let seen = seen.first().cloned().flatten().as_deref().and_then(PgSnapshot::parse).ok_or("no snapshot")?;
    let rows = answer(server.query_rows(sql).await)?;
    answer(server.simple_query("COMMIT").await)?;
    server.release = Release::Reuse;
    Ok((value(rows), seen))
}

/// A query's answer, or why there is none: the connection failed or the server refused.
fn answer<T>(r: Result<Result<T, QueryError>, ServerError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())?.map_err(|e| e.message)
}

/// The snapshot's value: the first column of the first row, as JSON when it parses as JSON
/// (`json_agg(...)`), a string otherwise, `null` without a row.
fn value(rows: Vec<Vec<Option<String>>>) -> String {
    let cell = rows.into_iter().next().and_then(|r| r.into_iter().next()).flatten();
    let v = match cell {
        None => Value::Null,
        Some(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
    };
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_is_the_first_cell_as_json_or_text() {
        let row = |v: Option<&str>| vec![vec![v.map(str::to_string), Some("ignored".into())]];
        assert_eq!(value(row(Some(r#"[{"id":1}]"#))), r#"[{"id":1}]"#);
        assert_eq!(value(row(Some("plain"))), r#""plain""#);
        assert_eq!(value(row(None)), "null");
        assert_eq!(value(Vec::new()), "null");
    }
}
