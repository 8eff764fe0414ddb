//! Control datagrams (keepalives, acks, challenges, responses) from any
//! source, with any bytes, into a server's and a client's sessions: the
//! checked view `Control::parse`, the tag check, the counters, path proofs
//! and migration.
//!
//! The input is a sequence of operations; each either hands raw bytes to a
//! side (most are refused), or makes a well-formed datagram with the real
//! keys and fields taken from the input (so that proofs, challenges,
//! migrations and replays are reached, not only refusals), or lets time
//! pass, or expires. After every step: the store's peers and sessions are
//! exactly what the gate lets in; a refused datagram changed nothing; a
//! session's generated address never changes.
//!
//! Input: operations, each a tag byte and its fields (see `step`).
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use udp_encap_tun::core::session::wire::{Control, EXPORTER_LEN, Kind, LEN};
use udp_encap_tun::core::session::{KeyBytes, Keys, SessionId, client, server};
use udp_encap_tun::core::store::{ConnectionStore, Pool};
use udp_encap_tun::core::{GateFull, PeerGate};

const MAX_OPS: usize = 96;

#[derive(Default)]
struct Gate {
    peers: HashSet<SocketAddr>,
    sessions: HashSet<SessionId>,
}

impl PeerGate for Gate {
    fn allow(&mut self, peer: SocketAddr) -> Result<(), GateFull> {
        if self.peers.len() >= 8 && !self.peers.contains(&peer) {
            return Err(GateFull);
        }
        self.peers.insert(peer);
        Ok(())
    }
    fn revoke(&mut self, peer: SocketAddr) {
        self.peers.remove(&peer);
    }
    fn allow_session(&mut self, id: SessionId) -> Result<(), GateFull> {
        self.sessions.insert(id);
        Ok(())
    }
    fn revoke_session(&mut self, id: SessionId) {
        self.sessions.remove(&id);
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
        self.0 = rest;
        first
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(std::array::from_fn(|_| self.u8()))
    }
    fn bytes(&mut self) -> Vec<u8> {
        let n = usize::from(self.u8()).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b.to_vec()
    }
    /// One of 8 sources: 4 addresses (two IPv6), 2 ports.
    fn src(&mut self) -> SocketAddr {
        let b = self.u8();
        let port = 40000 + u16::from(b & 1);
        match b >> 1 & 3 {
            0 => SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), port)),
            1 => SocketAddr::from((Ipv4Addr::new(198, 51, 100, 2), port)),
            2 => SocketAddr::new("2001:db8::1".parse().unwrap_or(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)), port),
            _ => SocketAddr::new("2001:db8::2".parse().unwrap_or(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)), port),
        }
    }
}

fn keys(n: u8) -> KeyBytes {
    KeyBytes::from_exporter(&[n; EXPORTER_LEN])
}

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SERVER_PATH: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(SERVER, 12345));

struct World {
    now: Instant,
    store: ConnectionStore,
    sessions: server::Sessions,
    sgate: Gate,
    client: client::Sessions,
    cgate: Gate,
    /// The address each session id was given (it must never change).
    addrs: HashMap<SessionId, Ipv4Addr>,
    /// What the client side of each session would send next.
    counters: HashMap<SessionId, u64>,
}

impl World {
    fn check(&self) {
        let mut want: HashSet<SocketAddr> = HashSet::new();
        for e in self.store.entries() {
            if let Some(p) = e.peer {
                assert!(want.insert(p), "two entries hold {p}");
                assert_eq!(self.store.by_peer(p), Some(e.addr));
            }
            assert!(self.sessions.get_by_addr(e.addr).is_some(), "an entry without a session");
        }
        assert_eq!(want, self.sgate.peers, "store peers and gate peers differ");
        let ids: HashSet<SessionId> = self.sessions.iter().map(|s| s.id).collect();
        assert_eq!(ids, self.sgate.sessions, "sessions and gate sessions differ");
        for s in self.sessions.iter() {
            assert_eq!(self.addrs.get(&s.id), Some(&s.addr), "a session's address changed");
            assert!(self.store.get(s.addr).is_some(), "a session without its entry");
        }
        for s in self.client.iter() {
            assert!(self.cgate.peers.contains(&s.path) && self.cgate.sessions.contains(&s.id));
        }
    }

