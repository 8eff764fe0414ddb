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
//! The core also owns the `connection_store` and the sessions (server) or
//! the leases (client), and keeps the peer gate (the XDP map) in step with
//! them: an entry exists in the store only if the gate accepted it.
//! Datagrams that are not TCP segments but control datagrams
//! ([`session::wire`]) are handed back to the caller, which passes them to
//! [`Core::control`] off the data path.
//!
//! Everything under this folder is pure in the same sense: bytes and `now`
//! in, decisions out, unit-tested over byte fixtures and an injected clock.
//! - [`wire`]: zero-copy views over packet bytes, checksums, the MSS clamp;
//! - [`store`]: the `connection_store` and its address pool;
//! - [`session`]: keepalives, path proofs and migration (SPEC decision 11);
//! - [`endpoints`]: where a client's datagrams for a server go (IPv4, IPv6,
//!   NAT64);
//! - [`tso`] / [`gro`]: TUN super-segments cut for the wire, GRO trains
//!   coalesced for the TUN;
//! - [`authq`]: client packets waiting for authentication;
//! - [`ratelog`]: log lines a remote sender can trigger, bounded.

pub mod authq;
pub mod endpoints;
pub mod gro;
pub mod mtu;
pub mod ratelog;
pub mod session;
pub mod store;
#[cfg(test)]
pub mod test_gate;
pub mod tso;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::endpoints::Endpoints;
use self::mtu::{MaxMss, PathMtu};
use self::session::{SessionId, client, server, wire as control_wire};
use self::store::{ConnectionStore, Entry, Upsert};
use self::wire::IPV4_HEADER_LEN;
use crate::counters::{Counters, Discard, Traffic};

/// Free bytes a receive buffer keeps before a datagram's payload.
pub const HEADROOM: usize = IPV4_HEADER_LEN;

/// Where the store's entries are mirrored (the XDP maps of allowed peers
/// and sessions).
pub trait PeerGate {
    /// Lets `peer`'s datagrams in; `Err` when the gate is full (the peer is
    /// then refused, and no live peer is evicted).
    fn allow(&mut self, peer: SocketAddr) -> Result<(), GateFull>;
    /// Stops letting `peer` in. Failures are the gate's to log.
    fn revoke(&mut self, peer: SocketAddr);
    /// Lets control datagrams of session `id` in from anywhere (a client
    /// proving a new path is not a known peer yet).
    fn allow_session(&mut self, id: SessionId) -> Result<(), GateFull>;
    fn revoke_session(&mut self, id: SessionId);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateFull;

/// Why a new peer or session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every address of the pool is taken by a live peer.
    PoolFull,
    /// The XDP map of allowed peers is full.
    GateFull,
    /// The client already holds `--max-entries-per-client` sessions.
    ClientLimit,
    /// Not now (an id in use, the wrong mode): try again.
    Unavailable,
}

/// What to do with a packet read from the TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromTun {
    /// Send `pkt[payload]` as one datagram to `to`.
    Send { to: SocketAddr, payload: Range<usize> },
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
    Send { to: SocketAddr, count: usize, thl: usize, payload: Range<usize> },
    /// As [`FromTun::NeedAuth`]; nothing was changed.
    NeedAuth { server: Ipv4Addr },
}

/// What [`Core::from_udp`] found in a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromUdp {
    /// `buf[range]` is the IPv4 packet to write to the TUN.
    Tun(Range<usize>),
    /// A control datagram: hand the payload to [`Core::control`].
    Control,
}

/// What a control datagram asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlDone {
    /// Send this datagram.
    pub reply: Option<(SocketAddr, [u8; control_wire::LEN])>,
    /// Client: the session with this server is bound; send what waits.
    pub bound: Option<Ipv4Addr>,
    /// Server: what happened, for the log (`None`: nothing worth a line).
    pub event: Option<server::Event>,
    /// Something worth saving to disk changed (a path bound or moved).
    pub changed: bool,
}

/// An entry or lease that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Server: an entry, with the client it belonged to (version 2).
    Entry { entry: Entry, client: Option<String> },
    /// Client: the lease with this server.
    Lease { server: Ipv4Addr },
}

// One per core, built once and never moved: the size of a variant does
// not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Role {
    Server {
        store: ConnectionStore,
        /// Version 2: only authentication creates entries, and proofs of
        /// the session refresh them.
        auth: bool,
        sessions: server::Sessions,
    },
    Client {
        endpoints: Endpoints,
        /// Version 2: traffic to and from a server needs a session with it.
        auth: bool,
        sessions: client::Sessions,
    },
}

pub struct Core {
    tun_addr: Ipv4Addr,
    /// Per outer family of the peer's path (mtu.rs).
    max_mss: MaxMss,
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
    /// `path_mtu`: the largest inner IPv4 packet that fits a path over
    /// IPv4 and over IPv6 (mtu.rs); SYNs to and from a peer are clamped
    /// for the family of its address.
    pub fn new(tun_addr: Ipv4Addr, path_mtu: PathMtu, role: Role, counters: Arc<Counters>) -> Core {
        Core {
            tun_addr,
            max_mss: path_mtu.max_mss(),
            ip_id: 0,
            role,
            counters,
            logs: PeerLogs::default(),
        }
    }

