//! The relay loop's turns: the steps taken before it waits (answer alone, attach, scan), one
//! wait on everything that can wake a client (its sockets, its stop signals, its
//! notifications), and what each wake-up does.

use super::waits::{drained, next_event};
use super::{ClientLoop, Exit, idle};
use crate::error::SqlState;
use crate::flag::Wait;
use crate::net::{ClientIo, ClientStream};
use crate::notify::Event;
use crate::proto::tag;
use crate::session::SessionError;
use crate::session::relay::{Events, Gone, RelayError, poll_relay};
use bytes::BytesMut;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

/// What the loop carries from one turn to the next.
struct Turn {
    /// New client bytes wait to be scanned.
    client_data: bool,
    /// The client said Terminate behind requests the server has not answered yet.
    terminating: bool,
    /// The client was asked to leave (shutdown, database removed) between transactions.
    draining: bool,
    /// Nothing is held for the client (no server running or inside a transaction for it).
    free: bool,
    /// When a client without a server may hibernate.
    quiet: idle::Quiet,
}

/// The signals that end or interrupt a wait, other than the sockets: KILL, a drain, and the
/// session's timer. Made once per loop: a wait made per turn would register with the flag's
/// waiter list (a lock) and unregister again several times per transaction.
struct Stops<'a, 'w> {
    killed: Pin<&'a mut Wait<'w>>,
    drain: Pin<&'a mut Wait<'w>>,
    timer: Pin<&'a mut Sleep>,
    /// The deadline the timer is set to, while it has not fired.
    armed: Option<Instant>,
}

/// Which stop signal fired.
enum Stop {
    Killed,
    Drain,
    Timer,
}

impl Stops<'_, '_> {
    /// Sets the timer to `deadline` if that is sooner than what it waits for.
    fn arm(&mut self, deadline: Option<Instant>) {
        if let Some(d) = deadline
            && self.armed.is_none_or(|a| d < a)
        {
            self.timer.as_mut().reset(d);
            self.armed = Some(d);
        }
    }

    /// The first signal that fired; a drain is not looked at again once `draining`.
    fn poll_stop(&mut self, cx: &mut Context<'_>, draining: bool) -> Poll<Stop> {
        if self.killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Stop::Killed);
        }
        if !draining && self.drain.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Stop::Drain);
        }
        if self.armed.is_some() && self.timer.as_mut().poll(cx).is_ready() {
            self.armed = None;
            return Poll::Ready(Stop::Timer);
        }
        Poll::Pending
    }
}

/// What ended a wait.
enum Woke {
    Relayed(Result<Events, RelayError>),
    Stop(Stop),
    /// A draining client's time to leave.
    Drained,
    /// A notification for a listening client (`None`: the hub cut it off).
    Event(Option<Event>),
}

/// What the steps before a wait decided.
enum Step {
    /// Wait for the next event.
    Wait,
    /// Something was done: take the steps again.
    Again,
    /// The loop is over.
    Exit(Exit),
}

impl ClientLoop {
    /// Relays until the client leaves, fails or may hibernate.
    pub(super) async fn relay(&mut self, io: &mut ClientIo<ClientStream>) -> Result<Exit, SessionError> {
        let client_data = self.take_login_bytes(io);
        let mut turn = Turn { client_data, terminating: false, draining: false, free: true, quiet: idle::Quiet::new() };
        let client = self.client.clone();
        let (killed, drain) = (std::pin::pin!(client.kill.wait()), std::pin::pin!(client.drain.wait()));
        let timer = std::pin::pin!(tokio::time::sleep(std::time::Duration::ZERO));
        let mut stops = Stops { killed, drain, timer, armed: None };
        loop {
            match self.step(io, &mut turn).await? {
                Step::Exit(exit) => return Ok(exit),
                Step::Again => continue,
                Step::Wait => {}
            }
            stops.arm(self.deadline(&mut turn));
            let woke = self.wait(io, &turn, &mut stops).await;
            if let Some(exit) = self.on_wake(io, &mut turn, woke).await? {
                return Ok(exit);
            }
        }
    }

    /// Bytes the client sent right behind its startup packet belong to the relay; the
    /// login's buffers are not used by it and give their memory back. True if there were.
    fn take_login_bytes(&mut self, io: &mut ClientIo<ClientStream>) -> bool {
        let some = !io.rbuf.is_empty();
        if some {
            self.up.read_buf().extend_from_slice(&io.rbuf);
        }
        io.rbuf = BytesMut::new();
        io.wbuf = BytesMut::new();
        some
    }

