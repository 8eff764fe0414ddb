//! The client's sessions: one per server it holds a lease with.
//!
//! After the TLS authentication the client proves its UDP path at once (a
//! keepalive; the server challenges it; the response binds the path) and,
//! unless the server kept its earlier session's path, waits for the ack
//! before its first packets leave: a datagram sent before the path is bound
//! would be dropped by the server's gate. From then on it sends a keepalive
//! ([`Sessions::due`]):
//! - after `--keepalive` without hearing from the server (the NAT mapping
//!   stays open while TCP connections idle, and a rebinding is noticed even
//!   when the applications only receive);
//! - when the lease is a third through since the last proof (a proof
//!   refreshes the server's entry; no new TLS handshake needed);
//! - at once after a restart, and every second while it sends without
//!   hearing back (a restarted server or a rebinding during an upload).
//!
//! After [`UNANSWERED`] keepalives without an answer it authenticates again,
//! naming its session so that a server that still has it keeps its address.
//! With `--keepalive 0` only the binding proof is sent, and leases are
//! renewed by authentication as before sessions existed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::wire::{self, Control, Kind, LEN};
use super::{KeyBytes, Keys, Refused, SessionId};
use crate::core::{GateFull, PeerGate};

/// Binding: a keepalive again after this without an answer.
pub const BIND_RETRY: Duration = Duration::from_secs(1);
/// Binding: give up (and authenticate again later) after this.
pub const BIND_GIVE_UP: Duration = Duration::from_secs(5);
/// A server that has not answered for this long while we kept sending has
/// probably lost our session or our path: prove it again now.
pub const SILENT_SERVER: Duration = Duration::from_secs(3);
/// Keepalives without an answer before the client authenticates again.
pub const UNANSWERED: u32 = 3;

#[derive(Debug)]
pub struct Session {
    /// The server's IPv4 address (what the kernel routes into the TUN).
    pub server: Ipv4Addr,
    /// Where its datagrams go and come from (address and --endpoint-port).
    pub path: SocketAddr,
    pub id: SessionId,
    keys: Keys,
    rx: u64,
    tx: u64,
    /// The server has our path: data may flow.
    pub bound: bool,
    /// The lease the server granted, and when it ends.
    pub lease: Duration,
    pub granted: Instant,
    pub until: Instant,
    /// Data path: last packet sent to the server, last datagram heard.
    pub sent: Instant,
    pub heard: Instant,
    /// The last keepalive or response we sent (when, its counter).
    last_proof: Option<(Instant, u64)>,
    /// The last keepalive sent (when).
    last_keepalive: Option<Instant>,
    /// Keepalives sent since the server was last heard.
    pub unanswered: u32,
    /// Send a keepalive at the next look, whatever the timers say.
    kick: bool,
    /// A re-authentication was asked for (not again until it ends).
    reauth: bool,
    /// When the lease was granted here (the binding's deadline counts from
    /// it, not from the start of a TLS handshake that may have been slow).
    bind_started: Instant,
}

impl Session {
    /// A session just granted or taken back at `now`: not bound, a
    /// keepalive due at once, nothing heard or sent before `now`.
    fn new(server: Ipv4Addr, path: SocketAddr, id: SessionId, keys: KeyBytes, now: Instant) -> Session {
        Session {
            server,
            path,
            id,
            keys: Keys::new(keys),
            rx: 0,
            tx: 0,
            bound: false,
            lease: Duration::ZERO,
            granted: now,
            until: now,
            sent: now,
            heard: now,
            last_proof: None,
            last_keepalive: None,
            unanswered: 0,
            kick: true,
            reauth: false,
            bind_started: now,
        }
    }

    fn make(&mut self, kind: Kind, echo: u64, now: Instant) -> [u8; LEN] {
        self.tx = self.tx.wrapping_add(1);
        self.last_proof = Some((now, self.tx));
        Control { kind, session: self.id, counter: self.tx, echo }.encode(&self.keys.client_to_server)
    }

    /// Whether the client is still sending or hearing within the last
    /// third of the lease (an idle client lets an unrenewed lease lapse).
    fn active(&self) -> Instant {
        self.sent.max(self.heard)
    }
}

