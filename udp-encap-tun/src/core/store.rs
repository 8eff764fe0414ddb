//! The `connection_store` (SPEC "Version 1"/"Version 2", decisions 3 and 4):
//! entries that each own a generated IPv4 address from a [`Pool`] and, once
//! known, the peer (real saddr + UDP sport, either family) whose datagrams
//! stand for it; removed when not refreshed for `timeout`.
//!
//! Pure data: no I/O, and no clock: `now` is always an argument.
//!
//! - An entry is named by its generated address, which never changes while
//!   it lives. Its peer may: in version 2 a session is bound to the peer its
//!   datagrams come from, learned after authentication and moved when the
//!   client's NAT rebinds ([`ConnectionStore::set_peer`]); until then the
//!   entry holds its address without a peer ([`ConnectionStore::reserve`]).
//!   In version 1 the first datagram of a peer creates its entry
//!   ([`ConnectionStore::upsert`]).
//! - Both per-packet lookups (by peer for a datagram in, by generated address
//!   for a packet from the TUN) are one hash-map probe. The maps use std's
//!   `RandomState` (SipHash-1-3 with a per-process random key): the peer is
//!   chosen by whoever sends datagrams, so an unkeyed hasher would let a sender
//!   degrade the maps.
//! - A new entry's address starts at a slot picked by SipHash-2-4 (the
//!   `siphasher` crate) of a peer address (the datagram's source in version
//!   1, the authentication's TCP source in version 2) under the
//!   constructor's key (the daemon passes a random one, so a remote sender
//!   cannot aim collisions; tests pass fixed keys) and probes linearly to the
//!   next address that is neither excluded, taken nor in quarantine. Memory
//!   is proportional to live and quarantined entries, never to the pool (a
//!   /8 is 16M addresses).
//! - Quarantine (decision 4): an address freed by an expired or removed entry
//!   is not handed out to another peer while another address is free, and
//!   then the least recently freed first, so the server's stale TCP
//!   connections to it are not delivered to a stranger. The peer that held
//!   it in version 1 (where the (address, port) is the peer) gets it back
//!   while it waits there ("the same peer gets the same address"): a peer
//!   whose entry lapsed in a pause longer than the entry timeout keeps its
//!   TCP connections.
//! - Expiry: an entry is due at its deadline, `refreshed + timeout` (or the
//!   shorter life [`ConnectionStore::reserve`] gives). A min-heap of
//!   deadlines, with lazy updates, keeps `expire` and `next_expiry` cheap while
//!   a refresh (every datagram in version 1) stays O(1) in the common case.
//!   See [`ConnectionStore`] for the invariant.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
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

/// One generated address, the peer standing behind it (if known yet), and
/// when it was last refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The generated address standing for the peer on the TUN side.
    pub addr: Ipv4Addr,
    /// Real saddr and UDP sport of the peer; `None` for a session that has
    /// not proven its UDP path yet.
    pub peer: Option<SocketAddr>,
    /// The last refresh: a datagram (version 1), a successful
    /// (re-)authentication or a proof of the session (version 2).
    pub refreshed: Instant,
    /// When it expires unless refreshed again; `None` past Instant's range.
    pub deadline: Option<Instant>,
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

/// Why [`ConnectionStore::restore`] refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("{0} is not an address of the pool")]
    NotInPool(Ipv4Addr),
    #[error("{0} is held by another entry")]
    AddrTaken(Ipv4Addr),
    #[error("peer {0} belongs to another entry")]
    PeerTaken(SocketAddr),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    entry: Entry,
    /// Tells this entry's heap item from items left by an earlier entry of
    /// the same address that was removed.
    seq: u64,
}

/// What the per-datagram lookup finds: the address, and when the peer was
/// last heard (a session's current path is alive while it is heard).
#[derive(Debug, Clone, Copy)]
struct PeerSlot {
    addr: Ipv4Addr,
    heard: Instant,
}

/// A heap item: (recorded deadline, seq, address), earliest first.
type Item = Reverse<(Instant, u64, Ipv4Addr)>;