    /// What can be done before waiting: a client without a server gets its LISTEN or its
    /// Parses answered by the broker, or a server for its next transaction; new client bytes
    /// are scanned.
    async fn step(&mut self, io: &mut ClientIo<ClientStream>, turn: &mut Turn) -> Result<Step, SessionError> {
        if turn.terminating && (self.is_done() || self.pending.copy_in()) {
            // A COPY FROM STDIN would wait for data that will never come: the server is
            // closed, as PostgreSQL ends the COPY when its client goes.
            return Ok(Step::Exit(Exit::Done));
        }
        // Without a server, a transaction starts with the client's next message (which the
        // loop reads only once it knows which server the bytes go to).
        let mut scan = std::mem::take(&mut turn.client_data);
        if self.server.is_none() {
            if self.answer_listen().await? || self.answer_alone()? {
                return Ok(Step::Again);
            }
            match self.up.peek_tag() {
                Some(tag::TERMINATE) => return Ok(Step::Exit(Exit::Done)),
                Some(_) => {
                    self.attach().await?;
                    scan = true;
                }
                None => {}
            }
        }
        if scan && self.scan_client()? {
            if self.server.is_none() || self.is_done() {
                return Ok(Step::Exit(Exit::Done));
            }
            // PostgreSQL runs what came before Terminate: the server gets it, and the session
            // stays until it has answered (to no one), so that it goes back clean.
            turn.terminating = true;
            return Ok(Step::Again);
        }
        if scan && self.server.is_some() && self.pending.is_settled() && self.up.ready().is_empty() {
            // Everything the client asked was answered by the broker (a DEALLOCATE of its
            // own statement): no server reply will come to give the server back on.
            self.detach_if_done(io).await?;
        }
        Ok(Step::Wait)
    }

    /// The next moment a timer needs a look: a limit of the session, or the time a client
    /// without a server may hibernate.
    fn deadline(&mut self, turn: &mut Turn) -> Option<Instant> {
        let held = self.held();
        let owed = self.owed();
        turn.free = held.is_none();
        self.timers.track(held.is_some(), owed);
        let quiet_at = (self.server.is_none() && !turn.draining).then_some(turn.quiet.at);
        match (self.timers.deadline(held, owed), quiet_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Waits for the sockets, a stop signal, a drain's end or a notification.
    async fn wait(&mut self, io: &mut ClientIo<ClientStream>, turn: &Turn, stops: &mut Stops<'_, '_>) -> Woke {
        let backed_up = self.down.is_backed_up();
        tokio::select! {
            biased;
            r = poll_fn(|cx| {
                let server = self.server.as_mut().map(|s| &mut s.stream);
                let r = if turn.terminating {
                    poll_relay(cx, &mut Gone, server, &mut self.up, &mut self.down)
                } else {
                    poll_relay(cx, &mut io.stream, server, &mut self.up, &mut self.down)
                };
                // Notifications were held back while the replies backed up: once the client
                // has taken them, turn again so that more are taken.
                if r.is_pending() && backed_up && !self.down.is_backed_up() {
                    return Poll::Ready(Ok(Events::default()));
                }
                r
            }) => Woke::Relayed(r),
            stop = poll_fn(|cx| stops.poll_stop(cx, turn.draining)) => Woke::Stop(stop),
            // Leaving: between transactions only. A client that has not run anything yet
            // gets a moment to send its first request, so a connection made just before the
            // drain is not turned away.
            () = drained(self.served, self.logged_in), if turn.draining && turn.free => Woke::Drained,
            ev = next_event(&mut self.listens, backed_up), if self.server.is_none() => Woke::Event(ev),
        }
    }

    /// Does what a wake-up asks; `Some` ends the loop.
    async fn on_wake(
        &mut self,
        io: &mut ClientIo<ClientStream>,
        turn: &mut Turn,
        woke: Woke,
    ) -> Result<Option<Exit>, SessionError> {
        match woke {
            Woke::Relayed(Ok(events)) => self.relayed(io, turn, events).await?,
            Woke::Relayed(Err(RelayError::Client(e))) => return Err(SessionError::Io(e)),
            Woke::Relayed(Err(RelayError::Server(e))) => return Err(self.server_lost(io, Some(e)).await),
            Woke::Stop(Stop::Killed) => {
                return Err(SessionError::fatal(SqlState::ADMIN_SHUTDOWN, "terminated by the administrator"));
            }
            Woke::Stop(Stop::Drain) => turn.draining = true,
            Woke::Stop(Stop::Timer) => {
                self.check_timers(io).await?;
                // The relay was polled just before (biased) and found the client silent.
                if !turn.draining && turn.quiet.is_over(Instant::now()) {
                    if self.can_hibernate() {
                        return Ok(Some(Exit::Hibernate));
                    }
                    turn.quiet = idle::Quiet::new();
                }
            }
            Woke::Drained => {
                return Err(SessionError::fatal(SqlState::ADMIN_SHUTDOWN, self.client.drain_reason().to_string()));
            }
            Woke::Event(None) => return Err(self.kicked(io).await),
            Woke::Event(Some(ev)) => self.deliver(&ev),
        }
        Ok(None)
    }

    /// Bytes moved: the server's are scanned (and may end the transaction), the client's
    /// are scanned at the next turn.
    async fn relayed(
        &mut self,
        io: &mut ClientIo<ClientStream>,
        turn: &mut Turn,
        events: Events,
    ) -> Result<(), SessionError> {
        turn.quiet.active = true;
        if events.server_data {
            self.timers.activity();
            self.timers.server_spoke();
            self.scan_server()?;
            self.replay();
            if turn.terminating {
                self.down.discard_ready();
            }
            self.detach_if_done(io).await?;
        }
        if events.server_closed {
            return Err(self.server_lost(io, None).await);
        }
        if events.client_closed {
            return Err(SessionError::Disconnected);
        }
        if events.client_data {
            self.timers.activity();
        }
        turn.client_data = events.client_data;
        Ok(())
    }
}