/// A lease the server granted at the end of an authentication.
#[derive(Debug, Clone)]
pub struct Grant {
    pub server: Ipv4Addr,
    pub path: SocketAddr,
    pub lease: Duration,
    pub id: SessionId,
    pub keys: KeyBytes,
    /// The server already has our path (it resumed our earlier session).
    pub bound: bool,
    /// Where our counter starts (the wall clock in microseconds).
    pub counter: u64,
    /// When the authentication started: the lease counts from then.
    pub started: Instant,
}

/// What the timers ask of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send { to: SocketAddr, bytes: [u8; LEN] },
    /// Authenticate with `server` again, naming `resume`.
    Reauth { server: Ipv4Addr, resume: SessionId },
    /// The path could not be bound in time: the waiting packets are lost
    /// (the session is forgotten).
    GaveUp { server: Ipv4Addr },
}

/// What a control datagram did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<(SocketAddr, [u8; LEN])>,
    /// The session with this server has just become bound: send what waits.
    pub bound: Option<Ipv4Addr>,
    /// It was an ack of our last proof.
    pub acked: bool,
}

/// A session as saved across a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub server: Ipv4Addr,
    pub path: SocketAddr,
    pub id: SessionId,
    pub keys: KeyBytes,
    pub rx: u64,
    pub tx: u64,
    pub lease: Duration,
    pub until: Instant,
}

#[derive(Debug)]
pub struct Sessions {
    by_server: HashMap<Ipv4Addr, Session>,
    by_path: HashMap<SocketAddr, Ipv4Addr>,
    keepalive: Duration,
}

impl Sessions {
    /// `keepalive`: `--keepalive` (zero: off).
    pub fn new(keepalive: Duration) -> Sessions {
        Sessions { by_server: HashMap::new(), by_path: HashMap::new(), keepalive }
    }

    /// A new lease from an authentication: a new session, or the keys of
    /// the existing one replaced. Lets the server's path through the gate.
    pub fn grant(&mut self, g: Grant, now: Instant, gate: &mut dyn PeerGate) -> Result<(), GateFull> {
        let old = self.by_server.get(&g.server).map(|s| (s.path, s.id, s.sent, s.heard));
        if old.is_none_or(|(p, ..)| p != g.path) {
            gate.allow(g.path)?;
        }
        gate.allow_session(g.id)?;
        if let Some((path, id, ..)) = old {
            if id != g.id {
                gate.revoke_session(id);
            }
            if path != g.path {
                self.by_path.remove(&path);
                gate.revoke(path);
            }
        }
        let (sent, heard) = old.map_or((now, now), |(_, _, s, h)| (s, now.max(h)));
        self.by_path.insert(g.path, g.server);
        let mut s = Session::new(g.server, g.path, g.id, g.keys, now);
        (s.tx, s.bound, s.lease, s.granted, s.until, s.sent, s.heard) =
            (g.counter, g.bound, g.lease, g.started, g.started + g.lease, sent, heard);
        self.by_server.insert(g.server, s);
        Ok(())
    }

    /// Where a packet for `server` goes: its path, if the session is bound
    /// and the lease runs. Notes the send.
    pub fn route(&mut self, server: Ipv4Addr, now: Instant) -> Option<SocketAddr> {
        let s = self.by_server.get_mut(&server)?;
        if !s.bound || now >= s.until {
            return None;
        }
        s.sent = now;
        Some(s.path)
    }

    /// The server (inner address) whose session `src` is the path of, if its
    /// lease runs: a datagram from it is let in. Notes that it was heard.
    pub fn accept(&mut self, src: SocketAddr, now: Instant) -> Option<Ipv4Addr> {
        let server = *self.by_path.get(&src)?;
        let s = self.by_server.get_mut(&server)?;
        if now >= s.until {
            return None;
        }
        s.heard = now;
        s.unanswered = 0;
        Some(server)
    }

