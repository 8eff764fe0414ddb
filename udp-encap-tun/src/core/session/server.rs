//! The server's sessions: one per successful authentication, each owning a
//! store entry (its generated address) and, once proven, the UDP path its
//! datagrams come from.
//!
//! A session starts without a path ([`Sessions::admit`]): the TCP source of
//! the authentication says nothing about the UDP one when a NAT maps them
//! apart. The client's first keepalive comes from its UDP path; the server
//! answers it with a challenge there, and the response binds the path. The
//! same exchange moves a live session to a new path later (NAT rebinding,
//! handover): see the module documentation of [`super`] for why a copied,
//! replayed or forged datagram moves nothing.
//!
//! Invariants kept with the store and the gate: every session has exactly one
//! store entry (`addr`), and its id is in the gate (`allow_session`); an
//! entry's peer is in the gate while the entry holds it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::wire::{self, Control, Kind, LEN};
use super::{KeyBytes, Keys, Refused, SessionId};
use crate::core::store::ConnectionStore;
use crate::core::{PeerGate, Refusal};

/// A new keepalive from a path being challenged gets a new challenge only
/// after this (the first may have been lost).
pub const CHALLENGE_RETRY: Duration = Duration::from_secs(1);

/// A challenge sent to `path`, waiting for the response that echoes `nonce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    path: SocketAddr,
    nonce: u64,
    sent: Instant,
}

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    /// The credential's id (revocation, `--max-entries-per-client`).
    pub client: String,
    /// The generated address: the session's store entry.
    pub addr: Ipv4Addr,
    keys: Keys,
    /// The highest counter accepted from the client.
    rx: u64,
    /// The last counter we sent.
    tx: u64,
    probe: Option<Probe>,
}

impl Session {
    fn send(&mut self, kind: Kind, echo: u64) -> [u8; LEN] {
        self.tx = self.tx.wrapping_add(1);
        Control { kind, session: self.id, counter: self.tx, echo }.encode(&self.keys.server_to_client)
    }
}

/// A successful authentication, as the auth edge hands it over.
#[derive(Debug, Clone)]
pub struct Admit<'a> {
    /// The TCP source of the authentication: only the seed of the address.
    pub seed: SocketAddr,
    pub client: &'a str,
    /// Chosen at random by the auth edge, which took the keys from the TLS
    /// exporter with it as context.
    pub id: SessionId,
    pub keys: KeyBytes,
    /// The session the client held before, if it says so: kept (address and
    /// path) if it is still here and the same client's.
    pub resume: Option<SessionId>,
    /// Where our counter starts (the daemon passes the wall clock in
    /// microseconds, so a restarted server never reuses a counter).
    pub counter: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub addr: Ipv4Addr,
    /// An earlier session of the client was taken over.
    pub resumed: bool,
    /// The session has a UDP path already (a resumed one): datagrams can
    /// flow at once.
    pub bound: bool,
}

/// What a control datagram did, for the counters and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A keepalive on the current path: lease refreshed, answered.
    Answered,
    /// A keepalive from another path: challenged there.
    Challenged { addr: Ipv4Addr, path: SocketAddr },
    /// A keepalive from a path already challenged a moment ago: nothing sent.
    ChallengePending,
    /// The session's first path is proven.
    Bound { addr: Ipv4Addr, path: SocketAddr },
    /// The session moved (NAT rebinding, a new address). `robbed`: another
    /// session held `to` and lost it.
    Moved { addr: Ipv4Addr, from: SocketAddr, to: SocketAddr, robbed: Option<Ipv4Addr> },
    /// A response came back, but the current path was heard from since the
    /// challenge: the client is still there, someone copied its datagrams.
    Abandoned { addr: Ipv4Addr, path: SocketAddr },
    /// The proven path could not be put into the gate (map full).
    GateFull { addr: Ipv4Addr, path: SocketAddr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<(SocketAddr, [u8; LEN])>,
    pub event: Event,
}

/// A session as saved across a restart (times as instants; the daemon turns
/// them into wall-clock times on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub id: SessionId,
    pub client: String,
    pub addr: Ipv4Addr,
    pub peer: Option<SocketAddr>,
    pub keys: KeyBytes,
    pub rx: u64,
    pub tx: u64,
    pub deadline: Instant,
}

