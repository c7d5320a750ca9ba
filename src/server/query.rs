//! The broker's own queries on a server connection (resets, settings, probes, the
//! listener's LISTEN and notifications): simple protocol, rows as text, errors as
//! `QueryError`, the connection's failure as `ServerError`.

use super::{Notification, QueryError, ServerConn, ServerError, error_fields, protocol, read_message, set_param};
use crate::proto::TxnStatus;
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

impl ServerConn {
    /// Runs `sql` with the simple protocol and waits for ReadyForQuery, discarding rows and
    /// recording ParameterStatus changes. The outer error means the connection is unusable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Result<(), QueryError>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(sql, &mut out)?;
        self.run(&out, |_| {}, None).await
    }

    /// Like `simple_query`, handing each notification that arrives meanwhile to `notified` at
    /// once: a listening connection must not hold what a busy server sends before its reply.
    pub async fn simple_query_notifying(
        &mut self,
        sql: &str,
        notified: &mut (dyn FnMut(Notification) + Send),
    ) -> Result<Result<(), QueryError>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(sql, &mut out)?;
        self.run(&out, |_| {}, Some(notified)).await
    }

    /// Like `simple_query`, returning every row's values as text.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Result<Vec<Vec<Option<String>>>, QueryError>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(sql, &mut out)?;
        let mut rows = Vec::new();
        let r = self.run(&out, |row| rows.push(row_values(row)), None).await?;
        Ok(r.map(|()| rows))
    }

    /// Like `simple_query`, returning the first row's values as text.
    pub async fn query_row(&mut self, sql: &str) -> Result<Result<Vec<Option<String>>, QueryError>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        frontend::query(sql, &mut out)?;
        Ok(self.first_row(&out).await?.map(Option::unwrap_or_default))
    }

    /// Runs `sql` with text `params` ($1, $2, ...) over the extended protocol, so values are
    /// never spliced into SQL, and returns the first row, if any.
    pub async fn query_row_with(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<Result<Option<Vec<Option<String>>>, QueryError>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 64);
        frontend::parse("", sql, std::iter::empty(), &mut out)?;
        let bound = frontend::bind(
            "",
            "",
            std::iter::once(0i16),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok::<_, Box<dyn std::error::Error + Sync + Send>>(postgres_protocol::IsNull::No)
            },
            std::iter::once(0i16),
            &mut out,
        );
        if bound.is_err() {
            return Err(protocol("cannot encode query parameters"));
        }
        frontend::execute("", 1, &mut out)?;
        frontend::sync(&mut out);
        self.first_row(&out).await
    }

    async fn first_row(&mut self, out: &[u8]) -> Result<Result<Option<Vec<Option<String>>>, QueryError>, ServerError> {
        let mut first: Option<Vec<Option<String>>> = None;
        let r = self
            .run(
                out,
                |row| {
                    if first.is_none() {
                        first = Some(row_values(row));
                    }
                },
                None,
            )
            .await?;
        Ok(r.map(|()| first))
    }

    /// Sends `out` (a Query, or an extended batch ending in Sync) and reads to ReadyForQuery.
    async fn run(
        &mut self,
        out: &[u8],
        mut on_row: impl FnMut(&postgres_protocol::message::backend::DataRowBody),
        mut notified: Option<&mut (dyn FnMut(Notification) + Send)>,
    ) -> Result<Result<(), QueryError>, ServerError> {
        self.synced = None;
        self.stream.write_all(out).await?;
        let mut first_error = None;
        loop {
            match read_message(&mut self.stream, &mut self.rbuf).await? {
                Message::ErrorResponse(body) if first_error.is_none() => {
                    first_error = Some(error_fields(&body));
                }
                Message::DataRow(row) => on_row(&row),
                Message::ParameterStatus(body) => set_param(&mut self.params, body.name()?, body.value()?),
                Message::NotificationResponse(body) => {
                    let n = Notification {
                        pid: body.process_id(),
                        channel: body.channel()?.to_string(),
                        payload: body.message()?.to_string(),
                    };
                    match notified.as_mut() {
                        Some(f) => f(n),
                        None => self.notifications.push_back(n),
                    }
                }
                Message::ReadyForQuery(body) => {
                    // Anything after it (a notification) stays in `rbuf` for whoever reads next.
                    self.status = TxnStatus::from_byte(body.status());
                    return Ok(first_error.map_or(Ok(()), Err));
                }
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    return Err(protocol("COPY in a broker query"));
                }
                _ => {}
            }
        }
    }

    /// Waits for the next notification on an idle (listening) connection. Notices and
    /// ParameterStatus are skipped; anything else means the connection is confused.
    ///
    /// # Cancel safety
    /// Bytes read are kept in `rbuf`; dropping the future loses nothing.
    pub async fn next_notification(&mut self) -> Result<Notification, ServerError> {
        loop {
            if let Some(n) = self.notifications.pop_front() {
                return Ok(n);
            }
            match read_message(&mut self.stream, &mut self.rbuf).await? {
                Message::NotificationResponse(body) => self.notifications.push_back(Notification {
                    pid: body.process_id(),
                    channel: body.channel()?.to_string(),
                    payload: body.message()?.to_string(),
                }),
                Message::NoticeResponse(_) => {}
                Message::ParameterStatus(body) => set_param(&mut self.params, body.name()?, body.value()?),
                Message::ErrorResponse(body) => {
                    let QueryError { code, message } = error_fields(&body);
                    return Err(ServerError::Refused { code, message });
                }
                _ => return Err(protocol("unexpected message on a listening connection")),
            }
        }
    }
}

/// A DataRow's values as text (NULL as `None`).
fn row_values(row: &postgres_protocol::message::backend::DataRowBody) -> Vec<Option<String>> {
    let buf = row.buffer();
    let mut values = Vec::new();
    let mut ranges = row.ranges();
    while let Ok(Some(range)) = ranges.next() {
        values.push(range.and_then(|r| buf.get(r)).map(|v| String::from_utf8_lossy(v).into_owned()));
    }
    values
}