    /// A control datagram from `src`.
    pub fn control(&mut self, src: SocketAddr, payload: &[u8], now: Instant) -> Result<Outcome, Refused> {
        let c = Control::parse(payload).ok_or(Refused::Kind)?;
        if c.kind.from_client() {
            return Err(Refused::Kind);
        }
        let server = *self.by_path.get(&src).ok_or(Refused::Path)?;
        let s = self.by_server.get_mut(&server).ok_or(Refused::Path)?;
        if c.session != s.id {
            return Err(Refused::UnknownSession);
        }
        if !wire::verify(payload, &s.keys.server_to_client) {
            return Err(Refused::Tag);
        }
        if c.counter <= s.rx {
            return Err(Refused::Replay);
        }
        s.rx = c.counter;
        s.heard = now;
        s.unanswered = 0;
        let mut out = Outcome { reply: None, bound: None, acked: false };
        match c.kind {
            Kind::Ack => {
                if let Some((at, n)) = s.last_proof
                    && n == c.echo
                {
                    // The server refreshed our entry when the proof arrived,
                    // after we sent it: our lease ends no later than theirs.
                    s.until = s.until.max(at + s.lease);
                    s.granted = s.granted.max(at);
                    s.reauth = false;
                    out.acked = true;
                }
                if !s.bound {
                    s.bound = true;
                    out.bound = Some(server);
                }
            }
            Kind::Challenge => out.reply = Some((s.path, s.make(Kind::Response, c.echo, now))),
            Kind::Keepalive | Kind::Response => return Err(Refused::Kind),
        }
        Ok(out)
    }

    /// What the timers ask for now: keepalives to send, servers to
    /// authenticate with again, bindings given up.
    pub fn due(&mut self, now: Instant, out: &mut Vec<Action>) {
        let k = self.keepalive;
        for s in self.by_server.values_mut() {
            if now >= s.until {
                continue; // expire() takes it
            }
            let since_ka = s.last_keepalive.map(|t| now.saturating_duration_since(t));
            let waited = |d: Duration| since_ka.is_none_or(|x| x >= d);
            if !s.bound {
                if now.saturating_duration_since(s.bind_started) >= BIND_GIVE_UP {
                    out.push(Action::GaveUp { server: s.server });
                } else if s.kick || waited(BIND_RETRY) {
                    keepalive(s, now, out);
                }
                continue;
            }
            let quiet = now.saturating_duration_since(s.heard);
            let sending_into_silence = s.sent.saturating_duration_since(s.heard) >= SILENT_SERVER;
            if k.is_zero() {
                // Renewal by authentication, as without sessions: past two
                // thirds of the lease while traffic flows, or at once when
                // the server went silent while we kept sending.
                let life = s.until.saturating_duration_since(s.granted);
                let renew = now >= s.granted + life * 2 / 3 && now.saturating_duration_since(s.active()) < life / 3;
                let silent = sending_into_silence && now.saturating_duration_since(s.granted) >= SILENT_SERVER;
                if s.kick {
                    keepalive(s, now, out);
                } else if (renew || silent) && !s.reauth {
                    s.reauth = true;
                    out.push(Action::Reauth { server: s.server, resume: s.id });
                }
                continue;
            }
            if s.unanswered >= UNANSWERED && quiet >= SILENT_SERVER {
                if !s.reauth {
                    s.reauth = true;
                    out.push(Action::Reauth { server: s.server, resume: s.id });
                }
                // Keep proving meanwhile, at the idle pace.
                if waited(k) {
                    keepalive(s, now, out);
                }
                continue;
            }
            let since_proof = s.last_proof.map_or(now.saturating_duration_since(s.granted), |(t, _)| now.saturating_duration_since(t));
            let want = s.kick
                || (quiet >= k && waited(k))
                || (since_proof >= s.lease / 3 && waited(BIND_RETRY))
                || (sending_into_silence && waited(BIND_RETRY));
            if want {
                keepalive(s, now, out);
            }
        }
    }

    /// Forgets sessions whose lease ran out, and their gate entries.
    pub fn expire(&mut self, now: Instant, gate: &mut dyn PeerGate, gone: &mut Vec<Ipv4Addr>) {
        let by_path = &mut self.by_path;
        self.by_server.retain(|server, s| {
            let live = now < s.until;
            if !live {
                by_path.remove(&s.path);
                gate.revoke(s.path);
                gate.revoke_session(s.id);
                gone.push(*server);
            }
            live
        });
    }

    /// Forgets the session with `server` now (its binding failed).
    pub fn forget(&mut self, server: Ipv4Addr, gate: &mut dyn PeerGate) -> Option<Session> {
        let s = self.by_server.remove(&server)?;
        self.by_path.remove(&s.path);
        gate.revoke(s.path);
        gate.revoke_session(s.id);
        Some(s)
    }

