//! The authentication exchange that runs inside TLS 1.3. Pure encoding and
//! decoding plus two bounded async readers; no sockets of its own.
//!
//! After the TLS handshake (the client has verified the server), the client
//! sends one *hello* and the server answers with one *reply* and closes:
//!
//! ```text
//! hello (client -> server), 43..=106 bytes
//!   offset   size    field
//!   0        1       version       = 2
//!   1        1       id_len        1..=64
//!   2        id_len  id            ASCII [A-Za-z0-9._-], first char alphanumeric
//!   2+id_len 32      secret        the client's 256-bit random secret
//!   34+id_len 8      resume        the session the client held with this
//!                                  server before (its address is kept if
//!                                  the server still has it); zero: none
//!
//! reply (server -> client), always 19 bytes
//!   0       1       version       = 2
//!   1       1       status        0 granted, 1 bad credential, 2 pool full,
//!                                 3 unavailable, 4 unsupported version,
//!                                 5 malformed hello, 6 this client holds
//!                                 --max-entries-per-client sessions already
//!   2       4       lease_ms      big endian; 0 unless granted
//!   6       4       address       the IPv4 address the server gave the peer;
//!                                 0.0.0.0 unless granted
//!   10      8       session       the session id; zero unless granted
//!   18      1       flags         bit 0: the session already has its UDP
//!                                 path (a resumed one); other bits zero
//! ```
//!
//! Both sides then take the session's two keys from the TLS exporter (RFC
//! 8446 section 7.5) with the label [`crate::core::session::wire::EXPORTER_LABEL`]
//! and the session id as context: they never cross the network.
//!
//! Every length is checked before it is used and every read is of a fixed,
//! small size, so a peer cannot make either side allocate or wait for more
//! than 106 bytes.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::Refused;
use crate::core::session::SessionId;

pub const VERSION: u8 = 2;
pub const SECRET_LEN: usize = 32;
pub const MAX_ID_LEN: usize = 64;
pub const RESUME_LEN: usize = 8;
pub const REPLY_LEN: usize = 19;
/// Reply flag: the session already has its UDP path.
pub const FLAG_BOUND: u8 = 1;
/// ALPN protocol id offered by the client and required by the server, so a
/// stray TLS client (a browser, a scanner) fails at the handshake.
pub const ALPN: &[u8] = b"udp-encap-tun/1";

/// Why bytes from the peer are not a valid hello or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unsupported protocol version {0} (this build speaks version {VERSION})")]
    Version(u8),
    #[error("client id length {0} is outside 1..={MAX_ID_LEN}")]
    IdLength(usize),
    #[error("client id contains characters outside [A-Za-z0-9._-]")]
    IdChars,
    #[error("unknown reply status {0}")]
    Status(u8),
    #[error("the peer closed the connection after {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("reading from the peer failed: {0}")]
    Io(String),
}

/// A client id: 1..=64 characters of `[A-Za-z0-9._-]`, starting with a letter
/// or digit (so it can never look like a comment or an option in the files).
pub fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b.first().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub id: String,
    pub secret: [u8; SECRET_LEN],
    /// The session to take over, if any.
    pub resume: Option<SessionId>,
}

/// The secret never reaches a log line or a panic message.
impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("resume", &self.resume)
            .finish()
    }
}