/// Why a saved session was not taken back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreRefused {
    #[error("it has expired")]
    Expired,
    #[error("session {0} twice")]
    Duplicate(SessionId),
    #[error("{0}")]
    Store(#[from] crate::core::store::RestoreError),
    #[error("the XDP map is full")]
    GateFull,
}

#[derive(Debug)]
pub struct Sessions {
    by_id: HashMap<SessionId, Session>,
    by_addr: HashMap<Ipv4Addr, SessionId>,
    per_client: HashMap<String, usize>,
    max_per_client: usize,
    /// How long an authenticated session may take to prove its UDP path.
    bind_life: Duration,
}

impl Sessions {
    pub fn new(max_per_client: usize, bind_life: Duration) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            by_addr: HashMap::new(),
            per_client: HashMap::new(),
            max_per_client: max_per_client.max(1),
            bind_life,
        }
    }

    /// A client proved its credential: a new session with an address of its
    /// own, or the client's earlier session taken over (`resume`).
    pub fn admit(&mut self, store: &mut ConnectionStore, gate: &mut dyn PeerGate, a: Admit<'_>, now: Instant) -> Result<Admitted, Refusal> {
        if a.id.is_zero() || self.by_id.contains_key(&a.id) {
            // A random 64-bit id met one in use: let the client try again.
            return Err(Refusal::Unavailable);
        }
        let keys = Keys::new(a.keys);
        if let Some(old) = a.resume.filter(|o| self.by_id.get(o).is_some_and(|s| s.client == a.client)) {
            gate.allow_session(a.id).map_err(|_| Refusal::GateFull)?;
            gate.revoke_session(old);
            let addr = match self.by_id.remove(&old) {
                Some(s) => s.addr,
                None => return Err(Refusal::Unavailable),
            };
            store.refresh(addr, now);
            self.by_addr.insert(addr, a.id);
            self.by_id.insert(a.id, Session { id: a.id, client: a.client.to_string(), addr, keys, rx: 0, tx: a.counter, probe: None });
            return Ok(Admitted { addr, resumed: true, bound: store.by_addr(addr).is_some() });
        }
        if self.per_client.get(a.client).copied().unwrap_or(0) >= self.max_per_client {
            return Err(Refusal::ClientLimit);
        }
        let addr = store.reserve(a.seed, now, self.bind_life).map_err(|_| Refusal::PoolFull)?;
        if gate.allow_session(a.id).is_err() {
            store.remove(addr);
            return Err(Refusal::GateFull);
        }
        *self.per_client.entry(a.client.to_string()).or_insert(0) += 1;
        self.by_addr.insert(addr, a.id);
        self.by_id.insert(a.id, Session { id: a.id, client: a.client.to_string(), addr, keys, rx: 0, tx: a.counter, probe: None });
        Ok(Admitted { addr, resumed: false, bound: false })
    }

    /// A control datagram from `src`. `nonce`: fresh random bits, used if
    /// a challenge goes out.
    pub fn control(
        &mut self,
        store: &mut ConnectionStore,
        gate: &mut dyn PeerGate,
        src: SocketAddr,
        payload: &[u8],
        now: Instant,
        nonce: u64,
    ) -> Result<Outcome, Refused> {
        let c = Control::parse(payload).ok_or(Refused::Kind)?;
        if !c.kind.from_client() {
            return Err(Refused::Kind);
        }
        let s = self.by_id.get_mut(&c.session).ok_or(Refused::UnknownSession)?;
        if !wire::verify(payload, &s.keys.client_to_server) {
            return Err(Refused::Tag);
        }
        if c.counter <= s.rx {
            return Err(Refused::Replay);
        }
        s.rx = c.counter;
        let addr = s.addr;
        let path = store.by_addr(addr);
        // A proof on the session's path: the lease is refreshed and the
        // path counts as heard, like a data datagram.
        let answer = |s: &mut Session, store: &mut ConnectionStore| {
            store.refresh(addr, now);
            store.heard(src, now);
            Some((src, s.send(Kind::Ack, c.counter)))
        };
        match c.kind {
            Kind::Keepalive if path == Some(src) => {
                s.probe = None;
                Ok(Outcome { reply: answer(s, store), event: Event::Answered })
            }
            Kind::Keepalive => {
                if s.probe.is_some_and(|p| p.path == src && now.saturating_duration_since(p.sent) < CHALLENGE_RETRY) {
                    return Ok(Outcome { reply: None, event: Event::ChallengePending });
                }
                s.probe = Some(Probe { path: src, nonce, sent: now });
                let reply = Some((src, s.send(Kind::Challenge, nonce)));
                Ok(Outcome { reply, event: Event::Challenged { addr, path: src } })
            }
            Kind::Response => match s.probe {
                Some(p) if p.path == src && p.nonce == c.echo => {
                    s.probe = None;
                    // Heard on the current path since the challenge left: the
                    // client is there, so this response was relayed by
                    // someone who copies its traffic.
                    if let Some(cur) = path
                        && store.last_heard(cur).is_some_and(|h| h > p.sent)
                    {
                        return Ok(Outcome { reply: None, event: Event::Abandoned { addr, path: src } });
                    }
                    if gate.allow(src).is_err() {
                        return Ok(Outcome { reply: None, event: Event::GateFull { addr, path: src } });
                    }
                    let (old, robbed) = store.set_peer(addr, src, now).unwrap_or((None, None));
                    if let Some(o) = old {
                        gate.revoke(o);
                    }
                    let reply = answer(s, store);
                    let client = s.client.clone();
                    // The path belonged to another session. If it is the same
                    // client's (a client restarted without its state, from the
                    // same socket), that session is abandoned: it goes now
                    // rather than hold an address and a place under
                    // --max-entries-per-client for a whole lease. Another
                    // client's keeps its address and waits for its own proof.
                    let robbed = robbed.filter(|r| {
                        let same = self.get_by_addr(*r).is_some_and(|o| o.client == client);
                        if same {
                            self.forget(*r, gate);
                            store.remove(*r);
                        }
                        !same
                    });
                    let event = match old {
                        Some(from) => Event::Moved { addr, from, to: src, robbed },
                        None => Event::Bound { addr, path: src },
                    };
                    Ok(Outcome { reply, event })
                }
                // The client answered a challenge from the path it is on:
                // someone relayed the challenge to it. It stays.
                _ if path == Some(src) => {
                    s.probe = None;
                    Ok(Outcome { reply: answer(s, store), event: Event::Answered })
                }
                _ => Err(Refused::NoChallenge),
            },
            Kind::Ack | Kind::Challenge => Err(Refused::Kind),
        }
    }

    /// The store entry of `addr` is gone (expired or removed): its session
    /// goes with it.
    pub fn forget(&mut self, addr: Ipv4Addr, gate: &mut dyn PeerGate) -> Option<Session> {
        let id = self.by_addr.remove(&addr)?;
        let s = self.by_id.remove(&id)?;
        gate.revoke_session(id);
        if let Some(n) = self.per_client.get_mut(&s.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_client.remove(&s.client);
            }
        }
        Some(s)
    }

    pub fn get_by_addr(&self, addr: Ipv4Addr) -> Option<&Session> {
        self.by_id.get(self.by_addr.get(&addr)?)
    }

    /// The addresses of the sessions whose client `keep` refuses.
    pub fn addrs_where(&self, mut drop: impl FnMut(&str) -> bool) -> Vec<Ipv4Addr> {
        self.by_id.values().filter(|s| drop(&s.client)).map(|s| s.addr).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Session> + '_ {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every session as it would be saved.
    pub fn saved(&self, store: &ConnectionStore) -> Vec<Saved> {
        self.by_id
            .values()
            .filter_map(|s| {
                let e = store.get(s.addr)?;
                Some(Saved {
                    id: s.id,
                    client: s.client.clone(),
                    addr: s.addr,
                    peer: e.peer,
                    keys: s.keys.bytes.clone(),
                    rx: s.rx,
                    tx: s.tx,
                    deadline: e.deadline?,
                })
            })
            .collect()
    }

    /// Takes back a session saved by an earlier run: its entry, its path in
    /// the gate. `counter`: at least where our counter resumes.
    pub fn restore(&mut self, store: &mut ConnectionStore, gate: &mut dyn PeerGate, s: Saved, counter: u64, now: Instant) -> Result<(), RestoreRefused> {
        if s.deadline <= now {
            return Err(RestoreRefused::Expired);
        }
        if self.by_id.contains_key(&s.id) || s.id.is_zero() {
            return Err(RestoreRefused::Duplicate(s.id));
        }
        store.restore(s.addr, s.peer, now, s.deadline)?;
        let gated = gate.allow_session(s.id).is_ok() && s.peer.is_none_or(|p| gate.allow(p).is_ok());
        if !gated {
            gate.revoke_session(s.id);
            store.remove(s.addr);
            return Err(RestoreRefused::GateFull);
        }
        *self.per_client.entry(s.client.clone()).or_insert(0) += 1;
        self.by_addr.insert(s.addr, s.id);
        let tx = s.tx.max(counter);
        self.by_id.insert(s.id, Session { id: s.id, client: s.client, addr: s.addr, keys: Keys::new(s.keys), rx: s.rx, tx, probe: None });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::core::store::Pool;
    use crate::core::test_gate::FakeGate;

    const SID: SessionId = SessionId([1, 2, 3, 4, 5, 6, 7, 8]);
    const T: Duration = Duration::from_secs(300);

    fn key_bytes(seed: u8) -> KeyBytes {
        let mut out = [0u8; wire::EXPORTER_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8);
        }
        KeyBytes::from_exporter(&out)
    }

    fn setup() -> (Sessions, ConnectionStore, FakeGate) {
        let pool = Pool::new(Ipv4Addr::new(198, 18, 0, 1), 24, &[Ipv4Addr::new(198, 18, 0, 1)]).unwrap();
        (Sessions::new(2, Duration::from_secs(10)), ConnectionStore::new(pool, T, 5), FakeGate::new(100))
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The client's side of the exchange, by hand.
    struct Client {
        keys: Keys,
        id: SessionId,
        counter: u64,
    }

    impl Client {
        fn new(id: SessionId, seed: u8) -> Client {
            Client { keys: Keys::new(key_bytes(seed)), id, counter: 100 }
        }
        fn make(&mut self, kind: Kind, echo: u64) -> [u8; LEN] {
            self.counter += 1;
            Control { kind, session: self.id, counter: self.counter, echo }.encode(&self.keys.client_to_server)
        }
        fn read(&self, b: &[u8; LEN]) -> Control {
            assert!(wire::verify(b, &self.keys.server_to_client), "the server's datagram verifies");
            Control::parse(b).unwrap()
        }
    }

    fn admit(s: &mut Sessions, store: &mut ConnectionStore, g: &mut FakeGate, id: SessionId, client: &str, now: Instant) -> Result<Admitted, Refusal> {
        let a = Admit { seed: sa("198.51.100.1:12345"), client, id, keys: key_bytes(id.0[0]), resume: None, counter: 1 };
        s.admit(store, g, a, now)
    }

    /// Keepalive, challenge, response, ack: the path is bound.
    fn bind(s: &mut Sessions, store: &mut ConnectionStore, g: &mut FakeGate, c: &mut Client, path: SocketAddr, now: Instant) -> Event {
        let ka = c.make(Kind::Keepalive, 0);
        let o = s.control(store, g, path, &ka, now, 0xfeed).unwrap();
        let (to, ch) = o.reply.unwrap();
        assert_eq!(to, path);
        let ch = c.read(&ch);
        assert_eq!((ch.kind, ch.echo), (Kind::Challenge, 0xfeed));
        let resp = c.make(Kind::Response, ch.echo);
        let o = s.control(store, g, path, &resp, now, 0).unwrap();
        let (to, ack) = o.reply.unwrap();
        assert_eq!(to, path);
        let ack = c.read(&ack);
        assert_eq!((ack.kind, ack.echo), (Kind::Ack, c.counter));
        o.event
    }

    #[test]
    fn the_udp_path_is_learned_from_udp_not_from_the_tcp_source() {
        let (mut s, mut store, mut g) = setup();
        let now = Instant::now();
        let a = admit(&mut s, &mut store, &mut g, SID, "alice", now).unwrap();
        assert_eq!(a, Admitted { addr: a.addr, resumed: false, bound: false });
        assert!(g.sessions.contains(&SID) && g.allowed.is_empty());
        assert_eq!(store.by_addr(a.addr), None);
        // The NAT maps UDP to another port than the TCP of the authentication.
        let udp = sa("198.51.100.1:52001");
        let mut c = Client::new(SID, 1);
        assert_eq!(bind(&mut s, &mut store, &mut g, &mut c, udp, now), Event::Bound { addr: a.addr, path: udp });
        assert_eq!(store.by_peer(udp), Some(a.addr));
        assert!(g.allowed.contains(&udp));
        assert!(!g.allowed.contains(&sa("198.51.100.1:12345")), "the TCP source is never let in");
        // The entry now lives the lease, refreshed by the proof.
        assert_eq!(store.next_expiry(), Some(now + T));
    }

    #[test]
    fn a_session_moves_to_a_proven_new_path_keeping_its_address() {
        let (mut s, mut store, mut g) = setup();
        let t0 = Instant::now();
        let a = admit(&mut s, &mut store, &mut g, SID, "alice", t0).unwrap().addr;
        let mut c = Client::new(SID, 1);
        let old = sa("198.18.0.254:50001");
        bind(&mut s, &mut store, &mut g, &mut c, old, t0);
        store.heard(old, t0 + Duration::from_secs(1));
        // The NAT rebinds; the old mapping is silent from now on.
        let new = sa("198.18.0.254:50777");
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(bind(&mut s, &mut store, &mut g, &mut c, new, t1), Event::Moved { addr: a, from: old, to: new, robbed: None });
        assert_eq!((store.by_peer(new), store.by_peer(old)), (Some(a), None));
        assert!(g.allowed.contains(&new) && !g.allowed.contains(&old), "the gate follows");
        // Keepalives on the new path are answered and refresh the lease.
        let ka = c.make(Kind::Keepalive, 0);
        let t2 = t1 + Duration::from_secs(20);
        let o = s.control(&mut store, &mut g, new, &ka, t2, 0).unwrap();
        assert_eq!(o.event, Event::Answered);
        assert_eq!(store.next_expiry(), Some(t2 + T));
    }

    #[test]
    fn copies_replays_and_forgeries_move_nothing() {
        let (mut s, mut store, mut g) = setup();
        let t0 = Instant::now();
        let a = admit(&mut s, &mut store, &mut g, SID, "alice", t0).unwrap().addr;
        let mut c = Client::new(SID, 1);
        let home = sa("198.18.0.254:50001");
        bind(&mut s, &mut store, &mut g, &mut c, home, t0);
        let thief = sa("203.0.113.66:40000");

        // A copy of a keepalive the server has already seen: replay.
        let ka = c.make(Kind::Keepalive, 0);
        s.control(&mut store, &mut g, home, &ka, t0, 0).unwrap();
        assert_eq!(s.control(&mut store, &mut g, thief, &ka, t0, 0), Err(Refused::Replay));
        // A forgery (no key): wrong tag.
        let mut forged = ka;
        forged[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(s.control(&mut store, &mut g, thief, &forged, t0, 0), Err(Refused::Tag));
        let wrong_key = Control { kind: Kind::Keepalive, session: SID, counter: u64::MAX, echo: 0 }.encode(&Keys::new(key_bytes(9)).client_to_server);
        assert_eq!(s.control(&mut store, &mut g, thief, &wrong_key, t0, 0), Err(Refused::Tag));
        // The server's own datagrams reflected back: wrong direction.
        let ack = Control { kind: Kind::Ack, session: SID, counter: 5, echo: 0 }.encode(&c.keys.server_to_client);
        assert_eq!(s.control(&mut store, &mut g, thief, &ack, t0, 0), Err(Refused::Kind));
        let reflected = Control { kind: Kind::Keepalive, session: SID, counter: u64::MAX, echo: 0 }.encode(&c.keys.server_to_client);
        assert_eq!(s.control(&mut store, &mut g, thief, &reflected, t0, 0), Err(Refused::Tag));
        // An unknown session.
        let other = Control { kind: Kind::Keepalive, session: SessionId([9; 8]), counter: 1, echo: 0 }.encode(&c.keys.client_to_server);
        assert_eq!(s.control(&mut store, &mut g, thief, &other, t0, 0), Err(Refused::UnknownSession));
        // A response to no challenge.
        let resp = c.make(Kind::Response, 1234);
        assert_eq!(s.control(&mut store, &mut g, thief, &resp, t0, 0), Err(Refused::NoChallenge));
        assert_eq!(store.by_peer(home), Some(a));

        // The race: a fresh keepalive copied and sent from elsewhere before
        // the original arrives is challenged there; the thief cannot answer
        // without the key.
        let t1 = t0 + Duration::from_secs(1);
        let ka = c.make(Kind::Keepalive, 0);
        let o = s.control(&mut store, &mut g, thief, &ka, t1, 0x5eed).unwrap();
        assert_eq!(o.event, Event::Challenged { addr: a, path: thief });
        // ... and the original, now a replay, is refused; the client keeps
        // sending from home.
        assert_eq!(s.control(&mut store, &mut g, home, &ka, t1, 0), Err(Refused::Replay));
        store.heard(home, t1 + Duration::from_millis(10));
        // The thief relays the challenge to the client and copies its
        // response: the current path was heard since, so nothing moves.
        let resp = c.make(Kind::Response, 0x5eed);
        let o = s.control(&mut store, &mut g, thief, &resp, t1 + Duration::from_millis(20), 0).unwrap();
        assert_eq!(o, Outcome { reply: None, event: Event::Abandoned { addr: a, path: thief } });
        assert_eq!(store.by_peer(home), Some(a));
        assert!(!g.allowed.contains(&thief));
        // Had the genuine response come first (from home): answered, stays.
        let ka = c.make(Kind::Keepalive, 0);
        s.control(&mut store, &mut g, thief, &ka, t1 + Duration::from_secs(2), 0x77).unwrap();
        let resp = c.make(Kind::Response, 0x77);
        let o = s.control(&mut store, &mut g, home, &resp, t1 + Duration::from_secs(2), 0).unwrap();
        assert_eq!(o.event, Event::Answered);
        assert_eq!(store.by_peer(home), Some(a));
    }

    #[test]
    fn a_session_that_takes_its_own_clients_old_path_ends_the_old_one() {
        let (mut s, mut store, mut g) = setup();
        let t0 = Instant::now();
        let p = sa("198.18.0.254:50001");
        let old = admit(&mut s, &mut store, &mut g, SID, "alice", t0).unwrap().addr;
        bind(&mut s, &mut store, &mut g, &mut Client::new(SID, 1), p, t0);
        // alice restarts without her state: a new session, from the same socket.
        let new_id = SessionId([2; 8]);
        let new = admit(&mut s, &mut store, &mut g, new_id, "alice", t0).unwrap().addr;
        assert_eq!(bind(&mut s, &mut store, &mut g, &mut Client::new(new_id, 2), p, t0), Event::Bound { addr: new, path: p });
        assert!(store.get(old).is_none() && s.get_by_addr(old).is_none(), "the abandoned session is gone");
        assert!(!g.sessions.contains(&SID) && g.allowed.contains(&p));
        assert_eq!(s.len(), 1);
        // Bob taking a path of alice's (a NAT reused her public port) leaves
        // her session waiting for its own proof, address kept.
        let bob = SessionId([3; 8]);
        let b = admit(&mut s, &mut store, &mut g, bob, "bob", t0).unwrap().addr;
        assert_eq!(bind(&mut s, &mut store, &mut g, &mut Client::new(bob, 3), p, t0), Event::Bound { addr: b, path: p });
        assert!(store.get(new).is_some() && store.by_addr(new).is_none());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn challenges_are_not_repeated_more_than_once_a_second() {
        let (mut s, mut store, mut g) = setup();
        let t0 = Instant::now();
        admit(&mut s, &mut store, &mut g, SID, "alice", t0).unwrap();
        let mut c = Client::new(SID, 1);
        let p = sa("198.18.0.254:50001");
        assert!(matches!(s.control(&mut store, &mut g, p, &c.make(Kind::Keepalive, 0), t0, 1).unwrap().event, Event::Challenged { .. }));
        let again = s.control(&mut store, &mut g, p, &c.make(Kind::Keepalive, 0), t0 + Duration::from_millis(500), 2).unwrap();
        assert_eq!(again, Outcome { reply: None, event: Event::ChallengePending });
        let later = s.control(&mut store, &mut g, p, &c.make(Kind::Keepalive, 0), t0 + CHALLENGE_RETRY, 3).unwrap();
        assert!(later.reply.is_some());
        // Only the latest challenge is answered.
        assert_eq!(s.control(&mut store, &mut g, p, &c.make(Kind::Response, 1), t0 + CHALLENGE_RETRY, 0), Err(Refused::NoChallenge));
    }

    #[test]
    fn resume_keeps_address_and_path_and_limits_hold_per_client() {
        let (mut s, mut store, mut g) = setup();
        let t0 = Instant::now();
        let a = admit(&mut s, &mut store, &mut g, SID, "alice", t0).unwrap().addr;
        let mut c = Client::new(SID, 1);
        let p = sa("198.18.0.254:50001");
        bind(&mut s, &mut store, &mut g, &mut c, p, t0);
        // Re-authentication naming the old session: same address, bound.
        let new = SessionId([2; 8]);
        let adm = s.admit(&mut store, &mut g, Admit { seed: p, client: "alice", id: new, keys: key_bytes(2), resume: Some(SID), counter: 1 }, t0).unwrap();
        assert_eq!(adm, Admitted { addr: a, resumed: true, bound: true });
        assert!(g.sessions.contains(&new) && !g.sessions.contains(&SID));
        assert_eq!(s.len(), 1);
        // Someone else naming alice's session gets a session of their own.
        let bob = s.admit(&mut store, &mut g, Admit { seed: p, client: "bob", id: SessionId([3; 8]), keys: key_bytes(3), resume: Some(new), counter: 1 }, t0).unwrap();
        assert!(!bob.resumed && bob.addr != a);
        // Two per client here: the third is refused, with its own reason.
        admit(&mut s, &mut store, &mut g, SessionId([4; 8]), "alice", t0).unwrap();
        assert_eq!(admit(&mut s, &mut store, &mut g, SessionId([5; 8]), "alice", t0), Err(Refusal::ClientLimit));
        assert_eq!(admit(&mut s, &mut store, &mut g, SessionId([4; 8]), "carol", t0), Err(Refusal::Unavailable), "an id in use");
        // An unproven session lapses after its short life, with its gate entry.
        let mut out = Vec::new();
        store.expire(t0 + Duration::from_secs(10), &mut out);
        for e in &out {
            s.forget(e.addr, &mut g);
        }
        assert_eq!(out.len(), 2, "bob's and alice's second, never bound");
        assert!(!g.sessions.contains(&SessionId([4; 8])));
        assert!(admit(&mut s, &mut store, &mut g, SessionId([6; 8]), "alice", t0).is_ok(), "alice's count went down");
    }

    #[test]
    fn saved_sessions_come_back_with_their_addresses() {
        let (mut s, mut store, mut g) = setup();
        let t0 = Instant::now();
        let a = admit(&mut s, &mut store, &mut g, SID, "alice", t0).unwrap().addr;
        let mut c = Client::new(SID, 1);
        let p = sa("[2001:db8::2]:50001");
        bind(&mut s, &mut store, &mut g, &mut c, p, t0);
        let saved = s.saved(&store);
        assert_eq!(saved.len(), 1);
        assert_eq!((saved[0].addr, saved[0].peer), (a, Some(p)));

        let (mut s2, mut store2, mut g2) = setup();
        let t1 = t0 + Duration::from_secs(1);
        s2.restore(&mut store2, &mut g2, saved[0].clone(), 10_000, t1).unwrap();
        assert_eq!(store2.by_peer(p), Some(a));
        assert!(g2.allowed.contains(&p) && g2.sessions.contains(&SID));
        // Keepalives go on where they were; a replay of an old one does not.
        let ka = c.make(Kind::Keepalive, 0);
        assert_eq!(s2.control(&mut store2, &mut g2, p, &ka, t1, 0).unwrap().event, Event::Answered);
        assert_eq!(s2.control(&mut store2, &mut g2, p, &ka, t1, 0), Err(Refused::Replay));
        // The server's counter starts past anything it sent before.
        let (_, ack) = s2.control(&mut store2, &mut g2, p, &c.make(Kind::Keepalive, 0), t1, 0).unwrap().reply.unwrap();
        assert!(c.read(&ack).counter > 10_000);
        // Expired or doubled: refused, nothing half-made.
        assert_eq!(s2.restore(&mut store2, &mut g2, saved[0].clone(), 0, t1), Err(RestoreRefused::Duplicate(SID)));
        let (mut s3, mut store3, mut g3) = setup();
        assert_eq!(s3.restore(&mut store3, &mut g3, saved[0].clone(), 0, t0 + T + T), Err(RestoreRefused::Expired));
        assert!(store3.is_empty() && g3.sessions.is_empty());
    }
}
