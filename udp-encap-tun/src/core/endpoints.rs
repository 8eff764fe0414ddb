//! Client: where the datagrams for a server go (SPEC decision 12).
//!
//! The kernel routes an IPv4 destination into the TUN; the datagrams for it
//! go to that address on `--endpoint-port`, or, on an IPv6 uplink, to the
//! IPv6 address `--endpoint-v6 SERVER4=SERVER6` names for it, or to the
//! IPv4 address embedded in `--nat64-prefix PREFIX/96` (RFC 6052 section
//! 2.2: the last 32 bits), so that a carrier's NAT64 reaches an IPv4-only
//! server. Pure: a lookup both ways.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::mtu::Families;

#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    port: u16,
    map: HashMap<Ipv4Addr, Ipv6Addr>,
    back: HashMap<Ipv6Addr, Ipv4Addr>,
    /// The first 96 bits of a NAT64 prefix.
    nat64: Option<[u8; 12]>,
}

impl Endpoints {
    /// `map`: explicit IPv6 addresses of servers; `nat64`: a /96 prefix
    /// (its last 32 bits are ignored).
    pub fn new(port: u16, map: &[(Ipv4Addr, Ipv6Addr)], nat64: Option<Ipv6Addr>) -> Endpoints {
        let nat64 = nat64.and_then(|p| p.octets().get(..12).and_then(|b| <[u8; 12]>::try_from(b).ok()));
        Endpoints {
            port,
            map: map.iter().copied().collect(),
            back: map.iter().map(|&(v4, v6)| (v6, v4)).collect(),
            nat64,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether any server is reached over IPv6.
    pub fn uses_ipv6(&self) -> bool {
        !self.map.is_empty() || self.nat64.is_some()
    }

    /// The families the client's socket needs: with a NAT64 prefix every
    /// server is reached over IPv6; with explicit addresses only, the
    /// others stay IPv4.
    pub fn families(&self) -> Families {
        match (self.nat64.is_some(), self.map.is_empty()) {
            (true, _) => Families::V6,
            (false, false) => Families::Both,
            (false, true) => Families::V4,
        }
    }

    /// Where the datagrams for `server` go.
    pub fn path(&self, server: Ipv4Addr) -> SocketAddr {
        if let Some(v6) = self.map.get(&server) {
            return SocketAddr::new(IpAddr::V6(*v6), self.port);
        }
        if let Some(p) = self.nat64 {
            let mut b = [0u8; 16];
            let (head, tail) = b.split_at_mut(12);
            head.copy_from_slice(&p);
            tail.copy_from_slice(&server.octets());
            return SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), self.port);
        }
        SocketAddr::new(IpAddr::V4(server), self.port)
    }

    /// The server (its IPv4 address) whose datagrams come from `src`, if
    /// `src` is where [`Endpoints::path`] sends for some server.
    pub fn server_of(&self, src: SocketAddr) -> Option<Ipv4Addr> {
        if src.port() != self.port {
            return None;
        }
        let server = match src.ip() {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match self.back.get(&v6) {
                Some(v4) => *v4,
                None => {
                    let o = v6.octets();
                    let (head, tail) = o.split_at(12);
                    if self.nat64.is_none_or(|p| p != head) {
                        return None;
                    }
                    Ipv4Addr::new(*tail.first()?, *tail.get(1)?, *tail.get(2)?, *tail.get(3)?)
                }
            },
        };
        (self.path(server) == src).then_some(server)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_both_ways() {
        let s4: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let other: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let e = Endpoints::new(12345, &[], None);
        assert!(!e.uses_ipv6());
        assert_eq!(e.families(), Families::V4);
        assert_eq!(e.path(s4), "192.0.2.1:12345".parse().unwrap());
        assert_eq!(e.server_of("192.0.2.1:12345".parse().unwrap()), Some(s4));
        assert_eq!(e.server_of("192.0.2.1:999".parse().unwrap()), None);
        assert_eq!(e.server_of("[2001:db8::1]:12345".parse().unwrap()), None);

        // An explicit IPv6 address for one server; the others stay IPv4.
        let e = Endpoints::new(12345, &[(s4, "2001:db8::10".parse().unwrap())], None);
        assert!(e.uses_ipv6());
        assert_eq!(e.families(), Families::Both, "the other servers stay IPv4");
        assert_eq!(e.path(s4), "[2001:db8::10]:12345".parse().unwrap());
        assert_eq!(e.path(other), "198.18.0.1:12345".parse().unwrap());
        assert_eq!(e.server_of("[2001:db8::10]:12345".parse().unwrap()), Some(s4));
        assert_eq!(e.server_of("192.0.2.1:12345".parse().unwrap()), None, "it has moved to IPv6");

        // RFC 6052: 192.0.2.1 in 2001:db8:64::/96 is 2001:db8:64::c000:201.
        let e = Endpoints::new(12345, &[], Some("2001:db8:64::".parse().unwrap()));
        assert_eq!(e.families(), Families::V6, "every server through the prefix");
        assert_eq!(e.path(s4), "[2001:db8:64::c000:201]:12345".parse().unwrap());
        assert_eq!(e.server_of("[2001:db8:64::c000:201]:12345".parse().unwrap()), Some(s4));
        assert_eq!(e.server_of("[2001:db8:65::c000:201]:12345".parse().unwrap()), None);
        // The RFC's own example: 192.0.2.33 in 64:ff9b::/96.
        let wk = Endpoints::new(1, &[], Some("64:ff9b::".parse().unwrap()));
        assert_eq!(wk.path("192.0.2.33".parse().unwrap()), "[64:ff9b::c000:221]:1".parse().unwrap());
    }
}
