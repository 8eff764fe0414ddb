//! The translation core: one packet in, one action out. No I/O, no clock.
//!
//! The I/O layer reads a packet from the TUN or a datagram from the socket
//! into its own buffer and hands it here with `now`; the core checks it,
//! rewrites it in place and says what to do with it: send these bytes to
//! this peer, write these bytes to the TUN, or discard it for a reason
//! (already counted). Receive buffers keep [`HEADROOM`] free bytes in front
//! of a datagram's payload so the rebuilt IPv4 header goes there without a
//! copy; a packet from the TUN leaves as the bytes after its IPv4 header.
//!
//! The core also owns the `connection_store` (server) or the leases
//! (client), and keeps the peer gate (the XDP map) in step with them: an
//! entry exists in the store only if the gate accepted it.
//!
//! Everything under this folder is pure in the same sense: bytes and `now`
//! in, decisions out, unit-tested over byte fixtures and an injected clock.
//! - [`wire`]: zero-copy views over packet bytes, checksums, the MSS clamp;
//! - [`store`]: the `connection_store` and its address pool;
//! - [`tso`] / [`gro`]: TUN super-segments cut for the wire, GRO trains
//!   coalesced for the TUN;
//! - [`authq`]: client packets waiting for authentication;
//! - [`ratelog`]: log lines a remote sender can trigger, bounded.

pub mod authq;
pub mod gro;
pub mod ratelog;
pub mod store;
pub mod tso;
pub mod wire;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::counters::{Counters, Discard, Traffic};
use self::store::{ConnectionStore, Entry, Upsert};
use self::wire::IPV4_HEADER_LEN;

/// Free bytes a receive buffer keeps before a datagram's payload.
pub const HEADROOM: usize = IPV4_HEADER_LEN;

/// TCP/IPv4 headers without options: what the MSS leaves out of the MTU.
const TCP_IP_HEADERS: u16 = 40;

/// Where the store's entries are mirrored (the XDP map of allowed peers).
pub trait PeerGate {
    /// Lets `peer`'s datagrams in; `Err` when the gate is full (the peer is
    /// then refused, and no live peer is evicted).
    fn allow(&mut self, peer: SocketAddrV4) -> Result<(), GateFull>;
    /// Stops letting `peer` in. Failures are the gate's to log.
    fn revoke(&mut self, peer: SocketAddrV4);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateFull;

/// Why a new peer was refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every address of the pool is taken by a live peer.
    PoolFull,
    /// The XDP map of allowed peers is full.
    GateFull,
}

/// What to do with a packet read from the TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromTun {
    /// Send `pkt[payload]` as one datagram to `to`.
    Send { to: SocketAddrV4, payload: Range<usize> },
    /// Client with authentication: no valid lease with `server` yet. The
    /// caller queues the packet and authenticates, then hands it back.
    NeedAuth { server: Ipv4Addr },
}

/// What [`Core::from_tun_super`] decided for a TSO super-segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromTunSuper {
    /// Send `count` datagrams to `to`: datagram `i` is the wire header
    /// `hdrs[i * thl..(i + 1) * thl]` followed by the payload
    /// `pkt[payload.start + i * gso_size..]`, at most `gso_size` bytes, up to
    /// `payload.end`.
    Send { to: SocketAddrV4, count: usize, thl: usize, payload: Range<usize> },
    /// As [`FromTun::NeedAuth`]; nothing was changed.
    NeedAuth { server: Ipv4Addr },
}

/// A client's standing with one server.
#[derive(Debug, Clone, Copy)]
struct Lease {
    granted: Instant,
    until: Instant,
    /// Last packet sent to the server.
    sent: Instant,
    /// Last datagram received from it.
    heard: Instant,
}

impl Lease {
    /// A lease is renewed only while traffic flows in either direction.
    fn active(&self) -> Instant {
        self.sent.max(self.heard)
    }
}

/// A server that has not answered for this long while we kept sending has
/// probably lost our entry (restarted): authenticate again without waiting
/// for the lease to run out.
pub const SILENT_SERVER: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub enum Role {
    Server {
        store: ConnectionStore,
        /// Version 2: only authentication creates and refreshes entries.
        auth: bool,
    },
    Client {
        endpoint_port: u16,
        /// Version 2: traffic to and from a server needs a lease with it.
        auth: bool,
        leases: HashMap<Ipv4Addr, LeaseSlot>,
    },
}

/// Opaque lease state kept per server (client role).
#[derive(Debug, Clone, Copy)]
pub struct LeaseSlot(Lease);

pub struct Core {
    tun_addr: Ipv4Addr,
    max_mss: u16,
    ip_id: u16,
    role: Role,
    counters: Arc<Counters>,
    logs: PeerLogs,
}

/// The core's log lines a remote sender can trigger (in version 1 every
/// datagram from a new source is an upsert; spoofed sources make a new one
/// per datagram), each bounded on its own (SPEC decision 9).
#[derive(Debug)]
struct PeerLogs {
    created: ratelog::RateLimitedLog,
    gate_full: ratelog::RateLimitedLog,
    pool_full: ratelog::RateLimitedLog,
}

impl Default for PeerLogs {
    fn default() -> PeerLogs {
        PeerLogs {
            created: ratelog::RateLimitedLog::new(log::Level::Info, 10),
            gate_full: ratelog::RateLimitedLog::new(log::Level::Warn, 1),
            pool_full: ratelog::RateLimitedLog::new(log::Level::Warn, 1),
        }
    }
}

