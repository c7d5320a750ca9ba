//! The WebSocket bridge's client commands: one text frame in, a checked command or the error
//! to answer with. Pure (no hub, no socket), so it is fuzzed on its own (`fuzz/ws_json`).

use super::{glob_match, json};
use crate::events::{EVENTS_CHANNEL, METRICS_CHANNEL};
use crate::proto::check_channel;
use serde::Deserialize;

/// Prefix of the broker's own channels, served without a database listener.
pub const BROKER_CHANNEL_PREFIX: &str = "$pgbroker.";

/// A client command that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Subscribe to at least one channel, each valid and allowed by the token.
    Subscribe {
        /// Broker channels (`$pgbroker.events`, `$pgbroker.metrics`), in the order sent.
        broker: Vec<String>,
        /// Database channels (LISTENed on), in the order sent.
        database: Vec<String>,
        /// `lastMessageId`: resume after this notification (see `replay`).
        resume: Option<u64>,
    },
    /// Unsubscribe from these channels (unchecked: unknown ones are no-ops), `None` = all.
    Unsubscribe(Option<Vec<String>>),
    /// Application-level ping, answered with `{"type":"pong"}`.
    Ping,
}

/// Why a text frame was refused; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `bad_request`, `bad_channel` or `forbidden_channel`.
    pub code: &'static str,
    /// For the client.
    pub message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into() }
    }

    /// The `{"type":"error",...}` reply.
    pub fn to_json(&self) -> String {
        json::error(self.code, &self.message)
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default, rename = "lastMessageId")]
    last_message_id: Option<MessageId>,
}

/// A `messageId` as a client sends it back: a number, or the same digits as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum MessageId {
    Number(u64),
    Text(String),
}

/// A `lastMessageId` from a query parameter or a subscribe message.
pub fn message_id(text: &str) -> Result<u64, Refusal> {
    text.trim().parse().map_err(|_| Refusal::new("bad_request", format!("lastMessageId {text:?} is not a message id")))
}

/// Checks channels to subscribe to and splits them into broker and database channels.
pub fn check_channels(wanted: Vec<String>, allowed: Option<&[String]>) -> Result<(Vec<String>, Vec<String>), Refusal> {
    for ch in &wanted {
        check_subscribe(ch, allowed)?;
    }
    Ok(wanted.into_iter().partition(|c| c.starts_with(BROKER_CHANNEL_PREFIX)))
}

/// Parses and checks one text frame. `allowed` = the channel patterns of the client's token
/// (`None`: no tokens configured, any channel goes).
pub fn parse(text: &str, allowed: Option<&[String]>) -> Result<Command, Refusal> {
    let Ok(raw) = serde_json::from_str::<Raw>(text) else {
        return Err(Refusal::new(
            "bad_request",
            "expected {\"type\":\"subscribe\"|\"unsubscribe\",\"channels\":[...]}",
        ));
    };
    match raw.kind.as_str() {
        "subscribe" => {
            let wanted = raw.channels.unwrap_or_default();
            if wanted.is_empty() {
                return Err(Refusal::new("bad_request", "subscribe needs a non-empty \"channels\" list"));
            }
            let resume = match raw.last_message_id {
                None => None,
                Some(MessageId::Number(n)) => Some(n),
                Some(MessageId::Text(t)) => Some(message_id(&t)?),
            };
            let (broker, database) = check_channels(wanted, allowed)?;
            Ok(Command::Subscribe { broker, database, resume })
        }
        "unsubscribe" => Ok(Command::Unsubscribe(raw.channels)),
        "ping" => Ok(Command::Ping),
        other => Err(Refusal::new("bad_request", format!("unknown message type {other:?}"))),
    }
}

/// Whether a client may subscribe to `ch`.
fn check_subscribe(ch: &str, allowed: Option<&[String]>) -> Result<(), Refusal> {
    if ch.starts_with(BROKER_CHANNEL_PREFIX) && ch != EVENTS_CHANNEL && ch != METRICS_CHANNEL {
        return Err(Refusal::new(
            "bad_channel",
            format!("{ch:?}: unknown broker channel (use {EVENTS_CHANNEL} or {METRICS_CHANNEL})"),
        ));
    }
    if let Err(why) = check_channel(ch) {
        return Err(Refusal::new("bad_channel", format!("{ch:?}: {why}")));
    }
    if let Some(patterns) = allowed
        && !patterns.iter().any(|p| glob_match(p, ch))
    {
        return Err(Refusal::new("forbidden_channel", format!("the token does not allow channel {ch:?}")));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn subscribe_splits_broker_and_database_channels() {
        let cmd = parse(r#"{"type":"subscribe","channels":["a","$pgbroker.events","b"]}"#, None).unwrap();
        assert_eq!(
            cmd,
            Command::Subscribe { broker: strings(&["$pgbroker.events"]), database: strings(&["a", "b"]), resume: None }
        );
    }

    #[test]
    fn subscribe_takes_a_last_message_id_as_number_or_string() {
        let resume = |text: &str| match parse(text, None) {
            Ok(Command::Subscribe { resume, .. }) => Ok(resume),
            Ok(_) => Err("not a subscribe".to_string()),
            Err(e) => Err(e.code.to_string()),
        };
        assert_eq!(resume(r#"{"type":"subscribe","channels":["a"],"lastMessageId":42}"#), Ok(Some(42)));
        assert_eq!(resume(r#"{"type":"subscribe","channels":["a"],"lastMessageId":"42"}"#), Ok(Some(42)));
        assert_eq!(resume(r#"{"type":"subscribe","channels":["a"],"lastMessageId":"x"}"#), Err("bad_request".into()));
    }

    #[test]
    fn subscribe_refuses_empty_unknown_invalid_and_forbidden_channels() {
        let code = |text: &str, allowed: Option<&[String]>| parse(text, allowed).unwrap_err().code;
        assert_eq!(code(r#"{"type":"subscribe"}"#, None), "bad_request");
        assert_eq!(code(r#"{"type":"subscribe","channels":[]}"#, None), "bad_request");
        assert_eq!(code(r#"{"type":"subscribe","channels":["$pgbroker.x"]}"#, None), "bad_channel");
        assert_eq!(code(r#"{"type":"subscribe","channels":["a\u0000b"]}"#, None), "bad_channel");
        assert_eq!(code(r#"{"type":"subscribe","channels":[""]}"#, None), "bad_channel");
        let only = strings(&["orders.*"]);
        assert_eq!(code(r#"{"type":"subscribe","channels":["users"]}"#, Some(&only)), "forbidden_channel");
        assert!(parse(r#"{"type":"subscribe","channels":["orders.new"]}"#, Some(&only)).is_ok());
    }

    #[test]
    fn unknown_types_and_non_json_are_bad_requests_with_json_replies() {
        for text in ["", "null", "{}", r#"{"type":1}"#, r#"{"type":"nope"}"#, r#"{"type":"ping","channels":1}"#] {
            let refusal = parse(text, None).unwrap_err();
            assert_eq!(refusal.code, "bad_request", "{text}");
            let reply: serde_json::Value = serde_json::from_str(&refusal.to_json()).unwrap();
            assert_eq!(reply["type"], "error");
        }
        assert_eq!(parse(r#"{"type":"ping"}"#, None), Ok(Command::Ping));
        assert_eq!(parse(r#"{"type":"unsubscribe"}"#, None), Ok(Command::Unsubscribe(None)));
    }
}
