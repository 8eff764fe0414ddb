//! A server `Core` and a client `Core`, each with a small fake peer gate,
//! driven by a sequence of operations decoded from the input: packets from
//! the TUN, datagrams from any source with any length, admissions, expiry
//! as time advances, leases, and packets carried end to end.
//!
//! After every step: the store (server) or the leases (client) and the gate
//! hold the same peers; a datagram `from_udp` accepted is an IPv4 packet
//! `parse_ipv4_tcp` accepts, with a valid header checksum, the core's TUN
//! address as destination and the peer's address as source; a segment with
//! a valid TCP checksum carried end to end arrives with a valid one.
//!
//! Input format (so seeds can be written by hand, see fuzz/seeds):
//! 4 setup bytes [flags, server gate capacity, client gate capacity, MTU
//! selector], then operations, each a tag byte and its fields (`Op`).
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udp_encap_tun::core::{Core, FromTun, FromTunSuper, GateFull, HEADROOM, PeerGate};
use udp_encap_tun::store::{ConnectionStore, Pool};
use udp_encap_tun::wire;
use udp_encap_tun_fuzz::{fill_tcp_checksum, ipv4_header_valid, tcp_checksum_valid};

const SERVER_TUN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_TUN: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const ENDPOINT_PORT: u16 = 4500;
const MAX_OPS: usize = 64;

/// The XDP map, as a set with a capacity.
struct FakeGate {
    allowed: HashSet<SocketAddrV4>,
    capacity: usize,
}

impl PeerGate for FakeGate {
    fn allow(&mut self, peer: SocketAddrV4) -> Result<(), GateFull> {
        if self.allowed.len() >= self.capacity && !self.allowed.contains(&peer) {
            return Err(GateFull);
        }
        self.allowed.insert(peer);
        Ok(())
    }
    fn revoke(&mut self, peer: SocketAddrV4) {
        self.allowed.remove(&peer);
    }
}

/// Reads the input front to back; runs dry as zeros / empty.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// A 2-byte length, then that many bytes (or what is left).
    fn bytes(&mut self) -> Vec<u8> {
        let n = usize::from(self.u16()).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
    /// A peer of the server: one of 8 addresses, 4 ports.
    fn client_peer(&mut self) -> SocketAddrV4 {
        let b = self.u8();
        SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1 + (b & 7)), 1000 + u16::from(b >> 3 & 3))
    }
    /// A source of datagrams to the client: one of 4 server addresses, on
    /// the endpoint port or another one.
    fn server_peer(&mut self) -> SocketAddrV4 {
        let b = self.u8();
        let port = if b & 0x10 == 0 { ENDPOINT_PORT } else { 1000 + u16::from(b >> 5) };
        SocketAddrV4::new(server_real(b), port)
    }
}

fn server_real(b: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 1 + (b & 3))
}

/// An address of the server's pool (198.18.0.0/28), or just outside it.
fn pool_addr(b: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, b & 0x1f)
}

/// Makes `pkt` an IPv4 TCP packet from `src` to `dst` with a valid header
/// (when long enough), and a valid TCP checksum if `fix_tcp`.
fn fix_packet(pkt: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, fix_tcp: bool) {
    if pkt.len() < 40 {
        return;
    }
    let total = u16::try_from(pkt.len()).unwrap_or(u16::MAX);
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&total.to_be_bytes());
    pkt[6] &= 0x40;
    pkt[7] = 0;
    pkt[9] = wire::PROTO_TCP;
    pkt[12..16].copy_from_slice(&src.octets());
    pkt[16..20].copy_from_slice(&dst.octets());
    let doff = pkt[32] >> 4;
    if doff < 5 || usize::from(doff) * 4 > usize::from(total) - 20 {
        pkt[32] = 0x50 | (pkt[32] & 0x0f);
    }
    if fix_tcp {
        fill_tcp_checksum(src, dst, &mut pkt[20..usize::from(total)]);
    }
}

/// A receive buffer: headroom, then the datagram.
fn datagram(payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; HEADROOM];
    b.extend_from_slice(payload);
    b
}