impl Hello {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if !valid_id(&self.id) {
            return Err(if self.id.is_empty() || self.id.len() > MAX_ID_LEN {
                ProtoError::IdLength(self.id.len())
            } else {
                ProtoError::IdChars
            });
        }
        let mut out = Vec::with_capacity(2 + self.id.len() + SECRET_LEN + RESUME_LEN);
        out.push(VERSION);
        // valid_id bounds the length to 64, so the cast cannot truncate.
        out.push(self.id.len() as u8);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.secret);
        out.extend_from_slice(&self.resume.map_or([0; RESUME_LEN], |s| s.0));
        Ok(out)
    }

    /// Checks the two header bytes; returns how many id bytes follow.
    pub fn parse_header(h: [u8; 2]) -> Result<usize, ProtoError> {
        let [version, id_len] = h;
        if version != VERSION {
            return Err(ProtoError::Version(version));
        }
        let id_len = usize::from(id_len);
        if id_len == 0 || id_len > MAX_ID_LEN {
            return Err(ProtoError::IdLength(id_len));
        }
        Ok(id_len)
    }

    /// Builds a hello from the id bytes, the secret and the resume field
    /// (header already checked).
    pub fn from_parts(id: &[u8], secret: [u8; SECRET_LEN], resume: [u8; RESUME_LEN]) -> Result<Hello, ProtoError> {
        let id = std::str::from_utf8(id).map_err(|_| ProtoError::IdChars)?;
        if !valid_id(id) {
            return Err(ProtoError::IdChars);
        }
        let resume = Some(SessionId(resume)).filter(|s| !s.is_zero());
        Ok(Hello {
            id: id.to_string(),
            secret,
            resume,
        })
    }

    /// Parses a complete hello held in memory (used by tests and tools).
    pub fn decode(b: &[u8]) -> Result<Hello, ProtoError> {
        let want_hdr = 2;
        let (hdr, rest) = b.split_first_chunk::<2>().ok_or(ProtoError::Truncated {
            got: b.len(),
            want: want_hdr,
        })?;
        let id_len = Self::parse_header(*hdr)?;
        let want = 2 + id_len + SECRET_LEN + RESUME_LEN;
        let (id, rest) = rest
            .split_at_checked(id_len)
            .ok_or(ProtoError::Truncated { got: b.len(), want })?;
        let (secret, rest) = rest
            .split_first_chunk::<SECRET_LEN>()
            .ok_or(ProtoError::Truncated { got: b.len(), want })?;
        let (resume, _) = rest
            .split_first_chunk::<RESUME_LEN>()
            .ok_or(ProtoError::Truncated { got: b.len(), want })?;
        Self::from_parts(id, *secret, *resume)
    }

    /// Reads one hello: at most 106 bytes, in three fixed-size reads.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, ProtoError> {
        let mut hdr = [0u8; 2];
        read_exact(r, &mut hdr).await?;
        let id_len = Self::parse_header(hdr)?;
        let mut id = [0u8; MAX_ID_LEN];
        let id = id.get_mut(..id_len).ok_or(ProtoError::IdLength(id_len))?;
        read_exact(r, id).await?;
        let mut tail = [0u8; SECRET_LEN + RESUME_LEN];
        read_exact(r, &mut tail).await?;
        let (secret, resume) = tail.split_at(SECRET_LEN);
        let secret: [u8; SECRET_LEN] = secret.try_into().map_err(|_| ProtoError::IdLength(id_len))?;
        let resume: [u8; RESUME_LEN] = resume.try_into().map_err(|_| ProtoError::IdLength(id_len))?;
        Self::from_parts(id, secret, resume)
    }
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Granted {
        lease: Duration,
        addr: Ipv4Addr,
        session: SessionId,
        /// The session already has its UDP path (resumed).
        bound: bool,
    },
    Refused(Refused),
    /// The hello's version is not ours (the client learns which one we speak
    /// from the reply's version byte).
    UnsupportedVersion,
    Malformed,
}

