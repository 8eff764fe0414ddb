//! Client side: packets waiting for authentication, and when to try.
//!
//! The first packet to a server without a lease starts an authentication;
//! it and the packets after it wait in a small queue per server (SPEC
//! decision 3) and go out when the lease arrives, or are dropped and counted
//! if it fails. A failure backs off (1 s, doubling to 30 s) so a refusing
//! server is not hammered and its per-source rate limit is not tripped by
//! our own retries. Pure: `now` is an argument.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Packets kept per server while its authentication is in flight.
pub const QUEUE_PER_SERVER: usize = 64;
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Server {
    in_flight: bool,
    queue: VecDeque<Vec<u8>>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// What [`AuthQueue::enqueue`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued; the caller must start an authentication now.
    StartAuth,
    /// Queued behind an authentication already in flight.
    Waiting,
    /// Dropped: the queue is full, or the server failed recently (backoff).
    Dropped,
}

#[derive(Debug, Default)]
pub struct AuthQueue {
    servers: HashMap<Ipv4Addr, Server>,
}

impl AuthQueue {
    pub fn enqueue(&mut self, server: Ipv4Addr, pkt: &[u8], now: Instant) -> Enqueued {
        let s = self.servers.entry(server).or_default();
        if s.in_flight {
            if s.queue.len() >= QUEUE_PER_SERVER {
                return Enqueued::Dropped;
            }
            s.queue.push_back(pkt.to_vec());
            return Enqueued::Waiting;
        }
        if s.retry_at.is_some_and(|t| now < t) {
            return Enqueued::Dropped;
        }
        s.in_flight = true;
        s.queue.push_back(pkt.to_vec());
        Enqueued::StartAuth
    }

    /// A renewal is due: start one unless an authentication is in flight.
    pub fn start_renewal(&mut self, server: Ipv4Addr, now: Instant) -> bool {
        let s = self.servers.entry(server).or_default();
        if s.in_flight || s.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        s.in_flight = true;
        true
    }

    /// The server granted a lease: the waiting packets, in order.
    pub fn succeeded(&mut self, server: Ipv4Addr) -> VecDeque<Vec<u8>> {
        match self.servers.remove(&server) {
            Some(s) => s.queue,
            None => VecDeque::new(),
        }
    }

    /// The authentication failed: drops the waiting packets (returns how
    /// many) and backs off before the next attempt.
    pub fn failed(&mut self, server: Ipv4Addr, now: Instant) -> usize {
        let s = self.servers.entry(server).or_default();
        s.in_flight = false;
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
        self.servers.get(&server).is_some_and(|s| s.in_flight)
    }

    /// Forgets servers that are idle and out of backoff (bounded memory).
    pub fn prune(&mut self, now: Instant) {
        self.servers
            .retain(|_, s| s.in_flight || !s.queue.is_empty() || s.retry_at.is_some_and(|t| now < t));
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
        q.failed(S, now);
        q.prune(now);
        assert_eq!(q.servers.len(), 1, "kept while backing off");
        q.prune(now + Duration::from_secs(2));
        assert!(q.servers.is_empty());
    }
}