/// Freed addresses kept out of use: at most this many are remembered (the
/// oldest then count as never used).
pub const QUARANTINE_MAX: usize = 65_536;

/// The `connection_store`.
///
/// Expiry: an entry is due when `now >= deadline`. Lookups do not check the
/// deadline: entries leave only through [`expire`](Self::expire) or
/// [`remove`](Self::remove), so the caller (which mirrors the store into a BPF
/// map) sees every removal.
///
/// Heap invariant: every live entry with a deadline has exactly one heap item
/// with its `seq`, whose recorded deadline is `<=` the real one (refreshes
/// only move deadlines later; the item is updated lazily). Items whose `seq`
/// matches no live entry are garbage, dropped when they surface. The top item
/// is always accurate (live, recorded == real), so it is the exact
/// [`next_expiry`](Self::next_expiry).
#[derive(Debug)]
pub struct ConnectionStore {
    pool: Pool,
    timeout: Duration,
    hash_key: u64,
    entries: HashMap<Ipv4Addr, Slot>,
    by_peer: HashMap<SocketAddr, PeerSlot>,
    heap: BinaryHeap<Item>,
    next_seq: u64,
    /// Freed addresses, least recently freed first, and the same as a map
    /// to the peer that held each (if it had one).
    quarantine: VecDeque<Ipv4Addr>,
    quarantined: HashMap<Ipv4Addr, Option<SocketAddr>>,
    /// The reverse of `quarantined`'s peers: the address a peer left behind.
    left_by: HashMap<SocketAddr, Ipv4Addr>,
}

impl ConnectionStore {
    pub fn new(pool: Pool, timeout: Duration, hash_key: u64) -> Self {
        ConnectionStore {
            pool,
            timeout,
            hash_key,
            entries: HashMap::new(),
            by_peer: HashMap::new(),
            heap: BinaryHeap::new(),
            next_seq: 0,
            quarantine: VecDeque::new(),
            quarantined: HashMap::new(),
            left_by: HashMap::new(),
        }
    }

    /// Version 1: creates the peer's entry, or refreshes it (the address
    /// stays). A new peer is refused with [`PoolFull`] when every address is
    /// held by a live entry (no eviction); entries past their deadline still
    /// hold their address until [`expire`](Self::expire) removes them, so call
    /// that first to free them.
    ///
    /// `refreshed` never moves back: a `now` earlier than the last refresh
    /// leaves it unchanged.
    pub fn upsert(&mut self, peer: SocketAddr, now: Instant) -> Result<Upsert, PoolFull> {
        if let Some(p) = self.by_peer.get_mut(&peer) {
            p.heard = p.heard.max(now);
            let addr = p.addr;
            self.refresh(addr, now);
            return Ok(Upsert::Refreshed(addr));
        }
        let addr = match self.left_by.get(&peer).copied() {
            // Back for the address it left: in version 1 the (address,
            // port) is the peer, so this is no stranger.
            Some(a) if self.entries.len() < self.capacity() => {
                self.unquarantine(a);
                self.insert(Entry { addr: a, peer: None, refreshed: now, deadline: now.checked_add(self.timeout) });
                a
            }
            _ => self.create(peer, now, self.timeout)?,
        };
        self.by_peer.insert(peer, PeerSlot { addr, heard: now });
        if let Some(slot) = self.entries.get_mut(&addr) {
            slot.entry.peer = Some(peer);
        }
        Ok(Upsert::Created(addr))
    }

    /// Version 2: a new entry without a peer yet, living `life` unless
    /// refreshed (a session that must prove its UDP path soon). Its address
    /// is picked from `seed`'s slot (the authentication's TCP source). An
    /// address in quarantine is never given back here, even to the peer
    /// that left it: in version 2 the peer is a credential, which the
    /// (address, port) does not name (the session's own resume keeps its
    /// address, decision 11).
    pub fn reserve(&mut self, seed: SocketAddr, now: Instant, life: Duration) -> Result<Ipv4Addr, PoolFull> {
        self.create(seed, now, life)
    }

