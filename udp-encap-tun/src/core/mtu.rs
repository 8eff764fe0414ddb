//! What fits a path, per address family of the outer header (SPEC decisions
//! 6 and 12). Pure arithmetic.
//!
//! A datagram carries the TCP segment without its inner IPv4 header, so an
//! inner IPv4 packet of `n` bytes crosses as `n - 20 + 8` bytes of UDP
//! under an outer IPv4 (20) or IPv6 (40) header: it fits an uplink of MTU
//! `m` when `n <= m - 8` over IPv4 and `n <= m - 28` over IPv6. The MSS
//! clamp is that inner packet minus 40 (TCP and IPv4 headers): `m - 48`
//! over IPv4, `m - 68` over IPv6, both capped by the TUN MTU.

/// The outer headers of a datagram: IPv4 + UDP.
pub const OUTER_V4: u32 = 20 + 8;
/// IPv6 + UDP: 20 bytes more than over IPv4.
pub const OUTER_V6: u32 = 40 + 8;
/// The inner IPv4 header, rebuilt by the receiver, never on the wire.
const INNER_IPV4: u32 = 20;
/// TCP/IPv4 headers without options: what the MSS leaves out of the MTU.
const TCP_IP_HEADERS: u16 = 40;
/// The least MSS any IPv4 host takes (RFC 9293 3.7.1): never clamp below it.
const MIN_MSS: u16 = 536;

/// Which outer families a daemon's socket carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    V4,
    V6,
    /// A dual-stack socket: IPv4 peers arrive IPv4-mapped.
    Both,
}

impl Families {
    pub fn v4(self) -> bool {
        matches!(self, Families::V4 | Families::Both)
    }

    pub fn v6(self) -> bool {
        matches!(self, Families::V6 | Families::Both)
    }
}

/// The largest inner IPv4 packet a path carries, per outer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathMtu {
    pub v4: u16,
    pub v6: u16,
}

impl PathMtu {
    /// min(TUN MTU, uplink MTU - outer headers + inner IPv4 header).
    pub fn new(tun_mtu: u32, uplink_mtu: u32) -> PathMtu {
        let fit = |outer: u32| {
            let m = tun_mtu.min(uplink_mtu.saturating_add(INNER_IPV4).saturating_sub(outer));
            u16::try_from(m).unwrap_or(u16::MAX)
        };
        PathMtu { v4: fit(OUTER_V4), v6: fit(OUTER_V6) }
    }

    /// The MSS clamp of paths over IPv4 and over IPv6.
    pub fn max_mss(self) -> MaxMss {
        let mss = |m: u16| m.saturating_sub(TCP_IP_HEADERS).max(MIN_MSS);
        MaxMss { v4: mss(self.v4), v6: mss(self.v6) }
    }

    /// The largest inner packet over the families in use: what the TUN's
    /// super-segments must be cut for. Segments of a smaller path (IPv6)
    /// are shorter, so a train cut for this one fits them too.
    pub fn largest(self, families: Families) -> u16 {
        match families {
            Families::V4 => self.v4,
            Families::V6 => self.v6,
            Families::Both => self.v4.max(self.v6),
        }
    }
}

/// The MSS clamp per outer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxMss {
    pub v4: u16,
    pub v6: u16,
}

impl MaxMss {
    /// The clamp for a peer (or a server path) at `peer`: one comparison.
    #[inline]
    pub fn for_peer(self, peer: &std::net::SocketAddr) -> u16 {
        if peer.is_ipv6() { self.v6 } else { self.v4 }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_paths_carry_20_bytes_less() {
        // A 1500-byte uplink and a TUN at 1492 (uplink - 8): IPv4 paths
        // carry the full TUN MTU, IPv6 paths 20 bytes less.
        let p = PathMtu::new(1492, 1500);
        assert_eq!(p, PathMtu { v4: 1492, v6: 1472 });
        assert_eq!(p.max_mss(), MaxMss { v4: 1452, v6: 1432 });
        // The usual TUN of 1400 fits both: the TUN caps them.
        let p = PathMtu::new(1400, 1500);
        assert_eq!(p, PathMtu { v4: 1400, v6: 1400 });
        assert_eq!(p.max_mss(), MaxMss { v4: 1360, v6: 1360 });
        // A TUN too large for the uplink: each family gets what fits.
        let p = PathMtu::new(1500, 1420);
        assert_eq!(p.max_mss(), MaxMss { v4: 1420 - 48, v6: 1420 - 68 });
        // Never below 536, never an underflow.
        assert_eq!(PathMtu::new(1400, 100).max_mss(), MaxMss { v4: 536, v6: 536 });
        assert_eq!(PathMtu::new(0, 0), PathMtu { v4: 0, v6: 0 });
    }

    #[test]
    fn a_full_segment_fits_the_uplink_in_each_family() {
        for uplink in [1280u32, 1420, 1500, 9000] {
            let mss = PathMtu::new(65_535, uplink).max_mss();
            // Outer header + UDP + TCP header (20) + MSS bytes of payload.
            assert_eq!(OUTER_V4 + 20 + u32::from(mss.v4), uplink);
            assert_eq!(OUTER_V6 + 20 + u32::from(mss.v6), uplink);
        }
    }

    #[test]
    fn clamp_follows_the_peer_family() {
        let m = MaxMss { v4: 1452, v6: 1432 };
        assert_eq!(m.for_peer(&"192.0.2.2:40000".parse().unwrap()), 1452);
        assert_eq!(m.for_peer(&"[2001:db8::2]:40000".parse().unwrap()), 1432);
    }

    #[test]
    fn super_segments_are_cut_for_the_largest_path_in_use() {
        let p = PathMtu::new(1492, 1500);
        assert_eq!(p.largest(Families::V4), 1492);
        assert_eq!(p.largest(Families::V6), 1472);
        assert_eq!(p.largest(Families::Both), 1492);
        assert!(Families::Both.v4() && Families::Both.v6());
        assert!(!Families::V6.v4() && !Families::V4.v6());
    }
}