impl Reply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let none = (0, Ipv4Addr::UNSPECIFIED, [0; 8], 0);
        let (status, (lease_ms, addr, session, flags)) = match self {
            // Leases longer than u32::MAX ms (49 days) are sent as that.
            Reply::Granted { lease, addr, session, bound } => (
                0,
                (u32::try_from(lease.as_millis()).unwrap_or(u32::MAX), *addr, session.0, if *bound { FLAG_BOUND } else { 0 }),
            ),
            Reply::Refused(Refused::BadCredential) => (1, none),
            Reply::Refused(Refused::PoolFull) => (2, none),
            Reply::Refused(Refused::Unavailable) => (3, none),
            Reply::UnsupportedVersion => (4, none),
            Reply::Malformed => (5, none),
            Reply::Refused(Refused::ClientLimit) => (6, none),
        };
        let mut b = [0u8; REPLY_LEN];
        let parts: [&[u8]; 5] = [&[VERSION, status], &lease_ms.to_be_bytes(), &addr.octets(), &session, &[flags]];
        let mut at = 0;
        for p in parts {
            if let Some(dst) = b.get_mut(at..at + p.len()) {
                dst.copy_from_slice(p);
            }
            at += p.len();
        }
        b
    }

    pub fn decode(b: [u8; REPLY_LEN]) -> Result<Reply, ProtoError> {
        let [version, status, l0, l1, l2, l3, a0, a1, a2, a3, s0, s1, s2, s3, s4, s5, s6, s7, flags] = b;
        if version != VERSION {
            return Err(ProtoError::Version(version));
        }
        Ok(match status {
            0 => {
                let session = SessionId([s0, s1, s2, s3, s4, s5, s6, s7]);
                if session.is_zero() || flags & !FLAG_BOUND != 0 {
                    return Err(ProtoError::Status(status));
                }
                Reply::Granted {
                    lease: Duration::from_millis(u64::from(u32::from_be_bytes([l0, l1, l2, l3]))),
                    addr: Ipv4Addr::new(a0, a1, a2, a3),
                    session,
                    bound: flags & FLAG_BOUND != 0,
                }
            }
            1 => Reply::Refused(Refused::BadCredential),
            2 => Reply::Refused(Refused::PoolFull),
            3 => Reply::Refused(Refused::Unavailable),
            4 => Reply::UnsupportedVersion,
            5 => Reply::Malformed,
            6 => Reply::Refused(Refused::ClientLimit),
            s => return Err(ProtoError::Status(s)),
        })
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Reply, ProtoError> {
        let mut b = [0u8; REPLY_LEN];
        read_exact(r, &mut b).await?;
        Self::decode(b)
    }
}

