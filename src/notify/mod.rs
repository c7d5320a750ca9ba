//! LISTEN/NOTIFY fan-out: per database, one hub with one listener server connection that
//! LISTENs on exactly the channels some subscriber (a WebSocket client, or a SQL client in
//! transaction mode) wants, and hands each notification to their bounded queues.

mod assemble;
pub mod bridge;
pub mod command;
mod glob;
pub use glob::glob_match;
pub mod hold;
mod hubs;
pub(crate) mod json;
pub use bridge::{Bridge, BridgeError};
pub use hubs::Hubs;
mod listener;
pub mod replay;
mod snapshot;
pub mod ws;

use crate::config::WebSocket;
use crate::pool::Pool;
use axum::extract::ws::Utf8Bytes;
use replay::Replay;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One notification, shared by every subscriber it goes to.
#[derive(Debug)]
pub struct Notification {
    /// The channel.
    pub channel: String,
    /// The payload as sent.
    pub payload: String,
    /// The notifying backend's process id.
    pub pid: i32,
    /// Increasing across listener reconnects and restarts (see `Replay::next_id`): what a
    /// client sends back to resume.
    pub message_id: u64,
    /// When the broker received it.
    pub received_at: SystemTime,
    /// The sending transaction, when `pgbroker_notify` sent it (see `hold`).
    pub xid: Option<u64>,
    json: OnceLock<Utf8Bytes>,
}

impl Notification {
    /// A notification received now.
    pub fn new(message_id: u64, channel: String, payload: String, pid: i32) -> Notification {
        let received_at = SystemTime::now();
        Notification { channel, payload, pid, message_id, received_at, xid: None, json: OnceLock::new() }
    }

    /// The bridge's message for it in its channel's shape, built once and shared by every
    /// client that gets it.
    pub fn json(&self, w: &WebSocket) -> Utf8Bytes {
        self.json.get_or_init(|| json::notification(self, w).into()).clone()
    }
}

/// What a subscriber's queue carries.
#[derive(Debug, Clone)]
pub enum Event {
    /// A notification on one of its channels.
    Notify(Arc<Notification>),
    /// The listener connection was re-established: notifications in between may be lost.
    Resync(Arc<str>),
    /// A channel's snapshot (see `hold`), before its notifications.
    Snapshot(Arc<hold::Snapshot>),
}

/// The private channel on which the listener proves it still receives (see `listener`).
pub const CHECK_CHANNEL: &str = "pgbroker.listener_check";

/// Channels kept listened on after their last subscriber left, per database, so that a
/// client that reconnects can resume them; past this the oldest is unlistened.
const RETAINED_MAX: usize = 256;

enum Cmd {
    /// LISTEN, then tell the subscriber waiting for it (if any).
    Listen(String, Option<oneshot::Sender<()>>),
    Unlisten(String),
}

/// A subscribe that would take a client past `websocket.max_channels_per_client`.
#[derive(Debug, thiserror::Error)]
#[error("at most {0} channels per client (websocket.max_channels_per_client)")]
pub struct TooManyChannels(pub usize);

/// How long `subscribe` waits for the listener to confirm a new LISTEN.
const LISTEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

struct Sub {
    tx: mpsc::Sender<Event>,
    kicked: CancellationToken,
    /// Kept in order, so listing them costs no sort.
    channels: BTreeSet<String>,
    /// A WebSocket client (see `Hub::register`).
    resumable: bool,
    /// Channels whose snapshot is on its way (see `hold`).
    holds: HashMap<String, hold::Hold>,
}

#[derive(Default)]
struct Inner {
    subs: HashMap<u64, Sub>,
    channels: HashMap<String, HashSet<u64>>,
    fixed: HashSet<String>,
    /// Channels whose LISTEN is queued but not yet done: whatever arrives on them was sent
    /// before it, and none of their subscribers (all newer than it) may get it.
    pending: HashSet<String>,
    /// Channels without subscribers still listened on for resumes, oldest first.
    retained: VecDeque<String>,
    /// Recent notifications and the channels' listening history.
    replay: Replay,
    /// `listener_check_interval` and `listener_check_timeout`.
    check: (Duration, Duration),
    /// Payloads sent in pieces by `pgbroker_notify`, put back together.
    assembler: assemble::Assembler,
    /// `websocket.max_payload_bytes`.
    max_payload: usize,
}