impl Core {
    /// `path_mtu`: the largest inner IPv4 packet that fits the path, i.e.
    /// min(TUN MTU, uplink MTU - 8).
    pub fn new(tun_addr: Ipv4Addr, path_mtu: u16, role: Role, counters: Arc<Counters>) -> Core {
        Core {
            tun_addr,
            max_mss: path_mtu.saturating_sub(TCP_IP_HEADERS).max(536),
            ip_id: 0,
            role,
            counters,
            logs: PeerLogs::default(),
        }
    }

    pub fn server(store: ConnectionStore, auth: bool) -> Role {
        Role::Server { store, auth }
    }

    pub fn client(endpoint_port: u16, auth: bool) -> Role {
        Role::Client { endpoint_port, auth, leases: HashMap::new() }
    }

    pub fn max_mss(&self) -> u16 {
        self.max_mss
    }

    pub fn tun_addr(&self) -> Ipv4Addr {
        self.tun_addr
    }

    pub fn store(&self) -> Option<&ConnectionStore> {
        match &self.role {
            Role::Server { store, .. } => Some(store),
            Role::Client { .. } => None,
        }
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn discard<T>(&self, reason: Discard) -> Result<T, Discard> {
        self.counters.discard(reason);
        Err(reason)
    }

    /// A packet read from the TUN. On `Send`, `pkt[payload]` has been
    /// rewritten to the wire form (MSS clamped, checksum without addresses).
    pub fn from_tun(&mut self, pkt: &mut [u8], now: Instant) -> Result<FromTun, Discard> {
        let (t, to) = self.parse_and_route(pkt, now)?;
        let Some(to) = to else {
            return Ok(FromTun::NeedAuth { server: t.dst });
        };
        let Some(seg) = pkt.get_mut(t.segment.clone()) else {
            return self.discard(Discard::Malformed);
        };
        if wire::clamp_mss(seg, self.max_mss) {
            self.counters.add(Traffic::MssClamped, 1);
        }
        if wire::rehome_checksum(seg, t.src, t.dst, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
            .is_none()
        {
            return self.discard(Discard::Malformed);
        }
        self.counters.add(Traffic::TunRxPackets, 1);
        self.counters.add(Traffic::TunRxBytes, t.segment.len() as u64);
        Ok(FromTun::Send { to, payload: t.segment })
    }

    /// A TSO super-segment read from the TUN (`pkt`: one IPv4 header, one TCP
    /// header, up to 64 KB of payload to be cut every `gso_size` bytes). The
    /// same checks and routing as [`Core::from_tun`], once for all its
    /// segments; their wire-form TCP headers go to `hdrs` (tso.rs), their
    /// payload stays in `pkt`.
    pub fn from_tun_super(
        &mut self,
        pkt: &mut [u8],
        gso_size: usize,
        hdrs: &mut [u8],
        now: Instant,
    ) -> Result<FromTunSuper, Discard> {
        let (t, to) = self.parse_and_route(pkt, now)?;
        let Some(to) = to else {
            return Ok(FromTunSuper::NeedAuth { server: t.dst });
        };
        let Some(seg) = pkt.get_mut(t.segment.clone()) else {
            return self.discard(Discard::Malformed);
        };
        // TSO never carries a SYN, but the check costs nothing.
        if wire::clamp_mss(seg, self.max_mss) {
            self.counters.add(Traffic::MssClamped, 1);
        }
        let Some(count) = tso::split_wire(seg, gso_size, hdrs) else {
            return self.discard(Discard::Malformed);
        };
        // split_wire checked the header length.
        let thl = wire::tcp_header_len(seg).unwrap_or(0);
        self.counters.add(Traffic::TunRxPackets, count as u64);
        self.counters.add(Traffic::TunRxBytes, (seg.len() + (count - 1) * thl) as u64);
        Ok(FromTunSuper::Send { to, count, thl, payload: t.segment.start + thl..t.segment.end })
    }

    /// A packet from the TUN checked (a refusal counted) and routed: where
    /// it goes, `None` if a lease must be had first.
    fn parse_and_route(&mut self, pkt: &[u8], now: Instant) -> Result<(wire::Ipv4Tcp, Option<SocketAddrV4>), Discard> {
        let t = match wire::parse_ipv4_tcp(pkt) {
            Ok(t) => t,
            Err(reason) => return self.discard(reason),
        };
        let to = self.route_tun(t.dst, now)?;
        Ok((t, to))
    }

    /// Where a packet from the TUN to `dst` goes: the server's peer with that
    /// address, or the client's server (`None`: no lease yet).
    fn route_tun(&mut self, dst: Ipv4Addr, now: Instant) -> Result<Option<SocketAddrV4>, Discard> {
        match &mut self.role {
            Role::Server { store, .. } => match store.by_addr(dst) {
                Some(peer) => Ok(Some(peer)),
                None => self.discard(Discard::NoEntry),
            },
            Role::Client { endpoint_port, auth, leases } => {
                if *auth {
                    match leases.get_mut(&dst) {
                        Some(LeaseSlot(l)) if now < l.until => l.sent = now,
                        _ => return Ok(None),
                    }
                }
                Ok(Some(SocketAddrV4::new(dst, *endpoint_port)))
            }
        }
    }

    /// A datagram from `src` whose payload is `buf[HEADROOM..HEADROOM + len]`.
    /// On success `buf[range]` is the IPv4 packet to write to the TUN.
    pub fn from_udp(
        &mut self,
        src: SocketAddrV4,
        buf: &mut [u8],
        len: usize,
        now: Instant,
        gate: &mut dyn PeerGate,
    ) -> Result<Range<usize>, Discard> {
        let Some(end) = HEADROOM.checked_add(len) else {
            return self.discard(Discard::Malformed);
        };
        let Some((hdr, seg)) = buf.get_mut(..end).map(|b| b.split_at_mut(HEADROOM)) else {
            return self.discard(Discard::Malformed);
        };
        let inner_src = self.accept_segment(src, seg, now, gate)?;
        let id = self.next_ip_id();
        if wire::write_ipv4_header(hdr, inner_src, self.tun_addr, len, id).is_none() {
            return self.discard(Discard::Malformed);
        }
        Ok(0..end)
    }

    /// A datagram's payload `seg` from `src`, checked and rewritten in place
    /// for the TUN: MSS clamped, checksum moved from the wire form to the
    /// pseudo-header (returned source, TUN address). The caller puts an
    /// IPv4 header from that source to [`Core::tun_addr`] in front of it.
    pub fn accept_segment(
        &mut self,
        src: SocketAddrV4,
        seg: &mut [u8],
        now: Instant,
        gate: &mut dyn PeerGate,
    ) -> Result<Ipv4Addr, Discard> {
        if let Err(reason) = wire::parse_segment(seg) {
            return self.discard(reason);
        }
        let inner_src = self.resolve_peer(src, now, gate)?;
        self.rewrite_for_tun(seg, inner_src)?;
        self.counters.add(Traffic::UdpRxPackets, 1);
        self.counters.add(Traffic::UdpRxBytes, seg.len() as u64);
        Ok(inner_src)
    }

    /// A GRO train from `src`: datagrams of `stride` bytes (the last may be
    /// shorter) back to back in `train`. Does for each what
    /// [`Core::accept_segment`] does, but looks the peer up once per train
    /// (every datagram of a train has the same source) and adds to the
    /// counters once. Pushes the ranges of the accepted datagrams onto
    /// `accepted` and returns their inner source, or `None` if none passed.
    pub fn accept_train(
        &mut self,
        src: SocketAddrV4,
        train: &mut [u8],
        stride: usize,
        now: Instant,
        gate: &mut dyn PeerGate,
        accepted: &mut Vec<Range<usize>>,
    ) -> Option<Ipv4Addr> {
        let mut inner = None;
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut at = 0;
        while at < train.len() {
            let end = at.saturating_add(stride.max(1)).min(train.len());
            let range = at..end;
            at = end;
            let Some(seg) = train.get_mut(range.clone()) else { break };
            if let Err(reason) = wire::parse_segment(seg) {
                self.counters.discard(reason);
                continue;
            }
            // Only a well-formed segment may create or refresh an entry;
            // a refusal is counted per segment, as accept_segment does.
            let addr = match inner {
                Some(a) => a,
                None => match self.resolve_peer(src, now, gate) {
                    Ok(a) => *inner.insert(a),
                    Err(_) => continue,
                },
            };
            if self.rewrite_for_tun(seg, addr).is_err() {
                continue;
            }
            packets += 1;
            bytes += seg.len() as u64;
            accepted.push(range);
        }
        if packets == 0 {
            return None;
        }
        self.counters.add(Traffic::UdpRxPackets, packets);
        self.counters.add(Traffic::UdpRxBytes, bytes);
        inner
    }

    /// The inner source address of datagrams from `src`, if `src` may send:
    /// the server creates (version 1) or finds its entry, the client checks
    /// its lease. Counts a refusal.
    fn resolve_peer(&mut self, src: SocketAddrV4, now: Instant, gate: &mut dyn PeerGate) -> Result<Ipv4Addr, Discard> {
        match &mut self.role {
            Role::Server { store, auth: false } => match upsert(store, src, now, gate, &self.counters, &mut self.logs) {
                Ok(addr) => Ok(addr),
                Err(_) => self.discard(Discard::PoolFull),
            },
            Role::Server { store, auth: true } => match store.by_peer(src) {
                Some(addr) => Ok(addr),
                None => self.discard(Discard::Unauthenticated),
            },
            Role::Client { endpoint_port, auth, leases } => {
                if *auth {
                    match leases.get_mut(src.ip()) {
                        Some(LeaseSlot(l)) if src.port() == *endpoint_port && now < l.until => l.heard = now,
                        _ => return self.discard(Discard::Unauthenticated),
                    }
                }
                Ok(*src.ip())
            }
        }
    }

    /// A checked segment from `inner_src`, rewritten in place for the TUN:
    /// MSS clamped, checksum moved from the wire form to the pseudo-header
    /// (`inner_src`, TUN address).
    fn rewrite_for_tun(&mut self, seg: &mut [u8], inner_src: Ipv4Addr) -> Result<(), Discard> {
        if wire::clamp_mss(seg, self.max_mss) {
            self.counters.add(Traffic::MssClamped, 1);
        }
        let zero = Ipv4Addr::UNSPECIFIED;
        if wire::rehome_checksum(seg, zero, zero, inner_src, self.tun_addr).is_none() {
            return self.discard(Discard::Malformed);
        }
        Ok(())
    }

    /// The ID field for the next rebuilt IPv4 header.
    pub fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Server: a peer authenticated (or, in version 1, sent a datagram):
    /// create or refresh its entry, mirrored into the gate.
    pub fn admit(
        &mut self,
        peer: SocketAddrV4,
        now: Instant,
        gate: &mut dyn PeerGate,
    ) -> Result<Ipv4Addr, Refusal> {
        match &mut self.role {
            Role::Server { store, .. } => upsert(store, peer, now, gate, &self.counters, &mut self.logs),
            Role::Client { .. } => Err(Refusal::PoolFull),
        }
    }

    /// Server: removes `peer`'s entry and its gate entry at once (a revoked
    /// client).
    pub fn remove_peer(&mut self, peer: SocketAddrV4, gate: &mut dyn PeerGate) -> Option<Entry> {
        let Role::Server { store, .. } = &mut self.role else { return None };
        let e = store.remove(peer)?;
        gate.revoke(peer);
        Some(e)
    }

    /// Server: removes entries whose time ran out, and their gate entries.
    /// Client: forgets leases that ran out. Returns the removed entries.
    pub fn expire(&mut self, now: Instant, gate: &mut dyn PeerGate, expired: &mut Vec<Entry>) {
        match &mut self.role {
            Role::Server { store, .. } => {
                let before = expired.len();
                store.expire(now, expired);
                for e in expired.iter().skip(before) {
                    gate.revoke(e.peer);
                }
                self.counters.add(Traffic::EntriesExpired, (expired.len() - before) as u64);
            }
            Role::Client { endpoint_port, leases, .. } => {
                let port = *endpoint_port;
                leases.retain(|server, LeaseSlot(l)| {
                    let live = now < l.until;
                    if !live {
                        gate.revoke(SocketAddrV4::new(*server, port));
                    }
                    live
                });
            }
        }
    }

    /// When [`Core::expire`] next has something to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        match &self.role {
            Role::Server { store, .. } => store.next_expiry(),
            Role::Client { leases, .. } => leases.values().map(|LeaseSlot(l)| l.until).min(),
        }
    }