/// `read_exact` that reports how far it got (a peer closing early is common
/// and worth a precise log line).
async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtoError> {
    let want = buf.len();
    let mut got = 0;
    while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
        match r.read(rest).await {
            Ok(0) => return Err(ProtoError::Truncated { got, want }),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtoError::Truncated { got, want });
            }
            Err(e) => return Err(ProtoError::Io(e.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7; 32];

    #[test]
    fn debug_output_does_not_show_the_secret() {
        let secret: [u8; 32] = std::array::from_fn(|i| 0xa0 + i as u8);
        let h = Hello { id: "alice".into(), secret, resume: None };
        for text in [format!("{h:?}"), format!("{h:#?}")] {
            assert!(text.contains("alice") && text.contains("redacted"), "{text}");
            // Neither the bytes as Debug prints them nor as hex.
            assert!(!text.contains("160") && !text.contains("161, 162"), "{text}");
            assert!(!text.contains("a0a1a2"), "{text}");
        }
    }

    #[test]
    fn hello_round_trip_and_fixture() {
        let h = Hello {
            id: "alice".into(),
            secret: SECRET,
            resume: None,
        };
        let b = h.encode().expect("valid");
        assert_eq!(b.len(), 2 + 5 + 32 + 8);
        assert_eq!(b.get(..7), Some(&[2, 5, b'a', b'l', b'i', b'c', b'e'][..]));
        assert_eq!(b.get(39..), Some(&[0u8; 8][..]));
        assert_eq!(Hello::decode(&b), Ok(h.clone()));
        let r = Hello { id: "bob".into(), secret: SECRET, resume: Some(SessionId([9, 8, 7, 6, 5, 4, 3, 2])) };
        let b = r.encode().expect("valid");
        assert_eq!(b.get(37..), Some(&[9, 8, 7, 6, 5, 4, 3, 2][..]));
        assert_eq!(Hello::decode(&b), Ok(r));
        // The secret never shows in a log line.
        let shown = format!("{h:?}");
        assert!(!shown.contains("7, 7") && shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn hello_rejects_bad_input() {
        assert_eq!(
            Hello::decode(&[]),
            Err(ProtoError::Truncated { got: 0, want: 2 })
        );
        assert_eq!(Hello::decode(&[1, 5]), Err(ProtoError::Version(1)), "version 1 is refused");
        assert_eq!(Hello::decode(&[2, 0]), Err(ProtoError::IdLength(0)));
        assert_eq!(Hello::decode(&[2, 65]), Err(ProtoError::IdLength(65)));
        assert!(matches!(
            Hello::decode(&[2, 3, b'a', b'b']),
            Err(ProtoError::Truncated { .. })
        ));
        let mut b = vec![2, 3, b'a', b' ', b'b'];
        b.extend_from_slice(&SECRET);
        b.extend_from_slice(&[0; 8]);
        assert_eq!(Hello::decode(&b), Err(ProtoError::IdChars));
        let mut b = vec![2, 2, 0xff, 0xfe];
        b.extend_from_slice(&SECRET);
        b.extend_from_slice(&[0; 8]);
        assert_eq!(Hello::decode(&b), Err(ProtoError::IdChars));
        // Without its resume field: truncated.
        let mut b = vec![2, 1, b'a'];
        b.extend_from_slice(&SECRET);
        assert!(matches!(Hello::decode(&b), Err(ProtoError::Truncated { .. })));
        assert!(
            Hello {
                id: "#x".into(),
                secret: SECRET,
                resume: None,
            }
            .encode()
            .is_err()
        );
        assert!(
            Hello {
                id: "x".repeat(65),
                secret: SECRET,
                resume: None,
            }
            .encode()
            .is_err()
        );
    }

    #[test]
    fn reply_round_trip_and_fixture() {
        let g = Reply::Granted {
            lease: Duration::from_secs(300),
            addr: Ipv4Addr::new(198, 18, 2, 3),
            session: SessionId([0xa0, 1, 2, 3, 4, 5, 6, 7]),
            bound: true,
        };
        let b = g.encode();
        assert_eq!(b, [2, 0, 0, 0x04, 0x93, 0xe0, 198, 18, 2, 3, 0xa0, 1, 2, 3, 4, 5, 6, 7, 1]);
        assert_eq!(Reply::decode(b), Ok(g));
        for r in [
            Reply::Refused(Refused::BadCredential),
            Reply::Refused(Refused::PoolFull),
            Reply::Refused(Refused::Unavailable),
            Reply::Refused(Refused::ClientLimit),
            Reply::UnsupportedVersion,
            Reply::Malformed,
        ] {
            assert_eq!(Reply::decode(r.encode()), Ok(r));
        }
        let mut bad = [0u8; REPLY_LEN];
        bad[0] = 2;
        bad[1] = 9;
        assert_eq!(Reply::decode(bad), Err(ProtoError::Status(9)));
        bad[1] = 0;
        assert_eq!(Reply::decode(bad), Err(ProtoError::Status(0)), "granted without a session id");
        let mut odd = b;
        odd[18] = 0x81;
        assert_eq!(Reply::decode(odd), Err(ProtoError::Status(0)), "unknown flags");
        bad[0] = 1;
        assert_eq!(Reply::decode(bad), Err(ProtoError::Version(1)));
        let huge = Reply::Granted {
            lease: Duration::from_secs(u64::MAX / 4),
            addr: Ipv4Addr::LOCALHOST,
            session: SessionId([1; 8]),
            bound: false,
        };
        assert_eq!(huge.encode().get(2..6), Some(&[0xff; 4][..]));
    }

    #[tokio::test]
    async fn readers_are_bounded_and_report_truncation() {
        let mut b = Hello {
            id: "bob".into(),
            secret: SECRET,
            resume: None,
        }
        .encode()
        .expect("valid");
        b.extend_from_slice(b"trailing bytes are left unread");
        let mut r = &b[..];
        assert_eq!(
            Hello::read(&mut r).await.map(|h| h.id),
            Ok("bob".to_string())
        );
        assert_eq!(r, b"trailing bytes are left unread");
        let mut r = &[2u8, 3, b'b'][..];
        assert_eq!(
            Hello::read(&mut r).await,
            Err(ProtoError::Truncated { got: 1, want: 3 })
        );
        let mut r = &[1u8, 0, 0][..];
        assert_eq!(
            Reply::read(&mut r).await,
            Err(ProtoError::Truncated { got: 3, want: REPLY_LEN })
        );
    }
}
