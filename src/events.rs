//! Operational events (pool changes, alerts, health changes): one structured log line each,
//! and the same JSON on the WebSocket bridge's reserved channel `$pgbroker.events`.

use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// The reserved bridge channel carrying events.
pub const EVENTS_CHANNEL: &str = "$pgbroker.events";
/// The reserved bridge channel carrying periodic metric snapshots.
pub const METRICS_CHANNEL: &str = "$pgbroker.metrics";

/// How many messages a slow reserved-channel subscriber may fall behind before it misses some.
const BACKLOG: usize = 256;

/// Publishes events and metric snapshots.
#[derive(Debug)]
pub struct Events {
    events: broadcast::Sender<Arc<str>>,
    metrics: broadcast::Sender<Arc<str>>,
}

impl Default for Events {
    fn default() -> Events {
        Events { events: broadcast::Sender::new(BACKLOG), metrics: broadcast::Sender::new(BACKLOG) }
    }
}

impl Events {
    /// Logs an event and publishes it. `fields` must be a JSON object.
    pub fn emit(&self, kind: &str, fields: Value) {
        tracing::info!(target: "pgbroker::events", event = kind, details = %fields, "event");
        if self.events.receiver_count() == 0 {
            return;
        }
        let mut msg = json!({
            "type": "event",
            "channel": EVENTS_CHANNEL,
            "event": kind,
            "timestamp": rfc3339(SystemTime::now()),
        });
        if let (Some(m), Value::Object(f)) = (msg.as_object_mut(), fields) {
            m.extend(f);
        }
        let _ = self.events.send(msg.to_string().into());
    }

    /// Publishes a metrics snapshot (skipped when nobody listens).
    pub fn publish_metrics(&self, snapshot: impl FnOnce() -> Value) {
        if self.metrics.receiver_count() > 0 {
            let _ = self.metrics.send(snapshot().to_string().into());
        }
    }

    /// True if someone watches the metrics channel.
    pub fn metrics_watched(&self) -> bool {
        self.metrics.receiver_count() > 0
    }

    /// A receiver for a reserved channel, if `channel` is one.
    pub fn subscribe(&self, channel: &str) -> Option<broadcast::Receiver<Arc<str>>> {
        match channel {
            EVENTS_CHANNEL => Some(self.events.subscribe()),
            METRICS_CHANNEL => Some(self.metrics.subscribe()),
            _ => None,
        }
    }
}

/// A two-threshold alarm: fires at `on`, clears below `off`, so a value hovering at the
/// threshold does not flap.
#[derive(Debug, Clone, Copy)]
pub struct Hysteresis {
    on: f64,
    off: f64,
    active: bool,
}

impl Hysteresis {
    /// An alarm firing at `on` and clearing below `off` (`off` <= `on`).
    pub fn new(on: f64, off: f64) -> Hysteresis {
        Hysteresis { on, off: off.min(on), active: false }
    }

    /// Feeds a value; returns `Some(true)` when the alarm fires, `Some(false)` when it clears.
    pub fn update(&mut self, value: f64) -> Option<bool> {
        if !self.active && value >= self.on {
            self.active = true;
            Some(true)
        } else if self.active && value < self.off {
            self.active = false;
            Some(false)
        } else {
            None
        }
    }
}

/// UTC time as RFC 3339 with milliseconds, e.g. `2026-11-22T04:55:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_321_500_123);
        assert_eq!(rfc3339(t), "2026-11-22T04:25:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn hysteresis_fires_once_and_clears_below_the_lower_threshold() {
        let mut h = Hysteresis::new(0.8, 0.7);
        assert_eq!(h.update(0.5), None);
        assert_eq!(h.update(0.85), Some(true));
        assert_eq!(h.update(0.9), None);
        assert_eq!(h.update(0.75), None, "between the thresholds: no flapping");
        assert_eq!(h.update(0.6), Some(false));
    }
}
