//! Validation of the `[websocket]`, `[health]` and `[budget]` sections.

use super::*;

/// Default of `websocket.max_channels_per_client`.
pub const DEFAULT_MAX_CHANNELS: usize = 1000;

/// Default of `websocket.replay_buffer`: notifications kept per database for resume.
pub const DEFAULT_REPLAY_BUFFER: usize = 1000;
/// Default of `websocket.max_payload_bytes`: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Default of `websocket.replay_buffer_bytes`: 8 MiB of payloads per database.
pub const DEFAULT_REPLAY_BUFFER_BYTES: usize = 8 << 20;

impl Validator<'_> {
    pub(super) fn websocket(&self, w: &raw::WebSocket) -> Result<WebSocket, ConfigError> {
        let path = self.string("websocket.path", &w.path)?.unwrap_or_else(|| "/ws".to_string());
        if !path.starts_with('/') {
            return Err(self.invalid("websocket.path", format!("must start with /, got {path:?}")));
        }
        let mut tokens = Vec::new();
        for (i, t) in w.tokens.iter().flatten().enumerate() {
            let key = format!("websocket.tokens[{i}]");
            let token = self
                .string(&format!("{key}.token"), &t.token)?
                .filter(|t| !t.is_empty())
                .ok_or_else(|| self.invalid(&format!("{key}.token"), "a non-empty token is required"))?;
            tokens.push(Token { token, channels: t.channels.clone().unwrap_or_default() });
        }
        let mut channels = std::collections::BTreeMap::new();
        for (name, c) in w.channels.iter().flatten() {
            let key = format!("websocket.channels.{name}");
            crate::proto::check_channel(name).map_err(|m| self.invalid(&key, m))?;
            let shape = ChannelShape {
                kind: self.string(&format!("{key}.type"), &c.kind)?,
                envelope: self.envelope(&format!("{key}.envelope"), &c.envelope)?,
                snapshot_query: self.string(&format!("{key}.snapshot_query"), &c.snapshot_query)?,
            };
            channels.insert(name.clone(), shape);
        }
        let default_channels = w.default_channels.clone().unwrap_or_default();
        for ch in &default_channels {
            crate::proto::check_channel(ch)
                .map_err(|m| self.invalid("websocket.default_channels", format!("{ch:?}: {m}")))?;
        }
        let ping_interval = self.duration("websocket.ping_interval", &w.ping_interval, 30)?;
        if ping_interval.is_zero() {
            return Err(self.invalid("websocket.ping_interval", "must be greater than 0"));
        }
        let listener_check_timeout = self.duration("websocket.listener_check_timeout", &w.listener_check_timeout, 5)?;
        if listener_check_timeout.is_zero() {
            return Err(self.invalid("websocket.listener_check_timeout", "must be greater than 0"));
        }
        Ok(WebSocket {
            path,
            ping_interval,
            pong_timeout: self.duration("websocket.pong_timeout", &w.pong_timeout, 10)?,
            idle_timeout: self.duration("websocket.idle_timeout", &w.idle_timeout, 300)?,
            max_ws_connections: self.int("websocket.max_ws_connections", w.max_ws_connections, 1000, 1)?,
            max_ws_connections_per_ip: self.int(
                "websocket.max_ws_connections_per_ip",
                w.max_ws_connections_per_ip,
                10,
                1,
            )?,
            ws_send_queue: self.int("websocket.ws_send_queue", w.ws_send_queue, 1024, 1)?,
            max_channels_per_client: self.int(
                "websocket.max_channels_per_client",
                w.max_channels_per_client,
                DEFAULT_MAX_CHANNELS,
                1,
            )?,
            allowed_origins: w.allowed_origins.clone().unwrap_or_default(),
            tokens,
            envelope: self.envelope("websocket.envelope", &w.envelope)?.unwrap_or_default(),
            default_channels,
            replay_buffer: self.int("websocket.replay_buffer", w.replay_buffer, DEFAULT_REPLAY_BUFFER, 0)?,
            replay_buffer_bytes: self.int(
                "websocket.replay_buffer_bytes",
                w.replay_buffer_bytes,
                DEFAULT_REPLAY_BUFFER_BYTES,
                0,
            )?,
            listener_check_interval: self.duration(
                "websocket.listener_check_interval",
                &w.listener_check_interval,
                30,
            )?,
            listener_check_timeout,
            max_payload_bytes: self.int(
                "websocket.max_payload_bytes",
                w.max_payload_bytes,
                DEFAULT_MAX_PAYLOAD_BYTES,
                8000,
            )?,
            channels,
        })
    }

    fn envelope(&self, key: &str, v: &Option<String>) -> Result<Option<Envelope>, ConfigError> {
        Ok(match self.string(key, v)?.as_deref() {
            None => None,
            Some("notification") => Some(Envelope::Notification),
            Some("typed") => Some(Envelope::Typed),
            Some(other) => {
                return Err(self.invalid(key, format!("expected \"notification\" or \"typed\", got {other:?}")));
            }
        })
    }

    fn ratio(&self, key: &str, v: Option<f64>, default: f64) -> Result<f64, ConfigError> {
        match v {
            None => Ok(default),
            Some(r) if (0.0..=1.0).contains(&r) => Ok(r),
            Some(r) => Err(self.invalid(key, format!("must be between 0 and 1, got {r}"))),
        }
    }

    pub(super) fn health(&self, h: &raw::Health) -> Result<Health, ConfigError> {
        Ok(Health {
            degraded_utilization: self.ratio("health.degraded_utilization", h.degraded_utilization, 0.8)?,
            degraded_error_rate: self.ratio("health.degraded_error_rate", h.degraded_error_rate, 0.05)?,
            overloaded_wait: self.duration("health.overloaded_wait", &h.overloaded_wait, 1)?,
            overloaded_waiting_clients: self.int(
                "health.overloaded_waiting_clients",
                h.overloaded_waiting_clients,
                100,
                1,
            )?,
            alert_utilization: self.ratio("health.alert_utilization", h.alert_utilization, 0.8)?,
            alert_waiting_clients: self.int("health.alert_waiting_clients", h.alert_waiting_clients, 10, 1)?,
        })
    }

    pub(super) fn budget(&self, b: &raw::Budget) -> Result<Budget, ConfigError> {
        let mut env_overrides = Vec::new();
        let env_num = |name: &'static str, overrides: &mut Vec<&'static str>| -> Result<Option<i64>, ConfigError> {
            match (self.env)(name) {
                Some(v) => {
                    overrides.push(name);
                    v.trim()
                        .parse()
                        .map(Some)
                        .map_err(|_| self.invalid(name, format!("environment value {v:?} is not a number")))
                }
                None => Ok(None),
            }
        };
        let server_max_connections = match env_num("DB_MAX_CONNECTIONS", &mut env_overrides)? {
            Some(n) => ServerMaxConnections::Fixed(self.int("DB_MAX_CONNECTIONS", Some(n), 0, 1)?),
            None => match &b.server_max_connections {
                None => ServerMaxConnections::Auto,
                Some(raw::NumOrStr::Str(s)) if s == "auto" => ServerMaxConnections::Auto,
                Some(raw::NumOrStr::Int(n)) => {
                    ServerMaxConnections::Fixed(self.int("budget.server_max_connections", Some(*n), 0, 1)?)
                }
                Some(raw::NumOrStr::Str(s)) => {
                    return Err(self.invalid(
                        "budget.server_max_connections",
                        format!("expected a number or \"auto\", got {s:?}"),
                    ));
                }
            },
        };
        let max_instances = match env_num("MAX_INSTANCES", &mut env_overrides)? {
            Some(n) => self.int("MAX_INSTANCES", Some(n), 1, 1)?,
            None => self.int("budget.max_instances", b.max_instances, 1, 1)?,
        };
        let reserved_connections = self.int("budget.reserved_connections", b.reserved_connections, 5, 0)?;
        if let ServerMaxConnections::Fixed(n) = server_max_connections
            && n <= reserved_connections
        {
            return Err(self.invalid(
                "budget.reserved_connections",
                format!("{reserved_connections} leaves no connections of server_max_connections = {n}"),
            ));
        }
        let mode = match self.string("budget.mode", &b.mode)?.as_deref() {
            None | Some("static") => BudgetMode::Static,
            Some("fleet") => BudgetMode::Fleet,
            Some(other) => {
                return Err(self.invalid("budget.mode", format!("expected \"static\" or \"fleet\", got {other:?}")));
            }
        };
        let fleet = self.string("budget.fleet", &b.fleet)?.unwrap_or_else(|| "default".to_string());
        // The fleet name goes into application_name (63 bytes) and a LIKE-free prefix match.
        if fleet.is_empty()
            || fleet.len() > 24
            || !fleet.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        {
            return Err(self.invalid("budget.fleet", format!("expected 1-24 of A-Z a-z 0-9 _ - ., got {fleet:?}")));
        }
        let fleet_interval = self.duration("budget.fleet_interval", &b.fleet_interval, 5)?;
        if fleet_interval < Duration::from_millis(100) {
            return Err(self.invalid("budget.fleet_interval", "must be at least 100ms"));
        }
        let fleet_min_budget = self.int("budget.fleet_min_budget", b.fleet_min_budget, 2, 1)?;
        Ok(Budget {
            server_max_connections,
            reserved_connections,
            max_instances,
            env_overrides,
            mode,
            fleet,
            fleet_interval,
            fleet_min_budget,
        })
    }
}