/// Counters for the admin console and metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Notifications received from the server.
    pub received: AtomicU64,
    /// Deliveries queued to subscribers.
    pub delivered: AtomicU64,
    /// Subscribers closed because their queue was full.
    pub dropped_slow: AtomicU64,
    /// Times the listener connection was re-established.
    pub reconnects: AtomicU64,
    /// Listener checks that failed (the listener was then replaced).
    pub check_failures: AtomicU64,
    /// Resumes served from the replay buffer.
    pub resumed: AtomicU64,
    /// Resumes answered with `resync`.
    pub resume_gaps: AtomicU64,
    /// `pgbroker_notify` payloads dropped: incomplete, or over `max_payload_bytes`.
    pub payloads_dropped: AtomicU64,
}

/// Publishes a broker event (kind and JSON fields), as `Events::emit`.
pub type Emit = Arc<dyn Fn(&str, serde_json::Value) + Send + Sync>;

/// The fan-out point of one database.
pub struct Hub {
    database: String,
    pool: Arc<Pool>,
    inner: Mutex<Inner>,
    next_sub: AtomicU64,
    cmds: mpsc::UnboundedSender<Cmd>,
    emit: Emit,
    /// Counters.
    pub stats: HubStats,
}

/// A subscriber's end: its queue, and a token cancelled when the hub cut it off for being
/// too slow. Dropping it unsubscribes everything.
pub struct Subscription {
    hub: Arc<Hub>,
    /// Subscriber id (the WebSocket `connectionId`).
    pub id: u64,
    /// Events for this subscriber.
    pub rx: mpsc::Receiver<Event>,
    /// Cancelled when the queue overflowed and the subscriber was removed.
    pub kicked: CancellationToken,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

impl Subscription {
    /// Subscribes to `channels` (already checked) and waits until the listener LISTENs on
    /// the new ones, so that every notification sent after this returns is delivered.
    /// Refused as a whole if it would take the subscriber past `cap` channels. With `resume`
    /// (a `lastMessageId`), what the replay buffer holds after it on these channels is
    /// queued first, or a `resync` when some of it may be missing.
    pub async fn subscribe(&self, channels: &[String], cap: usize, resume: Option<u64>) -> Result<(), TooManyChannels> {
        let acks = self.hub.subscribe(self.id, channels, cap, resume)?;
        for ack in acks {
            // On timeout or a lost connection the LISTEN still happens at reconnect.
            let _ = tokio::time::timeout(LISTEN_WAIT, ack).await;
        }
        Ok(())
    }

    /// The hub this subscription belongs to.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Unsubscribes from `channels` (`None` = all).
    pub fn unsubscribe(&self, channels: Option<&[String]>) {
        self.hub.unsubscribe(self.id, channels)
    }

    /// Every channel subscribed now, in order.
    pub fn channels(&self) -> Vec<String> {
        self.hub.lock().subs.get(&self.id).map(|s| s.channels.iter().cloned().collect()).unwrap_or_default()
    }
}

impl Hub {
    /// A hub for `database` whose listener connection comes from `pool` (size 1, counted in
    /// the budget). Channels in `fixed` are always listened on. The listener task ends with
    /// `shutdown` or when the hub is dropped.
    pub fn start(
        database: &str,
        pool: Arc<Pool>,
        fixed: &[String],
        w: &WebSocket,
        emit: Emit,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let fixed = fixed.iter().chain(&w.default_channels).cloned().collect();
        let hub = Arc::new(Hub {
            database: database.to_string(),
            pool,
            inner: Mutex::new(Inner { fixed, ..Inner::default() }),
            next_sub: AtomicU64::new(1),
            cmds: tx,
            emit,
            stats: HubStats::default(),
        });
        hub.configure(w);
        tokio::spawn(listener::run(Arc::downgrade(&hub), rx, shutdown));
        hub
    }

