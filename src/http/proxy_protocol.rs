//! The PROXY protocol on the webhook port: the client's address from the header a layer-4 load balancer
//! sends before anything else on each connection (HAProxy's v1 text and v2 binary forms, parsed by `ppp`).
//!
//! A balancer that passes connections through (AWS NLB, Google Cloud's TCP and SSL proxies, HAProxy or
//! nginx in TCP mode, Envoy) cannot add `X-Forwarded-For`, least of all to TLS it does not terminate: without
//! this header hookgate sees only the balancer, and a source's `allowed_ips` cannot judge the sender. With
//! `server.proxy_protocol` on, every connection must start with one, within the bound that the TLS handshake
//! and the request headers share; the address it names is the connection's peer from then on. As in nginx and
//! HAProxy, a header is believed from whoever connects, unless `server.proxy_protocol_from` lists the balancers
//! (then a connection from anywhere else is closed before it is read, in `crate::http`).
//!
//! The header is peeked, then exactly its bytes are read, so what follows (the TLS handshake, the first
//! request) stays in the socket for the next reader and the connection keeps its plain `TcpStream` type.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2, PartialResult as _};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The longest header taken. v2 allows 64 KiB of TLVs; the balancers' own (AWS's endpoint id, Google's and
/// Azure's link ids, HAProxy's TLS details) take a few hundred bytes.
pub const MAX_HEADER_BYTES: usize = 4096;

/// How a v1 header starts, and its longest form (`PROXY UNKNOWN`, two full IPv6 addresses, two ports, CRLF).
const V1_START: &[u8] = b"PROXY ";
const V1_MAX_BYTES: usize = 107;

/// What the first bytes of a connection hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes. `client` is `None` when it names no IP client: a v2 `LOCAL` (the
    /// balancer's own health check), a v1 `UNKNOWN`, or a Unix socket; the TCP peer then stays the peer.
    Header { len: usize, client: Option<SocketAddr> },
    /// The start of a header: more bytes are due.
    Incomplete,
    /// Not a header, in words an operator can act on.
    Invalid(String),
}

/// Reads a header from the start of `input`: v2 when it starts with (a part of) v2's signature, else v1.
pub fn parse(input: &[u8]) -> Parsed {
    let signature_seen = input.len().min(v2::PROTOCOL_PREFIX.len());
    if input[..signature_seen] == v2::PROTOCOL_PREFIX[..signature_seen] {
        match v2::Header::try_from(input) {
            Ok(header) => {
                let client = match (header.command, header.addresses) {
                    (v2::Command::Local, _) | (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                };
                Parsed::Header { len: header.len(), client }
            }
            Err(e) if e.is_incomplete() => incomplete(input),
            Err(e) => Parsed::Invalid(format!("a malformed v2 header ({e})")),
        }
    } else {
        // A v1 header is one line, so it is judged only once its end is in: ppp takes some prefixes (one
        // ending in the space before the last port) for a malformed header.
        let Some(end) = input.windows(2).take(V1_MAX_BYTES - 1).position(|pair| pair == b"\r\n") else {
            let start_seen = input.len().min(V1_START.len());
            return if input[..start_seen] == V1_START[..start_seen] && input.len() < V1_MAX_BYTES {
                Parsed::Incomplete
            } else {
                Parsed::Invalid(describe_non_header(input, "no end of line in its first 107 bytes"))
            };
        };
        match v1::Header::try_from(&input[..end + 2]) {
            Ok(header) => {
                let client = match header.addresses {
                    v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                    v1::Addresses::Unknown => None,
                };
                Parsed::Header { len: header.header.len(), client }
            }
            Err(e) => Parsed::Invalid(describe_non_header(input, &e.to_string())),
        }
    }
}

/// More bytes are due, unless the bound is already read.
fn incomplete(input: &[u8]) -> Parsed {
    if input.len() >= MAX_HEADER_BYTES {
        Parsed::Invalid(format!("a header longer than {MAX_HEADER_BYTES} bytes"))
    } else {
        Parsed::Incomplete
    }
}

/// Names what a connection sent instead of a header: the usual cause is a balancer that does not send one.
fn describe_non_header(input: &[u8], v1_error: &str) -> String {
    const TLS_HANDSHAKE_RECORD: u8 = 0x16;
    if input.first() == Some(&TLS_HANDSHAKE_RECORD) {
        "a TLS handshake and no PROXY protocol header (is the balancer set to send one?)".to_owned()
    } else if input.starts_with(V1_START) {
        format!("a malformed v1 header ({v1_error})")
    } else if input.first().is_some_and(u8::is_ascii_uppercase) {
        "plain HTTP and no PROXY protocol header (is the balancer set to send one?)".to_owned()
    } else {
        "no PROXY protocol header".to_owned()
    }
}

/// How reading a connection's header ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The header was read; the client it names, if any.
    Read(Option<SocketAddr>),
    /// The connection closed, or was closed at the bound, without sending a byte: a balancer's TCP health
    /// check. Not a failure, as for a TLS handshake.
    Silent,
    Invalid(String),
    /// A header was started but not finished within the bound, or the connection closed in its middle.
    TimedOut,
}

