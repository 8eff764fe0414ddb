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
/// Name of the TC classifier (clsact ingress) that runs the same gate where
/// XDP cannot attach (`--xdp-mode tc`).
pub const TC_PROG_NAME: &str = "udp_encap_tc";

/// Map names in the object. The kernel cuts map names at 15 characters.
pub const MAP_PEERS: &str = "UET_PEERS";
pub const MAP_SESSIONS: &str = "UET_SESSIONS";
pub const MAP_CONFIG: &str = "UET_CONFIG";
pub const MAP_COUNTERS: &str = "UET_COUNTERS";

/// Key of the peer map: one allowed (source address, UDP source port) pair,
/// one layout for both address families.
///
/// 20 bytes: `addr[16] port[2] pad[2]`, address and port in network byte
/// order (as in the packet); an IPv4 address is stored IPv4-mapped
/// (`::ffff:a.b.c.d`, RFC 4291 section 2.5.5.2), so `00 .. 00 ff ff` and the
/// four IPv4 bytes. The padding is always zero (the kernel hashes all 20
/// bytes, so a non-zero pad would make a different key). Aligned to 4 so
/// the XDP program can build a key in five word stores.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

/// The first 12 bytes of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl PeerKey {
    /// An IPv6 peer; `addr` and `port` are the wire bytes (network byte order).
    pub const fn new(addr: [u8; 16], port: [u8; 2]) -> Self {
        Self {
            addr,
            port,
            pad: [0; 2],
        }
    }

    /// An IPv4 peer, stored IPv4-mapped; wire bytes as in [`PeerKey::new`].
    pub const fn v4(addr: [u8; 4], port: [u8; 2]) -> Self {
        let [a, b, c, d] = addr;
        Self::new([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d], port)
    }
}

/// Key of the session map: a session id as its 8 bytes travel in a control
/// datagram (bytes 4..12, see the README's wire format). The daemon inserts
/// the id of every live session, so that a client whose (address, port)
/// changed (NAT rebinding, handover) can still reach it with a control
/// datagram that proves the session.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionKey {
    pub id: [u8; 8],
}

/// Value of the session map: `flags` as in [`PeerValue`]; [`PEER_ALLOWED`]
/// is the only bit.
pub type SessionValue = PeerValue;

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
    /// Link header before the IP header: [`L2_ETHERNET`] (then up to two VLAN
    /// tags) or [`L2_NONE`]; any other value makes the program pass
    /// everything.
    pub l2_len: u8,
}

/// An Ethernet header (14 bytes, then up to two VLAN tags) precedes the IP
/// header.
pub const L2_ETHERNET: u8 = 14;
/// Raw IP device (tun, wwan in raw-ip mode, PPP): the frame starts with the
/// IP header, whose version nibble says which family.
pub const L2_NONE: u8 = 0;

/// Indices into the per-CPU counter array. Every packet the program sees is
/// counted under exactly one of them.
pub mod counter {
    /// Not a listen-port UDP datagram (or not recognisably one): passed
    /// untouched.
    pub const PASS_OTHER: u32 = 0;
    /// A well-formed listen-port datagram passed to the stack.
    pub const PASS: u32 = 1;
    /// A non-first fragment (IPv4 of a UDP datagram; IPv6 of anything): it
    /// has no UDP header, so its port is unknown; passed (see docs/xdp.md).
    pub const PASS_FRAGMENT: u32 = 2;
    /// Listen-port datagram whose payload is shorter than a TCP header.
    pub const DROP_SHORT: u32 = 3;
    /// The TCP data offset is below 5 words or points past the payload.
    pub const DROP_TCP_OFFSET: u32 = 4;
    /// UDP length, IP (total or payload) length and frame length disagree
    /// (truncated or padded datagram, UDP length below 8).
    pub const DROP_LENGTH: u32 = 5;
    /// The first fragment of a fragmented listen-port datagram (IPv4: MF set,
    /// offset 0; IPv6: a Fragment header with offset 0).
    pub const DROP_FRAGMENT: u32 = 6;
    /// Enforcement on and (saddr, sport) not in the peer map.
    pub const DROP_UNKNOWN_PEER: u32 = 7;
    /// A listen-port datagram (or an IPv6 packet whose header chain the
    /// program does not walk to its end) that would have been dropped, but
    /// is not addressed to this host (the kernel routes it on): passed
    /// untouched. A routed datagram that passes anyway keeps its pass
    /// counter: the FIB is asked only before a drop.
    pub const PASS_FORWARD: u32 = 8;
    /// A control datagram in its exact shape whose (saddr, sport) is in the
    /// peer map or whose session id is in the session map (or enforcement
    /// off): passed.
    pub const PASS_CONTROL: u32 = 9;
    /// A control datagram in its exact shape, enforcement on, neither its
    /// source nor its session known.
    pub const DROP_CONTROL: u32 = 10;
    /// An IPv6 packet for this host whose extension-header chain is longer
    /// than the program walks ([`super::IPV6_MAX_EXT_HEADERS`]): it cannot
    /// be shown not to be for the listen port.
    pub const DROP_EXT_HEADERS: u32 = 11;
    /// Number of counters (the size of the array map).
    pub const COUNT: u32 = 12;

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
        "xdp_pass_forward",
        "xdp_pass_control",
        "xdp_drop_control",
        "xdp_drop_ext_headers",
    ];
}

/// IPv6 extension headers the program walks before it gives up on a packet
/// (RFC 8200 section 4.1 orders at most six before the upper-layer header,
/// the Destination Options header being the only one that may appear twice).
pub const IPV6_MAX_EXT_HEADERS: usize = 8;

/// A control datagram (session continuity; README, "Wire format"): a UDP
/// payload of exactly this many bytes.
pub const CONTROL_LEN: usize = 48;
/// Byte 1 of a control datagram.
pub const CONTROL_VERSION: u8 = 1;
/// Byte 0 (kind) of a control datagram: keepalive, ack, challenge, response.
pub const CONTROL_KIND_MIN: u8 = 1;
pub const CONTROL_KIND_MAX: u8 = 4;

/// Smallest TCP header: what a UDP payload must at least hold.
pub const TCP_MIN_HEADER: usize = 20;

// The layouts are part of the user interface (docs/xdp.md): fail the build if
// one changes size by accident.
const _: () = assert!(core::mem::size_of::<PeerKey>() == 20);
const _: () = assert!(core::mem::size_of::<SessionKey>() == 8);
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
    unsafe impl aya::Pod for super::SessionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}