    /// Takes the bridge's live settings: replay caps, listener checks, and default channels
    /// (new ones are listened on from now; removed ones stay until the broker restarts).
    pub fn configure(&self, w: &WebSocket) {
        let mut inner = self.lock();
        inner.replay.set_limits(w.replay_buffer, w.replay_buffer_bytes);
        inner.check = (w.listener_check_interval, w.listener_check_timeout);
        inner.max_payload = w.max_payload_bytes;
        for ch in &w.default_channels {
            if !inner.fixed.contains(ch) {
                inner.fixed.insert(ch.clone());
                if !inner.channels.contains_key(ch) && !inner.retained.contains(ch) {
                    inner.pending.insert(ch.clone());
                    let _ = self.cmds.send(Cmd::Listen(ch.clone(), None));
                }
            }
        }
    }

    /// `listener_check_interval` and `listener_check_timeout`.
    fn check_settings(&self) -> (Duration, Duration) {
        self.lock().check
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database this hub listens on.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Registers a subscriber with a queue of `queue` events.
    /// `resumable`: a WebSocket client, which may come back for what it missed (its
    /// channels' notifications are kept for resumes, and stay listened after it leaves).
    pub fn register(self: &Arc<Self>, queue: usize, resumable: bool) -> Subscription {
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let kicked = CancellationToken::new();
        self.lock().subs.insert(
            id,
            Sub { tx, kicked: kicked.clone(), channels: BTreeSet::new(), resumable, holds: HashMap::new() },
        );
        Subscription { hub: self.clone(), id, rx, kicked }
    }

    /// Channels the listener must be LISTENing on now.
    fn wanted(&self) -> Vec<String> {
        let inner = self.lock();
        let all = inner.channels.keys().chain(inner.fixed.iter()).chain(inner.retained.iter());
        all.cloned().collect::<HashSet<_>>().into_iter().collect()
    }

    /// Channels subscriber `id` is subscribed to.
    fn subscriptions(&self, id: u64) -> usize {
        self.lock().subs.get(&id).map_or(0, |s| s.channels.len())
    }

    /// Subscribers on a channel, for tests and the admin console.
    pub fn subscribers(&self, channel: &str) -> usize {
        self.lock().channels.get(channel).map_or(0, HashSet::len)
    }

    fn subscribe(
        &self,
        id: u64,
        channels: &[String],
        cap: usize,
        resume: Option<u64>,
    ) -> Result<Vec<oneshot::Receiver<()>>, TooManyChannels> {
        let mut inner = self.lock();
        let held = inner.subs.get(&id).map_or(0, |s| s.channels.len());
        let new: HashSet<&String> =
            channels.iter().filter(|c| inner.subs.get(&id).is_none_or(|s| !s.channels.contains(*c))).collect();
        if held + new.len() > cap {
            return Err(TooManyChannels(cap));
        }
        if let Some(after) = resume {
            // Under the lock that dispatch takes: nothing is delivered between the replay
            // and the live stream, nor twice.
            self.resume(&inner, id, after, channels);
        }
        let mut acks = Vec::new();
        for ch in new {
            if let Some(at) = inner.retained.iter().position(|c| c == ch) {
                inner.retained.remove(at);
            }
            let first = !inner.channels.contains_key(ch) && !inner.fixed.contains(ch) && !inner.replay.is_listened(ch);
            inner.channels.entry(ch.clone()).or_default().insert(id);
            if let Some(sub) = inner.subs.get_mut(&id) {
                sub.channels.insert(ch.clone());
            }
            if first {
                inner.pending.insert(ch.clone());
                let (tx, rx) = oneshot::channel();
                acks.push(rx);
                let _ = self.cmds.send(Cmd::Listen(ch.clone(), Some(tx)));
            }
        }
        Ok(acks)
    }

    fn unsubscribe(&self, id: u64, channels: Option<&[String]>) {
        let mut inner = self.lock();
        let names: Vec<String> = match channels {
            Some(c) => c.to_vec(),
            None => inner.subs.get(&id).map(|s| s.channels.iter().cloned().collect()).unwrap_or_default(),
        };
        for ch in &names {
            if let Some(sub) = inner.subs.get_mut(&id) {
                sub.channels.remove(ch);
            }
            self.drop_from_channel(&mut inner, id, ch, false);
        }
    }

    /// Queues to subscriber `id` what the replay buffer holds after `after` on `channels`,
    /// or a `resync` when some of it may be missing (or does not fit its queue).
    fn resume(&self, inner: &Inner, id: u64, after: u64, channels: &[String]) {
        let Some(sub) = inner.subs.get(&id) else { return };
        let gap = match inner.replay.since(after, channels) {
            Ok(missed) if missed.len() <= sub.tx.capacity() => {
                for n in missed {
                    let _ = sub.tx.try_send(Event::Notify(n));
                }
                self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(missed) => format!("{} notifications were missed, more than the client's queue holds", missed.len()),
            Err(gap) => gap.to_string(),
        };
        self.stats.resume_gaps.fetch_add(1, Ordering::Relaxed);
        let _ = sub.tx.try_send(Event::Resync(gap.into()));
    }

    /// Takes subscriber `id` off `ch`. When it was the last, the channel is unlistened; but
    /// with `retain` (the subscriber left rather than unsubscribed: it may be reconnecting)
    /// and resume on, it stays listened for a while (see `RETAINED_MAX`).
    fn drop_from_channel(&self, inner: &mut Inner, id: u64, ch: &str, retain: bool) {
        let Some(set) = inner.channels.get_mut(ch) else { return };
        set.remove(&id);
        if !set.is_empty() {
            return;
        }
        inner.channels.remove(ch);
        if inner.fixed.contains(ch) {
            return;
        }
        // With resume on, the channel stays listened for a while: its last subscriber may
        // be reconnecting.
        let unlisten = if retain && inner.replay.keeps() {
            inner.retained.push_back(ch.to_string());
            if inner.retained.len() > RETAINED_MAX { inner.retained.pop_front() } else { None }
        } else {
            Some(ch.to_string())
        };
        if let Some(ch) = unlisten {
            inner.replay.unlistened(&ch);
            let _ = self.cmds.send(Cmd::Unlisten(ch));
        }
    }

    fn remove(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(sub) = inner.subs.remove(&id) {
            for ch in sub.channels {
                self.drop_from_channel(&mut inner, id, &ch, sub.resumable);
            }
        }
    }

    /// Hands a notification to every subscriber of its channel. A subscriber whose queue is
    /// full is cut off (its `kicked` token fires) rather than slowing anyone else.
    fn dispatch(&self, pid: i32, channel: String, payload: String) {
        if channel == CHECK_CHANNEL {
            if let Some(token) = payload.strip_prefix(SNAPSHOT_MARKER) {
                self.marker(token);
            }
            return;
        }
        let mut inner = self.lock();
        let max = inner.max_payload;
        let Some(assemble::Whole { channel, payload, xid }) = inner.assembler.push(pid, channel, payload, max) else {
            self.stats.payloads_dropped.store(inner.assembler.dropped, Ordering::Relaxed);
            return;
        };
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if inner.pending.contains(&channel) {
            return;
        }
        let mut n = Notification::new(inner.replay.next_id(), channel, payload, pid);
        n.xid = xid;
        let n = Arc::new(n);
        let mut slow = Vec::new();
        let mut resumable = false;
        let Inner { channels, subs, .. } = &mut *inner;
        for id in channels.get(&n.channel).into_iter().flatten() {
            let Some(sub) = subs.get_mut(id) else { continue };
            resumable |= sub.resumable;
            if let Some(hold) = sub.holds.get_mut(&n.channel) {
                match hold.on_notification(&n) {
                    hold::Verdict::Keep => continue,
                    hold::Verdict::Deliver => {}
                    hold::Verdict::DeliverAndRelease => {
                        sub.holds.remove(&n.channel);
                    }
                }
            }
            match sub.tx.try_send(Event::Notify(n.clone())) {
                Ok(()) => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*id),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        // Kept only where a WebSocket client may come back for it (SQL clients cannot resume);
        // elsewhere the channel's history starts over, so no resume spans what was not kept.
        if resumable || inner.fixed.contains(&n.channel) || inner.retained.contains(&n.channel) {
            inner.replay.keep(&n);
        } else {
            inner.replay.not_kept(&n.channel);
        }
        for id in slow {
            self.stats.dropped_slow.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(database = %self.database, subscriber = id, "notification queue full; closing slow subscriber");
            if let Some(sub) = inner.subs.remove(&id) {
                sub.kicked.cancel();
                for ch in sub.channels {
                    self.drop_from_channel(&mut inner, id, &ch, sub.resumable);
                }
            }
        }
    }

    /// The LISTEN on `channel` (`None`: on every wanted channel) is done and what was read
    /// before it delivered: from here its notifications go to its subscribers.
    fn listened(&self, channel: Option<&str>) {
        let mut inner = self.lock();
        match channel {
            Some(ch) => {
                inner.pending.remove(ch);
                inner.replay.listened(ch);
            }
            None => {
                inner.pending.clear();
                inner.assembler.abandon("the listener connection it came on was replaced");
                let all: HashSet<String> =
                    inner.channels.keys().chain(inner.fixed.iter()).chain(inner.retained.iter()).cloned().collect();
                inner.replay.gap(all);
            }
        }
    }

    /// Holds subscriber `id`'s notifications on `channel` until its snapshot is taken;
    /// returns the marker payload to commit before taking it.
    pub fn hold(&self, id: u64, channel: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // The random part tells this broker's markers from those of others on the database.
        static RUN: OnceLock<u64> = OnceLock::new();
        let run = RUN.get_or_init(rand::random);
        let token = format!("{id}.{run:x}.{}", NEXT.fetch_add(1, Ordering::Relaxed));
        if let Some(sub) = self.lock().subs.get_mut(&id) {
            // Room for the snapshot and a resync behind what is held.
            let max = sub.tx.max_capacity().saturating_sub(2);
            sub.holds.insert(channel.to_string(), hold::Hold::new(token.clone(), max));
        }
        format!("{SNAPSHOT_MARKER}{token}")
    }

    /// A marker came through the listener.
    fn marker(&self, token: &str) {
        let Some(id) = token.split('.').next().and_then(|id| id.parse::<u64>().ok()) else { return };
        let mut inner = self.lock();
        let last = inner.replay.last();
        let Some(sub) = inner.subs.get_mut(&id) else { return };
        let mut done = Vec::new();
        for (channel, hold) in sub.holds.iter_mut() {
            let (events, over) = hold.on_marker(token, last, channel);
            queue(&sub.tx, events);
            if over {
                done.push(channel.clone());
            }
        }
        for channel in done {
            sub.holds.remove(&channel);
        }
    }

    /// Subscriber `id`'s snapshot of `channel` was taken (or failed).
    pub fn taken(&self, id: u64, channel: &str, taken: hold::Taken) {
        let mut inner = self.lock();
        let Some(sub) = inner.subs.get_mut(&id) else { return };
        let Some(hold) = sub.holds.get_mut(channel) else { return };
        let (events, over) = hold.on_taken(taken, channel);
        queue(&sub.tx, events);
        if over {
            sub.holds.remove(channel);
        }
    }

    /// Tells every subscriber that notifications may have been lost.
    fn resync(&self, reason: &str) {
        let reason: Arc<str> = reason.into();
        let inner = self.lock();
        for sub in inner.subs.values() {
            // A full queue will be cut off at the next notification anyway.
            let _ = sub.tx.try_send(Event::Resync(reason.clone()));
        }
    }
}

/// Queues events to a subscriber; one that does not fit is lost with the subscriber, whom
/// the next notification cuts off.
fn queue(tx: &mpsc::Sender<Event>, events: Vec<Event>) {
    for e in events {
        let _ = tx.try_send(e);
    }
}

/// The prefix of a snapshot marker's payload on `CHECK_CHANNEL`.
pub const SNAPSHOT_MARKER: &str = "snap:";
