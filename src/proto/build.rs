//! Builders for the backend messages the broker itself sends. Each appends to a `BytesMut`.

use super::{field, tag};
use crate::error::SqlState;
use bytes::{BufMut, BytesMut};

/// Appends a message: tag, a length patched in after `body` writes, then the body.
#[inline]
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    // A NUL inside would end the string early on the other side; it never comes from us,
    // so the common case is one copy.
    if s.contains(&0) {
        buf.extend(s.iter().copied().filter(|&b| b != 0));
    } else {
        buf.extend_from_slice(s);
    }
    buf.put_u8(0);
}

/// AuthenticationOk.
pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, tag::AUTHENTICATION, |b| b.put_i32(0));
}

/// AuthenticationCleartextPassword.
pub fn auth_cleartext(buf: &mut BytesMut) {
    message(buf, tag::AUTHENTICATION, |b| b.put_i32(3));
}

/// AuthenticationMD5Password with its salt.
pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

/// AuthenticationSASL listing the mechanisms offered.
pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

/// AuthenticationSASLContinue carrying server-first-message.
pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

/// AuthenticationSASLFinal carrying server-final-message.
pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, tag::AUTHENTICATION, |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

/// ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, tag::PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

/// BackendKeyData with a 4-byte secret (protocol 3.0).
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    message(buf, tag::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

/// ReadyForQuery with a transaction status byte.
pub fn ready_for_query(buf: &mut BytesMut, status: super::TxnStatus) {
    message(buf, tag::READY_FOR_QUERY, |b| b.put_u8(status.as_byte()));
}

/// NegotiateProtocolVersion: the newest minor version spoken and the options not understood.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: i32, unrecognized: &[String]) {
    message(buf, tag::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(minor);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            put_cstr(b, o.as_bytes());
        }
    });
}

/// Type OID of a result column the broker makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `text` (OID 25).
    Text,
    /// `int8` (OID 20).
    Int8,
}

/// RowDescription for text-format columns.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, ColumnType)]) {
    message(buf, tag::ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for (name, ty) in columns {
            put_cstr(b, name.as_bytes());
            b.put_i32(0); // table OID
            b.put_i16(0); // column number
            let (oid, len) = match ty {
                ColumnType::Text => (25, -1),
                ColumnType::Int8 => (20, 8),
            };
            b.put_i32(oid);
            b.put_i16(len);
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values (`None` = NULL).
pub fn data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[Option<S>]) {
    message(buf, tag::DATA_ROW, |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.as_ref().len() as i32);
                    b.put_slice(v.as_ref().as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// CommandComplete with its tag (e.g. `SHOW`, `SELECT 3`).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, tag::COMMAND_COMPLETE, |b| put_cstr(b, tag.as_bytes()));
}

/// Severity of a broker-made ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the connection stays.
    Error,
    /// The connection ends after this message.
    Fatal,
    /// Informational (NoticeResponse).
    Notice,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

/// ErrorResponse (or NoticeResponse for `Severity::Notice`) with code, message and optional detail.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: SqlState, text: &str, detail: Option<&str>) {
    let tag = if severity == Severity::Notice { tag::NOTICE_RESPONSE } else { tag::ERROR_RESPONSE };
    message(buf, tag, |b| {
        for kind in [field::SEVERITY, field::SEVERITY_V] {
            b.put_u8(kind);
            put_cstr(b, severity.as_str().as_bytes());
        }
        b.put_u8(field::CODE);
        put_cstr(b, code.code().as_bytes());
        b.put_u8(field::MESSAGE);
        put_cstr(b, text.as_bytes());
        if let Some(d) = detail {
            b.put_u8(field::DETAIL);
            put_cstr(b, d.as_bytes());
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    fn parse_one(buf: &mut BytesMut) -> Message {
        Message::parse(buf).unwrap().unwrap()
    }

    #[test]
    fn error_response_carries_severity_code_and_message() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Fatal,
            SqlState::INVALID_CATALOG_NAME,
            "database \"x\" does not exist",
            Some("configured: bench"),
        );
        let Message::ErrorResponse(body) = parse_one(&mut b) else { panic!("not an error") };
        use fallible_iterator::FallibleIterator;
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|f| Ok((f.type_(), String::from_utf8_lossy(f.value_bytes()).into_owned())))
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'S', "FATAL".into())));
        assert!(fields.contains(&(b'C', "3D000".into())));
        assert!(fields.contains(&(b'D', "configured: bench".into())));
    }

    #[test]
    fn builders_produce_messages_postgres_protocol_can_parse() {
        let mut b = BytesMut::new();
        auth_ok(&mut b);
        parameter_status(&mut b, "server_version", "15.0");
        backend_key_data(&mut b, 42, -7);
        ready_for_query(&mut b, crate::proto::TxnStatus::Idle);
        assert!(matches!(parse_one(&mut b), Message::AuthenticationOk));
        let Message::ParameterStatus(p) = parse_one(&mut b) else { panic!() };
        assert_eq!(p.name().unwrap(), "server_version");
        let Message::BackendKeyData(k) = parse_one(&mut b) else { panic!() };
        assert_eq!((k.process_id(), k.secret_key()), (42, -7));
        let Message::ReadyForQuery(r) = parse_one(&mut b) else { panic!() };
        assert_eq!(r.status(), b'I');
        assert!(b.is_empty());
    }

    #[test]
    fn result_sets_parse_with_postgres_protocol() {
        let mut b = BytesMut::new();
        row_description(&mut b, &[("name", ColumnType::Text), ("n", ColumnType::Int8)]);
        data_row(&mut b, &[Some("a"), None]);
        command_complete(&mut b, "SHOW");
        let Message::RowDescription(rd) = parse_one(&mut b) else { panic!() };
        use fallible_iterator::FallibleIterator;
        let names: Vec<String> = rd.fields().map(|f| Ok(f.name().to_string())).collect().unwrap();
        assert_eq!(names, ["name", "n"]);
        let Message::DataRow(row) = parse_one(&mut b) else { panic!() };
        let ranges: Vec<_> = row.ranges().collect().unwrap();
        assert_eq!(ranges.len(), 2);
        assert!(ranges[1].is_none());
        assert!(matches!(parse_one(&mut b), Message::CommandComplete(_)));
    }

    #[test]
    fn sasl_mechanism_list_is_double_terminated() {
        let mut b = BytesMut::new();
        auth_sasl(&mut b, &["SCRAM-SHA-256"]);
        assert_eq!(&b[9..], b"SCRAM-SHA-256\0\0");
    }
}