    fn create(&mut self, seed: SocketAddr, now: Instant, life: Duration) -> Result<Ipv4Addr, PoolFull> {
        if self.entries.len() >= self.capacity() {
            return Err(PoolFull);
        }
        let addr = self.free_addr(seed).ok_or(PoolFull)?;
        self.insert(Entry { addr, peer: None, refreshed: now, deadline: now.checked_add(life) });
        Ok(addr)
    }

    /// Puts back an entry saved by an earlier run (its deadline as saved).
    pub fn restore(&mut self, addr: Ipv4Addr, peer: Option<SocketAddr>, refreshed: Instant, deadline: Instant) -> Result<(), RestoreError> {
        if !self.pool.contains(addr) {
            return Err(RestoreError::NotInPool(addr));
        }
        if self.entries.contains_key(&addr) {
            return Err(RestoreError::AddrTaken(addr));
        }
        if let Some(p) = peer
            && self.by_peer.contains_key(&p)
        {
            return Err(RestoreError::PeerTaken(p));
        }
        self.unquarantine(addr);
        self.insert(Entry { addr, peer, refreshed, deadline: Some(deadline) });
        if let Some(p) = peer {
            self.by_peer.insert(p, PeerSlot { addr, heard: refreshed });
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        usize::try_from(self.pool.capacity()).unwrap_or(usize::MAX)
    }

    fn insert(&mut self, entry: Entry) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.entries.insert(entry.addr, Slot { entry, seq });
        if let Some(d) = entry.deadline {
            // A new item is accurate; if it lands on top, the top stays accurate.
            self.heap.push(Reverse((d, seq, entry.addr)));
        }
    }

    /// Binds the entry of `addr` to `peer` (a session proved a new path).
    /// Returns the peer it had. A peer held by another entry is taken from
    /// it (that entry is left without a peer: a NAT gave its old public port
    /// to someone else, who proved it), and returned as the second value.
    /// `None` if `addr` has no entry.
    pub fn set_peer(&mut self, addr: Ipv4Addr, peer: SocketAddr, now: Instant) -> Option<(Option<SocketAddr>, Option<Ipv4Addr>)> {
        let old = self.entries.get(&addr)?.entry.peer;
        if old == Some(peer) {
            return Some((old, None));
        }
        let robbed = match self.by_peer.insert(peer, PeerSlot { addr, heard: now }) {
            Some(prev) if prev.addr != addr => {
                if let Some(s) = self.entries.get_mut(&prev.addr) {
                    s.entry.peer = None;
                }
                Some(prev.addr)
            }
            _ => None,
        };
        if let Some(o) = old {
            self.by_peer.remove(&o);
        }
        if let Some(s) = self.entries.get_mut(&addr) {
            s.entry.peer = Some(peer);
        }
        Some((old, robbed))
    }

    /// Moves the entry's deadline to `now + timeout` (never back). `false`
    /// if `addr` has no entry.
    pub fn refresh(&mut self, addr: Ipv4Addr, now: Instant) -> bool {
        let timeout = self.timeout;
        let Some(slot) = self.entries.get_mut(&addr) else { return false };
        if now > slot.entry.refreshed {
            slot.entry.refreshed = now;
        }
        let d = slot.entry.refreshed.checked_add(timeout);
        slot.entry.deadline = match (slot.entry.deadline, d) {
            (Some(old), Some(new)) => Some(old.max(new)),
            (_, new) => new,
        };
        let seq = slot.seq;
        // Only the top item must be accurate; others catch up lazily.
        if matches!(self.heap.peek(), Some(Reverse((_, s, _))) if *s == seq) {
            self.settle();
        }
        true
    }

    /// The peer's generated address (no refresh).
    pub fn by_peer(&self, peer: SocketAddr) -> Option<Ipv4Addr> {
        self.by_peer.get(&peer).map(|p| p.addr)
    }

