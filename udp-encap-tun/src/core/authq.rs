//! Client side: packets waiting for a session, and when to try.
//!
//! The first packet to a server without a session starts an authentication;
//! it and the packets after it wait in a small queue per server (SPEC
//! decision 3) and go out when the session is bound (the TLS exchange, then
//! the proof of the UDP path), or are dropped and counted if that fails. A
//! failure backs off (1 s, doubling to 30 s) so a refusing server is not
//! hammered and its per-source rate limit is not tripped by our own retries.
//!
//! Anything a local program routes into the TUN reaches this queue, so it is
//! bounded in every direction (issue: 2000 connects to distinct addresses
//! once meant 2000 authentications and as many descriptors): at most
//! [`MAX_IN_FLIGHT`] authentications at once (the others wait their turn,
//! packets queued), and at most [`MAX_SERVERS`] servers tracked (packets for
//! more are dropped and counted as `discard_auth_busy`). Pure: `now` is an
//! argument.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Packets kept per server while its authentication is in flight.
pub const QUEUE_PER_SERVER: usize = 64;
/// Authentications (each a TCP connection) at once for new servers.
pub const MAX_IN_FLIGHT: usize = 8;
/// Slots beyond [`MAX_IN_FLIGHT`] kept for re-authenticating with servers we
/// hold a session with, so a flood of new destinations cannot keep a live
/// session from being renewed.
pub const RENEWAL_RESERVE: usize = 4;
/// Servers with packets waiting, an authentication running or a backoff.
pub const MAX_SERVERS: usize = 256;
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Waiting for a free authentication slot.
    #[default]
    Queued,
    InFlight,
    /// Nothing running (backing off, or done).
    Idle,
}

#[derive(Debug, Default)]
struct Server {
    state: State,
    queue: VecDeque<Vec<u8>>,
    failures: u32,
    retry_at: Option<Instant>,
    /// When it joined the line for a slot (first come, first served).
    since: Option<Instant>,
}

/// What [`AuthQueue::enqueue`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued; the caller must start an authentication now.
    StartAuth,
    /// Queued behind an authentication in flight, or waiting for a slot.
    Waiting,
    /// Dropped: the queue is full, or the server failed recently (backoff).
    Dropped,
    /// Dropped: too many servers are tracked already.
    Busy,
}

#[derive(Debug, Default)]
pub struct AuthQueue {
    servers: HashMap<Ipv4Addr, Server>,
    in_flight: usize,
}

impl AuthQueue {
    pub fn enqueue(&mut self, server: Ipv4Addr, pkt: &[u8], now: Instant) -> Enqueued {
        if !self.servers.contains_key(&server) && self.servers.len() >= MAX_SERVERS {
            self.prune(now);
            if self.servers.len() >= MAX_SERVERS {
                return Enqueued::Busy;
            }
        }
        let free = self.in_flight < MAX_IN_FLIGHT;
        let s = self.servers.entry(server).or_insert_with(|| Server { state: State::Idle, ..Server::default() });
        match s.state {
            State::InFlight | State::Queued => {
                if s.queue.len() >= QUEUE_PER_SERVER {
                    return Enqueued::Dropped;
                }
                s.queue.push_back(pkt.to_vec());
                Enqueued::Waiting
            }
            State::Idle => {
                if s.retry_at.is_some_and(|t| now < t) {
                    return Enqueued::Dropped;
                }
                s.queue.push_back(pkt.to_vec());
                if free {
                    s.state = State::InFlight;
                    self.in_flight += 1;
                    Enqueued::StartAuth
                } else {
                    s.state = State::Queued;
                    s.since = Some(now);
                    Enqueued::Waiting
                }
            }
        }
    }

    /// A renewal is due (the server holds our session): start one unless an
    /// authentication is in flight for that server, it is backing off, or
    /// every slot, the reserved ones included, is taken.
    pub fn start_renewal(&mut self, server: Ipv4Addr, now: Instant) -> bool {
        if self.in_flight >= MAX_IN_FLIGHT + RENEWAL_RESERVE {
            return false;
        }
        let s = self.servers.entry(server).or_insert_with(|| Server { state: State::Idle, ..Server::default() });
        if s.state != State::Idle || s.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        s.state = State::InFlight;
        self.in_flight += 1;
        true
    }