    /// Client: the server granted a lease of `duration`.
    pub fn grant_lease(
        &mut self,
        server: Ipv4Addr,
        duration: Duration,
        now: Instant,
        gate: &mut dyn PeerGate,
    ) -> Result<(), Refusal> {
        if let Role::Client { endpoint_port, leases, .. } = &mut self.role {
            let peer = SocketAddrV4::new(server, *endpoint_port);
            if !leases.contains_key(&server) && gate.allow(peer).is_err() {
                return Err(Refusal::GateFull);
            }
            // A new lease starts as heard from: the server just answered.
            let sent = leases.get(&server).map_or(now, |LeaseSlot(l)| l.sent);
            leases.insert(server, LeaseSlot(Lease { granted: now, until: now + duration, sent, heard: now }));
        }
        Ok(())
    }

    /// Client: servers whose lease is past two thirds of its life and that
    /// exchanged traffic within the last third of it (idle leases lapse),
    /// and servers that have been silent for [`SILENT_SERVER`] while we kept
    /// sending (a restarted server has forgotten us).
    pub fn leases_to_renew(&self, now: Instant) -> Vec<Ipv4Addr> {
        match &self.role {
            Role::Client { leases, .. } => leases
                .iter()
                .filter(|(_, LeaseSlot(l))| {
                    let life = l.until.saturating_duration_since(l.granted);
                    let due = now >= l.granted + life * 2 / 3
                        && now.saturating_duration_since(l.active()) < life / 3;
                    let silent = l.sent.saturating_duration_since(l.heard) >= SILENT_SERVER
                        && now.saturating_duration_since(l.granted) >= SILENT_SERVER;
                    (due || silent) && now < l.until
                })
                .map(|(s, _)| *s)
                .collect(),
            Role::Server { .. } => Vec::new(),
        }
    }

