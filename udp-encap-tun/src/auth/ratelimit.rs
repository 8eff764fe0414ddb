//! Per-source limit on *failed* authentication attempts: a token bucket per
//! IPv4 address. Every failure (bad credential, TLS error, garbage, deadline)
//! takes a token; a source without tokens is refused at `accept`, before any
//! TLS work. Successes take nothing, so a working client is never slowed.
//! `now` is an argument: the caller owns the clock (tests inject one).

use std::collections::HashMap;
use std::net::IpAddr;
#[cfg(test)]
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Failures a source may have in a burst before it is refused.
    pub burst: u32,
    /// One failure is forgiven per `refill`.
    pub refill: Duration,
    /// Sources tracked at most. A full table first forgets sources whose
    /// bucket is full again, then the one least recently seen, so memory is
    /// bounded whatever the number of attacking addresses.
    pub max_sources: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        // 5 failures at once, then one every 12 s: a mistyped credential
        // costs a user little, a password guesser gets 5 tries a minute (and
        // the secrets are 256-bit random anyway: the limit is about CPU spent
        // on TLS handshakes and log noise).
        RateLimitConfig {
            burst: 5,
            refill: Duration::from_secs(12),
            max_sources: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When `tokens` was last brought up to date.
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
    sources: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            cfg,
            sources: HashMap::new(),
        }
    }

    fn refill(cfg: &RateLimitConfig, b: &mut Bucket, now: Instant) {
        if b.tokens >= cfg.burst {
            b.last = now;
            return;
        }
        let elapsed = now.saturating_duration_since(b.last);
        let refill_ns = cfg.refill.as_nanos().max(1);
        let n = elapsed.as_nanos() / refill_ns;
        if n == 0 {
            return;
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        b.tokens = b.tokens.saturating_add(n32).min(cfg.burst);
        if b.tokens >= cfg.burst {
            b.last = now;
        } else {
            // Keep the fraction of a period already served.
            b.last += cfg.refill.saturating_mul(n32);
        }
    }

    /// May `ip` try (again)? Does not take a token.
    pub fn allowed(&mut self, ip: impl Into<IpAddr>, now: Instant) -> bool {
        let ip = ip.into();
        let cfg = self.cfg;
        match self.sources.get_mut(&ip) {
            None => true,
            Some(b) => {
                Self::refill(&cfg, b, now);
                b.tokens > 0
            }
        }
    }

    /// Records one failed attempt from `ip`.
    pub fn failure(&mut self, ip: impl Into<IpAddr>, now: Instant) {
        let ip = ip.into();
        let cfg = self.cfg;
        if !self.sources.contains_key(&ip) && self.sources.len() >= cfg.max_sources {
            self.make_room(now);
        }
        let b = self.sources.entry(ip).or_insert(Bucket {
            tokens: cfg.burst,
            last: now,
        });
        Self::refill(&cfg, b, now);
        b.tokens = b.tokens.saturating_sub(1);
    }

    fn make_room(&mut self, now: Instant) {
        let cfg = self.cfg;
        self.sources.retain(|_, b| {
            Self::refill(&cfg, b, now);
            b.tokens < cfg.burst
        });
        if self.sources.len() >= cfg.max_sources {
            // Still full of limited sources: forget the least recently updated.
            let oldest = self
                .sources
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(ip, _)| *ip);
            if let Some(ip) = oldest {
                self.sources.remove(&ip);
            }
        }
    }

    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    fn cfg() -> RateLimitConfig {
        RateLimitConfig {
            burst: 3,
            refill: Duration::from_secs(10),
            max_sources: 2,
        }
    }

    #[test]
    fn burst_then_refused_then_refilled() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(cfg());
        for _ in 0..3 {
            assert!(rl.allowed(A, t0));
            rl.failure(A, t0);
        }
        assert!(!rl.allowed(A, t0), "burst used up");
        assert!(rl.allowed(B, t0), "other sources are not affected");
        assert!(!rl.allowed(A, t0 + Duration::from_secs(9)));
        assert!(
            rl.allowed(A, t0 + Duration::from_secs(10)),
            "one token back"
        );
        rl.failure(A, t0 + Duration::from_secs(10));
        assert!(!rl.allowed(A, t0 + Duration::from_secs(19)));
        assert!(rl.allowed(A, t0 + Duration::from_secs(20)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(1000);
        for _ in 0..3 {
            assert!(rl.allowed(A, later));
            rl.failure(A, later);
        }
        assert!(!rl.allowed(A, later));
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(cfg());
        for i in 0..100u32 {
            rl.failure(
                Ipv4Addr::from(0x0a00_0000 + i),
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert!(rl.tracked() <= 2);
        // The most recent sources are the ones still tracked.
        rl.failure(
            Ipv4Addr::from(0x0a00_0000 + 99),
            t0 + Duration::from_millis(100),
        );
        rl.failure(
            Ipv4Addr::from(0x0a00_0000 + 99),
            t0 + Duration::from_millis(100),
        );
        assert!(!rl.allowed(
            Ipv4Addr::from(0x0a00_0000 + 99),
            t0 + Duration::from_millis(100)
        ));
    }
}
