//! Session continuity (SPEC decision 11): what keeps a client's TCP
//! connections alive through NAT rebinding, address changes, NATs that map
//! TCP and UDP apart, idle NAT timeouts and daemon restarts.
//!
//! The TLS authentication ([`crate::auth`]) ends in a *session*: an id the
//! server picked and two keys both sides took from the TLS exporter, never
//! sent. From then on the client proves itself over UDP with small control
//! datagrams ([`wire`]), and the server learns the client's UDP path from
//! those, not from the TCP connection of the authentication:
//!
//! - the client sends a keepalive after `--keepalive` without hearing from
//!   the server, and when its lease needs refreshing; the server answers on
//!   the session's current path, which keeps NAT mappings open and tells a
//!   client that hears nothing for a few intervals to authenticate again;
//! - a proven keepalive from a new (address, port) makes the server
//!   challenge that path with a random nonce; only a client that holds the
//!   key and receives on that path can answer; then the session moves
//!   there, keeping its generated address (path validation, as QUIC does in
//!   RFC 9000 section 9). A copy, replay or forgery from elsewhere moves
//!   nothing: the tag needs the key, the counter only goes up, and a
//!   challenge is abandoned when the current path is heard from meanwhile
//!   (the client is still there).
//!
//! Pure like the rest of [`crate::core`]: `now`, nonces and the starting
//! counter are arguments. [`server`] and [`client`] hold each side's table;
//! the [`crate::core::Core`] drives them and keeps the gate in step.

pub mod client;
pub mod server;
pub mod wire;

pub use wire::{KeyBytes, Keys, SessionId};

/// Why a control datagram was refused (each is counted under
/// `discard_control`; the daemon logs them rate limited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not the shape of a control datagram, or a kind this side never
    /// receives.
    Kind,
    /// No session with that id here.
    UnknownSession,
    /// The tag is not the session's: a forgery, or a corrupt datagram.
    Tag,
    /// The counter is not above the last one accepted: a copy or a replay.
    Replay,
    /// Client: from an address that is not the server's.
    Path,
    /// Server: a response to no challenge of ours, or from another path.
    NoChallenge,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Kind => "not a control datagram this side accepts",
            Refused::UnknownSession => "unknown session",
            Refused::Tag => "wrong tag (forged or corrupt)",
            Refused::Replay => "counter not fresh (a copy or a replay)",
            Refused::Path => "not from the server's address",
            Refused::NoChallenge => "a response to no challenge of ours",
        }
    }
}
