//! Control datagrams: the keepalives and proofs of session continuity (SPEC
//! decision 11), told apart from TCP segments without ambiguity.
//!
//! A control datagram is a UDP payload of exactly [`LEN`] bytes:
//!
//! ```text
//! offset size field
//! 0      1    kind: 1 keepalive (client -> server), 2 ack (server -> client),
//!                   3 challenge (server -> client), 4 response (client -> server)
//! 1      1    version = 1
//! 2      2    zero
//! 4      8    session id (chosen by the server at authentication, never zero)
//! 12     1    0x00: where a TCP segment keeps its data offset (high nibble,
//!             at least 5 for any segment): 0 says "not a segment"
//! 13     3    zero
//! 16     8    counter, big endian: strictly increasing per session and sender
//! 24     8    echo: challenge: a random nonce; response: the nonce it
//!             answers; ack: the counter of the datagram it answers;
//!             keepalive: zero
//! 32     16   tag: HMAC-SHA256 under the sender's key of bytes 0..32, first
//!             16 bytes
//! ```
//!
//! The keys come from the TLS authentication (an exporter, RFC 8446 section
//! 7.5), one per direction, so a datagram proves it was made by the holder
//! of the session and cannot be reflected back as the other side's. The
//! counter makes a copy worthless once the original has arrived; the path it
//! came from is checked by the session logic ([`super::server`]).
//!
//! [`Control::parse`] is the checked view: it looks at the shape only (length,
//! version, the zero fields, the marker, a known kind) and never panics; the
//! tag is checked by [`verify`] with the session's key.

use ring::hmac;
use subtle::ConstantTimeEq;

/// The length of every control datagram.
pub const LEN: usize = 48;
pub const VERSION: u8 = 1;
/// Bytes covered by the tag.
const SIGNED: usize = 32;
const TAG_LEN: usize = 16;

mod field {
    pub const KIND: usize = 0;
    pub const VERSION: usize = 1;
    pub const SESSION: std::ops::Range<usize> = 4..12;
    /// Where a TCP segment's data offset is.
    pub const MARKER: usize = 12;
    pub const COUNTER: std::ops::Range<usize> = 16..24;
    pub const ECHO: std::ops::Range<usize> = 24..32;
    pub const TAG: std::ops::Range<usize> = 32..48;
    /// Bytes that must be zero (besides the marker).
    pub const ZERO: [usize; 5] = [2, 3, 13, 14, 15];
}

/// A session id as it travels: 8 bytes, chosen at random by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 8]);

impl SessionId {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 8]
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client to server: "I am here" (keeps NAT mappings open, proves the
    /// path it comes from, refreshes the lease).
    Keepalive = 1,
    /// Server to client: the keepalive or response with counter `echo` was
    /// accepted on the session's current path.
    Ack = 2,
    /// Server to client, to a path it has not validated: answer with `echo`.
    Challenge = 3,
    /// Client to server: the answer to the challenge whose nonce is `echo`.
    Response = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Keepalive,
            2 => Kind::Ack,
            3 => Kind::Challenge,
            4 => Kind::Response,
            _ => return None,
        })
    }

    /// Whether a client sends this kind (the server sends the others).
    pub fn from_client(self) -> bool {
        matches!(self, Kind::Keepalive | Kind::Response)
    }
}

/// The fields of a control datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub kind: Kind,
    pub session: SessionId,
    pub counter: u64,
    pub echo: u64,
}

/// Whether `payload` has the shape of a control datagram (the tag is not
/// checked). A TCP segment never has: its data offset is at least 5.
pub fn is_control(payload: &[u8]) -> bool {
    Control::parse(payload).is_some()
}

impl Control {
    /// The checked view over `payload`: `None` unless it has exactly the
    /// shape above. The tag is left to [`verify`].
    pub fn parse(payload: &[u8]) -> Option<Control> {
        let b: &[u8; LEN] = payload.try_into().ok()?;
        let kind = Kind::from_u8(*b.get(field::KIND)?)?;
        if *b.get(field::VERSION)? != VERSION || *b.get(field::MARKER)? != 0 {
            return None;
        }
        if field::ZERO.iter().any(|&i| b.get(i) != Some(&0)) {
            return None;
        }
        let session = SessionId(b.get(field::SESSION)?.try_into().ok()?);
        if session.is_zero() {
            return None;
        }
        Some(Control {
            kind,
            session,
            counter: u64::from_be_bytes(b.get(field::COUNTER)?.try_into().ok()?),
            echo: u64::from_be_bytes(b.get(field::ECHO)?.try_into().ok()?),
        })
    }

    /// The datagram, tagged under `key` (the sender's direction).
    pub fn encode(&self, key: &hmac::Key) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[field::KIND] = self.kind as u8;
        b[field::VERSION] = VERSION;
        b[field::SESSION].copy_from_slice(&self.session.0);
        b[field::COUNTER].copy_from_slice(&self.counter.to_be_bytes());
        b[field::ECHO].copy_from_slice(&self.echo.to_be_bytes());
        let tag = hmac::sign(key, &b[..SIGNED]);
        // SHA-256 tags are 32 bytes: the first 16 always exist.
        if let Some(t) = tag.as_ref().get(..TAG_LEN) {
            b[field::TAG].copy_from_slice(t);
        }
        b
    }
}

