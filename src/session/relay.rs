//! The full-duplex relay between a client and its server, driven by one task: writes what each
//! pipe approved, reads more while under the buffering limit, and returns to the session
//! whenever new bytes need scanning. Neither direction can block the other.

use super::pipe::Pipe;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

/// What the relay stopped for. Several may be true at once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    /// New bytes from the client are in the upstream pipe.
    pub client_data: bool,
    /// New bytes from the server are in the downstream pipe.
    pub server_data: bool,
    /// The client closed its side.
    pub client_closed: bool,
    /// The server closed its side.
    pub server_closed: bool,
}

impl Events {
    fn any(&self) -> bool {
        self.client_data || self.server_data || self.client_closed || self.server_closed
    }
}

/// A socket failure on one side.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Writing to or reading from the client failed.
    #[error("client connection failed")]
    Client(#[source] io::Error),
    /// Writing to or reading from the server failed.
    #[error("server connection failed")]
    Server(#[source] io::Error),
}

/// Stands in for a client that said Terminate while its server still had work: replies are
/// dropped, and nothing more comes from it. Reads never complete, so they register no
/// waker; the server side and the session's timers wake the relay.
pub struct Gone;

impl AsyncRead for Gone {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Gone {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Writes `pipe`'s approved bytes to `w` until done or `w` is not ready (its waker is then
/// registered); pending only while a flush is.
fn poll_drain<W: AsyncWrite + Unpin>(cx: &mut Context<'_>, w: &mut W, pipe: &mut Pipe) -> Poll<io::Result<()>> {
    let mut wrote = false;
    while !pipe.ready().is_empty() {
        match Pin::new(&mut *w).poll_write(cx, pipe.ready()) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                pipe.consume(n);
                wrote = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => break,
        }
    }
    if wrote || pipe.unflushed {
        // A no-op for TCP; TLS streams buffer and need it.
        pipe.unflushed = true;
        ready!(Pin::new(&mut *w).poll_flush(cx))?;
        pipe.unflushed = false;
    }
    Poll::Ready(Ok(()))
}

/// Stack buffer for a read into a pipe that holds no buffer (a client between
/// transactions): waiting for the next request then costs no heap memory. Most requests fit;
/// the rest is read into the pipe's buffer on the next turn.
const IDLE_READ: usize = 1024;

/// Reads into `pipe` if it has room; returns (got data, closed). `idle`: a client without a
/// server, whose next request may be long in coming.
fn poll_fill<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    pipe: &mut Pipe,
    idle: bool,
) -> io::Result<(bool, bool)> {
    if !pipe.wants_read() {
        return Ok((false, false));
    }
    // Only for an idle client: a server's reply is read into the pipe at once, so a long
    // result does not cost an extra small read.
    if idle && pipe.is_released() {
        // Uninitialised: zeroing it would cost more than the read of a short request.
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); IDLE_READ];
        let mut buf = tokio::io::ReadBuf::uninit(&mut stack);
        return match Pin::new(r).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Ok((false, true)),
            Poll::Ready(Ok(())) => {
                pipe.read_buf().extend_from_slice(buf.filled());
                Ok((true, false))
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok((false, false)),
        };
    }
    match poll_read_buf(Pin::new(r), cx, pipe.read_buf()) {
        Poll::Ready(Ok(0)) => Ok((false, true)),
        Poll::Ready(Ok(_)) => Ok((true, false)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok((false, false)),
    }
}

/// Moves bytes until something needs the session's attention. With no server attached only
/// the client side is served.
///
/// # Cancel safety
/// All state lives in the pipes; dropping the future loses nothing.
pub fn poll_relay<C, S>(
    cx: &mut Context<'_>,
    client: &mut C,
    server: Option<&mut S>,
    up: &mut Pipe,
    down: &mut Pipe,
) -> Poll<Result<Events, RelayError>>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    // One pass: each pipe is drained before it is filled, so a read that waited for room
    // gets it in the same pass, and every source left pending has its waker registered (a
    // pipe still too full waits on its writer becoming writable).
    let idle = server.is_none();
    if let Poll::Ready(r) = poll_drain(cx, client, down) {
        r.map_err(RelayError::Client)?;
    }
    if idle {
        // Between transactions, once the last reply is out: an idle client keeps no buffer
        // (the next request is read through a stack buffer, see `poll_fill`).
        down.release_if_empty();
        up.release_if_empty();
    }
    let mut ev = Events::default();
    if let Some(s) = server {
        if let Poll::Ready(r) = poll_drain(cx, s, up) {
            r.map_err(RelayError::Server)?;
        }
        (ev.server_data, ev.server_closed) = poll_fill(cx, s, down, false).map_err(RelayError::Server)?;
    }
    // A client that does not read its replies is not read from either: requests the broker
    // answers itself would otherwise queue replies without bound. Its drain above waits for
    // the socket to take more.
    if !down.is_backed_up() {
        (ev.client_data, ev.client_closed) = poll_fill(cx, client, up, idle).map_err(RelayError::Client)?;
    }
    if ev.any() { Poll::Ready(Ok(ev)) } else { Poll::Pending }
}
