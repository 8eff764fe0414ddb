//! The `connection_store` (SPEC "Version 1"/"Version 2", decisions 3 and 4):
//! one entry per peer (real IPv4 saddr + UDP sport), each owning a generated
//! IPv4 address from a [`Pool`], removed when not refreshed for `timeout`.
//!
//! Pure data: no I/O, and no clock — `now` is always an argument.
//!
//! - Both per-packet lookups (by peer for a datagram in, by generated address
//!   for a packet from the TUN) are one hash-map probe. The maps use std's
//!   `RandomState` (SipHash-1-3 with a per-process random key): the peer is
//!   chosen by whoever sends datagrams, so an unkeyed hasher would let a sender
//!   degrade the maps; hashing 6 bytes with SipHash costs a few tens of ns per
//!   packet, not worth another dependency.
//! - A new peer's address starts at a slot picked by SipHash-2-4 (the
//!   `siphasher` crate) of (saddr, sport) under the constructor's key (the daemon passes a random
//!   one, so a remote sender cannot aim collisions; tests pass fixed keys) and
//!   probes linearly to the next address that is neither excluded nor taken.
//!   Memory is proportional to live entries, never to the pool (a /8 is 16M
//!   addresses).
//! - Expiry: an entry is due when `now - refreshed >= timeout`. A min-heap of
//!   deadlines, with lazy updates, keeps `expire` and `next_expiry` cheap while
//!   a refresh (every datagram in version 1) stays O(1) in the common case.
//!   See [`ConnectionStore`] for the invariant.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Why a [`Pool`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "address pool {network}/{prefix} has no usable address once its network and broadcast \
         addresses and the {excluded} excluded address(es) are removed: give the TUN interface \
         a subnet with room for peers (such as a /24), or pass --pool CIDR"
    )]
    Empty {
        network: Ipv4Addr,
        prefix: u8,
        excluded: usize,
    },
    #[error("address pool prefix length /{prefix} is invalid: an IPv4 prefix is 0 to 32")]
    Prefix { prefix: u8 },
}

/// A new peer was refused: every address of the pool is held by a live entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address pool full: every address is held by a live entry")]
pub struct PoolFull;

/// The generated addresses: a CIDR minus its network and broadcast addresses
/// (none for /31 and /32, RFC 3021), minus an exclusion list.
///
/// Usable addresses are `first..=last` less `excluded`; the pool stores only
/// those bounds and the (few) excluded addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    network: Ipv4Addr,
    prefix: u8,
    first: u32,
    last: u32,
    /// Excluded addresses inside `first..=last`, sorted, without duplicates.
    excluded: Vec<u32>,
}