/// Whether the tag of `payload` (a datagram that [`Control::parse`]
/// accepted) is the one `key` makes. Constant time in the tag.
pub fn verify(payload: &[u8], key: &hmac::Key) -> bool {
    let (Some(signed), Some(tag)) = (payload.get(..SIGNED), payload.get(field::TAG)) else {
        return false;
    };
    let want = hmac::sign(key, signed);
    want.as_ref().get(..TAG_LEN).is_some_and(|w| bool::from(w.ct_eq(tag)))
}

/// The two keys of a session, one per direction, as the TLS exporter made
/// them (kept as bytes so that they can be saved and restored).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBytes {
    pub client_to_server: [u8; 32],
    pub server_to_client: [u8; 32],
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes(..)")
    }
}

/// The exporter label both sides use (RFC 8446 section 7.5); the context is
/// the session id, so every session has keys of its own.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-udp-encap-tun-session";
/// Bytes taken from the exporter: both keys.
pub const EXPORTER_LEN: usize = 64;

impl KeyBytes {
    /// Splits the exporter's output into the two keys.
    pub fn from_exporter(out: &[u8; EXPORTER_LEN]) -> KeyBytes {
        let mut k = KeyBytes { client_to_server: [0; 32], server_to_client: [0; 32] };
        k.client_to_server.copy_from_slice(&out[..32]);
        k.server_to_client.copy_from_slice(&out[32..]);
        k
    }
}

/// The keys ready for HMAC.
#[derive(Clone)]
pub struct Keys {
    pub bytes: KeyBytes,
    pub client_to_server: hmac::Key,
    pub server_to_client: hmac::Key,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub fn new(bytes: KeyBytes) -> Keys {
        Keys {
            client_to_server: hmac::Key::new(hmac::HMAC_SHA256, &bytes.client_to_server),
            server_to_client: hmac::Key::new(hmac::HMAC_SHA256, &bytes.server_to_client),
            bytes,
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let mut out = [0u8; EXPORTER_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = i as u8;
        }
        Keys::new(KeyBytes::from_exporter(&out))
    }

    const SID: SessionId = SessionId([0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18]);

    #[test]
    fn fixture_layout_and_round_trip() {
        let k = keys();
        let c = Control { kind: Kind::Challenge, session: SID, counter: 0x0102_0304_0506_0708, echo: 0x1122_3344_5566_7788 };
        let b = c.encode(&k.server_to_client);
        assert_eq!(
            &b[..32],
            &[
                3, 1, 0, 0, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18, 0, 0, 0, 0, //
                1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
            ]
        );
        // The tag is HMAC-SHA256 of the first 32 bytes, cut to 16.
        let full = hmac::sign(&k.server_to_client, &b[..32]);
        assert_eq!(&b[32..], &full.as_ref()[..16]);
        assert_eq!(Control::parse(&b), Some(c));
        assert!(verify(&b, &k.server_to_client));
        // The other direction's key does not verify it: no reflection.
        assert!(!verify(&b, &k.client_to_server));
    }

    #[test]
    fn any_change_breaks_the_tag() {
        let k = keys();
        let b = Control { kind: Kind::Keepalive, session: SID, counter: 7, echo: 0 }.encode(&k.client_to_server);
        for i in 0..LEN {
            let mut x = b;
            x[i] ^= 0x01;
            let parsed = Control::parse(&x).is_some();
            assert!(!(parsed && verify(&x, &k.client_to_server)), "byte {i} flipped still verifies");
        }
    }

    #[test]
    fn shape_is_exact() {
        let k = keys();
        let b = Control { kind: Kind::Response, session: SID, counter: 1, echo: 9 }.encode(&k.client_to_server);
        assert!(is_control(&b));
        // one byte shorter or longer
        assert!(!is_control(&b[..LEN - 1]));
        assert!(!is_control(&[&b[..], &[0]].concat()));
        // version, the zero fields, the marker, the kind
        for (i, v) in [(1, 2u8), (2, 1), (3, 1), (12, 0x50), (13, 1), (14, 1), (15, 1), (0, 0), (0, 5)] {
            let mut x = b;
            x[i] = v;
            assert!(!is_control(&x), "byte {i} = {v:#x} accepted");
        }
        // a zero session id is never one
        let mut x = b;
        x[4..12].copy_from_slice(&[0; 8]);
        assert!(!is_control(&x));
        assert!(!verify(&b[..10], &k.client_to_server));
    }

    #[test]
    fn no_tcp_segment_is_a_control_datagram() {
        // Every 48-byte TCP segment has a data offset of 5 or more in the
        // high nibble of byte 12; the marker is 0.
        let mut seg = [0u8; LEN];
        seg[0] = 1;
        seg[1] = VERSION;
        seg[4] = 1;
        for doff in 5u8..=15 {
            for low in 0u8..16 {
                seg[12] = doff << 4 | low;
                assert!(!is_control(&seg));
            }
        }
    }

    #[test]
    fn kinds_know_their_sender() {
        assert!(Kind::Keepalive.from_client() && Kind::Response.from_client());
        assert!(!Kind::Ack.from_client() && !Kind::Challenge.from_client());
        assert_eq!(SID.to_string(), "a1b2c3d4e5f60718");
    }
}