    /// The peer's generated address, noting that it was heard at `now` (the
    /// data path's lookup, once per GRO train).
    pub fn heard(&mut self, peer: SocketAddr, now: Instant) -> Option<Ipv4Addr> {
        let p = self.by_peer.get_mut(&peer)?;
        if now > p.heard {
            p.heard = now;
        }
        Some(p.addr)
    }

    /// When a datagram of `peer` last came by [`heard`](Self::heard).
    pub fn last_heard(&self, peer: SocketAddr) -> Option<Instant> {
        self.by_peer.get(&peer).map(|p| p.heard)
    }

    /// The peer holding this generated address (no refresh); `None` also for
    /// an entry without a peer yet.
    pub fn by_addr(&self, addr: Ipv4Addr) -> Option<SocketAddr> {
        self.entries.get(&addr).and_then(|s| s.entry.peer)
    }

    /// The entry of this address, if any.
    pub fn get(&self, addr: Ipv4Addr) -> Option<&Entry> {
        self.entries.get(&addr).map(|s| &s.entry)
    }

    /// The entry of this peer, if any.
    pub fn get_by_peer(&self, peer: SocketAddr) -> Option<&Entry> {
        self.get(self.by_peer(peer)?)
    }

    /// Removes the entry of `addr` now (a revoked credential); its address
    /// goes into quarantine.
    pub fn remove(&mut self, addr: Ipv4Addr) -> Option<Entry> {
        let slot = self.entries.remove(&addr)?;
        if let Some(p) = slot.entry.peer {
            self.by_peer.remove(&p);
        }
        self.free(addr, slot.entry.peer);
        // Its heap item is garbage now; drop it if it is on top, and rebuild
        // when garbage outweighs live items so the heap stays O(entries).
        self.settle();
        if self.heap.len() > self.entries.len().saturating_mul(2).saturating_add(64) {
            self.rebuild_heap();
        }
        Some(slot.entry)
    }

    /// Removes the entry of `peer`, if any.
    pub fn remove_peer(&mut self, peer: SocketAddr) -> Option<Entry> {
        self.remove(self.by_peer(peer)?)
    }

