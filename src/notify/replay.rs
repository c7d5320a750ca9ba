//! What a client that reconnects may be given again: the latest notifications of a database
//! (bounded in count and bytes), and since when each channel has been listened on without a
//! gap. A resume is answered from here only when nothing can be missing; otherwise `resync`.

use super::Notification;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a resume cannot be served: the client must `resync`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Gap {
    /// The id is not in the buffer: older than its oldest, from before a listener gap, or
    /// from another run of the broker.
    #[error(
        "lastMessageId {0} is not in the replay buffer (older than what it keeps, from before a listener reconnect, or from before a restart)"
    )]
    Unknown(u64),
    /// A channel was not listened on the whole time since the id.
    #[error("channel \"{0}\" was not listened on the whole time since lastMessageId {1}")]
    NotListened(String, u64),
}

/// The replay buffer and the channels' listening history of one hub.
#[derive(Debug)]
pub struct Replay {
    kept: VecDeque<Arc<Notification>>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
    /// Per listened channel, the last id assigned before its LISTEN took effect: everything
    /// after it on that channel was received.
    since: HashMap<String, u64>,
    /// The last id assigned.
    last: u64,
}

impl Default for Replay {
    /// Ids start from the wall clock in microseconds: a run of the broker gives ids one by
    /// one from its start, so the next run, starting later, starts past every id of this one
    /// (unless it averaged over a million notifications a second). Below 2^53 until the
    /// year 2255, so JavaScript reads them exactly.
    fn default() -> Replay {
        Replay::starting_at(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64))
    }
}

impl Replay {
    /// Empty, its ids starting past `micros` (see `default`).
    fn starting_at(micros: u64) -> Replay {
        Replay { kept: VecDeque::new(), bytes: 0, max_count: 0, max_bytes: 0, since: HashMap::new(), last: micros }
    }

    /// Sets the caps (live config); what is over them goes at once.
    pub fn set_limits(&mut self, max_count: usize, max_bytes: usize) {
        self.max_count = max_count;
        self.max_bytes = max_bytes;
        self.trim();
    }

    /// The next message id: one past the last, across listener reconnects (a client sees a
    /// gap as a skipped number), and past every id of earlier runs (see `default`).
    pub fn next_id(&mut self) -> u64 {
        self.last += 1;
        self.last
    }

    /// True if notifications are kept at all (`replay_buffer` > 0).
    pub fn keeps(&self) -> bool {
        self.max_count > 0
    }

    /// The last id given.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Keeps a notification that was delivered.
    pub fn keep(&mut self, n: &Arc<Notification>) {
        if self.max_count == 0 {
            return;
        }
        self.bytes += cost(n);
        self.kept.push_back(n.clone());
        self.trim();
    }

    fn trim(&mut self) {
        while self.kept.len() > self.max_count || self.bytes > self.max_bytes {
            let Some(old) = self.kept.pop_front() else { break };
            self.bytes -= cost(&old);
        }
    }

    /// `channel`'s LISTEN took effect now: it is covered from the next id on.
    pub fn listened(&mut self, channel: &str) {
        self.since.insert(channel.to_string(), self.last);
    }

    /// The listener reconnected: nothing before now can be vouched for.
    pub fn gap(&mut self, channels: impl IntoIterator<Item = String>) {
        self.kept.clear();
        self.bytes = 0;
        self.since.clear();
        let last = self.last;
        self.since.extend(channels.into_iter().map(|c| (c, last)));
    }

    /// A notification on `channel` was not kept: its history starts over after it.
    pub fn not_kept(&mut self, channel: &str) {
        if let Some(since) = self.since.get_mut(channel) {
            *since = self.last;
        }
    }

    /// `channel` is no longer listened on.
    pub fn unlistened(&mut self, channel: &str) {
        self.since.remove(channel);
    }

    /// True if `channel` is listened on now.
    pub fn is_listened(&self, channel: &str) -> bool {
        self.since.contains_key(channel)
    }