struct World {
    server: Core,
    client: Core,
    sgate: FakeGate,
    cgate: FakeGate,
    now: Instant,
    expired: Vec<udp_encap_tun::store::Entry>,
}

impl World {
    /// The store and the server's gate hold the same peers; the client's
    /// leases and its gate hold the same servers.
    fn check(&self) {
        let store = self.server.store().expect("server core has a store");
        let in_store: HashSet<SocketAddrV4> = store.entries().map(|e| e.peer).collect();
        assert_eq!(in_store, self.sgate.allowed, "server store and gate disagree");
        assert_eq!(store.len(), in_store.len());
        for e in store.entries() {
            assert_eq!(store.by_peer(e.peer), Some(e.addr));
            assert_eq!(store.by_addr(e.addr), Some(e.peer));
            assert!(store.pool().contains(e.addr) && e.addr != SERVER_TUN, "{} outside the pool", e.addr);
        }
        let leased: HashSet<SocketAddrV4> =
            self.client.leases().iter().map(|(s, _)| SocketAddrV4::new(*s, ENDPOINT_PORT)).collect();
        assert_eq!(leased, self.cgate.allowed, "client leases and gate disagree");
        assert!(self.client.store().is_none());
    }

    /// Core::from_udp on `core`, checking what it hands the TUN. Returns the packet.
    fn receive(&mut self, to_server: bool, src: SocketAddrV4, payload: &[u8], len: usize) -> Option<Vec<u8>> {
        let mut buf = datagram(payload);
        let (core, gate) = if to_server {
            (&mut self.server, &mut self.sgate)
        } else {
            (&mut self.client, &mut self.cgate)
        };
        let r = core.from_udp(src, &mut buf, len, self.now, gate).ok()?;
        assert_eq!(r, 0..HEADROOM + len, "from_udp's packet is not headroom + datagram");
        let pkt = &buf[r];
        let t = wire::parse_ipv4_tcp(pkt).expect("from_udp produced a packet parse_ipv4_tcp refuses");
        assert!(ipv4_header_valid(pkt), "from_udp produced a bad IPv4 header checksum");
        assert_eq!(t.segment, HEADROOM..pkt.len());
        assert_eq!(t.dst, core.tun_addr());
        let expect_src = match core.store() {
            Some(store) => store.by_peer(src).expect("from_udp accepted a peer without an entry"),
            None => *src.ip(),
        };
        assert_eq!(t.src, expect_src);
        Some(pkt.to_vec())
    }

    /// accept_train on `core`: the accepted ranges are whole datagrams of
    /// the train in order, and the source is the peer's inner address.
    fn accept_train(&mut self, to_server: bool, src: SocketAddrV4, mut train: Vec<u8>, stride: usize) {
        let (core, gate) = if to_server {
            (&mut self.server, &mut self.sgate)
        } else {
            (&mut self.client, &mut self.cgate)
        };
        let mut accepted = Vec::new();
        let inner = core.accept_train(src, &mut train, stride, self.now, gate, &mut accepted);
        assert_eq!(inner.is_some(), !accepted.is_empty());
        let mut prev_end = 0;
        for r in &accepted {
            assert!(r.start >= prev_end && r.end <= train.len() && r.start < r.end, "bad range {r:?}");
            assert_eq!(r.start % stride.max(1), 0, "range {r:?} not on a datagram boundary");
            prev_end = r.end;
        }
        if let Some(inner) = inner {
            let expect = match core.store() {
                Some(store) => store.by_peer(src).expect("accept_train accepted a peer without an entry"),
                None => *src.ip(),
            };
            assert_eq!(inner, expect);
        }
    }