    /// A re-authentication failed: it may be asked for again.
    pub fn reauth_failed(&mut self, server: Ipv4Addr) {
        if let Some(s) = self.by_server.get_mut(&server) {
            s.reauth = false;
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.by_server.values().map(|s| s.until).min()
    }

    pub fn get(&self, server: Ipv4Addr) -> Option<&Session> {
        self.by_server.get(&server)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Session> + '_ {
        self.by_server.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_server.is_empty()
    }

    pub fn saved(&self) -> Vec<Saved> {
        self.by_server
            .values()
            .filter(|s| s.bound)
            .map(|s| Saved {
                server: s.server,
                path: s.path,
                id: s.id,
                keys: s.keys.bytes.clone(),
                rx: s.rx,
                tx: s.tx,
                lease: s.lease,
                until: s.until,
            })
            .collect()
    }

    /// Takes back a session saved by an earlier run, bound, with a keepalive
    /// due at once (the server learns our new socket's path, or answers).
    /// `false` if it expired or the gate is full.
    pub fn restore(&mut self, s: Saved, counter: u64, now: Instant, gate: &mut dyn PeerGate) -> bool {
        if s.until <= now || self.by_server.contains_key(&s.server) || self.by_path.contains_key(&s.path) {
            return false;
        }
        if gate.allow(s.path).is_err() || gate.allow_session(s.id).is_err() {
            gate.revoke(s.path);
            return false;
        }
        self.by_path.insert(s.path, s.server);
        let mut n = Session::new(s.server, s.path, s.id, s.keys, now);
        (n.rx, n.tx, n.bound, n.lease, n.until) = (s.rx, s.tx.max(counter), true, s.lease, s.until);
        n.granted = s.until.checked_sub(s.lease).unwrap_or(now).min(now);
        self.by_server.insert(s.server, n);
        true
    }
}

fn keepalive(s: &mut Session, now: Instant, out: &mut Vec<Action>) {
    s.kick = false;
    s.last_keepalive = Some(now);
    s.unanswered = s.unanswered.saturating_add(1);
    let bytes = s.make(Kind::Keepalive, 0, now);
    out.push(Action::Send { to: s.path, bytes });
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::core::test_gate::FakeGate;

    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const SID: SessionId = SessionId([7; 8]);
    const LEASE: Duration = Duration::from_secs(300);

    fn path() -> SocketAddr {
        SocketAddr::from((SERVER, 12345))
    }

    fn key_bytes() -> KeyBytes {
        KeyBytes::from_exporter(&[0x42; wire::EXPORTER_LEN])
    }

    fn grant(bound: bool, now: Instant) -> Grant {
        Grant { server: SERVER, path: path(), lease: LEASE, id: SID, keys: key_bytes(), bound, counter: 1000, started: now }
    }

    /// The server's side, by hand.
    struct Server {
        keys: Keys,
        counter: u64,
    }

    impl Server {
        fn new() -> Server {
            Server { keys: Keys::new(key_bytes()), counter: 1 }
        }
        fn make(&mut self, kind: Kind, echo: u64) -> [u8; LEN] {
            self.counter += 1;
            Control { kind, session: SID, counter: self.counter, echo }.encode(&self.keys.server_to_client)
        }
        fn read(&self, b: &[u8; LEN]) -> Control {
            assert!(wire::verify(b, &self.keys.client_to_server));
            Control::parse(b).unwrap()
        }
    }

    fn sends(out: &[Action]) -> Vec<Control> {
        let s = Server::new();
        out.iter()
            .filter_map(|a| match a {
                Action::Send { to, bytes } => {
                    assert_eq!(*to, path());
                    Some(s.read(bytes))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn binding_waits_for_the_ack_then_data_flows() {
        let t0 = Instant::now();
        let mut c = Sessions::new(Duration::from_secs(25));
        let mut g = FakeGate::new(10);
        c.grant(grant(false, t0), t0, &mut g).unwrap();
        assert!(g.allowed.contains(&path()) && g.sessions.contains(&SID));
        assert_eq!(c.route(SERVER, t0), None, "not bound: packets wait");
        let mut out = Vec::new();
        c.due(t0, &mut out);
        let ka = sends(&out);
        assert_eq!(ka.len(), 1);
        assert_eq!((ka[0].kind, ka[0].counter), (Kind::Keepalive, 1001));
        // Not again within the second.
        out.clear();
        c.due(t0 + Duration::from_millis(500), &mut out);
        assert!(out.is_empty());
        // The server challenges; we answer on the path.
        let mut srv = Server::new();
        let o = c.control(path(), &srv.make(Kind::Challenge, 0xabc), t0).unwrap();
        let (to, resp) = o.reply.unwrap();
        assert_eq!(to, path());
        let resp = srv.read(&resp);
        assert_eq!((resp.kind, resp.echo), (Kind::Response, 0xabc));
        assert_eq!(o.bound, None);
        // The ack binds: the waiting packets may go.
        let o = c.control(path(), &srv.make(Kind::Ack, resp.counter), t0).unwrap();
        assert_eq!(o.bound, Some(SERVER));
        assert!(o.acked);
        assert_eq!(c.route(SERVER, t0), Some(path()));
        // Replayed or forged server datagrams are refused.
        let old = srv.make(Kind::Ack, 1);
        c.control(path(), &old, t0).unwrap();
        assert_eq!(c.control(path(), &old, t0), Err(Refused::Replay));
        let mut forged = srv.make(Kind::Ack, 1);
        forged[40] ^= 1;
        assert_eq!(c.control(path(), &forged, t0), Err(Refused::Tag));
        let elsewhere: SocketAddr = "203.0.113.9:12345".parse().unwrap();
        assert_eq!(c.control(elsewhere, &srv.make(Kind::Ack, 1), t0), Err(Refused::Path));
    }

    #[test]
    fn a_binding_that_gets_no_answer_is_given_up() {
        let t0 = Instant::now();
        let mut c = Sessions::new(Duration::from_secs(25));
        c.grant(grant(false, t0), t0, &mut FakeGate::new(10)).unwrap();
        let mut out = Vec::new();
        for ms in (0..5000).step_by(100) {
            c.due(t0 + Duration::from_millis(ms), &mut out);
        }
        assert_eq!(sends(&out).len(), 5, "one keepalive a second");
        out.clear();
        c.due(t0 + BIND_GIVE_UP, &mut out);
        assert_eq!(out, vec![Action::GaveUp { server: SERVER }]);
    }

    #[test]
    fn idle_sessions_keep_alive_and_a_silent_server_is_authenticated_again() {
        let t0 = Instant::now();
        let k = Duration::from_secs(4);
        let mut c = Sessions::new(k);
        c.grant(grant(true, t0), t0, &mut FakeGate::new(10)).unwrap();
        let mut out = Vec::new();
        // One keepalive at once after the authentication (it proves our
        // UDP path even when the server kept an old one).
        c.due(t0, &mut out);
        assert_eq!(sends(&out).len(), 1);
        let mut srv = Server::new();
        c.control(path(), &srv.make(Kind::Ack, 1001), t0).unwrap();
        // Idle: one every 4 s, while the server answers.
        let mut at = t0;
        for _ in 0..5 {
            out.clear();
            c.due(at + Duration::from_millis(3900), &mut out);
            assert!(out.is_empty());
            at += k;
            c.due(at, &mut out);
            let ka = sends(&out);
            assert_eq!(ka.len(), 1);
            c.control(path(), &srv.make(Kind::Ack, ka[0].counter), at).unwrap();
        }
        assert_eq!(c.get(SERVER).unwrap().until, at + LEASE, "each answered proof moves the lease");
        // The server goes silent: keepalives go unanswered, then re-authentication.
        let mut reauth = None;
        for s in 1..=20u64 {
            out.clear();
            c.due(at + Duration::from_secs(s), &mut out);
            if let Some(Action::Reauth { server, resume }) = out.iter().find(|a| matches!(a, Action::Reauth { .. })) {
                reauth = Some((s, *server, *resume));
                break;
            }
        }
        let (after, server, resume) = reauth.expect("re-authentication asked for");
        assert_eq!((server, resume), (SERVER, SID));
        assert_eq!(after, 13, "a second after the third unanswered keepalive (at 4, 8, 12 s)");
        out.clear();
        c.due(at + Duration::from_secs(14), &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::Reauth { .. })), "asked once");
        c.reauth_failed(SERVER);
        out.clear();
        c.due(at + Duration::from_secs(15), &mut out);
        assert!(out.iter().any(|a| matches!(a, Action::Reauth { .. })), "asked again after a failure");
    }

    #[test]
    fn a_busy_lease_is_refreshed_by_proof_and_sending_into_silence_proves_at_once() {
        let t0 = Instant::now();
        let mut c = Sessions::new(Duration::from_secs(25));
        c.grant(grant(true, t0), t0, &mut FakeGate::new(10)).unwrap();
        let mut srv = Server::new();
        let mut out = Vec::new();
        c.due(t0, &mut out);
        c.control(path(), &srv.make(Kind::Ack, 1001), t0).unwrap();
        // Traffic both ways all the time: no idle keepalive ...
        let mut last = t0;
        for s in 1..200u64 {
            let at = t0 + Duration::from_secs(s);
            c.route(SERVER, at);
            c.accept(path(), at);
            out.clear();
            c.due(at, &mut out);
            if !out.is_empty() {
                last = at;
                break;
            }
        }
        // ... but one when a third of the lease has gone since the last proof.
        assert_eq!(last, t0 + LEASE / 3);
        let ka = sends(&out);
        c.control(path(), &srv.make(Kind::Ack, ka[0].counter), last).unwrap();
        assert_eq!(c.get(SERVER).unwrap().until, last + LEASE);
        // Sending while the server stays silent: after 3 s, a keepalive.
        let t1 = last + Duration::from_secs(50);
        c.accept(path(), t1);
        c.route(SERVER, t1 + Duration::from_secs(2));
        out.clear();
        c.due(t1 + Duration::from_secs(2), &mut out);
        assert!(out.is_empty());
        c.route(SERVER, t1 + SILENT_SERVER);
        c.due(t1 + SILENT_SERVER, &mut out);
        assert_eq!(sends(&out).len(), 1);
    }

    #[test]
    fn keepalive_off_renews_by_authentication_only_while_active() {
        let t0 = Instant::now();
        let mut c = Sessions::new(Duration::ZERO);
        c.grant(grant(true, t0), t0, &mut FakeGate::new(10)).unwrap();
        let mut out = Vec::new();
        c.due(t0, &mut out);
        assert_eq!(sends(&out).len(), 1, "the binding proof still goes");
        // Idle: nothing, the lease lapses.
        out.clear();
        c.due(t0 + LEASE * 2 / 3 + Duration::from_secs(1), &mut out);
        assert!(out.is_empty());
        // Active: renewed at two thirds.
        c.route(SERVER, t0 + LEASE * 2 / 3);
        c.due(t0 + LEASE * 2 / 3 + Duration::from_secs(1), &mut out);
        assert_eq!(out, vec![Action::Reauth { server: SERVER, resume: SID }]);
        let mut gone = Vec::new();
        let mut g = FakeGate::new(10);
        c.expire(t0 + LEASE, &mut g, &mut gone);
        assert_eq!(gone, vec![SERVER]);
        assert!(c.is_empty());
    }

    #[test]
    fn restored_sessions_prove_their_path_at_once() {
        let t0 = Instant::now();
        let mut c = Sessions::new(Duration::from_secs(25));
        let mut g = FakeGate::new(10);
        c.grant(grant(true, t0), t0, &mut g).unwrap();
        let saved = c.saved();
        assert_eq!(saved.len(), 1);
        let mut d = Sessions::new(Duration::from_secs(25));
        let mut g2 = FakeGate::new(10);
        let t1 = t0 + Duration::from_secs(2);
        assert!(d.restore(saved[0].clone(), 50_000, t1, &mut g2));
        assert!(g2.allowed.contains(&path()) && g2.sessions.contains(&SID));
        assert_eq!(d.route(SERVER, t1), Some(path()), "bound: data flows at once");
        let mut out = Vec::new();
        d.due(t1, &mut out);
        let ka = sends(&out);
        assert_eq!(ka.len(), 1);
        assert!(ka[0].counter > 50_000);
        assert!(!d.restore(saved[0].clone(), 0, t1, &mut g2), "not twice");
        let mut e = Sessions::new(Duration::from_secs(25));
        assert!(!e.restore(saved[0].clone(), 0, t0 + LEASE, &mut FakeGate::new(10)), "expired");
    }
}
