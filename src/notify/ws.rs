//! The WebSocket endpoint: admission (origin, token, limits), then one task per connection
//! running subscribe/unsubscribe commands, notifications out, heartbeats and timeouts.

use super::bridge::Bridge;
use super::command::{self, Command};
use super::hold::Taken;
use super::{Event, Subscription, json};
use crate::config::Config;
use crate::events::{EVENTS_CHANNEL, METRICS_CHANNEL};
use crate::net::{IpSlot, PerIp};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// WebSocket close code for "try again later": the client was too slow.
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
/// Close code when the server goes away (broker shutting down, heartbeat missed).
const CLOSE_GOING_AWAY: u16 = 1001;
/// Largest client message accepted.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Bytes read from a client at a time.
const READ_CHUNK: usize = 1024;
/// Most bytes buffered for writing to one client; its queue holds the rest.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;

/// Open WebSocket connections, in total and per IP.
#[derive(Default)]
pub struct WsCounts {
    per_ip: Arc<PerIp>,
    next_id: std::sync::atomic::AtomicU64,
}

impl WsCounts {
    /// A new `connectionId`.
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.per_ip.total()
    }
}

/// Query parameters of the endpoint.
#[derive(Debug, Deserialize)]
pub struct Params {
    database: Option<String>,
    token: Option<String>,
    /// Channels to subscribe to on connect, comma-separated.
    channels: Option<String>,
    /// Resume after this notification.
    #[serde(rename = "lastMessageId")]
    last_message_id: Option<String>,
}

/// What a connection subscribes to as it opens: `websocket.default_channels` and
/// `?channels=`, resumed after `?lastMessageId=`.
struct OnConnect {
    channels: Vec<String>,
    resume: Option<u64>,
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// `GET <websocket.path>`: checks the request, then upgrades.
pub async fn handler(
    State(bridge): State<Arc<Bridge>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let cfg = bridge.config();
    let w = &cfg.websocket;
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if !w.allowed_origins.is_empty() {
        if !w.allowed_origins.iter().any(|o| o == "*" || Some(o.as_str()) == origin) {
            return refuse(StatusCode::FORBIDDEN, "origin not allowed");
        }
    } else if w.tokens.is_empty() && !same_origin(origin, &headers) {
        // Nothing authenticates the bridge: a page of any site the operator's browser opens
        // could otherwise read the broker's channels through the loopback listener.
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-origin WebSocket refused: list the page's origin in websocket.allowed_origins, or configure tokens",
        );
    }
    let resume = match params.last_message_id.as_deref().map(command::message_id).transpose() {
        Ok(r) => r,
        Err(refusal) => return refuse(StatusCode::BAD_REQUEST, &refusal.message),
    };
    let mut channels = w.default_channels.clone();
    for ch in params.channels.iter().flat_map(|c| c.split(',')).map(str::trim).filter(|c| !c.is_empty()) {
        if !channels.iter().any(|c| c == ch) {
            channels.push(ch.to_string());
        }
    }
    let on_connect = OnConnect { channels, resume };
    let allowed = match token_channels(&cfg, &headers, params.token.as_deref()) {
        Ok(a) => a,
        Err(()) => return refuse(StatusCode::UNAUTHORIZED, "missing or unknown bearer token"),
    };
    let database = match (&params.database, cfg.databases.len()) {
        (Some(d), _) if cfg.databases.contains_key(d) => d.clone(),
        (Some(d), _) => return refuse(StatusCode::NOT_FOUND, &format!("database \"{d}\" is not configured")),
        (None, 1) => cfg.databases.keys().next().cloned().unwrap_or_default(),
        (None, _) => return refuse(StatusCode::BAD_REQUEST, "several databases are configured: add ?database=NAME"),
    };
    let Some(admission) = admit(&bridge, &cfg, crate::net::peer_key(peer.ip())) else {
        return if bridge.ws().total() >= w.max_ws_connections {
            refuse(StatusCode::SERVICE_UNAVAILABLE, &format!("max_ws_connections ({}) reached", w.max_ws_connections))
        } else {
            refuse(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "max_ws_connections_per_ip ({}) reached for {}",
                    w.max_ws_connections_per_ip,
                    crate::net::peer_key(peer.ip())
                ),
            )
        };
    };
    // Without a listener for this database the broker's own channels still work; database
    // channels then answer with the reason.
    let (sub, hub_error) = match bridge.hub(&cfg, &database) {
        Ok(h) => {
            h.configure(w);
            (Some(h.register(w.ws_send_queue, true)), None)
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let hubbed = Hubbed { sub, error: hub_error };
    limits(upgrade).on_upgrade(move |socket| session(socket, hubbed, on_connect, allowed, cfg, admission, bridge))
}

/// The bridge's size limits on an upgrade; one function so the `ws_frames` fuzz target runs
/// the WebSocket layer exactly as configured here.
pub fn limits(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        // A frame is refused from its header: without this a client could announce a 16 MiB
        // frame (tungstenite's default) and have it buffered before the message limit applies.
        .max_frame_size(MAX_CLIENT_MESSAGE)
        // Bound what a client that stops reading can pin in memory besides its queue.
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        // tungstenite zeroes this much before every read attempt, and the session polls a
        // read at each notification it sends: its default (128 KiB, also held per connection)
        // was a third of the fan-out's CPU. Client messages are small commands.
        .read_buffer_size(READ_CHUNK)
}

/// True for a request a browser page of another site cannot make: no `Origin` (not a
/// browser), or an `Origin` naming the host the request was sent to (the status page).
fn same_origin(origin: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(origin) = origin else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| !host.is_empty() && a.eq_ignore_ascii_case(host))
}

