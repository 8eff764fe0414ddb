//! The layouts the XDP gate shares with the daemon: map keys and values, the
//! configuration record and the counter indices.
//!
//! Both sides see the same bytes, so every type is `#[repr(C)]` with explicit
//! padding and byte arrays wherever byte order matters: a field that holds a
//! packet's address or port holds the bytes exactly as they travel on the
//! wire (network byte order), so `bpftool map dump` shows them in the order a
//! human reads them (`c6 12 00 01` is 198.18.0.1) and the XDP program compares
//! them with the packet without swapping. The layouts are documented for
//! operators in `docs/xdp.md`; changing one is a user-visible change.
#![no_std]

/// Name of the XDP program in the object (and in `bpftool prog show`; the
/// kernel keeps 15 characters).
pub const PROG_NAME: &str = "udp_encap_tun";

/// Map names in the object. The kernel cuts map names at 15 characters.
pub const MAP_PEERS: &str = "UET_PEERS";
pub const MAP_CONFIG: &str = "UET_CONFIG";
pub const MAP_COUNTERS: &str = "UET_COUNTERS";

/// Key of the peer map: one allowed (IPv4 saddr, UDP sport) pair.
///
/// 8 bytes: `addr[4] port[2] pad[2]`, address and port in network byte order
/// (as in the packet), padding always zero (the kernel hashes all 8 bytes, so
/// a non-zero pad would make a different key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

impl PeerKey {
    /// `addr` and `port` are the wire bytes (network byte order).
    pub const fn new(addr: [u8; 4], port: [u8; 2]) -> Self {
        Self {
            addr,
            port,
            pad: [0; 2],
        }
    }
}

/// Value of the peer map. 4 bytes: `flags` as a native-endian (little-endian
/// on x86/arm64) u32; [`PEER_ALLOWED`] is the only bit so far. The XDP program
/// only tests whether the key exists; the value is there for operators and
/// for later use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerValue {
    pub flags: u32,
}

/// Set in [`PeerValue::flags`] for every entry the daemon inserts.
pub const PEER_ALLOWED: u32 = 1;

/// The one record of the config array map (index 0). 4 bytes:
/// `listen_port[2] enforce[1] l2_len[1]`.
///
/// A zeroed record (the state before the daemon writes it) makes the program
/// pass everything: a gate that is not configured never drops.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// The UDP port the gate guards, network byte order. `[0, 0]`: gate idle.
    pub listen_port: [u8; 2],
    /// Non-zero: drop listen-port datagrams whose (saddr, sport) is not in the
    /// peer map.
    pub enforce: u8,
    /// Bytes before the IPv4 header: [`L2_ETHERNET`] or [`L2_NONE`]; any other
    /// value makes the program pass everything.
    pub l2_len: u8,
}

/// An Ethernet header (14 bytes) precedes the IPv4 header.
pub const L2_ETHERNET: u8 = 14;
/// Raw IP device (tun, wwan in raw-ip mode): the frame starts with IPv4.
pub const L2_NONE: u8 = 0;

/// Indices into the per-CPU counter array. Every packet the program sees is
/// counted under exactly one of them.
pub mod counter {
    /// Not a listen-port IPv4 UDP datagram (or not recognisably one): passed
    /// untouched.
    pub const PASS_OTHER: u32 = 0;
    /// A well-formed listen-port datagram passed to the stack.
    pub const PASS: u32 = 1;
    /// A non-first IPv4 fragment of a UDP datagram: it has no UDP header, so
    /// its port is unknown; passed (see docs/xdp.md).
    pub const PASS_FRAGMENT: u32 = 2;
    /// Listen-port datagram whose payload is shorter than a TCP header.
    pub const DROP_SHORT: u32 = 3;
    /// The TCP data offset is below 5 words or points past the payload.
    pub const DROP_TCP_OFFSET: u32 = 4;
    /// UDP length, IPv4 total length and frame length disagree (truncated or
    /// padded datagram, UDP length below 8).
    pub const DROP_LENGTH: u32 = 5;
    /// The first fragment of a fragmented listen-port datagram.
    pub const DROP_FRAGMENT: u32 = 6;
    /// Enforcement on and (saddr, sport) not in the peer map.
    pub const DROP_UNKNOWN_PEER: u32 = 7;
    /// Number of counters (the size of the array map).
    pub const COUNT: u32 = 8;

    /// Names as the daemon prints them, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "xdp_pass_other",
        "xdp_pass",
        "xdp_pass_fragment",
        "xdp_drop_short",
        "xdp_drop_tcp_offset",
        "xdp_drop_length",
        "xdp_drop_fragment",
        "xdp_drop_unknown_peer",
    ];
}

/// Smallest TCP header: what a UDP payload must at least hold.
pub const TCP_MIN_HEADER: usize = 20;

// The layouts are part of the user interface (docs/xdp.md): fail the build if
// one changes size by accident.
const _: () = assert!(core::mem::size_of::<PeerKey>() == 8);
const _: () = assert!(core::mem::size_of::<PeerValue>() == 4);
const _: () = assert!(core::mem::size_of::<Config>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integer fields and byte arrays, no implicit
    // padding (checked by the size asserts above), every bit pattern valid.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}
