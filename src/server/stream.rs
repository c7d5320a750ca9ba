//! A server socket: TCP, TLS over TCP, or Unix, behind one type so the relay needs no generics.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

/// A connected server socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
    /// TLS over TCP (`server_tls_sslmode`).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Peeks at the socket without waiting or consuming: `WouldBlock` means nothing is
    /// pending (the healthy idle case), `Ok(0)` that the server hung up.
    ///
    /// The peek (a syscall) runs only if the reactor saw the socket readable since a read
    /// last found it empty; a peek that finds nothing clears that mark. A server that spoke
    /// or hung up has been seen readable by the time the reactor last polled, so a healthy
    /// pooled server is checked out without a syscall.
    pub fn probe(&self) -> io::Result<usize> {
        let mut byte = [std::mem::MaybeUninit::uninit()];
        let readable = tokio::io::Interest::READABLE;
        match self {
            Stream::Tcp(s) => s.try_io(readable, || socket2::SockRef::from(s).peek(&mut byte)),
            Stream::Unix(s) => s.try_io(readable, || socket2::SockRef::from(s).peek(&mut byte)),
            Stream::Tls(s) => {
                let tcp = s.get_ref().0;
                tcp.try_io(readable, || socket2::SockRef::from(tcp).peek(&mut byte))
            }
        }
    }
}

impl Stream {
    /// The server certificate's `tls-server-end-point` data, for SCRAM channel binding.
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        let Stream::Tls(s) = self else { return None };
        let cert = s.get_ref().1.peer_certificates()?.first()?;
        crate::tls::end_point_hash(cert)
    }

    /// Writes without waiting (a best-effort Terminate before closing). TLS would need the
    /// bytes encrypted first; there the server sees the connection close without it.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(buf),
            Stream::Unix(s) => s.try_write(buf),
            Stream::Tls(_) => Ok(0),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