    /// `max_per_client`: `--max-entries-per-client`; `bind_life`: how long a
    /// new session may take to prove its UDP path.
    pub fn server(store: ConnectionStore, auth: bool, max_per_client: usize, bind_life: Duration) -> Role {
        Role::Server { store, auth, sessions: server::Sessions::new(max_per_client, bind_life) }
    }

    /// `keepalive`: `--keepalive` (zero: off).
    pub fn client(endpoints: Endpoints, auth: bool, keepalive: Duration) -> Role {
        Role::Client { endpoints, auth, sessions: client::Sessions::new(keepalive) }
    }

    /// The MSS clamp of IPv4 and of IPv6 paths.
    pub fn max_mss(&self) -> MaxMss {
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

    pub fn server_sessions(&self) -> Option<&server::Sessions> {
        match &self.role {
            Role::Server { sessions, .. } => Some(sessions),
            Role::Client { .. } => None,
        }
    }

    pub fn client_sessions(&self) -> Option<&client::Sessions> {
        match &self.role {
            Role::Client { sessions, .. } => Some(sessions),
            Role::Server { .. } => None,
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
        if wire::clamp_mss(seg, self.max_mss.for_peer(&to)) {
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
        if wire::clamp_mss(seg, self.max_mss.for_peer(&to)) {
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
    fn parse_and_route(&mut self, pkt: &[u8], now: Instant) -> Result<(wire::Ipv4Tcp, Option<SocketAddr>), Discard> {
        let t = match wire::parse_ipv4_tcp(pkt) {
            Ok(t) => t,
            Err(reason) => return self.discard(reason),
        };
        let to = self.route_tun(t.dst, now)?;
        Ok((t, to))
    }

    /// Where a packet from the TUN to `dst` goes: the server's peer with that
    /// address, or the client's server (`None`: no bound session yet).
    fn route_tun(&mut self, dst: Ipv4Addr, now: Instant) -> Result<Option<SocketAddr>, Discard> {
        match &mut self.role {
            Role::Server { store, .. } => match store.by_addr(dst) {
                Some(peer) => Ok(Some(peer)),
                None => self.discard(Discard::NoEntry),
            },
            Role::Client { auth: true, sessions, .. } => Ok(sessions.route(dst, now)),
            Role::Client { endpoints, auth: false, .. } => Ok(Some(endpoints.path(dst))),
        }
    }

    /// A datagram from `src` whose payload is `buf[HEADROOM..HEADROOM + len]`.
    /// On [`FromUdp::Tun`], `buf[range]` is the IPv4 packet to write to the
    /// TUN; on [`FromUdp::Control`], the payload is a control datagram for
    /// [`Core::control`].
    pub fn from_udp(
        &mut self,
        src: SocketAddr,
        buf: &mut [u8],
        len: usize,
        now: Instant,
        gate: &mut dyn PeerGate,
    ) -> Result<FromUdp, Discard> {
        let Some(end) = HEADROOM.checked_add(len) else {
            return self.discard(Discard::Malformed);
        };
        let Some((hdr, seg)) = buf.get_mut(..end).map(|b| b.split_at_mut(HEADROOM)) else {
            return self.discard(Discard::Malformed);
        };
        if wire::parse_segment(seg).is_err() && control_wire::is_control(seg) {
            return Ok(FromUdp::Control);
        }
        let inner_src = self.accept_segment(src, seg, now, gate)?;
        let id = self.next_ip_id();
        if wire::write_ipv4_header(hdr, inner_src, self.tun_addr, len, id).is_none() {
            return self.discard(Discard::Malformed);
        }
        Ok(FromUdp::Tun(0..end))
    }

    /// A datagram's payload `seg` from `src`, checked and rewritten in place
    /// for the TUN: MSS clamped, checksum moved from the wire form to the
    /// pseudo-header (returned source, TUN address). The caller puts an
    /// IPv4 header from that source to [`Core::tun_addr`] in front of it.
    pub fn accept_segment(
        &mut self,
        src: SocketAddr,
        seg: &mut [u8],
        now: Instant,
        gate: &mut dyn PeerGate,
    ) -> Result<Ipv4Addr, Discard> {
        if let Err(reason) = wire::parse_segment(seg) {
            return self.discard(reason);
        }
        let inner_src = self.resolve_peer(src, now, gate)?;
        self.rewrite_for_tun(seg, inner_src, self.max_mss.for_peer(&src))?;
        self.counters.add(Traffic::UdpRxPackets, 1);
        self.counters.add(Traffic::UdpRxBytes, seg.len() as u64);
        Ok(inner_src)
    }

    /// A GRO train from `src`: datagrams of `stride` bytes (the last may be
    /// shorter) back to back in `train`. Does for each what
    /// [`Core::accept_segment`] does, but looks the peer up once per train
    /// (every datagram of a train has the same source) and adds to the
    /// counters once. Pushes the ranges of the accepted datagrams onto
    /// `accepted`, those of control datagrams onto `controls`, and returns
    /// the inner source of the accepted ones, or `None` if none passed.
    #[allow(clippy::too_many_arguments)]
    pub fn accept_train(
        &mut self,
        src: SocketAddr,
        train: &mut [u8],
        stride: usize,
        now: Instant,
        gate: &mut dyn PeerGate,
        accepted: &mut Vec<Range<usize>>,
        controls: &mut Vec<Range<usize>>,
    ) -> Option<Ipv4Addr> {
        let mut inner = None;
        let max_mss = self.max_mss.for_peer(&src);
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut at = 0;
        while at < train.len() {
            let end = at.saturating_add(stride.max(1)).min(train.len());
            let range = at..end;
            at = end;
            let Some(seg) = train.get_mut(range.clone()) else { break };
            if let Err(reason) = wire::parse_segment(seg) {
                if control_wire::is_control(seg) {
                    controls.push(range);
                } else {
                    self.counters.discard(reason);
                }
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
            if self.rewrite_for_tun(seg, addr, max_mss).is_err() {
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
    /// its session. Counts a refusal.
    fn resolve_peer(&mut self, src: SocketAddr, now: Instant, gate: &mut dyn PeerGate) -> Result<Ipv4Addr, Discard> {
        let found = match &mut self.role {
            Role::Server { store, auth: false, .. } => match upsert(store, src, now, gate, &self.counters, &mut self.logs) {
                Ok(addr) => Ok(addr),
                Err(_) => Err(Discard::PoolFull),
            },
            Role::Server { store, auth: true, .. } => store.heard(src, now).ok_or(Discard::Unauthenticated),
            Role::Client { sessions, auth: true, .. } => sessions.accept(src, now).ok_or(Discard::Unauthenticated),
            // Version 1 takes any IPv4 source at its word (the inner source
            // is the outer one); an IPv6 one must be a server we send to.
            Role::Client { endpoints, auth: false, .. } => match src {
                SocketAddr::V4(s) => Ok(*s.ip()),
                SocketAddr::V6(_) => endpoints.server_of(src).ok_or(Discard::Unauthenticated),
            },
        };
        found.or_else(|reason| self.discard(reason))
    }

    /// A checked segment from `inner_src`, rewritten in place for the TUN:
    /// MSS clamped to `max_mss` (the family of the path it came by),
    /// checksum moved from the wire form to the pseudo-header (`inner_src`,
    /// TUN address).
    fn rewrite_for_tun(&mut self, seg: &mut [u8], inner_src: Ipv4Addr, max_mss: u16) -> Result<(), Discard> {
        if wire::clamp_mss(seg, max_mss) {
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

    /// A control datagram `payload` from `src` (off the data path: at most
    /// one HMAC each). `nonce`: fresh random bits, used if the server sends a
    /// challenge. A refusal is counted under `discard_control` and returned.
    pub fn control(
        &mut self,
        src: SocketAddr,
        payload: &[u8],
        now: Instant,
        gate: &mut dyn PeerGate,
        nonce: u64,
    ) -> Result<ControlDone, session::Refused> {
        let c = &self.counters;
        let done = match &mut self.role {
            Role::Server { store, auth: true, sessions } => sessions.control(store, gate, src, payload, now, nonce).map(|o| {
                let mut done = ControlDone { reply: o.reply, ..ControlDone::default() };
                match o.event {
                    server::Event::Answered => c.add(Traffic::KeepalivesAnswered, 1),
                    server::Event::Challenged { .. } => {
                        c.add(Traffic::Challenges, 1);
                        done.event = Some(o.event);
                    }
                    server::Event::ChallengePending => {}
                    server::Event::Bound { .. } | server::Event::Moved { .. } => {
                        c.add(Traffic::KeepalivesAnswered, 1);
                        if matches!(o.event, server::Event::Moved { .. }) {
                            c.add(Traffic::Migrations, 1);
                        }
                        done.event = Some(o.event);
                        done.changed = true;
                    }
                    server::Event::Abandoned { .. } | server::Event::GateFull { .. } => {
                        c.discard(Discard::Control);
                        done.event = Some(o.event);
                    }
                }
                done
            }),
            Role::Client { auth: true, sessions, .. } => sessions.control(src, payload, now).map(|o| {
                if o.acked {
                    c.add(Traffic::KeepalivesAnswered, 1);
                }
                ControlDone { reply: o.reply, bound: o.bound, event: None, changed: o.bound.is_some() }
            }),
            // Version 1 has no sessions.
            _ => Err(session::Refused::UnknownSession),
        };
        if done.is_err() {
            c.discard(Discard::Control);
        }
        done
    }

    /// Server: a client proved its credential (SPEC version 2); a session and
    /// an entry for it, or its earlier session taken over.
    pub fn admit(&mut self, a: server::Admit<'_>, now: Instant, gate: &mut dyn PeerGate) -> Result<server::Admitted, Refusal> {
        let Role::Server { store, auth: true, sessions } = &mut self.role else {
            return Err(Refusal::Unavailable);
        };
        let (client, seed) = (a.client.to_string(), a.seed);
        let r = sessions.admit(store, gate, a, now);
        match r {
            Ok(adm) if adm.resumed => self.counters.add(Traffic::SessionsResumed, 1),
            Ok(_) => self.counters.add(Traffic::EntriesCreated, 1),
            Err(Refusal::ClientLimit) => self.counters.discard(Discard::ClientLimit),
            Err(Refusal::PoolFull) => {
                self.counters.discard(Discard::PoolFull);
                let live = store.len();
                self.logs.pool_full.log(now, || {
                    format!("refused client {client} at {seed}: every address of the pool is taken ({live} live entries); widen --pool")
                });
            }
            Err(Refusal::GateFull) => {
                self.counters.discard(Discard::PoolFull);
                self.logs.gate_full.log(now, || {
                    format!("refused client {client} at {seed}: the XDP map is full (raise --xdp-map-size)")
                });
            }
            Err(Refusal::Unavailable) => {}
        }
        r
    }

    /// Server: removes the entry of `addr` and its gate entries at once (a
    /// revoked client).
    pub fn remove_entry(&mut self, addr: Ipv4Addr, gate: &mut dyn PeerGate) -> Option<Entry> {
        let Role::Server { store, sessions, .. } = &mut self.role else { return None };
        let e = store.remove(addr)?;
        if let Some(p) = e.peer {
            gate.revoke(p);
        }
        sessions.forget(addr, gate);
        Some(e)
    }

    /// Server: removes the entries of every session whose client `drop`
    /// says so (revocation). Returns them with their clients.
    pub fn remove_clients(&mut self, drop: impl FnMut(&str) -> bool, gate: &mut dyn PeerGate) -> Vec<(Entry, String)> {
        let Role::Server { store, sessions, .. } = &mut self.role else { return Vec::new() };
        let mut out = Vec::new();
        for addr in sessions.addrs_where(drop) {
            let client = sessions.forget(addr, gate).map(|s| s.client).unwrap_or_default();
            if let Some(e) = store.remove(addr) {
                if let Some(p) = e.peer {
                    gate.revoke(p);
                }
                out.push((e, client));
            }
        }
        out
    }

    /// Server: removes entries whose time ran out, and their gate entries
    /// and sessions. Client: forgets leases that ran out.
    pub fn expire(&mut self, now: Instant, gate: &mut dyn PeerGate, ended: &mut Vec<Ended>) {
        match &mut self.role {
            Role::Server { store, sessions, .. } => {
                let mut gone = Vec::new();
                store.expire(now, &mut gone);
                for e in gone {
                    if let Some(p) = e.peer {
                        gate.revoke(p);
                    }
                    let client = sessions.forget(e.addr, gate).map(|s| s.client);
                    self.counters.add(Traffic::EntriesExpired, 1);
                    ended.push(Ended::Entry { entry: e, client });
                }
            }
            Role::Client { sessions, .. } => {
                let mut gone = Vec::new();
                sessions.expire(now, gate, &mut gone);
                ended.extend(gone.into_iter().map(|server| Ended::Lease { server }));
            }
        }
    }

    /// When [`Core::expire`] next has something to do.
    pub fn next_expiry(&self) -> Option<Instant> {
        match &self.role {
            Role::Server { store, .. } => store.next_expiry(),
            Role::Client { sessions, .. } => sessions.next_expiry(),
        }
    }

    /// Client: the server granted a lease at the end of an authentication.
    pub fn grant(&mut self, g: client::Grant, now: Instant, gate: &mut dyn PeerGate) -> Result<(), Refusal> {
        let Role::Client { sessions, .. } = &mut self.role else { return Err(Refusal::Unavailable) };
        sessions.grant(g, now, gate).map_err(|_| Refusal::GateFull)
    }

    /// Client: where the datagrams for `server` go.
    pub fn path_for(&self, server: Ipv4Addr) -> Option<SocketAddr> {
        match &self.role {
            Role::Client { endpoints, .. } => Some(endpoints.path(server)),
            Role::Server { .. } => None,
        }
    }

    /// Client: what the session timers ask for now (keepalives to send,
    /// re-authentications, bindings given up), counted.
    pub fn client_due(&mut self, now: Instant, out: &mut Vec<client::Action>) {
        if let Role::Client { sessions, auth: true, .. } = &mut self.role {
            let before = out.len();
            sessions.due(now, out);
            let sent = out.iter().skip(before).filter(|a| matches!(a, client::Action::Send { .. })).count();
            self.counters.add(Traffic::KeepalivesSent, sent as u64);
        }
    }

    /// Client: forgets the session with `server` (its binding failed).
    pub fn forget_server(&mut self, server: Ipv4Addr, gate: &mut dyn PeerGate) {
        if let Role::Client { sessions, .. } = &mut self.role {
            sessions.forget(server, gate);
        }
    }

    /// Client: a re-authentication with `server` failed; it may be asked
    /// for again.
    pub fn reauth_failed(&mut self, server: Ipv4Addr) {
        if let Role::Client { sessions, .. } = &mut self.role {
            sessions.reauth_failed(server);
        }
    }

    /// Server: takes back a session saved by an earlier run.
    pub fn restore_server(&mut self, s: server::Saved, counter: u64, now: Instant, gate: &mut dyn PeerGate) -> Result<(), server::RestoreRefused> {
        let Role::Server { store, sessions, .. } = &mut self.role else { return Err(server::RestoreRefused::Expired) };
        sessions.restore(store, gate, s, counter, now)?;
        self.counters.add(Traffic::SessionsResumed, 1);
        Ok(())
    }

    /// Client: takes back a session saved by an earlier run.
    pub fn restore_client(&mut self, s: client::Saved, counter: u64, now: Instant, gate: &mut dyn PeerGate) -> bool {
        let Role::Client { sessions, .. } = &mut self.role else { return false };
        let ok = sessions.restore(s, counter, now, gate);
        if ok {
            self.counters.add(Traffic::SessionsResumed, 1);
        }
        ok
    }

    /// Server: the quarantined addresses (saved across a restart).
    pub fn restore_quarantine(&mut self, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        if let Role::Server { store, .. } = &mut self.role {
            store.restore_quarantine(addrs);
        }
    }
}

/// Version 1: a datagram creates or refreshes its sender's entry.
fn upsert(
    store: &mut ConnectionStore,
    peer: SocketAddr,
    now: Instant,
    gate: &mut dyn PeerGate,
    counters: &Counters,
    logs: &mut PeerLogs,
) -> Result<Ipv4Addr, Refusal> {
    match store.upsert(peer, now) {
        Ok(Upsert::Refreshed(addr)) => Ok(addr),
        Ok(Upsert::Created(addr)) => {
            if gate.allow(peer).is_err() {
                store.remove(addr);
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
    use crate::core::test_gate::FakeGate;

    const SERVER_TUN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT_TUN: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    const SERVER_REAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 12345));

    fn from_server() -> SocketAddr {
        SocketAddr::from((SERVER_REAL, 12345))
    }

    fn gate(capacity: usize) -> FakeGate {
        FakeGate::new(capacity)
    }

    fn server(auth: bool, timeout: Duration) -> Core {
        let pool = Pool::new(Ipv4Addr::new(198, 18, 0, 0), 24, &[SERVER_TUN]).unwrap();
        let store = ConnectionStore::new(pool, timeout, 7);
        Core::new(SERVER_TUN, PathMtu::new(1400, 1500), Core::server(store, auth, 8, Duration::from_secs(10)), Arc::default())
    }

    fn client(auth: bool) -> Core {
        let endpoints = Endpoints::new(12345, &[], None);
        Core::new(CLIENT_TUN, PathMtu::new(1400, 1500), Core::client(endpoints, auth, Duration::from_secs(25)), Arc::default())
    }

    fn tun_range(r: Result<FromUdp, Discard>) -> Result<Range<usize>, Discard> {
        match r? {
            FromUdp::Tun(r) => Ok(r),
            FromUdp::Control => panic!("a control datagram"),
        }
    }

    const SID: SessionId = SessionId([5; 8]);

    fn key_bytes() -> session::KeyBytes {
        session::KeyBytes::from_exporter(&[0x33; control_wire::EXPORTER_LEN])
    }

    /// A client's control datagram of session SID.
    fn from_client(kind: control_wire::Kind, counter: u64, echo: u64) -> [u8; control_wire::LEN] {
        let k = session::Keys::new(key_bytes());
        control_wire::Control { kind, session: SID, counter, echo }.encode(&k.client_to_server)
    }

    /// A server's control datagram of session SID.
    fn from_srv(kind: control_wire::Kind, counter: u64, echo: u64) -> [u8; control_wire::LEN] {
        let k = session::Keys::new(key_bytes());
        control_wire::Control { kind, session: SID, counter, echo }.encode(&k.server_to_client)
    }

    /// Server: authentication, then the path `peer` proven by keepalive,
    /// challenge and response, all through the core. Returns the address.
    fn admit_and_bind(s: &mut Core, peer: SocketAddr, now: Instant, g: &mut FakeGate) -> Ipv4Addr {
        let a = server::Admit { seed: peer, client: "alice", id: SID, keys: key_bytes(), resume: None, counter: 1 };
        let addr = s.admit(a, now, g).unwrap().addr;
        let done = s.control(peer, &from_client(control_wire::Kind::Keepalive, 10, 0), now, g, 0x77).unwrap();
        assert!(done.reply.is_some(), "challenged");
        let done = s.control(peer, &from_client(control_wire::Kind::Response, 11, 0x77), now, g, 0).unwrap();
        assert!(matches!(done.event, Some(server::Event::Bound { .. })));
        assert!(done.changed);
        addr
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

    /// [`tcp_packet`]'s segment as it crosses the wire: the checksum over
    /// zero addresses.
    fn wire_segment(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut seg = tcp_packet(src, dst)[20..].to_vec();
        let zero = Ipv4Addr::UNSPECIFIED;
        wire::rehome_checksum(&mut seg, src, dst, zero, zero).unwrap();
        seg
    }

    /// The MSS option of a SYN segment laid out as [`tcp_packet`] writes it.
    fn mss_of(seg: &[u8]) -> u16 {
        assert_eq!(&seg[20..22], &[2, 4], "an MSS option at the start of the options");
        u16::from_be_bytes([seg[22], seg[23]])
    }

    /// A 1500-byte uplink and a TUN of 1492 (uplink - 8): SYNs to and from an
    /// IPv4 peer are clamped to 1500 - 48, to and from an IPv6 peer to
    /// 1500 - 68, each by the family of that peer's path.
    #[test]
    fn server_clamps_the_mss_per_peer_family() {
        let now = Instant::now();
        let pool = Pool::new(Ipv4Addr::new(198, 18, 0, 0), 24, &[SERVER_TUN]).unwrap();
        let store = ConnectionStore::new(pool, Duration::from_secs(300), 7);
        let mut s = Core::new(SERVER_TUN, PathMtu::new(1492, 1500), Core::server(store, false, 8, Duration::from_secs(10)), Arc::default());
        assert_eq!(s.max_mss(), MaxMss { v4: 1452, v6: 1432 });
        let mut g = gate(10);
        let v6: SocketAddr = "[2001:db8::2]:40000".parse().unwrap();
        for (peer, want) in [(PEER, 1452), (v6, 1432)] {
            // In: the peer's SYN (MSS 1460) reaches the TUN clamped.
            let seg = &wire_segment(CLIENT_TUN, SERVER_REAL);
            let mut buf = datagram(seg);
            let r = tun_range(s.from_udp(peer, &mut buf, seg.len(), now, &mut g)).unwrap();
            assert_eq!(mss_of(&buf[r.start + 20..r.end]), want, "SYN from {peer}");
            let generated = s.store().unwrap().by_peer(peer).unwrap();
            assert!(tcp_valid(generated, SERVER_TUN, &buf[r.start + 20..r.end]), "checksum after the clamp");
            // Out: the server's SYN-ACK to that peer leaves clamped.
            let mut reply = tcp_packet(SERVER_TUN, generated);
            let FromTun::Send { to, payload } = s.from_tun(&mut reply, now).unwrap() else { panic!() };
            assert_eq!(to, peer);
            assert_eq!(mss_of(&reply[payload.clone()]), want, "SYN to {peer}");
            assert!(tcp_valid(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &reply[payload]));
        }
        assert_eq!(s.counters().traffic(Traffic::MssClamped), 4);
    }

    /// A client with one server over IPv6 (`--endpoint-v6`) and one over
    /// IPv4 clamps per server path, in both directions.
    #[test]
    fn client_clamps_the_mss_per_server_path() {
        let now = Instant::now();
        let other = Ipv4Addr::new(198, 51, 100, 1);
        let endpoints = Endpoints::new(12345, &[(SERVER_REAL, "2001:db8::1".parse().unwrap())], None);
        let mut c = Core::new(CLIENT_TUN, PathMtu::new(1492, 1500), Core::client(endpoints, false, Duration::from_secs(25)), Arc::default());
        let mut g = gate(10);
        for (server, path, want) in [
            (SERVER_REAL, "[2001:db8::1]:12345".parse::<SocketAddr>().unwrap(), 1432),
            (other, SocketAddr::from((other, 12345)), 1452),
        ] {
            let mut syn = tcp_packet(CLIENT_TUN, server);
            let FromTun::Send { to, payload } = c.from_tun(&mut syn, now).unwrap() else { panic!() };
            assert_eq!(to, path);
            assert_eq!(mss_of(&syn[payload]), want, "SYN to {path}");
            let seg = &wire_segment(server, CLIENT_TUN);
            let mut buf = datagram(seg);
            let r = tun_range(c.from_udp(path, &mut buf, seg.len(), now, &mut g)).unwrap();
            let out = &buf[r];
            assert_eq!(wire::parse_ipv4_tcp(out).unwrap().src, server, "the server's IPv4 address, not its path");
            assert_eq!(mss_of(&out[20..]), want, "SYN from {path}");
        }
    }

    #[test]
    fn client_to_server_and_back_end_to_end() {
        let now = Instant::now();
        let (mut c, mut s) = (client(false), server(false, Duration::from_secs(300)));
        let mut g = gate(10);

        // client: the app's SYN to the server's real address leaves as a datagram
        let mut pkt = tcp_packet(CLIENT_TUN, SERVER_REAL);
        let FromTun::Send { to, payload } = c.from_tun(&mut pkt, now).unwrap() else { panic!() };
        assert_eq!(to, from_server());
        assert_eq!(payload, 20..49);
        assert_eq!(&pkt[payload.clone()][20..24], &[2, 4, 0x05, 0x50], "MSS clamped to 1400 - 40 = 1360");
        assert!(tcp_valid(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &pkt[payload.clone()]));

        // server: the datagram becomes a segment from the peer's generated address
        let mut buf = datagram(&pkt[payload.clone()]);
        let r = tun_range(s.from_udp(PEER, &mut buf, payload.len(), now, &mut g)).unwrap();
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
        let r = tun_range(c.from_udp(from_server(), &mut buf, payload.len(), now, &mut g)).unwrap();
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
        assert_eq!((to, count, thl), (from_server(), 4, 32));
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
        let mut controls = Vec::new();
        let src = s.accept_train(PEER, &mut train, stride, now, &mut g, &mut accepted, &mut controls);
        assert!(controls.is_empty());
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
        assert_eq!(s2.accept_train(PEER, &mut junk, 25, now, &mut gate(4), &mut accepted, &mut controls), None);
        assert!(s2.store().unwrap().is_empty());
        let mut auth = server(true, Duration::from_secs(300));
        let mut two = [seg.clone(), seg.clone()].concat();
        accepted.clear();
        assert_eq!(auth.accept_train(PEER, &mut two, stride, now, &mut gate(4), &mut accepted, &mut controls), None);
        assert!(accepted.is_empty());
        assert_eq!(auth.counters().discards(Discard::Unauthenticated), 2);
        // stride 0 (never from the kernel) still ends
        assert_eq!(s2.accept_train(PEER, &mut junk, 0, now, &mut gate(4), &mut accepted, &mut controls), None);
    }

    #[test]
    fn authenticated_server_needs_a_proven_path_first() {
        let now = Instant::now();
        let mut s = server(true, Duration::from_secs(300));
        let mut g = gate(10);
        let seg = tcp_packet(CLIENT_TUN, SERVER_REAL)[20..].to_vec();
        let mut buf = datagram(&seg);
        assert_eq!(s.from_udp(PEER, &mut buf, seg.len(), now, &mut g), Err(Discard::Unauthenticated));
        assert!(s.store().unwrap().is_empty(), "datagrams no longer create entries");
        // Authenticated but not proven: still nothing gets in.
        let a = server::Admit { seed: PEER, client: "alice", id: SID, keys: key_bytes(), resume: None, counter: 1 };
        let addr = s.admit(a, now, &mut g).unwrap().addr;
        assert_eq!(s.from_udp(PEER, &mut datagram(&seg), seg.len(), now, &mut g), Err(Discard::Unauthenticated));
        // A control datagram is told apart from a segment and handed back.
        let ka = from_client(control_wire::Kind::Keepalive, 10, 0);
        assert_eq!(s.from_udp(PEER, &mut datagram(&ka), ka.len(), now, &mut g), Ok(FromUdp::Control));
        let done = s.control(PEER, &ka, now, &mut g, 0x77).unwrap();
        assert_eq!(s.counters().traffic(Traffic::Challenges), 1);
        let (to, ch) = done.reply.unwrap();
        assert_eq!((to, ch[0]), (PEER, control_wire::Kind::Challenge as u8));
        let done = s.control(PEER, &from_client(control_wire::Kind::Response, 11, 0x77), now, &mut g, 0).unwrap();
        assert_eq!(done.event, Some(server::Event::Bound { addr, path: PEER }));
        assert!(g.allowed.contains(&PEER) && g.sessions.contains(&SID));
        let r = tun_range(s.from_udp(PEER, &mut buf, seg.len(), now, &mut g)).unwrap();
        assert_eq!(wire::parse_ipv4_tcp(&buf[r]).unwrap().src, addr);
        // A replayed keepalive is refused and counted.
        assert_eq!(s.control(PEER, &ka, now, &mut g, 0), Err(session::Refused::Replay));
        assert_eq!(s.counters().discards(Discard::Control), 1);
        // Control datagrams inside a GRO train are handed back by range.
        let mut train = [from_client(control_wire::Kind::Keepalive, 12, 0), from_client(control_wire::Kind::Keepalive, 13, 0)].concat();
        let (mut accepted, mut controls) = (Vec::new(), Vec::new());
        assert_eq!(s.accept_train(PEER, &mut train, 48, now, &mut g, &mut accepted, &mut controls), None);
        assert_eq!(controls, vec![0..48, 48..96]);
        assert_eq!(s.counters().discards(Discard::Malformed), 0, "not counted as malformed");
    }

    #[test]
    fn full_gate_refuses_the_new_peer_and_keeps_the_live_one() {
        let now = Instant::now();
        let mut s = server(false, Duration::from_secs(300));
        let mut g = gate(1);
        let seg = tcp_packet(CLIENT_TUN, SERVER_REAL)[20..].to_vec();
        let other = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 3), 1));
        tun_range(s.from_udp(PEER, &mut datagram(&seg), seg.len(), now, &mut g)).unwrap();
        assert_eq!(s.from_udp(other, &mut datagram(&seg), seg.len(), now, &mut g), Err(Discard::PoolFull));
        assert_eq!(s.store().unwrap().len(), 1);
        assert!(s.store().unwrap().by_peer(other).is_none(), "store and gate agree");
        assert!(g.allowed.contains(&PEER));
        // Version 2: a session the gate has no room for is refused.
        let mut s2 = server(true, Duration::from_secs(300));
        let mut g0 = gate(0);
        let a = server::Admit { seed: PEER, client: "alice", id: SID, keys: key_bytes(), resume: None, counter: 1 };
        assert_eq!(s2.admit(a, now, &mut g0), Err(Refusal::GateFull));
        assert!(s2.store().unwrap().is_empty());
        assert_eq!(s2.counters().discards(Discard::PoolFull), 1);
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
                let src = SocketAddr::from((Ipv4Addr::from(0xc612_0000 + from + i), 1024 + (i % 50_000) as u16));
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
        let mut s = Core::new(SERVER_TUN, PathMtu::new(1400, 1500), Core::server(ConnectionStore::new(pool, Duration::from_secs(300), 7), false, 8, Duration::from_secs(10)), Arc::default());
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
        tun_range(s.from_udp(PEER, &mut datagram(&seg), seg.len(), t0, &mut g)).unwrap();
        // a datagram at 1.5 s refreshes the entry (version 1)
        let t1 = t0 + Duration::from_millis(1500);
        tun_range(s.from_udp(PEER, &mut datagram(&seg), seg.len(), t1, &mut g)).unwrap();
        let mut gone = Vec::new();
        s.expire(t0 + Duration::from_millis(2500), &mut g, &mut gone);
        assert!(gone.is_empty(), "refreshed at 1.5 s, alive at 2.5 s");
        s.expire(t1 + Duration::from_secs(2), &mut g, &mut gone);
        let [Ended::Entry { entry, client: None }] = &gone[..] else { panic!("{gone:?}") };
        assert!(s.store().unwrap().is_empty());
        assert!(g.allowed.is_empty(), "gate entry removed with the store entry");
        assert_eq!(s.counters().traffic(Traffic::EntriesExpired), 1);
        // the server's traffic to the old address is now discarded
        let mut reply = tcp_packet(SERVER_TUN, entry.addr);
        assert_eq!(s.from_tun(&mut reply, t1 + Duration::from_secs(3)), Err(Discard::NoEntry));
    }

    #[test]
    fn sessions_expire_and_revoked_clients_go_with_their_gate_entries() {
        let now = Instant::now();
        let mut s = server(true, Duration::from_secs(300));
        let mut g = gate(10);
        let addr = admit_and_bind(&mut s, PEER, now, &mut g);
        let removed = s.remove_clients(|c| c == "alice", &mut g);
        assert_eq!(removed.len(), 1);
        assert_eq!((removed[0].0.addr, removed[0].1.as_str()), (addr, "alice"));
        assert!(g.allowed.is_empty() && g.sessions.is_empty());
        assert!(s.store().unwrap().is_empty() && s.server_sessions().unwrap().is_empty());
        assert!(s.remove_entry(addr, &mut g).is_none());
        // An unproven session lapses after its short life (10 s here).
        let a = server::Admit { seed: PEER, client: "bob", id: SessionId([6; 8]), keys: key_bytes(), resume: None, counter: 1 };
        s.admit(a, now, &mut g).unwrap();
        let mut gone = Vec::new();
        s.expire(now + Duration::from_secs(10), &mut g, &mut gone);
        assert!(matches!(&gone[..], [Ended::Entry { client: Some(c), .. }] if c == "bob"));
        assert!(g.sessions.is_empty());
    }

    #[test]
    fn client_sessions_gate_traffic_both_ways() {
        let t0 = Instant::now();
        let mut c = client(true);
        let mut g = gate(10);
        let mut pkt = tcp_packet(CLIENT_TUN, SERVER_REAL);
        assert_eq!(c.from_tun(&mut pkt, t0), Ok(FromTun::NeedAuth { server: SERVER_REAL }));
        let seg = tcp_packet(SERVER_REAL, CLIENT_TUN)[20..].to_vec();
        assert_eq!(c.from_udp(from_server(), &mut datagram(&seg), seg.len(), t0, &mut g), Err(Discard::Unauthenticated));

        let path = c.path_for(SERVER_REAL).unwrap();
        let grant = client::Grant { server: SERVER_REAL, path, lease: Duration::from_secs(30), id: SID, keys: key_bytes(), bound: false, counter: 100, started: t0 };
        c.grant(grant, t0, &mut g).unwrap();
        assert!(g.allowed.contains(&from_server()));
        // Not bound yet: packets still wait; the keepalive goes out.
        assert_eq!(c.from_tun(&mut pkt, t0), Ok(FromTun::NeedAuth { server: SERVER_REAL }));
        let mut due = Vec::new();
        c.client_due(t0, &mut due);
        assert!(matches!(due[..], [client::Action::Send { to, .. }] if to == from_server()));
        assert_eq!(c.counters().traffic(Traffic::KeepalivesSent), 1);
        // The server's ack binds the session.
        let ack = from_srv(control_wire::Kind::Ack, 5, 101);
        assert_eq!(c.from_udp(from_server(), &mut datagram(&ack), ack.len(), t0, &mut g), Ok(FromUdp::Control));
        let done = c.control(from_server(), &ack, t0, &mut g, 0).unwrap();
        assert_eq!(done.bound, Some(SERVER_REAL));
        assert!(matches!(c.from_tun(&mut pkt, t0), Ok(FromTun::Send { .. })));
        let wrong_port = SocketAddr::from((SERVER_REAL, 999));
        assert_eq!(c.from_udp(wrong_port, &mut datagram(&seg), seg.len(), t0, &mut g), Err(Discard::Unauthenticated));
        assert!(c.from_udp(from_server(), &mut datagram(&seg), seg.len(), t0, &mut g).is_ok());
        // lapsed lease: traffic needs authentication again, and the gate forgets the server
        let late = t0 + Duration::from_secs(31);
        let mut gone = Vec::new();
        c.expire(late, &mut g, &mut gone);
        assert_eq!(gone, vec![Ended::Lease { server: SERVER_REAL }]);
        assert!(g.allowed.is_empty() && g.sessions.is_empty());
        assert_eq!(c.from_tun(&mut tcp_packet(CLIENT_TUN, SERVER_REAL), late), Ok(FromTun::NeedAuth { server: SERVER_REAL }));
    }

    #[test]
    fn version1_client_accepts_any_source() {
        let now = Instant::now();
        let mut c = client(false);
        let seg = tcp_packet(SERVER_REAL, CLIENT_TUN)[20..].to_vec();
        let src = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 9), 4000));
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