    fn step(&mut self, op: u8, inp: &mut Input<'_>) {
        match op % 10 {
            // A packet from the server's TUN, optionally made to look right
            // and sent to a pool address.
            0 => {
                let mode = inp.u8();
                let mut pkt = inp.bytes();
                if mode & 1 != 0 {
                    fix_packet(&mut pkt, SERVER_TUN, pool_addr(mode >> 2), mode & 2 != 0);
                }
                if let Ok(FromTun::Send { to, payload }) = self.server.from_tun(&mut pkt, self.now) {
                    assert!(payload.end <= pkt.len());
                    assert!(self.sgate.allowed.contains(&to), "server sends to {to}, which the gate does not let in");
                }
            }
            // A packet from the client's TUN.
            1 => {
                let mode = inp.u8();
                let mut pkt = inp.bytes();
                if mode & 1 != 0 {
                    fix_packet(&mut pkt, CLIENT_TUN, server_real(mode >> 2), mode & 2 != 0);
                }
                // The same packet as a TSO super-segment, cut at some size.
                let gso = usize::from(mode >> 3) * 97 + 1;
                let mut sup = pkt.clone();
                let mut hdrs = vec![0u8; 64 * udp_encap_tun::tso::MAX_TCP_HEADER];
                if let Ok(FromTunSuper::Send { to, count, thl, payload }) =
                    self.client.from_tun_super(&mut sup, gso, &mut hdrs, self.now)
                {
                    assert_eq!(to.port(), ENDPOINT_PORT);
                    assert!(payload.end <= sup.len() && count * thl <= hdrs.len());
                    assert_eq!(count, payload.len().div_ceil(gso));
                }
                match self.client.from_tun(&mut pkt, self.now) {
                    Ok(FromTun::Send { to, payload }) => {
                        assert!(payload.end <= pkt.len());
                        assert_eq!(to.port(), ENDPOINT_PORT);
                    }
                    Ok(FromTun::NeedAuth { .. }) | Err(_) => {}
                }
            }
            // A datagram to either side, with a length that may lie.
            2 | 3 => {
                let to_server = op % 10 == 2;
                let src = if to_server { inp.client_peer() } else { inp.server_peer() };
                let lenmode = inp.u8();
                let payload = inp.bytes();
                if lenmode & 3 == 1 {
                    // The same bytes as a GRO train cut at a stride.
                    return self.accept_train(to_server, src, payload, usize::from(lenmode >> 2) * 8);
                }
                let len = match lenmode & 3 {
                    0 | 1 => payload.len(),
                    2 => payload.len().saturating_sub(usize::from(lenmode >> 2)),
                    _ => match lenmode >> 2 {
                        0 => usize::MAX,
                        63 => usize::MAX - HEADROOM + 1,
                        n => payload.len() + usize::from(n),
                    },
                };
                self.receive(to_server, src, &payload, len);
            }
            // Authentication admits a peer.
            4 => {
                let peer = inp.client_peer();
                if let Ok(addr) = self.server.admit(peer, self.now, &mut self.sgate) {
                    assert_eq!(self.server.store().and_then(|s| s.by_peer(peer)), Some(addr));
                }
                let _ = self.client.admit(peer, self.now, &mut self.cgate);
            }
            // Time passes, then both sides expire.
            5 => {
                self.now += Duration::from_millis(u64::from(inp.u32()));
                self.expire();
            }
            // The client is granted a lease (lease_ms is 32 bits on the wire).
            6 => {
                let server = server_real(inp.u8());
                let lease = Duration::from_millis(u64::from(inp.u32()));
                let _ = self.client.grant_lease(server, lease, self.now, &mut self.cgate);
                let _ = self.server.grant_lease(server, lease, self.now, &mut self.sgate);
                let _ = self.client.leases_to_renew(self.now);
            }
            // A packet from the client's TUN, carried to the server.
            7 => {
                let mode = inp.u8();
                let peer = inp.client_peer();
                let mut pkt = inp.bytes();
                let dst = server_real(mode >> 2);
                if mode & 1 != 0 {
                    fix_packet(&mut pkt, CLIENT_TUN, dst, mode & 2 != 0);
                }
                let valid = wire::parse_ipv4_tcp(&pkt)
                    .is_ok_and(|t| tcp_checksum_valid(t.src, t.dst, &pkt[t.segment.clone()]));
                if let Ok(FromTun::Send { payload, .. }) = self.client.from_tun(&mut pkt, self.now) {
                    let seg = pkt[payload].to_vec();
                    if let Some(out) = self.receive(true, peer, &seg, seg.len()) {
                        let t = wire::parse_ipv4_tcp(&out).expect("checked in from_udp");
                        if valid {
                            assert!(
                                tcp_checksum_valid(t.src, t.dst, &out[t.segment]),
                                "client -> server: a valid TCP checksum arrived invalid"
                            );
                        }
                    }
                }
            }
            // A packet from the server's TUN to a live peer's address,
            // carried to the client.
            8 => {
                let mode = inp.u8();
                let pick = inp.u8();
                let mut pkt = inp.bytes();
                // Sorted: the store's maps iterate in a per-process random order.
                let mut live: Vec<_> = self.server.store().map(|s| s.entries().copied().collect()).unwrap_or_default();
                live.sort_by_key(|e| e.addr);
                let Some(&entry) = live.get(usize::from(pick) % 16) else { return };
                if mode & 1 != 0 {
                    fix_packet(&mut pkt, SERVER_TUN, entry.addr, mode & 2 != 0);
                }
                let valid = wire::parse_ipv4_tcp(&pkt)
                    .is_ok_and(|t| tcp_checksum_valid(t.src, t.dst, &pkt[t.segment.clone()]));
                if let Ok(FromTun::Send { to, payload }) = self.server.from_tun(&mut pkt, self.now) {
                    if wire::parse_ipv4_tcp(&pkt).is_ok_and(|t| t.dst == entry.addr) {
                        assert_eq!(to, entry.peer, "server sent a generated address's traffic to another peer");
                    }
                    let seg = pkt[payload].to_vec();
                    let from = SocketAddrV4::new(server_real(pick), ENDPOINT_PORT);
                    if let Some(out) = self.receive(false, from, &seg, seg.len()) {
                        let t = wire::parse_ipv4_tcp(&out).expect("checked in from_udp");
                        if valid {
                            assert!(
                                tcp_checksum_valid(t.src, t.dst, &out[t.segment]),
                                "server -> client: a valid TCP checksum arrived invalid"
                            );
                        }
                    }
                }
            }
            // Time passes without expiry (entries past their deadline stay
            // until expire runs).
            _ => {
                self.now += Duration::from_millis(u64::from(inp.u16()));
                let _ = self.server.next_expiry();
                let _ = self.client.next_expiry();
            }
        }
    }

