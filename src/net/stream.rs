//! A client socket: plain TCP or TLS, behind one type so the relay needs no generics for it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A connected client.
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, with the `tls-server-end-point` data of the certificate it was accepted with.
    Tls(Box<TlsStream<TcpStream>>, Option<Arc<[u8]>>),
    /// The socket was taken for a TLS handshake that failed; every operation fails.
    Gone,
}

impl ClientStream {
    /// True once the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(..))
    }

    /// Channel-binding data for SCRAM-SHA-256-PLUS, when encrypted with a usable certificate.
    pub fn tls_server_end_point(&self) -> Option<Arc<[u8]>> {
        match self {
            ClientStream::Tls(_, end_point) => end_point.clone(),
            _ => None,
        }
    }

    /// Ready once the socket has bytes (or an end) to read. For TLS this is the TCP socket:
    /// poll it only after a read found nothing buffered in the TLS layer either. A poll
    /// function, not an async one: a hibernating client keeps no future for it.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Plain(s) => s.poll_read_ready(cx),
            ClientStream::Tls(s, _) => s.get_ref().0.poll_read_ready(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    /// Takes the plain socket out for a TLS handshake, leaving `Gone`.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, ClientStream::Gone) {
            ClientStream::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client connection lost during TLS handshake")
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Gone => Poll::Ready(Err(gone())),
        }
    }
}