impl Pool {
    /// `network`'s bits beyond `prefix` are ignored (198.18.0.1/24 is 198.18.0.0/24).
    /// Excluded addresses outside the range are ignored.
    pub fn new(network: Ipv4Addr, prefix: u8, exclude: &[Ipv4Addr]) -> Result<Pool, PoolError> {
        if prefix > 32 {
            return Err(PoolError::Prefix { prefix });
        }
        // checked_shl(32) is None: a /0 has no network bits.
        let mask = u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0);
        let net = u32::from(network) & mask;
        let bcast = net | !mask;
        let (first, last) = if prefix >= 31 {
            (net, bcast)
        } else {
            // prefix <= 30: the range holds at least 4 addresses, no overflow.
            (net + 1, bcast - 1)
        };
        let mut excluded: Vec<u32> = exclude
            .iter()
            .map(|&a| u32::from(a))
            .filter(|a| (first..=last).contains(a))
            .collect();
        excluded.sort_unstable();
        excluded.dedup();
        let pool = Pool {
            network: Ipv4Addr::from(net),
            prefix,
            first,
            last,
            excluded,
        };
        if pool.capacity() == 0 {
            return Err(PoolError::Empty {
                network: pool.network,
                prefix,
                excluded: exclude.len(),
            });
        }
        Ok(pool)
    }

    /// Usable addresses.
    pub fn capacity(&self) -> u32 {
        // excluded holds distinct addresses in first..=last, so it never
        // exceeds span(); saturating only to state that in the types.
        let span = self.span();
        let excluded = u64::try_from(self.excluded.len()).unwrap_or(u64::MAX);
        u32::try_from(span.saturating_sub(excluded)).unwrap_or(u32::MAX)
    }

    /// Whether `a` is an address this pool can hand out.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        (self.first..=self.last).contains(&a) && !self.is_excluded(a)
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Addresses in `first..=last`, excluded ones included (1 ..= 2^32).
    fn span(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    fn is_excluded(&self, a: u32) -> bool {
        self.excluded.binary_search(&a).is_ok()
    }

    /// The address at offset `off` (taken modulo the span) from `first`.
    fn at(&self, off: u64) -> u32 {
        let off = off % self.span();
        // first + off <= last: fits u32.
        u32::try_from(u64::from(self.first) + off).unwrap_or(self.last)
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One peer and its generated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Real IPv4 saddr and UDP sport of the peer.
    pub peer: SocketAddrV4,
    /// The generated address standing for the peer on the TUN side.
    pub addr: Ipv4Addr,
    /// The last refresh: a datagram (version 1) or a successful
    /// (re-)authentication (version 2).
    pub refreshed: Instant,
}

/// What [`ConnectionStore::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// A new entry with this address.
    Created(Ipv4Addr),
    /// An existing entry, refreshed; its address never changes.
    Refreshed(Ipv4Addr),
}

impl Upsert {
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Upsert::Created(a) | Upsert::Refreshed(a) => a,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    entry: Entry,
    /// Tells this entry's heap item from items left by an earlier entry of
    /// the same peer that was removed.
    seq: u64,
}

/// A heap item: (recorded deadline, seq, peer), earliest first.
type Item = Reverse<(Instant, u64, SocketAddrV4)>;

/// The `connection_store`.
///
/// Expiry: an entry is due when `now - refreshed >= timeout`, i.e. when
/// `now >= refreshed + timeout` (its deadline). Lookups do not check the
/// deadline: entries leave only through [`expire`](Self::expire) or
/// [`remove`](Self::remove), so the caller (which mirrors the store into a BPF
/// map) sees every removal.
///
/// Heap invariant: every live entry with a finite deadline has exactly one
/// heap item with its `seq`, whose recorded deadline is `<=` the real one
/// (refreshes only move deadlines later; the item is updated lazily). Items
/// whose `seq` matches no live entry are garbage, dropped when they surface.
/// The top item is always accurate (live, recorded == real), so it is the
/// exact [`next_expiry`](Self::next_expiry).
#[derive(Debug)]
pub struct ConnectionStore {
    pool: Pool,
    timeout: Duration,
    hash_key: u64,
    by_peer: HashMap<SocketAddrV4, Slot>,
    by_addr: HashMap<Ipv4Addr, SocketAddrV4>,
    heap: BinaryHeap<Item>,
    next_seq: u64,
}