    /// A datagram of session `id`, from the client's side, well formed.
    fn client_datagram(&mut self, id: SessionId, key: u8, kind: Kind, echo: u64, counter_skip: u8) -> [u8; LEN] {
        let c = self.counters.entry(id).or_insert(0);
        *c = c.wrapping_add(1 + u64::from(counter_skip & 3)).min(u64::MAX - 8);
        let counter = if counter_skip & 0x80 != 0 { c.saturating_sub(2) } else { *c };
        Control { kind, session: id, counter, echo }.encode(&Keys::new(keys(key)).client_to_server)
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        match inp.u8() % 9 {
            // A client authenticates (ids from a small set, so they collide).
            0 => {
                let id = SessionId([1 + (inp.u8() & 3); 8]);
                let resume = (inp.u8() & 1 == 1).then(|| SessionId([1 + (inp.u8() & 3); 8]));
                let client = if inp.u8() & 1 == 0 { "alice" } else { "bob" };
                let a = server::Admit { seed: inp.src(), client, id, keys: keys(id.0[0]), resume, counter: inp.u64() >> 8 };
                let before: Vec<_> = self.store.entries().copied().collect();
                match self.sessions.admit(&mut self.store, &mut self.sgate, a, self.now) {
                    Ok(adm) => {
                        // A resumed session keeps its address under its new id.
                        if let Some(old) = resume.filter(|_| adm.resumed) {
                            assert_eq!(self.addrs.get(&old), Some(&adm.addr));
                        }
                        self.addrs.insert(id, adm.addr);
                        self.counters.insert(id, 0);
                    }
                    Err(_) => {
                        let after: Vec<_> = self.store.entries().copied().collect();
                        assert_eq!(before.len(), after.len(), "a refused admission changed the store");
                    }
                }
            }
            // Raw bytes from anywhere to the server.
            1 => {
                let src = inp.src();
                let b = inp.bytes();
                let before = self.store.len();
                if self.sessions.control(&mut self.store, &mut self.sgate, src, &b, self.now, inp.u64()).is_err() {
                    assert_eq!(before, self.store.len());
                }
            }
            // A well-formed keepalive or response of a session, maybe with
            // the wrong key, from any source.
            2 => {
                let id = SessionId([1 + (inp.u8() & 3); 8]);
                let key = if inp.u8() & 7 == 0 { 99 } else { id.0[0] };
                let kind = if inp.u8() & 1 == 0 { Kind::Keepalive } else { Kind::Response };
                let echo = inp.u64();
                let skip = inp.u8();
                let dgram = self.client_datagram(id, key, kind, echo, skip);
                let src = inp.src();
                let peers_before = self.store.entries().filter_map(|e| e.peer).count();
                let r = self.sessions.control(&mut self.store, &mut self.sgate, src, &dgram, self.now, inp.u64());
                if key == 99 {
                    assert!(r.is_err(), "a datagram under the wrong key was taken");
                    assert_eq!(peers_before, self.store.entries().filter_map(|e| e.peer).count());
                }
                // Answer a challenge at once, from where it went, sometimes.
                if let Ok(server::Outcome { reply: Some((to, reply)), event: server::Event::Challenged { .. } }) = r
                    && inp.u8() & 1 == 1
                    && let Some(ch) = Control::parse(&reply)
                {
                    let resp = self.client_datagram(id, key, Kind::Response, ch.echo, 0);
                    let _ = self.sessions.control(&mut self.store, &mut self.sgate, to, &resp, self.now, 0);
                }
            }
            // The data path hears a peer.
            3 => {
                let src = inp.src();
                let _ = self.store.heard(src, self.now);
            }
            // Time passes; entries lapse with their sessions.
            4 => {
                self.now += Duration::from_millis(u64::from(inp.u8()) * 100);
                let mut gone = Vec::new();
                self.store.expire(self.now, &mut gone);
                for e in gone {
                    if let Some(p) = e.peer {
                        self.sgate.revoke(p);
                    }
                    self.sessions.forget(e.addr, &mut self.sgate);
                }
                let mut lapsed = Vec::new();
                self.client.expire(self.now, &mut self.cgate, &mut lapsed);
            }
            // The client gets a lease, bound or not.
            5 => {
                let id = SessionId([1 + (inp.u8() & 3); 8]);
                let g = client::Grant {
                    server: SERVER,
                    path: SERVER_PATH,
                    lease: Duration::from_secs(u64::from(inp.u8())),
                    id,
                    keys: keys(id.0[0]),
                    bound: inp.u8() & 1 == 1,
                    counter: inp.u64() >> 8,
                    started: self.now,
                };
                let _ = self.client.grant(g, self.now, &mut self.cgate);
            }
            // Raw bytes, or a well-formed server datagram, to the client.
            6 | 7 => {
                let src = if inp.u8() & 3 == 0 { inp.src() } else { SERVER_PATH };
                let b = if inp.u8() & 1 == 0 {
                    inp.bytes()
                } else {
                    let id = SessionId([1 + (inp.u8() & 3); 8]);
                    let kind = if inp.u8() & 1 == 0 { Kind::Ack } else { Kind::Challenge };
                    let c = Control { kind, session: id, counter: inp.u64(), echo: inp.u64() };
                    c.encode(&Keys::new(keys(id.0[0])).server_to_client).to_vec()
                };
                if let Ok(o) = self.client.control(src, &b, self.now) {
                    assert_eq!(src, SERVER_PATH, "the client took a datagram from elsewhere");
                    if let Some((to, _)) = o.reply {
                        assert_eq!(to, SERVER_PATH);
                    }
                }
            }
            // The client's timers.
            _ => {
                let mut out = Vec::new();
                self.client.due(self.now, &mut out);
                for a in out {
                    if let client::Action::Send { to, bytes } = a {
                        assert_eq!(to, SERVER_PATH);
                        assert!(Control::parse(&bytes).is_some(), "the client sent a malformed datagram");
                    }
                }
            }
        }
    }
}

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    let Ok(pool) = Pool::new(Ipv4Addr::new(198, 18, 0, 0), 28, &[Ipv4Addr::new(198, 18, 0, 1)]) else { return };
    let mut w = World {
        now: Instant::now(),
        store: ConnectionStore::new(pool, Duration::from_secs(30), 11),
        sessions: server::Sessions::new(2, Duration::from_secs(10)),
        sgate: Gate::default(),
        client: client::Sessions::new(Duration::from_secs(4)),
        cgate: Gate::default(),
        addrs: HashMap::new(),
        counters: HashMap::new(),
    };
    let mut inp = Input(data);
    for _ in 0..MAX_OPS {
        if inp.0.is_empty() {
            break;
        }
        w.step(&mut inp);
        w.check();
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