    /// Removes every entry due at `now` and appends them to `expired`,
    /// earliest deadline first. Returns at once when nothing is due (one heap
    /// peek).
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<Entry>) {
        while let Some(&Reverse((recorded, seq, addr))) = self.heap.peek() {
            if recorded > now {
                break;
            }
            self.heap.pop();
            let Some(slot) = self.entries.get(&addr).copied() else {
                continue; // garbage: the entry was removed
            };
            if slot.seq != seq {
                continue; // garbage: left by an earlier entry of this address
            }
            match slot.entry.deadline {
                Some(real) if real <= now => {
                    self.entries.remove(&addr);
                    if let Some(p) = slot.entry.peer {
                        self.by_peer.remove(&p);
                    }
                    self.free(addr, slot.entry.peer);
                    expired.push(slot.entry);
                }
                // Refreshed since the item was recorded: put it back at its
                // real deadline (it may still be due and pop again).
                Some(real) => self.heap.push(Reverse((real, seq, addr))),
                None => {} // deadline beyond Instant's range: never expires
            }
        }
        self.settle();
    }

    /// The earliest instant at which [`expire`](Self::expire) will remove an
    /// entry, or `None` when no entry can expire.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((d, _, _))| *d)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.entries.values().map(|s| &s.entry)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The quarantined addresses, least recently freed first.
    pub fn quarantine(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.quarantine.iter().copied()
    }

    /// Puts addresses (least recently freed first) into quarantine, as an
    /// earlier run left them. Addresses outside the pool or in use are
    /// skipped.
    pub fn restore_quarantine(&mut self, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        for a in addrs {
            if self.pool.contains(a) && !self.entries.contains_key(&a) {
                self.free(a, None);
            }
        }
    }

    /// Puts `addr`, just freed by `peer`'s entry, at the back of the
    /// quarantine (most recently freed), remembering who left it.
    fn free(&mut self, addr: Ipv4Addr, peer: Option<SocketAddr>) {
        self.unquarantine(addr);
        self.quarantine.push_back(addr);
        self.quarantined.insert(addr, peer);
        if let Some(p) = peer
            && let Some(older) = self.left_by.insert(p, addr)
        {
            // The peer left another address before: that one now waits for
            // anyone (the peer is back at `addr`'s, if it returns).
            if let Some(owner) = self.quarantined.get_mut(&older) {
                *owner = None;
            }
        }
        while self.quarantine.len() > QUARANTINE_MAX {
            if let Some(old) = self.quarantine.pop_front() {
                self.forget_quarantined(old);
            }
        }
    }

    /// Takes `addr` out of the quarantine, if it is there.
    fn unquarantine(&mut self, addr: Ipv4Addr) {
        if self.quarantined.contains_key(&addr) {
            self.quarantine.retain(|a| *a != addr);
            self.forget_quarantined(addr);
        }
    }

    /// Drops `addr` from the map and the peer index (the deque is the
    /// caller's).
    fn forget_quarantined(&mut self, addr: Ipv4Addr) {
        if let Some(Some(p)) = self.quarantined.remove(&addr)
            && self.left_by.get(&p) == Some(&addr)
        {
            self.left_by.remove(&p);
        }
    }

    /// Restores "the top item is accurate": drops garbage and re-pushes
    /// stale items at their real deadline until the top is accurate. Each
    /// re-pushed item is accurate, so this ends.
    fn settle(&mut self) {
        while let Some(&Reverse((recorded, seq, addr))) = self.heap.peek() {
            let real = match self.entries.get(&addr) {
                Some(slot) if slot.seq == seq => slot.entry.deadline,
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
                self.heap.push(Reverse((real, seq, addr)));
            }
        }
    }

    fn rebuild_heap(&mut self) {
        self.heap = self
            .entries
            .values()
            .filter_map(|s| Some(Reverse((s.entry.deadline?, s.seq, s.entry.addr))))
            .collect();
    }

    /// The first address from the seed's keyed start slot that is neither
    /// excluded, taken nor quarantined; failing that, the least recently
    /// freed one. Among any `taken + excluded + quarantined + 1` consecutive
    /// addresses one is free, so the probe is bounded by the entries, not by
    /// the pool size; `None` only if the pool is full.
    fn free_addr(&mut self, seed: SocketAddr) -> Option<Ipv4Addr> {
        let start = self.start_offset(seed);
        let bound = self.pool.span().min(
            (self.entries.len() + self.pool.excluded.len() + self.quarantine.len()) as u64 + 1,
        );
        for i in 0..bound {
            // start < span <= 2^32 and i < 2^32: no overflow in u64.
            let a = Ipv4Addr::from(self.pool.at(start + i));
            if !self.pool.is_excluded(u32::from(a)) && !self.entries.contains_key(&a) && !self.quarantined.contains_key(&a) {
                return Some(a);
            }
        }
        let a = self.quarantine.pop_front()?;
        self.forget_quarantined(a);
        Some(a)
    }

    /// Offset of the seed's first-choice address from the pool's first.
    fn start_offset(&self, seed: SocketAddr) -> u64 {
        // The IPv4 form is the 6 bytes it always was, so addresses stay put
        // for IPv4 peers; IPv6 peers hash their 18 bytes.
        let mut v4 = [0u8; 6];
        let mut v6 = [0u8; 18];
        let msg: &[u8] = match seed {
            SocketAddr::V4(s) => {
                let (ip, port) = v4.split_at_mut(4);
                ip.copy_from_slice(&s.ip().octets());
                port.copy_from_slice(&s.port().to_be_bytes());
                &v4
            }
            SocketAddr::V6(s) => {
                let (ip, port) = v6.split_at_mut(16);
                ip.copy_from_slice(&s.ip().octets());
                port.copy_from_slice(&s.port().to_be_bytes());
                &v6
            }
        };
        // Domain-separate k1 so the 64-bit key fills SipHash's 128-bit one.
        let k1 = self.hash_key.rotate_left(32) ^ 0x7564_702d_656e_6361; // "udp-enca"
        siphash24(self.hash_key, k1, msg) % self.pool.span()
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

    fn peer(n: u32) -> SocketAddr {
        // Spread over addresses and ports (198.18.0.0/15), deterministic.
        SocketAddr::from((Ipv4Addr::from(0xc612_0000 | (n >> 4)), 40000 + (n & 0xf) as u16))
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
        assert_eq!(s.by_peer.len(), s.entries().filter(|e| e.peer.is_some()).count());
        for e in s.entries() {
            if let Some(p) = e.peer {
                assert_eq!(s.by_peer(p), Some(e.addr));
            }
            assert_eq!(s.by_addr(e.addr), e.peer);
            assert!(s.pool().contains(e.addr), "{} not in pool", e.addr);
            assert!(!s.quarantined.contains_key(&e.addr), "{} live and quarantined", e.addr);
        }
        assert_eq!(s.quarantine.len(), s.quarantined.len());
        for (p, a) in &s.left_by {
            assert_eq!(s.quarantined.get(a), Some(&Some(*p)), "left_by {p} -> {a} not in quarantine");
        }
        let owned = s.quarantined.values().filter(|o| o.is_some()).count();
        assert_eq!(owned, s.left_by.len(), "every owned quarantined address is indexed");
        let min = s.entries().filter_map(|e| e.deadline).min();
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
    fn a_lapsed_v1_peer_gets_its_address_back_a_v2_reservation_never() {
        let mut s = store("192.0.2.0", 24, &[]);
        let base = Instant::now();
        let (p, q) = (peer(1), peer(2));
        let a = s.upsert(p, base).unwrap().addr();
        let b = s.upsert(q, base).unwrap().addr();
        let mut gone = Vec::new();
        s.expire(base + Duration::from_secs(301), &mut gone);
        assert_eq!(gone.len(), 2);
        // q comes back through version 2's reservation: a fresh address.
        let r = s.reserve(q, base + Duration::from_secs(302), Duration::from_secs(10)).unwrap();
        assert!(r != a && r != b, "reserve handed out a quarantined address: {r}");
        // p, back in version 1 after the lapse: the address it had.
        assert_eq!(s.upsert(p, base + Duration::from_secs(302)).unwrap().addr(), a);
        assert_eq!(s.quarantine().collect::<Vec<_>>(), vec![b]);
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
        // After it leaves, its address waits in quarantine: another peer
        // whose slot it is gets the next free one, not a1 (the server's
        // stale connections may still name it) ...
        s.remove_peer(p1).unwrap();
        check(&s);
        let p3 = (0..10_000u32)
            .map(peer)
            .find(|p| *p != p1 && *p != p2 && s.start_offset(*p) == start)
            .expect("another peer with a1's slot");
        let a3 = s.upsert(p3, base).unwrap().addr();
        assert_ne!(a3, a1);
        assert_ne!(a3, a2);
        // ... while p1, back, gets a1 again: its own connections live on.
        assert_eq!(s.upsert(p1, base).unwrap().addr(), a1);
        check(&s);
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
        let freed = s.remove_peer(victim).unwrap().addr;
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
            Ok(Upsert::Refreshed(before[&Some(peer(0))].addr))
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
            s.get_by_peer(peer(1)).unwrap().refreshed,
            base + Duration::from_secs(1000)
        );
        // A `now` earlier than the last refresh never moves it back.
        s.upsert(peer(1), base).unwrap();
        assert_eq!(
            s.get_by_peer(peer(1)).unwrap().refreshed,
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
                peer: Some(peer(1)),
                addr: a,
                refreshed: base,
                deadline: Some(base + T),
            }]
        );
        assert!(s.is_empty());
        assert_eq!(s.by_addr(a), None);
        assert_eq!(s.next_expiry(), None);
    }

    #[test]
    fn freed_addresses_wait_in_quarantine_least_recently_freed_first() {
        // Was `expired_address_is_reusable_by_anyone` (an expired address
        // went straight to the next new peer). Now (SPEC decision 4, issue
        // 14 item 11) it is handed out only when no other address is free.
        // A /29 less two excluded: 4 addresses.
        let mut s = store("192.0.2.0", 29, &[ip("192.0.2.1"), ip("192.0.2.4")]);
        let base = Instant::now();
        let a = s.upsert(peer(1), base).unwrap().addr();
        let b = s.upsert(peer(2), base + Duration::from_secs(1)).unwrap().addr();
        let mut out = Vec::new();
        s.expire(base + T, &mut out);
        assert_eq!(out.iter().map(|e| e.addr).collect::<Vec<_>>(), vec![a]);
        assert_eq!(s.quarantine().collect::<Vec<_>>(), vec![a]);
        // The two never-used addresses go first, whatever the slots say.
        let c = s.upsert(peer(3), base + T).unwrap().addr();
        let d = s.upsert(peer(4), base + T).unwrap().addr();
        assert!(![a, b].contains(&c) && ![a, b, c].contains(&d));
        check(&s);
        // Only `a` is left: the pool is not refused while it waits.
        assert_eq!(s.upsert(peer(5), base + T), Ok(Upsert::Created(a)));
        assert_eq!(s.quarantine().count(), 0);
        // Two freed in turn come back in the order they were freed.
        s.remove(d).unwrap();
        s.remove(b).unwrap();
        assert_eq!(s.quarantine().collect::<Vec<_>>(), vec![d, b]);
        assert_eq!(s.upsert(peer(6), base + T), Ok(Upsert::Created(d)));
        assert_eq!(s.upsert(peer(7), base + T), Ok(Upsert::Created(b)));
        assert_eq!(s.upsert(peer(8), base + T), Err(PoolFull));
        check(&s);
    }

    #[test]
    fn quarantine_is_bounded_and_restorable() {
        let mut s = store("198.18.0.0", 15, &[]);
        let base = Instant::now();
        let first = s.upsert(peer(0), base).unwrap().addr();
        s.remove(first).unwrap();
        for n in 1..=QUARANTINE_MAX as u32 {
            let a = s.upsert(peer(n), base).unwrap().addr();
            s.remove(a).unwrap();
        }
        assert_eq!(s.quarantine().count(), QUARANTINE_MAX);
        assert!(!s.quarantined.contains_key(&first), "the oldest left the quarantine");
        check(&s);
        // A new run takes over the list; addresses outside the pool are dropped.
        let list: Vec<_> = s.quarantine().take(3).collect();
        let mut t = store("198.18.0.0", 15, &[]);
        t.restore_quarantine(list.iter().copied().chain([ip("203.0.113.1")]));
        assert_eq!(t.quarantine().collect::<Vec<_>>(), list);
    }

    #[test]
    fn reserved_entries_get_their_peer_later_and_can_move() {
        let mut s = store("198.18.0.0", 24, &[ip("198.18.0.1")]);
        let base = Instant::now();
        let tcp = peer(1);
        let a = s.reserve(tcp, base, Duration::from_secs(10)).unwrap();
        assert_eq!(s.by_addr(a), None, "no peer until the session proves one");
        assert_eq!(s.by_peer(tcp), None, "the TCP source is only the seed");
        assert_eq!(s.next_expiry(), Some(base + Duration::from_secs(10)));
        check(&s);
        // The session proves its UDP path (a NAT that maps UDP apart).
        let udp = peer(2);
        assert_eq!(s.set_peer(a, udp, base), Some((None, None)));
        assert_eq!((s.by_addr(a), s.by_peer(udp)), (Some(udp), Some(a)));
        assert!(s.refresh(a, base + Duration::from_secs(1)));
        assert_eq!(s.next_expiry(), Some(base + Duration::from_secs(1) + T));
        // NAT rebinding: the same entry, the same address, a new peer.
        let moved = SocketAddr::from((Ipv4Addr::new(198, 18, 9, 9), 50_001));
        assert_eq!(s.set_peer(a, moved, base), Some((Some(udp), None)));
        assert_eq!((s.by_peer(udp), s.by_peer(moved)), (None, Some(a)));
        check(&s);
        // Another entry proves a peer this one holds: it takes it over.
        let b = s.reserve(peer(3), base, Duration::from_secs(10)).unwrap();
        assert_eq!(s.set_peer(b, moved, base), Some((None, Some(a))));
        assert_eq!((s.by_addr(a), s.by_addr(b)), (None, Some(moved)));
        check(&s);
        assert_eq!(s.set_peer(ip("198.18.0.99"), udp, base), None);
        // heard() is the data path's lookup; it remembers when.
        let later = base + Duration::from_secs(5);
        assert_eq!(s.heard(moved, later), Some(b));
        assert_eq!(s.last_heard(moved), Some(later));
        assert_eq!(s.heard(udp, later), None);
        // A reserved entry lives its short life unless refreshed: b took
        // the peer but was never refreshed, a was.
        let mut out = Vec::new();
        s.expire(base + Duration::from_secs(10), &mut out);
        assert_eq!(out.iter().map(|e| (e.addr, e.peer)).collect::<Vec<_>>(), vec![(b, Some(moved))]);
        assert_eq!(s.by_peer(moved), None);
        assert!(s.get(a).is_some());
        check(&s);
    }

    #[test]
    fn ipv6_peers_and_restore() {
        let mut s = store("198.18.0.0", 24, &[ip("198.18.0.1")]);
        let base = Instant::now();
        let v6: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let a = s.upsert(v6, base).unwrap().addr();
        assert_eq!(s.by_peer(v6), Some(a));
        assert_eq!(s.by_addr(a), Some(v6));
        // A restart puts entries back with their addresses and deadlines.
        let mut t = store("198.18.0.0", 24, &[ip("198.18.0.1")]);
        let dl = base + Duration::from_secs(60);
        assert_eq!(t.restore(a, Some(v6), base, dl), Ok(()));
        assert_eq!(t.restore(a, None, base, dl), Err(RestoreError::AddrTaken(a)));
        assert_eq!(t.restore(ip("198.18.0.7"), Some(v6), base, dl), Err(RestoreError::PeerTaken(v6)));
        assert_eq!(t.restore(ip("203.0.113.1"), None, base, dl), Err(RestoreError::NotInPool(ip("203.0.113.1"))));
        assert_eq!(t.restore(ip("198.18.0.1"), None, base, dl), Err(RestoreError::NotInPool(ip("198.18.0.1"))));
        assert_eq!(t.by_peer(v6), Some(a));
        assert_eq!(t.next_expiry(), Some(dl));
        check(&t);
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
        s.remove_peer(peer(2)).unwrap();
        assert_eq!(s.next_expiry(), Some(at(40) + T));
        // Nothing due before next_expiry; the entry due at it goes.
        let mut out = Vec::new();
        s.expire(at(40) + T - Duration::from_millis(1), &mut out);
        assert!(out.is_empty());
        s.expire(s.next_expiry().unwrap(), &mut out);
        assert_eq!(
            out.iter().map(|e| e.peer).collect::<Vec<_>>(),
            vec![Some(peer(1))]
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
        let mut addr_of: HashMap<SocketAddr, Ipv4Addr> = HashMap::new();
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let now = base + Duration::from_secs(step / 10);
            let p = peer((x % 60) as u32);
            match (x >> 32) % 10 {
                0 => {
                    let r = s.remove_peer(p);
                    assert_eq!(r.map(|e| e.addr), addr_of.remove(&p));
                }
                1 => {
                    out.clear();
                    s.expire(now, &mut out);
                    for e in &out {
                        assert!(now.duration_since(e.refreshed) >= T);
                        assert!(s.by_peer(e.peer.unwrap()).is_none());
                        assert_eq!(addr_of.remove(&e.peer.unwrap()), Some(e.addr));
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