/// Reads the header at the start of `stream` by `deadline`, leaving every byte after it unread.
pub async fn read_header(stream: &mut TcpStream, deadline: Instant) -> Outcome {
    let mut buffer = vec![0_u8; MAX_HEADER_BYTES];
    // The protocol asks senders to write the header at once, so a second look is rare; when one is needed,
    // waiting between looks keeps a client that trickles its header from spinning a thread (a peek of bytes
    // already there returns at once).
    let mut pause = Duration::from_millis(1);
    // Whether any byte came: a connection that goes without one is a health check, not a failure.
    let mut started = false;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) if !started => return Outcome::Silent,
            Ok(Err(_)) | Err(_) => return Outcome::TimedOut,
        };
        if peeked == 0 {
            return if started { Outcome::TimedOut } else { Outcome::Silent };
        }
        started = true;
        match parse(&buffer[..peeked]) {
            Parsed::Header { len, client } => {
                // The bytes are already in the socket's buffer: this read does not wait.
                return match stream.read_exact(&mut buffer[..len]).await {
                    Ok(_) => Outcome::Read(client),
                    Err(_) => Outcome::TimedOut,
                };
            }
            Parsed::Invalid(reason) => return Outcome::Invalid(reason),
            Parsed::Incomplete => {
                if Instant::now() + pause >= deadline {
                    return Outcome::TimedOut;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(command: v2::Command, client: SocketAddr, server: SocketAddr, tlv: Option<&[u8]>) -> Vec<u8> {
        let mut builder =
            v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, (client, server));
        if let Some(value) = tlv {
            builder = builder.write_tlv(0xEA, value).expect("tlv");
        }
        builder.build().expect("v2 header")
    }

    #[test]
    fn a_v1_header_names_the_client_and_its_exact_length() {
        let header = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 443\r\n";
        let mut input = header.to_vec();
        input.extend_from_slice(b"POST /webhooks/stripe HTTP/1.1\r\n");
        assert_eq!(
            parse(&input),
            Parsed::Header { len: header.len(), client: Some("203.0.113.7:51234".parse().expect("addr")) }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        assert_eq!(parse(v6), Parsed::Header { len: v6.len(), client: Some("[2001:db8::7]:4000".parse().expect("a")) });
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Header { len: 15, client: None });
    }

    #[test]
    fn a_v2_header_names_the_client_past_its_tlvs_and_local_names_none() {
        let (client, server): (SocketAddr, SocketAddr) =
            ("198.51.100.9:60000".parse().expect("addr"), "10.0.0.5:443".parse().expect("addr"));
        let header = v2_header(v2::Command::Proxy, client, server, Some(b"\x01vpce-0123456789abcdef"));
        let mut input = header.clone();
        input.extend_from_slice(&[0x16, 0x03, 0x01]);
        assert_eq!(parse(&input), Parsed::Header { len: header.len(), client: Some(client) });

        let v6: SocketAddr = "[2001:db8::9]:60000".parse().expect("addr");
        let header = v2_header(v2::Command::Proxy, v6, "[2001:db8::1]:443".parse().expect("addr"), None);
        assert_eq!(parse(&header), Parsed::Header { len: header.len(), client: Some(v6) });

        let health_check = v2_header(v2::Command::Local, client, server, None);
        assert_eq!(parse(&health_check), Parsed::Header { len: health_check.len(), client: None });
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        let v2 = v2_header(
            v2::Command::Proxy,
            "198.51.100.9:1".parse().expect("addr"),
            "10.0.0.5:443".parse().expect("addr"),
            Some(b"x"),
        );
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 443\r\n".to_vec();
        // The longest a sender may write: UNKNOWN, with the addresses it is allowed to add anyway.
        let v1_longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(v1_longest.len(), V1_MAX_BYTES);
        assert_eq!(parse(v1_longest), Parsed::Header { len: V1_MAX_BYTES, client: None });
        for header in [v2, v1, v1_longest.to_vec(), b"PROXY UNKNOWN\r\n".to_vec()] {
            for end in 1..header.len() {
                assert_eq!(parse(&header[..end]), Parsed::Incomplete, "{end} bytes of {}", header.len());
            }
        }
    }

    #[test]
    fn what_is_not_a_header_is_named() {
        let reason = |input: &[u8]| match parse(input) {
            Parsed::Invalid(reason) => reason,
            other => panic!("{other:?} for {input:?}"),
        };
        assert!(reason(b"POST /webhooks/stripe HTTP/1.1\r\n").starts_with("plain HTTP"));
        assert!(reason(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).starts_with("a TLS handshake"));
        assert!(reason(b"PROXY TCP4 203.0.113.7 nonsense 1 2\r\n").starts_with("a malformed v1 header"));
        assert!(reason(b"\x00\x01garbage\r\n").starts_with("no PROXY protocol header"));
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 100]].concat();
        assert_eq!(reason(&endless), "a malformed v1 header (no end of line in its first 107 bytes)");
        let mut bad_version = v2_header(
            v2::Command::Proxy,
            "198.51.100.9:1".parse().expect("addr"),
            "10.0.0.5:443".parse().expect("addr"),
            None,
        );
        bad_version[12] = 0x31;
        assert!(reason(&bad_version).starts_with("a malformed v2 header"));
        // A v2 header announcing more TLVs than the bound: refused once the bound is read, not waited for.
        let mut huge = v2_header(
            v2::Command::Proxy,
            "198.51.100.9:1".parse().expect("addr"),
            "10.0.0.5:443".parse().expect("addr"),
            None,
        );
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        huge.resize(MAX_HEADER_BYTES, 0);
        assert!(reason(&huge).contains("longer than"));
        assert_eq!(parse(&huge[..MAX_HEADER_BYTES - 1]), Parsed::Incomplete);
    }
}