    /// Every kept notification on `channels` after `after`, oldest first; or the reason
    /// some may be missing.
    pub fn since(&self, after: u64, channels: &[String]) -> Result<Vec<Arc<Notification>>, Gap> {
        for ch in channels {
            if self.since.get(ch).is_none_or(|&s| s > after) {
                return Err(Gap::NotListened(ch.clone(), after));
            }
        }
        if after == self.last {
            return Ok(Vec::new());
        }
        let at = self.kept.binary_search_by_key(&after, |n| n.message_id).map_err(|_| Gap::Unknown(after))?;
        Ok(self.kept.iter().skip(at + 1).filter(|n| channels.contains(&n.channel)).cloned().collect())
    }
}

/// What a kept notification counts against `replay_buffer_bytes`.
fn cost(n: &Notification) -> usize {
    n.payload.len() + n.channel.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn note(r: &mut Replay, channel: &str) -> Arc<Notification> {
        let n = Arc::new(Notification::new(r.next_id(), channel.into(), "{}".into(), 1));
        r.keep(&n);
        n
    }

    fn replay(count: usize) -> Replay {
        let mut r = Replay::default();
        r.set_limits(count, 1 << 20);
        r.listened("a");
        r.listened("b");
        r
    }

    fn ch(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_are_consecutive_and_a_later_run_starts_past_them() {
        let start = 1_796_000_000_000_000; // late 2026, in microseconds
        let mut r = Replay::starting_at(start);
        let ids: Vec<u64> = (0..1000).map(|_| r.next_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] + 1 == w[1]));
        assert!(ids[999] < 1 << 53);
        assert!(Replay::starting_at(start + 2_000).next_id() > ids[999], "a restart 2 ms later, after 1,000 ids");
        assert!(Replay::default().next_id() > start, "today's clock");
    }

    #[test]
    fn a_resume_gets_what_came_after_its_id_on_its_channels_in_order() {
        let mut r = replay(10);
        let first = note(&mut r, "a");
        let wanted = [note(&mut r, "a"), note(&mut r, "a")];
        note(&mut r, "b");
        let got = r.since(first.message_id, &ch(&["a"])).unwrap();
        assert_eq!(got.iter().map(|n| n.message_id).collect::<Vec<_>>(), wanted.map(|n| n.message_id));
    }

    #[test]
    fn a_resume_at_the_latest_id_gets_nothing() {
        let mut r = replay(10);
        let last = note(&mut r, "a");
        assert!(r.since(last.message_id, &ch(&["a"])).unwrap().is_empty());
    }

    #[test]
    fn an_id_older_than_the_buffer_is_a_gap() {
        let mut r = replay(2);
        let old = note(&mut r, "a");
        note(&mut r, "a");
        note(&mut r, "a");
        assert_eq!(r.since(old.message_id, &ch(&["a"])).unwrap_err(), Gap::Unknown(old.message_id));
    }

    #[test]
    fn an_id_from_another_run_is_a_gap() {
        let mut r = replay(10);
        note(&mut r, "a");
        assert!(r.since(12345, &ch(&["a"])).is_err());
    }

    #[test]
    fn a_listener_reconnect_is_a_gap_for_every_earlier_id() {
        let mut r = replay(10);
        let before = note(&mut r, "a");
        r.gap(ch(&["a", "b"]));
        note(&mut r, "a");
        assert!(r.since(before.message_id, &ch(&["a"])).is_err());
    }

    #[test]
    fn a_channel_listened_after_the_id_is_a_gap() {
        let mut r = replay(10);
        let id = note(&mut r, "a");
        note(&mut r, "a");
        r.listened("c");
        assert!(matches!(r.since(id.message_id, &ch(&["a", "c"])), Err(Gap::NotListened(c, _)) if c == "c"));
    }

    #[test]
    fn a_notification_not_kept_is_a_gap_for_earlier_ids() {
        let mut r = replay(10);
        let id = note(&mut r, "a");
        r.next_id();
        r.not_kept("a");
        assert!(matches!(r.since(id.message_id, &ch(&["a"])), Err(Gap::NotListened(..))));
    }

    #[test]
    fn the_byte_cap_drops_the_oldest() {
        let mut r = Replay::default();
        r.set_limits(100, 10);
        r.listened("a");
        let old = note(&mut r, "a"); // 3 bytes each
        for _ in 0..3 {
            note(&mut r, "a");
        }
        assert!(r.since(old.message_id, &ch(&["a"])).is_err());
        assert!(r.bytes <= 10);
    }
}