/// The channel patterns the request's token allows; `None` = no tokens configured, anything
/// goes. `Err` = a token is required and this one is missing or unknown.
fn token_channels(cfg: &Config, headers: &HeaderMap, query: Option<&str>) -> Result<Option<Vec<String>>, ()> {
    let tokens = &cfg.websocket.tokens;
    if tokens.is_empty() {
        return Ok(None);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(query)
        .ok_or(())?;
    tokens
        .iter()
        .find(|t| crate::crypto::ct_eq(t.token.as_bytes(), bearer.as_bytes()))
        .map(|t| Some(t.channels.clone()))
        .ok_or(())
}

fn admit(bridge: &Bridge, cfg: &Config, ip: IpAddr) -> Option<IpSlot> {
    let w = &cfg.websocket;
    bridge.ws().per_ip.take(ip, w.max_ws_connections_per_ip, w.max_ws_connections)
}

/// How a session ends.
enum End {
    /// The socket failed or the client closed: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// Close, but the client stopped reading: the close frame gets only a moment.
    Stuck(u16, &'static str),
}

/// The hub cut the client off: its notification queue overflowed.
const KICKED: End = End::Close(CLOSE_TRY_AGAIN_LATER, "too slow: notification queue overflowed");
/// Longest wait for the close frame to go out.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the close frame may wait on a client that stopped reading.
const STUCK_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// What a send races with: a client that stops reading must not hold its session (nor a
/// drain) for longer than `limit`, and a kick or a shutdown must be seen mid-send.
struct Bound<'a> {
    limit: std::time::Duration,
    kicked: &'a Option<tokio_util::sync::CancellationToken>,
    shutdown: &'a tokio_util::sync::CancellationToken,
}

/// Sends one message within `bound`. Most sends complete at once (the socket takes the
/// bytes): only one that does not arms the timer, which would otherwise cost a timer
/// registration per message and subscriber.
async fn send(socket: &mut WebSocket, msg: Message, bound: &Bound<'_>) -> Result<(), End> {
    let sending = socket.send(msg);
    tokio::pin!(sending);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(sending.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(r) = first {
        return r.map_err(|_| End::Gone);
    }
    tokio::select! {
        r = &mut sending => r.map_err(|_| End::Gone),
        _ = tokio::time::sleep(bound.limit) => {
            Err(End::Stuck(CLOSE_TRY_AGAIN_LATER, "too slow: the client is not reading"))
        }
        _ = cancelled(bound.kicked) => Err(End::Stuck(CLOSE_TRY_AGAIN_LATER, "too slow: notification queue overflowed")),
        _ = bound.shutdown.cancelled() => Err(End::Stuck(CLOSE_GOING_AWAY, "pgbroker is shutting down")),
    }
}

/// One connection, from the ack to the close.
async fn session(
    mut socket: WebSocket,
    mut sub: Hubbed,
    on_connect: OnConnect,
    allowed: Option<Vec<String>>,
    cfg: Arc<Config>,
    _admission: IpSlot,
    bridge: Arc<Bridge>,
) {
    let w = &cfg.websocket;
    let shutdown = bridge.shutdown().drain_token();
    let mut reserved = Reserved::default();
    let kicked = sub.sub.as_ref().map(|s| s.kicked.clone());
    // A client that cannot take a message within pong_timeout is as gone as one that does
    // not answer a ping within it.
    let bound = Bound { limit: w.pong_timeout.max(STUCK_CLOSE_WAIT), kicked: &kicked, shutdown: &shutdown };
    let id = bridge.ws().next_id();
    let mut opened = send(&mut socket, Message::Text(json::ack(id).into()), &bound).await;
    if opened.is_ok() && !on_connect.channels.is_empty() {
        let reply = match command::check_channels(on_connect.channels, allowed.as_deref()) {
            Ok((broker, database)) => {
                subscribe(&sub, &bridge, &mut reserved, broker, database, on_connect.resume).await
            }
            Err(refusal) => refusal.to_json(),
        };
        opened = send(&mut socket, Message::Text(reply.into()), &bound).await;
    }
    let end = match opened {
        Ok(()) => session_loop(&mut socket, &mut sub, &mut reserved, allowed.as_deref(), &cfg, &bridge, &bound).await,
        Err(end) => end,
    };
    let (code, reason, wait) = match end {
        End::Gone => return,
        // A client that reads takes a close frame at once: one that does not must not hold a
        // drain for pong_timeout.
        End::Close(code, reason) => (code, reason, w.pong_timeout.min(CLOSE_WAIT)),
        End::Stuck(code, reason) => (code, reason, STUCK_CLOSE_WAIT),
    };
    let frame = CloseFrame { code, reason: reason.into() };
    let _ = tokio::time::timeout(wait, socket.send(Message::Close(Some(frame)))).await;
}

/// The select loop of one connection: commands in, replies, notifications and pings out.
/// Every send is bounded (see [`Bound`]).
async fn session_loop(
    socket: &mut WebSocket,
    sub: &mut Hubbed,
    reserved: &mut Reserved,
    allowed: Option<&[String]>,
    cfg: &Config,
    bridge: &Bridge,
    bound: &Bound<'_>,
) -> End {
    let w = &cfg.websocket;
    let mut ping = tokio::time::interval_at(Instant::now() + w.ping_interval, w.ping_interval);
    let mut pong_deadline: Option<Instant> = None;
    let mut idle_since = Some(Instant::now());
    // Made once: a token's wait future registers with the token when created, and the loop
    // turns once per message sent.
    let kicked = cancelled(bound.kicked);
    let shutdown = bound.shutdown.cancelled();
    tokio::pin!(kicked, shutdown);
    loop {
        let idle_deadline = idle_since.filter(|_| !w.idle_timeout.is_zero()).map(|t| t + w.idle_timeout);
        let wake = [pong_deadline, idle_deadline].into_iter().flatten().min();
        let sent = tokio::select! {
            biased;
            _ = &mut kicked => return KICKED,
            _ = &mut shutdown => return End::Close(CLOSE_GOING_AWAY, "pgbroker is shutting down"),
            ev = sub.recv() => {
                let text = match ev {
                    Some(Event::Notify(n)) => n.json(w),
                    Some(Event::Snapshot(s)) => json::snapshot(&s).into(),
                    Some(Event::Resync(reason)) => {
                        // What the client held may be stale: snapshots again, behind the resync.
                        if let Some(s) = &sub.sub {
                            snapshots(bridge, cfg, s, &s.channels(), None).await;
                        }
                        json::resync(&reason).into()
                    }
                    None => return End::Gone,
                };
                send(socket, Message::Text(text), bound).await
            }
            r = recv_reserved(&mut reserved.events) => {
                send(socket, Message::Text(reserved_text(r, &mut reserved.events).into()), bound).await
            }
            r = recv_reserved(&mut reserved.metrics) => {
                send(socket, Message::Text(reserved_text(r, &mut reserved.metrics).into()), bound).await
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(text))) => {
                    let reply = command(sub, bridge, reserved, allowed, &text).await;
                    let subscribed = sub.sub.as_ref().map_or(0, |s| s.hub.subscriptions(s.id)) + reserved.count();
                    idle_since = if subscribed == 0 { idle_since.or(Some(Instant::now())) } else { None };
                    send(socket, Message::Text(reply.into()), bound).await
                }
                Some(Ok(Message::Pong(_))) => {
                    pong_deadline = None;
                    Ok(())
                }
                Some(Ok(Message::Ping(_))) => Ok(()), // answered by the WebSocket layer
                Some(Ok(Message::Binary(_))) => {
                    send(socket, Message::Text(json::error("bad_request", "send JSON text messages").into()), bound).await
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return End::Gone,
            },
            _ = ping.tick() => {
                pong_deadline.get_or_insert(Instant::now() + w.pong_timeout);
                send(socket, Message::Ping(Vec::new().into()), bound).await
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                let now = Instant::now();
                if pong_deadline.is_some_and(|d| now >= d) {
                    return End::Close(CLOSE_GOING_AWAY, "no pong within pong_timeout");
                }
                if idle_deadline.is_some_and(|d| now >= d) {
                    return End::Close(CLOSE_GOING_AWAY, "idle_timeout: no subscriptions");
                }
                Ok(())
            }
        };
        if let Err(end) = sent {
            return end;
        }
    }
}

/// The connection's database subscriptions, when its database has a listener.
struct Hubbed {
    sub: Option<Subscription>,
    /// Why there is no listener.
    error: Option<String>,
}

/// Waits for a token that may not exist (then forever).
async fn cancelled(token: &Option<tokio_util::sync::CancellationToken>) {
    match token {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

impl Hubbed {
    async fn recv(&mut self) -> Option<Event> {
        match self.sub.as_mut() {
            Some(s) => s.rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// Subscriptions to the broker's own channels (`$pgbroker.events`, `$pgbroker.metrics`).
#[derive(Default)]
struct Reserved {
    events: Option<broadcast::Receiver<Arc<str>>>,
    metrics: Option<broadcast::Receiver<Arc<str>>>,
}

impl Reserved {
    fn slot(&mut self, channel: &str) -> Option<&mut Option<broadcast::Receiver<Arc<str>>>> {
        match channel {
            EVENTS_CHANNEL => Some(&mut self.events),
            METRICS_CHANNEL => Some(&mut self.metrics),
            _ => None,
        }
    }

    fn count(&self) -> usize {
        usize::from(self.events.is_some()) + usize::from(self.metrics.is_some())
    }

    fn names(&self) -> impl Iterator<Item = String> {
        [(EVENTS_CHANNEL, self.events.is_some()), (METRICS_CHANNEL, self.metrics.is_some())]
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(n, _)| n.to_string())
    }
}

/// The next message on a reserved channel; pending forever when not subscribed.
async fn recv_reserved(
    rx: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> Result<Arc<str>, broadcast::error::RecvError> {
    match rx.as_mut() {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn reserved_text(
    r: Result<Arc<str>, broadcast::error::RecvError>,
    rx: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> String {
    match r {
        Ok(text) => text.to_string(),
        Err(broadcast::error::RecvError::Lagged(n)) => {
            json::resync(&format!("{n} broker events were dropped: the client read too slowly"))
        }
        Err(broadcast::error::RecvError::Closed) => {
            *rx = None;
            json::error("closed", "the broker's event stream ended")
        }
    }
}

fn all_channels(reserved: &Reserved, hub: Vec<String>) -> Vec<String> {
    let mut v: Vec<String> = hub.into_iter().chain(reserved.names()).collect();
    v.sort();
    v
}

/// Subscribes to broker and database channels (checked), resuming the latter after
/// `resume`; returns the reply.
async fn subscribe(
    sub: &Hubbed,
    bridge: &Bridge,
    reserved: &mut Reserved,
    broker: Vec<String>,
    database: Vec<String>,
    resume: Option<u64>,
) -> String {
    // Refused whole: no broker channel is taken on when the database ones cannot be.
    if sub.sub.is_none() && !database.is_empty() {
        return json::error("unavailable", sub.error.as_deref().unwrap_or("no listener"));
    }
    for ch in &broker {
        if let Some(slot) = reserved.slot(ch)
            && slot.is_none()
        {
            *slot = bridge.events().subscribe(ch);
        }
    }
    let hub = match (&sub.sub, database.is_empty()) {
        (Some(s), true) => s.channels(),
        (Some(s), false) => {
            let cfg = bridge.config();
            let cap = cfg.websocket.max_channels_per_client;
            // New channels with a snapshot are held from before their LISTEN (a resume
            // instead gets what it missed, or a resync, which brings the snapshot).
            let held = s.channels();
            let new: Vec<String> = database.iter().filter(|c| !held.contains(c)).cloned().collect();
            let markers = match resume {
                None => hold(&cfg, s, &new),
                Some(_) => Vec::new(),
            };
            if let Err(e) = s.subscribe(&database, cap, resume).await {
                for (ch, _) in &markers {
                    s.hub().taken(s.id, ch, Taken { data: Err(e.to_string()), seen: None });
                }
                return json::error("too_many_channels", &e.to_string());
            }
            snapshots(bridge, &cfg, s, &new, Some(markers)).await;
            s.channels()
        }
        (None, true) => Vec::new(),
        (None, false) => return json::error("unavailable", sub.error.as_deref().unwrap_or("no listener")),
    };
    json::channels("subscribed", &all_channels(reserved, hub))
}

/// Holds `channels` that have a `snapshot_query` for `s`; their markers.
fn hold(cfg: &Config, s: &Subscription, channels: &[String]) -> Vec<(String, String)> {
    let w = &cfg.websocket;
    let with_snapshot = channels.iter().filter(|c| w.channels.get(*c).is_some_and(|c| c.snapshot_query.is_some()));
    with_snapshot.map(|c| (c.clone(), s.hub().hold(s.id, c))).collect()
}

/// Takes the snapshots of `channels` for `s`: those held in `markers`, or (`None`) every one
/// of `channels` with a `snapshot_query`, held now.
async fn snapshots(
    bridge: &Bridge,
    cfg: &Config,
    s: &Subscription,
    channels: &[String],
    markers: Option<Vec<(String, String)>>,
) {
    let markers = markers.unwrap_or_else(|| hold(cfg, s, channels));
    for (ch, marker) in markers {
        let Some(sql) = cfg.websocket.channels.get(&ch).and_then(|c| c.snapshot_query.as_deref()) else { continue };
        let taken = super::snapshot::take(bridge, cfg, s.hub().database(), sql, &marker).await;
        s.hub().taken(s.id, &ch, taken);
    }
}

/// Runs one JSON command and returns the reply.
async fn command(
    sub: &Hubbed,
    bridge: &Bridge,
    reserved: &mut Reserved,
    allowed: Option<&[String]>,
    text: &str,
) -> String {
    let cmd = match command::parse(text, allowed) {
        Ok(cmd) => cmd,
        Err(refusal) => return refusal.to_json(),
    };
    match cmd {
        Command::Subscribe { broker, database, resume } => {
            subscribe(sub, bridge, reserved, broker, database, resume).await
        }
        Command::Unsubscribe(channels) => {
            match channels.as_deref() {
                None => *reserved = Reserved::default(),
                Some(chs) => {
                    for ch in chs {
                        if let Some(slot) = reserved.slot(ch) {
                            *slot = None;
                        }
                    }
                }
            }
            let hub = sub
                .sub
                .as_ref()
                .map(|s| {
                    s.unsubscribe(channels.as_deref());
                    s.channels()
                })
                .unwrap_or_default();
            json::channels("unsubscribed", &all_channels(reserved, hub))
        }
        Command::Ping => json::pong(),
    }
}
