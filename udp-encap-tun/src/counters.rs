//! Counters a user can read while the daemon runs (`udp-encap-tun status`).
//!
//! Every packet the daemon discards is counted under exactly one reason
//! (SPEC decision 7). The data path increments them with relaxed atomics: they
//! are statistics, not synchronisation, and a relaxed add on an uncontended
//! cache line costs about as much as a plain one.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was discarded. The names are the ones `status` prints after
/// `discard_`, so they are part of the user interface: do not rename lightly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Discard {
    /// A packet read from the TUN that is not IPv4 TCP (UDP, ICMP, IPv6, ...).
    NotTcp,
    /// An IPv4 header longer than 20 bytes (IP options).
    IpOptions,
    /// Server: no `connection_store` entry for the destination (TUN -> UDP).
    NoEntry,
    /// Server with authentication: a datagram from a (saddr, sport) without an
    /// entry (UDP -> TUN). Client: a datagram from a server it holds no lease with.
    Unauthenticated,
    /// Truncated, inconsistent lengths, fragments, a TCP header that does not
    /// fit, oversized: anything that cannot be a well-formed segment.
    Malformed,
    /// Server: a new peer found the address pool (or the XDP map) full.
    PoolFull,
    /// An authentication attempt that failed (bad credential, TLS error,
    /// deadline, rate limit).
    AuthFailure,
    /// Client: a packet waiting for authentication was dropped (queue full or
    /// authentication failed).
    AuthQueue,
    /// The kernel refused a write or send (buffer full, no route, ...).
    IoError,
    /// A control datagram refused: unknown session, wrong tag, a counter
    /// already seen (a copy or a replay), a response to no challenge, or a
    /// path proof abandoned because the session's path was heard meanwhile.
    Control,
    /// Server: a client refused a new session because it holds
    /// `--max-entries-per-client` already.
    ClientLimit,
    /// Client: a packet for a server we could not start authenticating with
    /// (too many authentications at once, or too many servers tracked).
    AuthBusy,
}

impl Discard {
    pub const ALL: [Discard; 12] = [
        Discard::NotTcp,
        Discard::IpOptions,
        Discard::NoEntry,
        Discard::Unauthenticated,
        Discard::Malformed,
        Discard::PoolFull,
        Discard::AuthFailure,
        Discard::AuthQueue,
        Discard::IoError,
        Discard::Control,
        Discard::ClientLimit,
        Discard::AuthBusy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Discard::NotTcp => "not_tcp",
            Discard::IpOptions => "ip_options",
            Discard::NoEntry => "no_entry",
            Discard::Unauthenticated => "unauthenticated",
            Discard::Malformed => "malformed",
            Discard::PoolFull => "pool_full",
            Discard::AuthFailure => "auth_failure",
            Discard::AuthQueue => "auth_queue",
            Discard::IoError => "io_error",
            Discard::Control => "control",
            Discard::ClientLimit => "client_limit",
            Discard::AuthBusy => "auth_busy",
        }
    }
}

/// Traffic that went through, by direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Traffic {
    TunRxPackets,
    TunRxBytes,
    UdpTxPackets,
    UdpTxBytes,
    UdpRxPackets,
    UdpRxBytes,
    TunTxPackets,
    TunTxBytes,
    MssClamped,
    EntriesCreated,
    EntriesExpired,
    /// System calls of the data path: packets per call shows how well
    /// batching (TSO/GSO/GRO) works.
    TunReads,
    TunWrites,
    UdpSendCalls,
    UdpRecvCalls,
    /// Client: keepalives sent (each a proof of the session).
    KeepalivesSent,
    /// Server: keepalives (and path responses) answered; client: answers
    /// received to its keepalives.
    KeepalivesAnswered,
    /// Server: challenges sent to a path a session's keepalive came from.
    Challenges,
    /// Server: sessions moved to a new path (NAT rebinding, a new address).
    Migrations,
    /// Sessions taken back from the state directory at start, and (server)
    /// taken over by a client's re-authentication.
    SessionsResumed,
    /// GSO trains the kernel refused for their size, sent one datagram per
    /// call instead (batch.rs).
    UdpGsoRefused,
}

