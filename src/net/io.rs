//! Buffered client I/O for the login phase and the console, where messages are read one at
//! a time.

use crate::proto::frame::FrameError;
use crate::proto::startup::{self, Packet, StartupError};
use bytes::{Buf, Bytes, BytesMut};
use std::io;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a client's message could not be read or written.
#[derive(Debug, Error)]
pub enum ClientIoError {
    /// The client went away.
    #[error("client disconnected")]
    Disconnected,
    /// The client socket failed.
    #[error("client connection failed")]
    Io(#[source] io::Error),
    /// The client broke message framing.
    #[error("protocol violation")]
    Frame(#[from] FrameError),
    /// The client sent a bad startup packet.
    #[error("invalid startup packet")]
    Startup(#[from] StartupError),
}

/// A client socket with its read and write buffers.
pub struct ClientIo<S> {
    /// The socket.
    pub stream: S,
    /// Bytes read but not consumed.
    pub rbuf: BytesMut,
    /// Bytes to send on the next `flush`.
    pub wbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientIo<S> {
    /// Wraps a connected socket.
    pub fn new(stream: S) -> ClientIo<S> {
        ClientIo { stream, rbuf: BytesMut::with_capacity(1024), wbuf: BytesMut::with_capacity(1024) }
    }

    async fn fill(&mut self, need: usize) -> Result<(), ClientIoError> {
        while self.rbuf.len() < need {
            self.rbuf.reserve(need - self.rbuf.len());
            if self.stream.read_buf(&mut self.rbuf).await.map_err(ClientIoError::Io)? == 0 {
                return Err(ClientIoError::Disconnected);
            }
        }
        Ok(())
    }

    /// Reads one untagged startup-phase packet, bounded by `MAX_STARTUP_LEN`.
    pub async fn read_startup(&mut self) -> Result<Packet, ClientIoError> {
        self.fill(4).await?;
        let mut prefix = [0u8; 4];
        prefix.copy_from_slice(&self.rbuf[..4]);
        let len = startup::body_len(prefix)?;
        self.fill(4 + len).await?;
        self.rbuf.advance(4);
        let body = self.rbuf.split_to(len);
        Ok(startup::parse(&body)?)
    }

    /// Reads one tagged message whose length field is at most `max`; returns tag and body.
    pub async fn read_message(&mut self, max: usize) -> Result<(u8, Bytes), ClientIoError> {
        self.fill(5).await?;
        let tag = self.rbuf[0];
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        if len < 4 {
            return Err(FrameError::BadLength { tag, len }.into());
        }
        let len = len as usize;
        if len > max {
            return Err(FrameError::TooLong { tag, len, max }.into());
        }
        self.fill(1 + len).await?;
        self.rbuf.advance(5);
        Ok((tag, self.rbuf.split_to(len - 4).freeze()))
    }

    /// Sends everything in the write buffer.
    pub async fn flush(&mut self) -> Result<(), ClientIoError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await.map_err(ClientIoError::Io)?;
            // A no-op for TCP; TLS holds records until flushed.
            self.stream.flush().await.map_err(ClientIoError::Io)?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Sends a single byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn write_byte(&mut self, b: u8) -> io::Result<()> {
        self.stream.write_all(&[b]).await?;
        self.stream.flush().await
    }
}
