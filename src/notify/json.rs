//! The bridge's JSON messages and their timestamps.

use super::Notification;
use crate::config::{Envelope, WebSocket};
use crate::events::rfc3339;
use serde_json::{Value, json};

/// A notification in its channel's envelope; the payload is embedded as JSON when it parses
/// as JSON. `notification`: `{"type":"notification","channel","payload","pid","timestamp",
/// "messageId"}`; `typed`: `{"type":<the channel's type>,"channel","data","timestamp",
/// "messageId"}`.
pub fn notification(n: &Notification, w: &WebSocket) -> String {
    let payload = serde_json::from_str::<Value>(&n.payload).unwrap_or_else(|_| Value::String(n.payload.clone()));
    match w.shape(&n.channel) {
        (Envelope::Notification, _) => json!({
            "type": "notification",
            "channel": n.channel,
            "payload": payload,
            "pid": n.pid,
            "timestamp": rfc3339(n.received_at),
            "messageId": n.message_id,
        }),
        (Envelope::Typed, kind) => json!({
            "type": kind,
            "channel": n.channel,
            "data": payload,
            "timestamp": rfc3339(n.received_at),
            "messageId": n.message_id,
        }),
    }
    .to_string()
}

/// `{"type":"snapshot","channel":...,"data":...,"messageId":...}`, or, when the query
/// failed, `{"type":"error","code":"snapshot_failed","channel":...,"message":...}`.
pub fn snapshot(s: &super::hold::Snapshot) -> String {
    match &s.data {
        Ok(data) => {
            let data = serde_json::from_str::<Value>(data).unwrap_or(Value::Null);
            json!({"type": "snapshot", "channel": s.channel, "data": data, "messageId": s.message_id}).to_string()
        }
        Err(e) => json!({"type": "error", "code": "snapshot_failed", "channel": s.channel, "message": e}).to_string(),
    }
}

/// `{"type":"connection_ack","connectionId":id}`.
pub fn ack(id: u64) -> String {
    json!({"type": "connection_ack", "connectionId": id}).to_string()
}

/// `{"type":"subscribed"|"unsubscribed","channels":[...]}` with every channel now subscribed.
pub fn channels(kind: &str, channels: &[String]) -> String {
    json!({"type": kind, "channels": channels}).to_string()
}

/// `{"type":"error","code":...,"message":...}`.
pub fn error(code: &str, message: &str) -> String {
    json!({"type": "error", "code": code, "message": message}).to_string()
}

/// `{"type":"resync","reason":...}`.
pub fn resync(reason: &str) -> String {
    json!({"type": "resync", "reason": reason}).to_string()
}

/// `{"type":"pong"}`, the answer to an application-level `{"type":"ping"}`.
pub fn pong() -> String {
    json!({"type": "pong"}).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use std::time::UNIX_EPOCH;

    fn note(payload: &str) -> Notification {
        Notification {
            channel: "employee_changes".into(),
            payload: payload.into(),
            pid: 42,
            message_id: 7,
            received_at: UNIX_EPOCH,
            xid: None,
            json: OnceLock::new(),
        }
    }

    fn bridge(toml: &str) -> WebSocket {
        let text = format!("{toml}\n[auth]\ntype = \"trust\"\n[databases.app]\nhost = \"127.0.0.1\"\n");
        crate::config::Config::parse(&text, None, &|_| None).unwrap().websocket.clone()
    }

    #[test]
    fn the_typed_envelope_carries_the_channel_type_and_the_row_as_data() {
        let w = bridge("[websocket.channels.employee_changes]\ntype = \"employee_update\"\nenvelope = \"typed\"");
        let v: Value = serde_json::from_str(&notification(&note(r#"{"id":1}"#), &w)).unwrap();
        assert_eq!(v["type"], "employee_update");
        assert_eq!(v["channel"], "employee_changes");
        assert_eq!(v["data"]["id"], 1);
        assert_eq!(v["messageId"], 7);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("payload").is_none());
    }

    #[test]
    fn a_bridge_wide_typed_envelope_names_the_type_after_the_channel() {
        let w = bridge("[websocket]\nenvelope = \"typed\"");
        let v: Value = serde_json::from_str(&notification(&note("plain"), &w)).unwrap();
        assert_eq!(v["type"], "employee_changes");
        assert_eq!(v["data"], "plain");
    }

    #[test]
    fn json_payloads_are_embedded_and_others_are_strings() {
        let w = bridge("");
        let v: Value = serde_json::from_str(&notification(&note(r#"{"id":1,"name":"Ann"}"#), &w)).unwrap();
        assert_eq!(v["type"], "notification");
        assert_eq!(v["payload"]["name"], "Ann");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["messageId"], 7);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        let v: Value = serde_json::from_str(&notification(&note("not json {"), &w)).unwrap();
        assert_eq!(v["payload"], "not json {");
    }
}