impl ConnectionStore {
    pub fn new(pool: Pool, timeout: Duration, hash_key: u64) -> Self {
        ConnectionStore {
            pool,
            timeout,
            hash_key,
            by_peer: HashMap::new(),
            by_addr: HashMap::new(),
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }

    /// Creates the peer's entry, or refreshes it (the address stays). A new
    /// peer is refused with [`PoolFull`] when every address is held by a live
    /// entry (no reuse, no eviction); entries past their deadline still hold
    /// their address until [`expire`](Self::expire) removes them, so call that
    /// first to free them.
    ///
    /// `refreshed` never moves back: a `now` earlier than the last refresh
    /// leaves it unchanged.
    pub fn upsert(&mut self, peer: SocketAddrV4, now: Instant) -> Result<Upsert, PoolFull> {
        if let Some(slot) = self.by_peer.get_mut(&peer) {
            if now > slot.entry.refreshed {
                slot.entry.refreshed = now;
            }
            let (addr, seq) = (slot.entry.addr, slot.seq);
            // Only the top item must be accurate; others catch up lazily.
            if matches!(self.heap.peek(), Some(Reverse((_, s, _))) if *s == seq) {
                self.settle();
            }
            return Ok(Upsert::Refreshed(addr));
        }
        if self.by_peer.len() >= usize::try_from(self.pool.capacity()).unwrap_or(usize::MAX) {
            return Err(PoolFull);
        }
        let addr = self.free_addr(peer).ok_or(PoolFull)?;
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let entry = Entry {
            peer,
            addr,
            refreshed: now,
        };
        self.by_peer.insert(peer, Slot { entry, seq });
        self.by_addr.insert(addr, peer);
        if let Some(d) = self.deadline(now) {
            // A new item is accurate; if it lands on top, the top stays accurate.
            self.heap.push(Reverse((d, seq, peer)));
        }
        Ok(Upsert::Created(addr))
    }

    /// The peer's generated address (no refresh).
    pub fn by_peer(&self, peer: SocketAddrV4) -> Option<Ipv4Addr> {
        self.by_peer.get(&peer).map(|s| s.entry.addr)
    }

    /// The peer holding this generated address (no refresh).
    pub fn by_addr(&self, addr: Ipv4Addr) -> Option<SocketAddrV4> {
        self.by_addr.get(&addr).copied()
    }

    /// The peer's entry, if any (no refresh).
    pub fn get(&self, peer: SocketAddrV4) -> Option<&Entry> {
        self.by_peer.get(&peer).map(|s| &s.entry)
    }

    /// Removes the peer's entry now (e.g. a revoked credential); its address
    /// is free at once.
    pub fn remove(&mut self, peer: SocketAddrV4) -> Option<Entry> {
        let slot = self.by_peer.remove(&peer)?;
        self.by_addr.remove(&slot.entry.addr);
        // Its heap item is garbage now; drop it if it is on top, and rebuild
        // when garbage outweighs live items so the heap stays O(entries).
        self.settle();
        if self.heap.len() > self.by_peer.len().saturating_mul(2).saturating_add(64) {
            self.rebuild_heap();
        }
        Some(slot.entry)
    }

    /// Removes every entry due at `now` (`now - refreshed >= timeout`) and
    /// appends them to `expired`, earliest deadline first. Returns at once
    /// when nothing is due (one heap peek).
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<Entry>) {
        while let Some(&Reverse((recorded, seq, peer))) = self.heap.peek() {
            if recorded > now {
                break;
            }
            self.heap.pop();
            let Some(slot) = self.by_peer.get(&peer).copied() else {
                continue; // garbage: the entry was removed
            };
            if slot.seq != seq {
                continue; // garbage: left by an earlier entry of this peer
            }
            match self.deadline(slot.entry.refreshed) {
                Some(real) if real <= now => {
                    self.by_peer.remove(&peer);
                    self.by_addr.remove(&slot.entry.addr);
                    expired.push(slot.entry);
                }
                // Refreshed since the item was recorded: put it back at its
                // real deadline (it may still be due and pop again).
                Some(real) => self.heap.push(Reverse((real, seq, peer))),
                None => {} // deadline beyond Instant's range: never expires
            }
        }
        self.settle();
    }

