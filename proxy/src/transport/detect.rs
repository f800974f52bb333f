//! Captured connections: where the app meant to go (`SO_ORIGINAL_DST`), and
//! what it speaks, told from its first bytes.
//!
//! HTTP/1.x starts with a method token and a space; h2c with prior
//! knowledge with `PRI * HTTP/2.0` (a token and a space too). Anything else
//! — a TLS ClientHello the app makes itself, a database protocol — is
//! opaque, and so is a connection that sends nothing for
//! [`DETECT_TIMEOUT`]: a protocol where the server speaks first.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a captured connection may stay silent before it is taken for a
/// server-speaks-first protocol.
pub(crate) const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The longest HTTP method token looked for.
const MAX_METHOD: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    Opaque,
    /// Nothing sent within [`DETECT_TIMEOUT`]: the server speaks first.
    ServerFirst,
}

impl Protocol {
    /// The `detected` label of `weft_tcp_connections_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Opaque => "opaque",
            Protocol::ServerFirst => "server-first",
        }
    }
}

/// Where a connection accepted on `listener` was going before the redirect
/// rules sent it here; `None` for a connection made to the listener itself.
pub(crate) fn original_dst(stream: &TcpStream, listener: SocketAddr) -> Option<SocketAddr> {
    let dst = socket2::SockRef::from(stream).original_dst_v4().ok()?.as_socket()?;
    let to_listener = dst.port() == listener.port() && (listener.ip().is_unspecified() || dst.ip() == listener.ip());
    (!to_listener).then_some(dst)
}

/// What the first bytes say (`None`: too few to tell yet).
pub(crate) fn classify(first: &[u8]) -> Option<Protocol> {
    for (i, b) in first.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i >= 3 => return Some(Protocol::Http),
            _ => return Some(Protocol::Opaque),
        }
    }
    if first.len() > MAX_METHOD { Some(Protocol::Opaque) } else { None }
}

/// Peeks at `stream` until its protocol can be told, for at most
/// [`DETECT_TIMEOUT`]; a connection closed before any byte is `Err`.
pub(crate) async fn detect(stream: &TcpStream) -> std::io::Result<Protocol> {
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut buf = [0u8; MAX_METHOD + 1];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Protocol::ServerFirst),
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(p) = classify(&buf[..n]) {
            return Ok(p);
        }
        // A method cut short: the rest is on its way.
        if tokio::time::Instant::now() >= deadline {
            return Ok(Protocol::Opaque);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes() {
        for http in [&b"GET / HTTP/1.1\r\n"[..], b"POST /x", b"PRI * HTTP/2.0\r\n", b"M-SEARCH * HTTP/1.1"] {
            assert_eq!(classify(http), Some(Protocol::Http), "{}", String::from_utf8_lossy(http));
        }
        for opaque in
            [&[0x16u8, 3, 1, 0, 200][..], b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"get / HTTP/1.1", b"GE /", b"SSH-2.0"]
        {
            assert_eq!(classify(opaque), Some(Protocol::Opaque), "{opaque:?}");
        }
        assert_eq!(classify(b"GE"), None, "a method cut short");
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQ"), Some(Protocol::Opaque), "no method is that long");
    }
}
