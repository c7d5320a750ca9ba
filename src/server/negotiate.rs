//! TLS towards the server: SSLRequest, then a rustls handshake, as `server_tls_sslmode` says.

use super::{ServerError, Stream, Target};
use crate::proto::startup::{ENCRYPTION_ACCEPTED, ENCRYPTION_REFUSED};
use crate::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// SSLRequest: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Asks a TCP server for TLS and wraps the socket when it agrees. Unix sockets and
/// `disable` pass through unchanged; a server that says no is refused when TLS is required.
pub(super) async fn encrypt(target: &Target, stream: Stream) -> Result<Stream, ServerError> {
    let Some(connector) = target.tls.connector() else {
        return Ok(stream);
    };
    let Stream::Tcp(mut tcp) = stream else {
        return Ok(stream);
    };
    tcp.write_all(&SSL_REQUEST).await?;
    match tcp.read_u8().await.map_err(|_| ServerError::Closed)? {
        ENCRYPTION_ACCEPTED => {}
        ENCRYPTION_REFUSED if !target.tls.mode.required() => return Ok(Stream::Tcp(tcp)),
        ENCRYPTION_REFUSED => {
            return Err(ServerError::TlsRefused { addr: target.addr(), mode: target.tls.mode.as_str() });
        }
        other => return Err(super::protocol(&format!("unexpected answer {other:#04x} to SSLRequest"))),
    }
    let name = tls::server_name(&target.host)
        .ok_or_else(|| super::protocol(&format!("{:?} is not a valid TLS server name", target.host)))?;
    let tls = connector.connect(name, tcp).await.map_err(|source| ServerError::Tls { addr: target.addr(), source })?;
    Ok(Stream::Tls(Box::new(tls)))
}
