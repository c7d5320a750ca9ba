//! A subscriber's channel on its way from subscribe to live when it has a `snapshot_query`:
//! the snapshot must come first, and every change exactly once after it.
//!
//! The broker commits a marker notification, then takes the snapshot in a REPEATABLE READ
//! transaction on another connection. PostgreSQL queues notifications in commit order, so
//! everything before the marker was committed before the snapshot and is in it (dropped),
//! and everything after the snapshot's transaction began is not (delivered). Between the two
//! (the instant between the marker's commit and the snapshot) the order alone cannot tell;
//! there a notification sent by `pgbroker_notify` carries its transaction id, and the
//! snapshot's `pg_current_snapshot()` says whether it saw that transaction. A plain
//! `pg_notify` in that instant is delivered (it may also be in the snapshot).

use super::{Event, Notification};
use std::sync::Arc;

/// A `pg_current_snapshot()`: which transactions a snapshot sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl PgSnapshot {
    /// Parses the text form, `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<PgSnapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        Some(PgSnapshot { xmin, xmax, xip })
    }

    /// True if the snapshot sees transaction `xid` (committed before it).
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// A snapshot as taken: its value (JSON text) or why it failed, and what it saw.
#[derive(Debug)]
pub struct Taken {
    /// The snapshot query's value as JSON, or the error.
    pub data: Result<String, String>,
    /// What the snapshot saw (`None` if it failed).
    pub seen: Option<PgSnapshot>,
}

/// The snapshot message for a subscriber.
#[derive(Debug)]
pub struct Snapshot {
    /// The channel.
    pub channel: String,
    /// The value (JSON text), or why it could not be taken.
    pub data: Result<String, String>,
    /// The id of the last notification before the snapshot's point.
    pub message_id: u64,
}

/// Where one channel of one subscriber is.
#[derive(Debug)]
pub enum Hold {
    /// Until the marker comes through the listener: what arrives is in the snapshot.
    BeforeMarker {
        /// The marker's payload.
        token: String,
        /// Most notifications to hold after the marker.
        max: usize,
        /// The snapshot, if it was taken before its marker came through.
        taken: Option<Taken>,
    },
    /// After the marker, until the snapshot is taken: held back.
    Holding {
        /// The last notification id when the marker came.
        marker_id: u64,
        held: Vec<Arc<Notification>>,
        /// More came than `max` (what fits the subscriber's queue after the snapshot):
        /// the subscriber gets `resync` after the snapshot instead.
        overflow: bool,
        max: usize,
    },
    /// Live, dropping what the snapshot saw (known by transaction id), until the first
    /// notification it did not see: all later ones were committed later still.
    Filtering(PgSnapshot),
}

/// What to do with a notification for a held channel.
pub enum Verdict {
    /// Deliver it now.
    Deliver,
    /// Drop it (the snapshot has it), or it was held.
    Keep,
    /// Deliver it; the channel is live from here (remove the hold).
    DeliverAndRelease,
}

impl Hold {
    /// A hold waiting for marker `token`, holding at most `max` notifications after it.
    pub fn new(token: String, max: usize) -> Hold {
        Hold::BeforeMarker { token, max, taken: None }
    }

    /// A notification arrived for the channel.
    pub fn on_notification(&mut self, n: &Arc<Notification>) -> Verdict {
        match self {
            Hold::BeforeMarker { .. } => Verdict::Keep,
            Hold::Holding { held, overflow, max, .. } => {
                if held.len() < *max {
                    held.push(n.clone());
                } else {
                    *overflow = true;
                }
                Verdict::Keep
            }
            Hold::Filtering(seen) => match n.xid {
                Some(x) if seen.sees(x) => Verdict::Keep,
                Some(_) => Verdict::DeliverAndRelease,
                None => Verdict::Deliver,
            },
        }
    }

    /// Marker `token` came through the listener, after notification `last_id`. Returns the
    /// events to queue (when the snapshot was already taken) and whether the hold is over.
    pub fn on_marker(&mut self, token: &str, last_id: u64, channel: &str) -> (Vec<Event>, bool) {
        let Hold::BeforeMarker { token: t, taken, max } = self else { return (Vec::new(), false) };
        let max = *max;
        if t != token {
            return (Vec::new(), false);
        }
        match taken.take() {
            Some(taken) => self.release(taken, last_id, Vec::new(), false, channel),
            None => {
                *self = Hold::Holding { marker_id: last_id, held: Vec::new(), overflow: false, max };
                (Vec::new(), false)
            }
        }
    }

    /// The snapshot was taken (or failed). Returns the events to queue and whether the
    /// hold is over.
    pub fn on_taken(&mut self, taken: Taken, channel: &str) -> (Vec<Event>, bool) {
        match self {
            Hold::BeforeMarker { taken: slot, .. } => {
                *slot = Some(taken);
                (Vec::new(), false)
            }
            Hold::Holding { marker_id, held, overflow, .. } => {
                let (id, held, overflow) = (*marker_id, std::mem::take(held), *overflow);
                self.release(taken, id, held, overflow, channel)
            }
            Hold::Filtering(_) => (Vec::new(), false),
        }
    }