    /// The earliest instant at which [`expire`](Self::expire) will remove an
    /// entry (that entry's `refreshed + timeout`), or `None` when no entry
    /// can expire.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((d, _, _))| *d)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.by_peer.values().map(|s| &s.entry)
    }

    pub fn len(&self) -> usize {
        self.by_peer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_peer.is_empty()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// `refreshed + timeout`, or `None` past Instant's range (never expires).
    fn deadline(&self, refreshed: Instant) -> Option<Instant> {
        refreshed.checked_add(self.timeout)
    }

    /// Restores "the top item is accurate": drops garbage and re-pushes
    /// stale items at their real deadline until the top is accurate. Each
    /// re-pushed item is accurate, so this ends.
    fn settle(&mut self) {
        while let Some(&Reverse((recorded, seq, peer))) = self.heap.peek() {
            let real = match self.by_peer.get(&peer) {
                Some(slot) if slot.seq == seq => self.deadline(slot.entry.refreshed),
                _ => {
                    self.heap.pop();
                    continue;
                }
            };
            if real == Some(recorded) {
                return;
            }
            self.heap.pop();
            if let Some(real) = real {
                self.heap.push(Reverse((real, seq, peer)));
            }
        }
    }

    fn rebuild_heap(&mut self) {
        let timeout = self.timeout;
        self.heap = self
            .by_peer
            .values()
            .filter_map(|s| {
                let d = s.entry.refreshed.checked_add(timeout)?;
                Some(Reverse((d, s.seq, s.entry.peer)))
            })
            .collect();
    }

    /// The first address from the peer's keyed start slot that is neither
    /// excluded nor taken. Among any `taken + excluded + 1` consecutive
    /// addresses one is free, so the probe is bounded by the live entries,
    /// not by the pool size; `None` only if the pool is full.
    fn free_addr(&self, peer: SocketAddrV4) -> Option<Ipv4Addr> {
        let start = self.start_offset(peer);
        for i in 0..self.pool.span() {
            // start < span <= 2^32 and i < 2^32: no overflow in u64.
            let a = self.pool.at(start + i);
            if !self.pool.is_excluded(a) && !self.by_addr.contains_key(&Ipv4Addr::from(a)) {
                return Some(Ipv4Addr::from(a));
            }
        }
        None
    }

    /// Offset of the peer's first-choice address from the pool's first.
    fn start_offset(&self, peer: SocketAddrV4) -> u64 {
        let mut msg = [0u8; 6];
        let (ip, port) = msg.split_at_mut(4);
        ip.copy_from_slice(&peer.ip().octets());
        port.copy_from_slice(&peer.port().to_be_bytes());
        // Domain-separate k1 so the 64-bit key fills SipHash's 128-bit one.
        let k1 = self.hash_key.rotate_left(32) ^ 0x7564_702d_656e_6361; // "udp-enca"
        siphash24(self.hash_key, k1, &msg) % self.pool.span()
    }
}