    /// Client: servers with a live lease and when it ends.
    pub fn leases(&self) -> Vec<(Ipv4Addr, Instant)> {
        match &self.role {
            Role::Client { leases, .. } => leases.iter().map(|(s, LeaseSlot(l))| (*s, l.until)).collect(),
            Role::Server { .. } => Vec::new(),
        }
    }
}

fn upsert(
    store: &mut ConnectionStore,
    peer: SocketAddrV4,
    now: Instant,
    gate: &mut dyn PeerGate,
    counters: &Counters,
    logs: &mut PeerLogs,
) -> Result<Ipv4Addr, Refusal> {
    match store.upsert(peer, now) {
        Ok(Upsert::Refreshed(addr)) => Ok(addr),
        Ok(Upsert::Created(addr)) => {
            if gate.allow(peer).is_err() {
                store.remove(peer);
                logs.gate_full.log(now, || {
                    format!("refused peer {peer}: the XDP map of allowed peers is full (raise --xdp-map-size)")
                });
                return Err(Refusal::GateFull);
            }
            counters.add(Traffic::EntriesCreated, 1);
            logs.created.log(now, || format!("new peer {peer} -> {addr}"));
            Ok(addr)
        }
        Err(_) => {
            let live = store.len();
            logs.pool_full.log(now, || {
                format!("refused peer {peer}: every address of the pool is taken ({live} live entries); widen --pool")
            });
            Err(Refusal::PoolFull)
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::core::store::Pool;
    use std::collections::HashSet;

    const SERVER_TUN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT_TUN: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    const SERVER_REAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 12345);

    #[derive(Default)]
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

    fn gate(capacity: usize) -> FakeGate {
        FakeGate { capacity, ..Default::default() }
    }

    fn server(auth: bool, timeout: Duration) -> Core {
        let pool = Pool::new(Ipv4Addr::new(198, 18, 0, 0), 24, &[SERVER_TUN]).unwrap();
        let store = ConnectionStore::new(pool, timeout, 7);
        Core::new(SERVER_TUN, 1400, Core::server(store, auth), Arc::default())
    }

    fn client(auth: bool) -> Core {
        Core::new(CLIENT_TUN, 1400, Core::client(12345, auth), Arc::default())
    }

    /// A TCP SYN with MSS 1460 and 5 bytes of data, from `src` to `dst`, as
    /// the kernel writes it into the TUN.
    fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 49, 0, 1, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // IPv4
            0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, // ports, seq, ack
            0x60, 0x02, 0xff, 0xff, 0, 0, 0, 0, // doff 6, SYN
            0x02, 0x04, 0x05, 0xb4, // MSS 1460
            b'h', b'e', b'l', b'l', b'o',
        ];
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = wire::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let c = wire::tcp_checksum(src, dst, &p[20..]);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp_valid(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> bool {
        let mut s = seg.to_vec();
        let c = u16::from_be_bytes([s[16], s[17]]);
        s[16] = 0;
        s[17] = 0;
        let want = wire::tcp_checksum(src, dst, &s);
        c == want || (c == 0xffff && want == 0) || (c == 0 && want == 0xffff)
    }

    /// The receive buffer the I/O layer would fill: headroom, then the datagram.
    fn datagram(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADROOM];
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn client_to_server_and_back_end_to_end() {
        let now = Instant::now();
        let (mut c, mut s) = (client(false), server(false, Duration::from_secs(300)));
        let mut g = gate(10);

        // client: the app's SYN to the server's real address leaves as a datagram
        let mut pkt = tcp_packet(CLIENT_TUN, SERVER_REAL);
        let FromTun::Send { to, payload } = c.from_tun(&mut pkt, now).unwrap() else { panic!() };
        assert_eq!(to, SocketAddrV4::new(SERVER_REAL, 12345));
        assert_eq!(payload, 20..49);
        assert_eq!(&pkt[payload.clone()][20..24], &[2, 4, 0x05, 0x50], "MSS clamped to 1400 - 40 = 1360");
        assert!(tcp_valid(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &pkt[payload.clone()]));

        // server: the datagram becomes a segment from the peer's generated address
        let mut buf = datagram(&pkt[payload.clone()]);
        let r = s.from_udp(PEER, &mut buf, payload.len(), now, &mut g).unwrap();
        let out = &buf[r];
        let t = wire::parse_ipv4_tcp(out).unwrap();
        let generated = s.store().unwrap().by_peer(PEER).unwrap();
        assert_eq!((t.src, t.dst), (generated, SERVER_TUN));
        assert_eq!(wire::fold(wire::sum_words(&out[..20], 0)), 0xffff, "IPv4 header checksum");
        assert!(tcp_valid(generated, SERVER_TUN, &out[20..]));
        assert_eq!(&out[44..], b"hello");
        assert!(g.allowed.contains(&PEER), "entry mirrored into the gate");

        // server: the reply to the generated address goes back to the peer
        let mut reply = tcp_packet(SERVER_TUN, generated);
        let FromTun::Send { to, payload } = s.from_tun(&mut reply, now).unwrap() else { panic!() };
        assert_eq!(to, PEER);

        // client: the reply appears to come from the server's real address
        let mut buf = datagram(&reply[payload.clone()]);
        let r = c.from_udp(SocketAddrV4::new(SERVER_REAL, 12345), &mut buf, payload.len(), now, &mut g).unwrap();
        let t = wire::parse_ipv4_tcp(&buf[r.clone()]).unwrap();
        assert_eq!((t.src, t.dst), (SERVER_REAL, CLIENT_TUN));
        assert!(tcp_valid(SERVER_REAL, CLIENT_TUN, &buf[r][20..]));
    }

    #[test]
    fn server_discards_are_counted_by_reason() {
        let now = Instant::now();
        let mut s = server(false, Duration::from_secs(300));
        let mut udp = tcp_packet(SERVER_TUN, Ipv4Addr::new(198, 18, 0, 9));
        udp[9] = 17;
        assert_eq!(s.from_tun(&mut udp, now), Err(Discard::NotTcp));
        let mut opts = tcp_packet(SERVER_TUN, Ipv4Addr::new(198, 18, 0, 9));
        opts[0] = 0x46;
        assert_eq!(s.from_tun(&mut opts, now), Err(Discard::IpOptions));
        let mut nobody = tcp_packet(SERVER_TUN, Ipv4Addr::new(198, 18, 0, 9));
        assert_eq!(s.from_tun(&mut nobody, now), Err(Discard::NoEntry));
        let mut short = datagram(&[0u8; 19]);
        assert_eq!(s.from_udp(PEER, &mut short, 19, now, &mut gate(1)), Err(Discard::Malformed));
        assert_eq!(s.from_udp(PEER, &mut short, 400, now, &mut gate(1)), Err(Discard::Malformed));
        let c = s.counters();
        for (reason, n) in [
            (Discard::NotTcp, 1),
            (Discard::IpOptions, 1),
            (Discard::NoEntry, 1),
            (Discard::Malformed, 2),
            (Discard::PoolFull, 0),
        ] {
            assert_eq!(c.discards(reason), n, "{}", reason.name());
        }
        assert!(s.store().unwrap().is_empty(), "malformed datagrams create no entry");
    }

    /// An IPv4 packet around TCP segment `seg`, from `src` to `dst`, with a
    /// valid TCP checksum.
    fn ipv4_around(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(seg);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let c = wire::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[36..38].copy_from_slice(&[0, 0]);
        let c = wire::tcp_checksum(src, dst, &p[20..]);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn a_super_segment_leaves_as_its_segments_would_one_by_one() {
        let now = Instant::now();
        let gso = 1336;
        // ACK|PSH|FIN, timestamps, 3 full segments and a short one
        let mut seg = vec![0x9c, 0x40, 0x00, 0x50, 0, 0, 0x10, 0, 0, 0, 0, 9, 0x80, 0x19, 0xff, 0xff, 0, 0, 0, 0];
        seg.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 5, 0, 0, 0, 6]);
        seg.extend((0..3 * gso + 99).map(|i| (i % 251) as u8));
        let mut pkt = ipv4_around(CLIENT_TUN, SERVER_REAL, &seg);

        let mut c = client(false);
        let mut hdrs = vec![0u8; 64 * tso::MAX_TCP_HEADER];
        let FromTunSuper::Send { to, count, thl, payload } = c.from_tun_super(&mut pkt, gso, &mut hdrs, now).unwrap()
        else {
            panic!("no lease needed without auth")
        };
        assert_eq!((to, count, thl), (SocketAddrV4::new(SERVER_REAL, 12345), 4, 32));
        assert_eq!(payload, 52..pkt.len());
        assert_eq!(c.counters().traffic(Traffic::TunRxPackets), 4);

        let mut one = client(false);
        for i in 0..count {
            let data = &seg[32 + i * gso..(32 + (i + 1) * gso).min(seg.len())];
            let mut h = seg[..32].to_vec();
            h[4..8].copy_from_slice(&(0x1000u32 + (i * gso) as u32).to_be_bytes());
            if i + 1 < count {
                h[13] &= !0x09; // FIN and PSH on the last only
            }
            let mut alone = ipv4_around(CLIENT_TUN, SERVER_REAL, &[&h[..], data].concat());
            let FromTun::Send { payload: r, .. } = one.from_tun(&mut alone, now).unwrap() else { panic!() };
            let got = [&hdrs[i * thl..(i + 1) * thl], &pkt[payload.start + i * gso..(payload.start + (i + 1) * gso).min(payload.end)]].concat();
            assert_eq!(got, alone[r].to_vec(), "segment {i}");
        }
        assert_eq!(one.counters().traffic(Traffic::TunRxBytes), c.counters().traffic(Traffic::TunRxBytes));

        // the same checks as from_tun: a server without the entry, options
        let mut s = server(false, Duration::from_secs(300));
        let mut to_nobody = ipv4_around(SERVER_TUN, Ipv4Addr::new(198, 18, 0, 9), &seg);
        assert_eq!(s.from_tun_super(&mut to_nobody, gso, &mut hdrs, now), Err(Discard::NoEntry));
        let mut short = pkt[..60].to_vec();
        assert_eq!(c.from_tun_super(&mut short, gso, &mut hdrs, now), Err(Discard::Malformed));
        let mut small_arena = [0u8; 64];
        assert_eq!(c.from_tun_super(&mut pkt, gso, &mut small_arena, now), Err(Discard::Malformed));
        // an authenticating client without a lease changes nothing
        let mut a = client(true);
        let before = pkt.clone();
        assert_eq!(a.from_tun_super(&mut pkt, gso, &mut hdrs, now), Ok(FromTunSuper::NeedAuth { server: SERVER_REAL }));
        assert_eq!(pkt, before);
    }

    #[test]
    fn a_train_is_checked_per_datagram_and_looked_up_once() {
        let now = Instant::now();
        let mut c = client(false);
        let mut seg = tcp_packet(CLIENT_TUN, SERVER_REAL);
        let FromTun::Send { payload, .. } = c.from_tun(&mut seg, now).unwrap() else { panic!() };
        let seg = seg[payload].to_vec();
        let stride = seg.len();
        // good, garbage (too short for TCP), good, and a short last one
        let mut train = [seg.clone(), vec![0u8; stride], seg.clone(), seg[..10].to_vec()].concat();
        let mut one_by_one = server(false, Duration::from_secs(300));
        let mut g1 = gate(4);
        let expect: Vec<Option<Vec<u8>>> = train
            .chunks(stride)
            .map(|d| {
                let mut d = d.to_vec();
                one_by_one.accept_segment(PEER, &mut d, now, &mut g1).ok().map(|_| d)
            })
            .collect();

        let mut s = server(false, Duration::from_secs(300));
        let mut g = gate(4);
        let mut accepted = Vec::new();
        let src = s.accept_train(PEER, &mut train, stride, now, &mut g, &mut accepted);
        let generated = s.store().unwrap().by_peer(PEER).unwrap();
        assert_eq!(src, Some(generated));
        assert_eq!(accepted, vec![0..stride, 2 * stride..3 * stride]);
        for (i, want) in expect.iter().enumerate() {
            if let Some(want) = want {
                assert_eq!(&train[i * stride..(i + 1) * stride], &want[..], "datagram {i} rewritten as alone");
            }
        }
        assert!(tcp_valid(generated, SERVER_TUN, &train[..stride]));
        assert_eq!(s.counters().traffic(Traffic::UdpRxPackets), 2);
        assert_eq!(s.counters().traffic(Traffic::UdpRxBytes), 2 * stride as u64);
        assert_eq!(s.counters().discards(Discard::Malformed), one_by_one.counters().discards(Discard::Malformed));
        assert_eq!(s.counters().discards(Discard::Malformed), 2);

        // a train of garbage creates no entry; an unknown peer on an
        // authenticating server is refused once per datagram
        let mut junk = vec![0u8; 3 * 25];
        let mut s2 = server(false, Duration::from_secs(300));
        assert_eq!(s2.accept_train(PEER, &mut junk, 25, now, &mut gate(4), &mut accepted), None);
        assert!(s2.store().unwrap().is_empty());
        let mut auth = server(true, Duration::from_secs(300));
        let mut two = [seg.clone(), seg.clone()].concat();
        accepted.clear();
        assert_eq!(auth.accept_train(PEER, &mut two, stride, now, &mut gate(4), &mut accepted), None);
        assert!(accepted.is_empty());
        assert_eq!(auth.counters().discards(Discard::Unauthenticated), 2);
        // stride 0 (never from the kernel) still ends
        assert_eq!(s2.accept_train(PEER, &mut junk, 0, now, &mut gate(4), &mut accepted), None);
    }

    #[test]
    fn authenticated_server_needs_an_entry_first() {
        let now = Instant::now();
        let mut s = server(true, Duration::from_secs(300));
        let mut g = gate(10);
        let seg = tcp_packet(CLIENT_TUN, SERVER_REAL)[20..].to_vec();
        let mut buf = datagram(&seg);
        assert_eq!(s.from_udp(PEER, &mut buf, seg.len(), now, &mut g), Err(Discard::Unauthenticated));
        assert!(s.store().unwrap().is_empty(), "datagrams no longer create entries");
        let addr = s.admit(PEER, now, &mut g).unwrap();
        let mut buf = datagram(&seg);
        let r = s.from_udp(PEER, &mut buf, seg.len(), now, &mut g).unwrap();
        assert_eq!(wire::parse_ipv4_tcp(&buf[r]).unwrap().src, addr);
    }

    #[test]
    fn full_gate_refuses_the_new_peer_and_keeps_the_live_one() {
        let now = Instant::now();
        let mut s = server(false, Duration::from_secs(300));
        let mut g = gate(1);
        let seg = tcp_packet(CLIENT_TUN, SERVER_REAL)[20..].to_vec();
        let other = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), 1);
        s.from_udp(PEER, &mut datagram(&seg), seg.len(), now, &mut g).unwrap();
        assert_eq!(s.from_udp(other, &mut datagram(&seg), seg.len(), now, &mut g), Err(Discard::PoolFull));
        assert_eq!(s.store().unwrap().len(), 1);
        assert!(s.store().unwrap().by_peer(other).is_none(), "store and gate agree");
        assert!(g.allowed.contains(&PEER));
        assert_eq!(s.admit(other, now, &mut g), Err(Refusal::GateFull));
    }

    /// SPEC decision 9: a version-1 server flooded by spoofed sources (a new
    /// (saddr, sport) per datagram) counts every refusal but logs a few
    /// lines a second, for a full gate and for a full pool alike.
    #[test]
    fn a_spoofed_flood_is_counted_per_datagram_and_logged_a_few_times() {
        ratelog::testlog::init();
        let _ = ratelog::testlog::take();
        let t0 = Instant::now();
        let seg = tcp_packet(CLIENT_TUN, SERVER_REAL)[20..].to_vec();
        let flood = |s: &mut Core, g: &mut FakeGate, from: u32| {
            for i in 0..5000u32 {
                let src = SocketAddrV4::new(Ipv4Addr::from(0xc612_0000 + from + i), 1024 + (i % 50_000) as u16);
                let mut buf = datagram(&seg);
                let now = t0 + Duration::from_micros(u64::from(i) * 200); // one second
                let _ = s.from_udp(src, &mut buf, seg.len(), now, g);
            }
        };
        // The gate holds 3: the rest find it full.
        let mut s = server(false, Duration::from_secs(300));
        let mut g = gate(3);
        flood(&mut s, &mut g, 0);
        assert_eq!(s.counters().discards(Discard::PoolFull), 4997, "every refusal counted");
        let lines = ratelog::testlog::take();
        let refused = lines.iter().filter(|l| l.contains("refused peer")).count();
        let created = lines.iter().filter(|l| l.contains("new peer")).count();
        assert_eq!((refused, created), (1, 3), "{lines:#?}");

        // A pool of 5 and room in the gate: the pool runs out.
        let pool = Pool::new(Ipv4Addr::new(198, 18, 0, 0), 29, &[Ipv4Addr::new(198, 18, 0, 1)]).unwrap();
        let mut s = Core::new(SERVER_TUN, 1400, Core::server(ConnectionStore::new(pool, Duration::from_secs(300), 7), false), Arc::default());
        let mut g = gate(100_000);
        flood(&mut s, &mut g, 1 << 16);
        assert_eq!(s.counters().discards(Discard::PoolFull), 4995);
        let lines = ratelog::testlog::take();
        assert!(lines.len() <= 6, "{} lines for one second of flood: {lines:#?}", lines.len());
        assert_eq!(lines.iter().filter(|l| l.contains("every address of the pool is taken")).count(), 1);
    }

    #[test]
    fn expiry_removes_from_store_and_gate() {
        let t0 = Instant::now();
        let mut s = server(false, Duration::from_secs(2));
        let mut g = gate(10);
        let seg = tcp_packet(CLIENT_TUN, SERVER_REAL)[20..].to_vec();
        s.from_udp(PEER, &mut datagram(&seg), seg.len(), t0, &mut g).unwrap();
        // a datagram at 1.5 s refreshes the entry (version 1)
        let t1 = t0 + Duration::from_millis(1500);
        s.from_udp(PEER, &mut datagram(&seg), seg.len(), t1, &mut g).unwrap();
        let mut gone = Vec::new();
        s.expire(t0 + Duration::from_millis(2500), &mut g, &mut gone);
        assert!(gone.is_empty(), "refreshed at 1.5 s, alive at 2.5 s");
        s.expire(t1 + Duration::from_secs(2), &mut g, &mut gone);
        assert_eq!(gone.len(), 1);
        assert!(s.store().unwrap().is_empty());
        assert!(g.allowed.is_empty(), "gate entry removed with the store entry");
        assert_eq!(s.counters().traffic(Traffic::EntriesExpired), 1);
        // the server's traffic to the old address is now discarded
        let mut reply = tcp_packet(SERVER_TUN, gone[0].addr);
        assert_eq!(s.from_tun(&mut reply, t1 + Duration::from_secs(3)), Err(Discard::NoEntry));
    }

    #[test]
    fn removed_peer_leaves_store_and_gate() {
        let now = Instant::now();
        let mut s = server(true, Duration::from_secs(300));
        let mut g = gate(10);
        let addr = s.admit(PEER, now, &mut g).unwrap();
        assert_eq!(s.remove_peer(PEER, &mut g).map(|e| e.addr), Some(addr));
        assert!(g.allowed.is_empty());
        assert!(s.store().unwrap().is_empty());
        assert!(s.remove_peer(PEER, &mut g).is_none());
    }

    #[test]
    fn client_leases_gate_traffic_both_ways() {
        let t0 = Instant::now();
        let mut c = client(true);
        let mut g = gate(10);
        let mut pkt = tcp_packet(CLIENT_TUN, SERVER_REAL);
        assert_eq!(c.from_tun(&mut pkt, t0), Ok(FromTun::NeedAuth { server: SERVER_REAL }));
        let seg = tcp_packet(SERVER_REAL, CLIENT_TUN)[20..].to_vec();
        let from_server = SocketAddrV4::new(SERVER_REAL, 12345);
        assert_eq!(c.from_udp(from_server, &mut datagram(&seg), seg.len(), t0, &mut g), Err(Discard::Unauthenticated));

        c.grant_lease(SERVER_REAL, Duration::from_secs(30), t0, &mut g).unwrap();
        assert!(g.allowed.contains(&from_server));
        assert!(matches!(c.from_tun(&mut pkt, t0), Ok(FromTun::Send { .. })));
        let wrong_port = SocketAddrV4::new(SERVER_REAL, 999);
        assert_eq!(c.from_udp(wrong_port, &mut datagram(&seg), seg.len(), t0, &mut g), Err(Discard::Unauthenticated));
        assert!(c.from_udp(from_server, &mut datagram(&seg), seg.len(), t0, &mut g).is_ok());

        // active lease: renewed after two thirds of its life
        let t20 = t0 + Duration::from_secs(20);
        assert!(matches!(c.from_tun(&mut tcp_packet(CLIENT_TUN, SERVER_REAL), t20), Ok(FromTun::Send { .. })));
        assert!(c.from_udp(from_server, &mut datagram(&seg), seg.len(), t20, &mut g).is_ok());
        assert!(c.leases_to_renew(t0 + Duration::from_secs(19)).is_empty());
        assert_eq!(c.leases_to_renew(t0 + Duration::from_secs(21)), vec![SERVER_REAL]);
        // lapsed lease: traffic needs authentication again, and the gate forgets the server
        let late = t0 + Duration::from_secs(31);
        let mut gone = Vec::new();
        c.expire(late, &mut g, &mut gone);
        assert!(g.allowed.is_empty());
        assert_eq!(c.from_tun(&mut tcp_packet(CLIENT_TUN, SERVER_REAL), late), Ok(FromTun::NeedAuth { server: SERVER_REAL }));
    }

    #[test]
    fn a_silent_server_is_authenticated_again() {
        let t0 = Instant::now();
        let mut c = client(true);
        let mut g = gate(10);
        c.grant_lease(SERVER_REAL, Duration::from_secs(300), t0, &mut g).unwrap();
        let from_server = SocketAddrV4::new(SERVER_REAL, 12345);
        let seg = tcp_packet(SERVER_REAL, CLIENT_TUN)[20..].to_vec();
        let send = |c: &mut Core, at| {
            assert!(matches!(c.from_tun(&mut tcp_packet(CLIENT_TUN, SERVER_REAL), at), Ok(FromTun::Send { .. })));
        };
        // sending and hearing back: nothing to do
        for s in 1..10 {
            let at = t0 + Duration::from_secs(s);
            send(&mut c, at);
            c.from_udp(from_server, &mut datagram(&seg), seg.len(), at, &mut g).unwrap();
            assert!(c.leases_to_renew(at).is_empty(), "at {s} s");
        }
        // the server goes quiet while we keep sending (it restarted)
        send(&mut c, t0 + Duration::from_secs(11));
        assert!(c.leases_to_renew(t0 + Duration::from_secs(11)).is_empty(), "2 s of silence is not enough");
        send(&mut c, t0 + Duration::from_millis(12_100));
        assert_eq!(c.leases_to_renew(t0 + Duration::from_millis(12_100)), vec![SERVER_REAL]);
        // a fresh lease is not questioned at once
        let t1 = t0 + Duration::from_secs(13);
        c.grant_lease(SERVER_REAL, Duration::from_secs(300), t1, &mut g).unwrap();
        send(&mut c, t1 + Duration::from_secs(1));
        assert!(c.leases_to_renew(t1 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn idle_lease_is_not_renewed() {
        let t0 = Instant::now();
        let mut c = client(true);
        let mut g = gate(10);
        c.grant_lease(SERVER_REAL, Duration::from_secs(30), t0, &mut g).unwrap();
        assert!(c.leases_to_renew(t0 + Duration::from_secs(25)).is_empty());
    }

    #[test]
    fn version1_client_accepts_any_source() {
        let now = Instant::now();
        let mut c = client(false);
        let seg = tcp_packet(SERVER_REAL, CLIENT_TUN)[20..].to_vec();
        let src = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 4000);
        let r = c.from_udp(src, &mut datagram(&seg), seg.len(), now, &mut gate(0));
        assert!(r.is_ok());
    }

    #[test]
    fn no_input_panics() {
        // Every length and a sweep of byte patterns through both directions.
        let now = Instant::now();
        let mut s = server(false, Duration::from_secs(300));
        let mut c = client(true);
        let mut g = gate(1000);
        let mut x: u32 = 1;
        for len in 0..80usize {
            for _ in 0..50 {
                let mut bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        (x >> 16) as u8
                    })
                    .collect();
                if len > 0 && x.is_multiple_of(2) {
                    bytes[0] = 0x45;
                }
                let _ = s.from_tun(&mut bytes.clone(), now);
                let _ = c.from_tun(&mut bytes.clone(), now);
                let mut b = datagram(&bytes);
                let _ = s.from_udp(PEER, &mut b, len, now, &mut g);
                let _ = s.from_udp(PEER, &mut b, len + 5, now, &mut g);
                let _ = s.from_udp(PEER, &mut b, usize::MAX, now, &mut g);
            }
        }
    }
}