    /// The snapshot message, then what was held and not in the snapshot; the hold goes on
    /// filtering while the snapshot's transaction ids can still tell.
    fn release(
        &mut self,
        taken: Taken,
        marker_id: u64,
        held: Vec<Arc<Notification>>,
        overflow: bool,
        channel: &str,
    ) -> (Vec<Event>, bool) {
        let snapshot = Snapshot { channel: channel.to_string(), data: taken.data, message_id: marker_id };
        let mut events = vec![Event::Snapshot(Arc::new(snapshot))];
        if overflow {
            events.push(Event::Resync("too many notifications arrived while the snapshot was taken".into()));
            return (events, true);
        }
        let Some(seen) = taken.seen else {
            events.extend(held.into_iter().map(Event::Notify));
            return (events, true);
        };
        *self = Hold::Filtering(seen);
        let mut over = false;
        for n in held {
            if over {
                events.push(Event::Notify(n));
                continue;
            }
            match self.on_notification(&n) {
                Verdict::Keep => {}
                Verdict::Deliver => events.push(Event::Notify(n)),
                Verdict::DeliverAndRelease => {
                    events.push(Event::Notify(n));
                    over = true;
                }
            }
        }
        (events, over)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn note(id: u64, xid: Option<u64>) -> Arc<Notification> {
        let mut n = Notification::new(id, "c".into(), id.to_string(), 1);
        n.xid = xid;
        Arc::new(n)
    }

    fn taken(snapshot: &str) -> Taken {
        Taken { data: Ok("[]".into()), seen: PgSnapshot::parse(snapshot) }
    }

    fn ids(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Notify(n) => n.message_id.to_string(),
                Event::Snapshot(_) => "snapshot".into(),
                Event::Resync(_) => "resync".into(),
            })
            .collect()
    }

    #[test]
    fn snapshots_parse_and_see_what_committed_before_them() {
        let s = PgSnapshot::parse("100:105:100,103").unwrap();
        assert!(s.sees(99));
        assert!(!s.sees(100), "in progress");
        assert!(s.sees(101));
        assert!(!s.sees(103), "in progress");
        assert!(!s.sees(105), "not yet started");
        assert_eq!(PgSnapshot::parse("7:7:").unwrap(), PgSnapshot { xmin: 7, xmax: 7, xip: vec![] });
        assert!(PgSnapshot::parse("x:1:").is_none());
    }

    #[test]
    fn before_the_marker_everything_is_in_the_snapshot() {
        let mut h = Hold::new("t".into(), 100);
        assert!(matches!(h.on_notification(&note(1, None)), Verdict::Keep));
        let (events, over) = h.on_marker("t", 1, "c");
        assert!(events.is_empty() && !over);
        h.on_notification(&note(2, Some(101)));
        h.on_notification(&note(3, Some(104)));
        h.on_notification(&note(4, Some(102)));
        let (events, over) = h.on_taken(taken("100:105:100,104"), "c");
        // 101 is in the snapshot; 104 was in progress (not seen): delivered, and since
        // notifications come in commit order, everything after it too.
        assert_eq!(ids(&events), ["snapshot", "3", "4"]);
        assert!(over);
    }

    #[test]
    fn held_notifications_the_snapshot_saw_are_dropped() {
        let mut h = Hold::new("t".into(), 100);
        h.on_marker("t", 1, "c");
        h.on_notification(&note(2, Some(101)));
        h.on_notification(&note(3, None));
        let (events, over) = h.on_taken(taken("100:105:"), "c");
        assert_eq!(ids(&events), ["snapshot", "3"], "101 is in the snapshot; a plain one is delivered");
        assert!(!over, "still filtering");
        assert!(matches!(h.on_notification(&note(4, Some(102))), Verdict::Keep), "seen by the snapshot");
        assert!(matches!(h.on_notification(&note(5, Some(110))), Verdict::DeliverAndRelease));
    }

    #[test]
    fn a_snapshot_taken_before_its_marker_comes_waits_for_it() {
        let mut h = Hold::new("t".into(), 100);
        let (events, _) = h.on_taken(taken("100:100:"), "c");
        assert!(events.is_empty());
        assert!(matches!(h.on_notification(&note(1, None)), Verdict::Keep));
        assert!(h.on_marker("other", 1, "c").0.is_empty(), "another subscriber's marker");
        let (events, over) = h.on_marker("t", 1, "c");
        assert_eq!(ids(&events), ["snapshot"]);
        assert!(!over);
    }

    #[test]
    fn more_held_than_fits_gives_the_snapshot_then_resync() {
        let mut h = Hold::new("t".into(), 1);
        h.on_marker("t", 1, "c");
        h.on_notification(&note(2, None));
        h.on_notification(&note(3, None));
        let (events, over) = h.on_taken(taken("100:100:"), "c");
        assert_eq!(ids(&events), ["snapshot", "resync"]);
        assert!(over);
    }

    #[test]
    fn a_failed_snapshot_releases_what_was_held() {
        let mut h = Hold::new("t".into(), 100);
        h.on_marker("t", 1, "c");
        h.on_notification(&note(2, Some(101)));
        let (events, over) = h.on_taken(Taken { data: Err("boom".into()), seen: None }, "c");
        assert_eq!(ids(&events), ["snapshot", "2"]);
        assert!(over);
    }
}