/// SipHash-2-4 (Aumasson and Bernstein, 2012), 64-bit output, from the
/// `siphasher` crate; the test below holds it to the paper's vectors.
fn siphash24(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher24::new_with_keys(k0, k1);
    h.write(msg);
    h.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const T: Duration = Duration::from_secs(300);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn peer(n: u32) -> SocketAddrV4 {
        // Spread over addresses and ports, deterministic.
        SocketAddrV4::new(
            Ipv4Addr::from(0x0a00_0000 | (n >> 4)),
            40000 + (n & 0xf) as u16,
        )
    }

    fn store(cidr: &str, prefix: u8, exclude: &[Ipv4Addr]) -> ConnectionStore {
        ConnectionStore::new(
            Pool::new(ip(cidr), prefix, exclude).unwrap(),
            T,
            0x1234_5678_9abc_def0,
        )
    }

    /// Checks that both maps describe the same bijection and that every
    /// address is a pool address; and the heap invariant on the top.
    fn check(s: &ConnectionStore) {
        assert_eq!(s.by_peer.len(), s.by_addr.len());
        for e in s.entries() {
            assert_eq!(s.by_peer(e.peer), Some(e.addr));
            assert_eq!(s.by_addr(e.addr), Some(e.peer));
            assert!(s.pool().contains(e.addr), "{} not in pool", e.addr);
        }
        let min = s
            .entries()
            .filter_map(|e| e.refreshed.checked_add(s.timeout()))
            .min();
        assert_eq!(s.next_expiry(), min);
    }

    #[test]
    fn siphash_reference_vectors() {
        // From the SipHash paper's vectors.h: key 00..0f, message 00..(len-1).
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..64).collect();
        assert_eq!(siphash24(k0, k1, &msg[..0]), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(k0, k1, &msg[..1]), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(k0, k1, &msg[..8]), 0x93f5_f579_9a93_2462);
        assert_eq!(siphash24(k0, k1, &msg[..15]), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn pool_24_skips_network_broadcast_and_excluded() {
        let p = Pool::new(ip("198.18.0.1"), 24, &[ip("198.18.0.1"), ip("203.0.113.1")]).unwrap();
        assert_eq!(p.network(), ip("198.18.0.0"));
        assert_eq!(p.to_string(), "198.18.0.0/24");
        assert_eq!(p.capacity(), 253);
        assert!(!p.contains(ip("198.18.0.0")));
        assert!(!p.contains(ip("198.18.0.255")));
        assert!(!p.contains(ip("198.18.0.1")));
        assert!(!p.contains(ip("198.18.1.2")));
        assert!(p.contains(ip("198.18.0.2")));
        assert!(p.contains(ip("198.18.0.254")));

        // Fill it: every usable address handed out once, nothing else.
        let mut s = ConnectionStore::new(p, T, 7);
        let base = Instant::now();
        let mut got = HashSet::new();
        for n in 0..253 {
            let a = s.upsert(peer(n), base).unwrap().addr();
            assert!(got.insert(a));
        }
        let want: HashSet<Ipv4Addr> = (2..=254).map(|h| Ipv4Addr::new(198, 18, 0, h)).collect();
        assert_eq!(got, want);
        check(&s);
    }

    #[test]
    fn pool_30_31_32() {
        let base = Instant::now();
        // /30: .1 and .2 usable; exclude .1 (the TUN's own) leaves .2.
        let mut s = store("192.0.2.0", 30, &[ip("192.0.2.1")]);
        assert_eq!(s.pool().capacity(), 1);
        assert_eq!(
            s.upsert(peer(1), base),
            Ok(Upsert::Created(ip("192.0.2.2")))
        );
        assert_eq!(s.upsert(peer(2), base), Err(PoolFull));

        // /31: both addresses usable (RFC 3021).
        let mut s = store("192.0.2.7", 31, &[]);
        assert_eq!(s.pool().capacity(), 2);
        let a = s.upsert(peer(1), base).unwrap().addr();
        let b = s.upsert(peer(2), base).unwrap().addr();
        let got: HashSet<_> = [a, b].into();
        assert_eq!(got, [ip("192.0.2.6"), ip("192.0.2.7")].into());
        assert_eq!(s.upsert(peer(3), base), Err(PoolFull));

        // /32: the one address; excluded, the pool is empty.
        let mut s = store("192.0.2.9", 32, &[]);
        assert_eq!(s.pool().capacity(), 1);
        assert_eq!(
            s.upsert(peer(1), base),
            Ok(Upsert::Created(ip("192.0.2.9")))
        );
        assert!(matches!(
            Pool::new(ip("192.0.2.9"), 32, &[ip("192.0.2.9")]),
            Err(PoolError::Empty { .. })
        ));
    }

    #[test]
    fn empty_pool_is_an_error_that_says_what_to_do() {
        // A /30 whose two hosts are both the TUN's.
        let e = Pool::new(ip("192.0.2.0"), 30, &[ip("192.0.2.1"), ip("192.0.2.2")]).unwrap_err();
        assert!(matches!(
            e,
            PoolError::Empty {
                prefix: 30,
                excluded: 2,
                ..
            }
        ));
        let msg = e.to_string();
        assert!(msg.contains("192.0.2.0/30"), "{msg}");
        assert!(msg.contains("/24") && msg.contains("--pool"), "{msg}");
        assert!(matches!(
            Pool::new(ip("1.2.3.4"), 33, &[]),
            Err(PoolError::Prefix { prefix: 33 })
        ));
    }

    #[test]
    fn large_pools_do_not_allocate_per_address() {
        let p = Pool::new(ip("198.1.2.3"), 8, &[ip("198.0.0.1")]).unwrap();
        assert_eq!(p.capacity(), (1 << 24) - 3);
        let p0 = Pool::new(ip("1.2.3.4"), 0, &[]).unwrap();
        assert_eq!(p0.capacity(), u32::MAX - 1);
        assert!(!p0.contains(ip("0.0.0.0")) && !p0.contains(ip("255.255.255.255")));
        let mut s = ConnectionStore::new(p, T, 1);
        let base = Instant::now();
        for n in 0..1000 {
            s.upsert(peer(n), base).unwrap();
        }
        check(&s);
    }

    #[test]
    fn unique_addresses_for_many_peers() {
        let mut s = store("198.18.0.0", 16, &[ip("198.18.0.1")]);
        let base = Instant::now();
        let mut seen = HashSet::new();
        for n in 0..20_000 {
            let Upsert::Created(a) = s.upsert(peer(n), base).unwrap() else {
                panic!("peer {n} already there");
            };
            assert!(seen.insert(a), "{a} handed out twice");
        }
        assert_eq!(s.len(), 20_000);
        check(&s);
    }

    #[test]
    fn tiny_pool_every_address_once() {
        // A /29 minus network/broadcast/2 excluded: 4 addresses, 4 peers.
        let mut s = store("192.0.2.0", 29, &[ip("192.0.2.1"), ip("192.0.2.4")]);
        assert_eq!(s.pool().capacity(), 4);
        let base = Instant::now();
        let got: HashSet<_> = (0..4)
            .map(|n| s.upsert(peer(n), base).unwrap().addr())
            .collect();
        assert_eq!(
            got,
            [
                ip("192.0.2.2"),
                ip("192.0.2.3"),
                ip("192.0.2.5"),
                ip("192.0.2.6")
            ]
            .into()
        );
        check(&s);
    }

    #[test]
    fn same_start_slot_probes_to_the_next_free_address() {
        let mut s = store("192.0.2.0", 24, &[]);
        // Find two peers with the same start slot (birthday: quick in 254 slots).
        let mut slots = HashMap::new();
        let (p1, p2) = (0..)
            .find_map(|n| {
                let p = peer(n);
                slots.insert(s.start_offset(p), p).map(|q| (q, p))
            })
            .unwrap();
        let start = s.start_offset(p1);
        let base = Instant::now();
        let a1 = s.upsert(p1, base).unwrap().addr();
        let a2 = s.upsert(p2, base).unwrap().addr();
        assert_eq!(u32::from(a1), u32::from(ip("192.0.2.1")) + start as u32);
        assert_ne!(a1, a2);
        // The next one on, wrapping from .254 to .1.
        let next = if a1 == ip("192.0.2.254") {
            ip("192.0.2.1")
        } else {
            Ipv4Addr::from(u32::from(a1) + 1)
        };
        assert_eq!(a2, next);
        check(&s);
        // The first one's address follows the hash: after it leaves, it
        // comes back to the same address.
        s.remove(p1).unwrap();
        assert_eq!(s.upsert(p1, base), Ok(Upsert::Created(a1)));
    }

    #[test]
    fn last_free_address_is_found_from_any_slot() {
        // Pool of 4 with the peer whose slot is the last address: taken
        // addresses force a wrap past the excluded one.
        let mut s = store("192.0.2.0", 29, &[ip("192.0.2.1"), ip("192.0.2.4")]);
        let base = Instant::now();
        for n in 0..4 {
            s.upsert(peer(n), base).unwrap();
        }
        let victim = peer(0);
        let freed = s.remove(victim).unwrap().addr;
        // Any new peer gets the single free address, whatever its slot.
        assert_eq!(s.upsert(peer(100), base), Ok(Upsert::Created(freed)));
        check(&s);
    }

    #[test]
    fn pool_full_refuses_and_leaves_live_entries() {
        let mut s = store("192.0.2.0", 29, &[]);
        let base = Instant::now();
        for n in 0..6 {
            s.upsert(peer(n), base).unwrap();
        }
        let before: HashMap<_, _> = s.entries().map(|e| (e.peer, *e)).collect();
        let later = base + Duration::from_secs(10);
        assert_eq!(s.upsert(peer(99), later), Err(PoolFull));
        assert_eq!(s.by_peer(peer(99)), None);
        let after: HashMap<_, _> = s.entries().map(|e| (e.peer, *e)).collect();
        assert_eq!(before, after);
        // Existing peers still refresh while full.
        assert_eq!(
            s.upsert(peer(0), later),
            Ok(Upsert::Refreshed(before[&peer(0)].addr))
        );
        // Even entries past their deadline hold their address until expire().
        let late = base + T + T;
        assert_eq!(s.upsert(peer(99), late), Err(PoolFull));
        let mut out = Vec::new();
        s.expire(late, &mut out);
        assert_eq!(out.len(), 6);
        assert!(matches!(s.upsert(peer(99), late), Ok(Upsert::Created(_))));
        check(&s);
    }

    #[test]
    fn refresh_keeps_the_address_and_the_entry_alive() {
        let mut s = store("192.0.2.0", 24, &[]);
        let base = Instant::now();
        let a = s.upsert(peer(1), base).unwrap().addr();
        s.upsert(peer(2), base).unwrap();
        for k in 1..=10u64 {
            let now = base + Duration::from_secs(100 * k);
            assert_eq!(s.upsert(peer(1), now), Ok(Upsert::Refreshed(a)));
            let mut out = Vec::new();
            s.expire(now, &mut out);
            check(&s);
            if k >= 3 {
                // peer 2 was never refreshed: gone at base + 300 s.
                assert_eq!(s.by_peer(peer(2)), None);
            }
        }
        // Alive at base + 1000 s, far past the first deadline.
        assert_eq!(s.by_peer(peer(1)), Some(a));
        assert_eq!(
            s.get(peer(1)).unwrap().refreshed,
            base + Duration::from_secs(1000)
        );
        // A `now` earlier than the last refresh never moves it back.
        s.upsert(peer(1), base).unwrap();
        assert_eq!(
            s.get(peer(1)).unwrap().refreshed,
            base + Duration::from_secs(1000)
        );
    }

    #[test]
    fn expiry_boundary_is_inclusive() {
        // Expired when now - refreshed >= timeout.
        let mut s = store("192.0.2.0", 24, &[]);
        let base = Instant::now();
        let a = s.upsert(peer(1), base).unwrap().addr();
        let mut out = Vec::new();
        s.expire(base + T - Duration::from_nanos(1), &mut out);
        assert!(out.is_empty());
        assert_eq!(s.len(), 1);
        s.expire(base + T, &mut out);
        assert_eq!(
            out,
            vec![Entry {
                peer: peer(1),
                addr: a,
                refreshed: base
            }]
        );
        assert!(s.is_empty());
        assert_eq!(s.by_addr(a), None);
        assert_eq!(s.next_expiry(), None);
    }

    #[test]
    fn expired_address_is_reusable_by_anyone() {
        let mut s = store("192.0.2.0", 30, &[]); // 2 addresses
        let base = Instant::now();
        let a = s.upsert(peer(1), base).unwrap().addr();
        let b = s
            .upsert(peer(2), base + Duration::from_secs(1))
            .unwrap()
            .addr();
        assert_eq!(s.upsert(peer(3), base), Err(PoolFull));
        let mut out = Vec::new();
        s.expire(base + T, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].addr, a);
        assert_eq!(s.upsert(peer(3), base + T), Ok(Upsert::Created(a)));
        assert_eq!(s.by_addr(a), Some(peer(3)));
        assert_eq!(s.by_addr(b), Some(peer(2)));
        check(&s);
    }

    #[test]
    fn next_expiry_tracks_the_earliest_deadline() {
        let mut s = store("192.0.2.0", 24, &[]);
        let base = Instant::now();
        let at = |secs| base + Duration::from_secs(secs);
        assert_eq!(s.next_expiry(), None);
        s.upsert(peer(1), at(10)).unwrap();
        s.upsert(peer(2), at(20)).unwrap();
        s.upsert(peer(3), at(30)).unwrap();
        assert_eq!(s.next_expiry(), Some(at(10) + T));
        // Refreshing the earliest moves it to the next one.
        s.upsert(peer(1), at(40)).unwrap();
        assert_eq!(s.next_expiry(), Some(at(20) + T));
        // Refreshing a later one changes nothing.
        s.upsert(peer(3), at(50)).unwrap();
        assert_eq!(s.next_expiry(), Some(at(20) + T));
        // Removing the earliest moves it too.
        s.remove(peer(2)).unwrap();
        assert_eq!(s.next_expiry(), Some(at(40) + T));
        // Nothing due before next_expiry; the entry due at it goes.
        let mut out = Vec::new();
        s.expire(at(40) + T - Duration::from_millis(1), &mut out);
        assert!(out.is_empty());
        s.expire(s.next_expiry().unwrap(), &mut out);
        assert_eq!(
            out.iter().map(|e| e.peer).collect::<Vec<_>>(),
            vec![peer(1)]
        );
        assert_eq!(s.next_expiry(), Some(at(50) + T));
        check(&s);
    }

    #[test]
    fn huge_timeout_never_expires_and_never_panics() {
        let p = Pool::new(ip("192.0.2.0"), 24, &[]).unwrap();
        let mut s = ConnectionStore::new(p, Duration::MAX, 3);
        let base = Instant::now();
        s.upsert(peer(1), base).unwrap();
        assert_eq!(s.next_expiry(), None);
        let mut out = Vec::new();
        s.expire(base + Duration::from_secs(1 << 40), &mut out);
        assert!(out.is_empty());
        // Zero timeout: due at once.
        let p = Pool::new(ip("192.0.2.0"), 24, &[]).unwrap();
        let mut s = ConnectionStore::new(p, Duration::ZERO, 3);
        s.upsert(peer(1), base).unwrap();
        s.expire(base, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn maps_agree_after_churn() {
        // Deterministic pseudo-random churn: upserts, removes, expiries on a
        // small pool so collisions, PoolFull and reuse all happen.
        let mut s = store("192.0.2.0", 27, &[ip("192.0.2.1")]); // 29 addresses
        let base = Instant::now();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut out = Vec::new();
        let mut addr_of: HashMap<SocketAddrV4, Ipv4Addr> = HashMap::new();
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let now = base + Duration::from_secs(step / 10);
            let p = peer((x % 60) as u32);
            match (x >> 32) % 10 {
                0 => {
                    let r = s.remove(p);
                    assert_eq!(r.map(|e| e.addr), addr_of.remove(&p));
                }
                1 => {
                    out.clear();
                    s.expire(now, &mut out);
                    for e in &out {
                        assert!(now.duration_since(e.refreshed) >= T);
                        assert_eq!(addr_of.remove(&e.peer), Some(e.addr));
                    }
                    assert!(s.entries().all(|e| now.duration_since(e.refreshed) < T));
                }
                _ => match s.upsert(p, now) {
                    Ok(Upsert::Refreshed(a)) => assert_eq!(addr_of.get(&p), Some(&a)),
                    Ok(Upsert::Created(a)) => assert_eq!(addr_of.insert(p, a), None),
                    Err(PoolFull) => {
                        assert_eq!(s.len() as u32, s.pool().capacity());
                        assert!(!addr_of.contains_key(&p));
                    }
                },
            }
            check(&s);
            assert_eq!(s.len(), addr_of.len());
            assert!(s.heap.len() <= 2 * s.len() + 64 + 60);
        }
    }
}