impl Traffic {
    pub const ALL: [Traffic; 21] = [
        Traffic::TunRxPackets,
        Traffic::TunRxBytes,
        Traffic::UdpTxPackets,
        Traffic::UdpTxBytes,
        Traffic::UdpRxPackets,
        Traffic::UdpRxBytes,
        Traffic::TunTxPackets,
        Traffic::TunTxBytes,
        Traffic::MssClamped,
        Traffic::EntriesCreated,
        Traffic::EntriesExpired,
        Traffic::TunReads,
        Traffic::TunWrites,
        Traffic::UdpSendCalls,
        Traffic::UdpRecvCalls,
        Traffic::KeepalivesSent,
        Traffic::KeepalivesAnswered,
        Traffic::Challenges,
        Traffic::Migrations,
        Traffic::SessionsResumed,
        Traffic::UdpGsoRefused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Traffic::TunRxPackets => "tun_rx_packets",
            Traffic::TunRxBytes => "tun_rx_bytes",
            Traffic::UdpTxPackets => "udp_tx_packets",
            Traffic::UdpTxBytes => "udp_tx_bytes",
            Traffic::UdpRxPackets => "udp_rx_packets",
            Traffic::UdpRxBytes => "udp_rx_bytes",
            Traffic::TunTxPackets => "tun_tx_packets",
            Traffic::TunTxBytes => "tun_tx_bytes",
            Traffic::MssClamped => "mss_clamped",
            Traffic::EntriesCreated => "entries_created",
            Traffic::EntriesExpired => "entries_expired",
            Traffic::TunReads => "tun_reads",
            Traffic::TunWrites => "tun_writes",
            Traffic::UdpSendCalls => "udp_send_calls",
            Traffic::UdpRecvCalls => "udp_recv_calls",
            Traffic::KeepalivesSent => "keepalives_sent",
            Traffic::KeepalivesAnswered => "keepalives_answered",
            Traffic::Challenges => "challenges",
            Traffic::Migrations => "migrations",
            Traffic::SessionsResumed => "sessions_resumed",
            Traffic::UdpGsoRefused => "udp_gso_refused",
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    discards: [AtomicU64; Discard::ALL.len()],
    traffic: [AtomicU64; Traffic::ALL.len()],
}

impl Counters {
    pub fn discard(&self, reason: Discard) {
        self.discard_n(reason, 1);
    }

    pub fn discard_n(&self, reason: Discard, n: u64) {
        if let Some(c) = self.discards.get(reason as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn add(&self, what: Traffic, n: u64) {
        if let Some(c) = self.traffic.get(what as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn discards(&self, reason: Discard) -> u64 {
        self.discards
            .get(reason as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn traffic(&self, what: Traffic) -> u64 {
        self.traffic
            .get(what as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// `name value` pairs in a fixed order, the way `status` prints them.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Traffic::ALL
            .iter()
            .map(|t| (t.name().to_string(), self.traffic(*t)))
            .collect();
        out.extend(
            Discard::ALL
                .iter()
                .map(|d| (format!("discard_{}", d.name()), self.discards(*d))),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_counts_separately() {
        let c = Counters::default();
        for (i, d) in Discard::ALL.iter().enumerate() {
            c.discard_n(*d, i as u64 + 1);
        }
        for (i, d) in Discard::ALL.iter().enumerate() {
            assert_eq!(c.discards(*d), i as u64 + 1, "{}", d.name());
        }
        let snap = c.snapshot();
        assert!(snap.contains(&("discard_not_tcp".to_string(), 1)));
        assert!(snap.contains(&("discard_io_error".to_string(), 9)));
        assert!(snap.contains(&("discard_auth_busy".to_string(), 12)));
        assert_eq!(snap.len(), Discard::ALL.len() + Traffic::ALL.len());
    }
}