    /// Servers waiting for a slot that can start now, oldest first; each
    /// is marked in flight.
    pub fn start_waiting(&mut self) -> Vec<Ipv4Addr> {
        let mut waiting: Vec<_> = self
            .servers
            .iter()
            .filter(|(_, s)| s.state == State::Queued)
            .map(|(a, s)| (s.since, *a))
            .collect();
        waiting.sort();
        let n = MAX_IN_FLIGHT.saturating_sub(self.in_flight);
        let mut out = Vec::new();
        for (_, a) in waiting.into_iter().take(n) {
            if let Some(s) = self.servers.get_mut(&a) {
                s.state = State::InFlight;
                self.in_flight += 1;
                out.push(a);
            }
        }
        out
    }

    fn finish(&mut self, server: Ipv4Addr) -> Option<&mut Server> {
        let s = self.servers.get_mut(&server)?;
        if s.state == State::InFlight {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        s.state = State::Idle;
        Some(s)
    }

    /// The session is bound: the waiting packets, in order.
    pub fn succeeded(&mut self, server: Ipv4Addr) -> VecDeque<Vec<u8>> {
        self.finish(server);
        match self.servers.remove(&server) {
            Some(s) => s.queue,
            None => VecDeque::new(),
        }
    }

    /// The authentication (or the binding after it) failed: drops the
    /// waiting packets (returns how many) and backs off before the next
    /// attempt.
    pub fn failed(&mut self, server: Ipv4Addr, now: Instant) -> usize {
        if !self.servers.contains_key(&server) {
            return 0;
        }
        let Some(s) = self.finish(server) else { return 0 };
        s.failures = s.failures.saturating_add(1);
        let backoff = BACKOFF_FIRST
            .saturating_mul(1u32 << s.failures.saturating_sub(1).min(5))
            .min(BACKOFF_MAX);
        s.retry_at = Some(now + backoff);
        let dropped = s.queue.len();
        s.queue.clear();
        dropped
    }

    pub fn in_flight(&self, server: Ipv4Addr) -> bool {
        self.servers.get(&server).is_some_and(|s| s.state == State::InFlight)
    }

    /// Authentications running now.
    pub fn running(&self) -> usize {
        self.in_flight
    }

    /// Forgets servers that are idle and out of backoff (bounded memory).
    pub fn prune(&mut self, now: Instant) {
        self.servers
            .retain(|_, s| s.state != State::Idle || !s.queue.is_empty() || s.retry_at.is_some_and(|t| now < t));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn first_packet_starts_auth_and_the_rest_wait_in_order() {
        let now = Instant::now();
        let mut q = AuthQueue::default();
        assert_eq!(q.enqueue(S, b"syn", now), Enqueued::StartAuth);
        assert_eq!(q.enqueue(S, b"two", now), Enqueued::Waiting);
        assert!(q.in_flight(S));
        let out: Vec<_> = q.succeeded(S).into_iter().collect();
        assert_eq!(out, vec![b"syn".to_vec(), b"two".to_vec()]);
        assert!(!q.in_flight(S));
        assert_eq!(q.running(), 0);
        // after success the next packet would start afresh (the core holds the lease)
        assert_eq!(q.enqueue(S, b"x", now), Enqueued::StartAuth);
    }

    #[test]
    fn the_queue_is_bounded() {
        let now = Instant::now();
        let mut q = AuthQueue::default();
        assert_eq!(q.enqueue(S, b"0", now), Enqueued::StartAuth);
        for _ in 1..QUEUE_PER_SERVER {
            assert_eq!(q.enqueue(S, b"n", now), Enqueued::Waiting);
        }
        assert_eq!(q.enqueue(S, b"over", now), Enqueued::Dropped);
        assert_eq!(q.succeeded(S).len(), QUEUE_PER_SERVER);
    }

    #[test]
    fn failure_drops_the_queue_and_backs_off_doubling() {
        let t0 = Instant::now();
        let mut q = AuthQueue::default();
        q.enqueue(S, b"a", t0);
        q.enqueue(S, b"b", t0);
        assert_eq!(q.failed(S, t0), 2);
        assert_eq!(q.running(), 0);
        assert_eq!(q.enqueue(S, b"c", t0 + Duration::from_millis(999)), Enqueued::Dropped);
        assert_eq!(q.enqueue(S, b"c", t0 + Duration::from_secs(1)), Enqueued::StartAuth);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(q.failed(S, t1), 1);
        assert_eq!(q.enqueue(S, b"d", t1 + Duration::from_millis(1999)), Enqueued::Dropped);
        assert!(!q.start_renewal(S, t1 + Duration::from_millis(1999)));
        assert_eq!(q.enqueue(S, b"d", t1 + Duration::from_secs(2)), Enqueued::StartAuth);
        // backoff stops growing at 30 s
        let mut t = t1;
        for _ in 0..10 {
            t += Duration::from_secs(60);
            q.failed(S, t);
        }
        assert_eq!(q.enqueue(S, b"e", t + Duration::from_secs(30)), Enqueued::StartAuth);
    }

    #[test]
    fn renewal_does_not_double_up_and_prune_forgets_idle_servers() {
        let now = Instant::now();
        let mut q = AuthQueue::default();
        assert!(q.start_renewal(S, now));
        assert!(!q.start_renewal(S, now), "one authentication in flight at a time");
        assert_eq!(q.enqueue(S, b"p", now), Enqueued::Waiting);
        assert_eq!(q.succeeded(S).len(), 1);
        q.prune(now);
        assert!(q.servers.is_empty());
        q.start_renewal(S, now);
        q.failed(S, now);
        q.prune(now);
        assert_eq!(q.servers.len(), 1, "kept while backing off");
        q.prune(now + Duration::from_secs(2));
        assert!(q.servers.is_empty());
    }

    #[test]
    fn authentications_at_once_and_servers_tracked_are_bounded() {
        let t0 = Instant::now();
        let mut q = AuthQueue::default();
        let server = |i: u32| Ipv4Addr::from(0xc612_0000 + i);
        // A local program connects to many addresses routed into the TUN.
        let mut started = 0;
        for i in 0..MAX_SERVERS as u32 {
            match q.enqueue(server(i), b"syn", t0 + Duration::from_millis(u64::from(i))) {
                Enqueued::StartAuth => started += 1,
                Enqueued::Waiting => {}
                other => panic!("{i}: {other:?}"),
            }
        }
        assert_eq!(started, MAX_IN_FLIGHT);
        assert_eq!(q.running(), MAX_IN_FLIGHT);
        assert_eq!(q.enqueue(server(10_000), b"syn", t0), Enqueued::Busy);
        // A live session's renewal still gets one of the reserved slots.
        for i in 0..RENEWAL_RESERVE as u32 {
            assert!(q.start_renewal(server(20_000 + i), t0), "renewal {i}");
        }
        assert!(!q.start_renewal(server(10_001), t0), "the reserve is spent");
        for i in 0..RENEWAL_RESERVE as u32 {
            q.succeeded(server(20_000 + i));
        }
        // One finishes: the next in line (the oldest waiting) starts.
        assert_eq!(q.failed(server(0), t0), 1);
        assert_eq!(q.start_waiting(), vec![server(MAX_IN_FLIGHT as u32)]);
        assert_eq!(q.running(), MAX_IN_FLIGHT);
        assert!(q.start_waiting().is_empty(), "no slot free");
        q.succeeded(server(1));
        q.succeeded(server(2));
        assert_eq!(q.start_waiting().len(), 2);
        // Servers whose backoff ran out leave room for new ones.
        for i in 0..MAX_SERVERS as u32 {
            if q.in_flight(server(i)) {
                q.failed(server(i), t0);
            }
        }
        let later = t0 + Duration::from_secs(60);
        q.prune(later);
        assert!(q.servers.len() < MAX_SERVERS);
        assert_ne!(q.enqueue(server(10_000), b"syn", later), Enqueued::Busy);
    }
}