    fn expire(&mut self) {
        self.expired.clear();
        self.server.expire(self.now, &mut self.sgate, &mut self.expired);
        let store = self.server.store().expect("server core has a store");
        for e in &self.expired {
            assert!(store.by_peer(e.peer).is_none() && store.by_addr(e.addr).is_none());
            assert!(self.now.duration_since(e.refreshed) >= store.timeout());
        }
        if let Some(next) = self.server.next_expiry() {
            assert!(next > self.now, "expire left an entry that is due");
        }
        self.expired.clear();
        self.client.expire(self.now, &mut self.cgate, &mut self.expired);
        assert!(self.client.leases().iter().all(|(_, until)| *until > self.now));
    }
}

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let flags = inp.u8();
    let server_cap = usize::from(inp.u8() % 17);
    let client_cap = usize::from(inp.u8() % 5);
    let mtu = match inp.u8() {
        0 => 0,
        1 => u16::MAX,
        m => 500 + u16::from(m) * 4,
    };
    let timeout = Duration::from_millis(1 + u64::from(flags >> 2) * 500);
    let pool = Pool::new(Ipv4Addr::new(198, 18, 0, 0), 28, &[SERVER_TUN]).expect("a /28 has room");
    let store = ConnectionStore::new(pool, timeout, 7);
    let mut w = World {
        server: Core::new(SERVER_TUN, mtu, Core::server(store, flags & 1 != 0), Arc::default()),
        client: Core::new(CLIENT_TUN, mtu, Core::client(ENDPOINT_PORT, flags & 2 != 0), Arc::default()),
        sgate: FakeGate { allowed: HashSet::new(), capacity: server_cap },
        cgate: FakeGate { allowed: HashSet::new(), capacity: client_cap },
        now: Instant::now(),
        expired: Vec::new(),
    };
    w.check();
    for _ in 0..MAX_OPS {
        if inp.0.is_empty() {
            break;
        }
        let op = inp.u8();
        w.step(op, &mut inp);
        w.check();
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
