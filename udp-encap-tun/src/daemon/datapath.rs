//! The data path: TUN to UDP and UDP to TUN in batches, through the core.
//!
//! Both directions work in batches: a TUN read yields a TSO super-segment
//! that leaves as GSO trains of wire headers and payload slices straight from
//! the read buffer (tso.rs); the datagrams of a GRO receive are rewritten
//! where they lie and each run of one flow goes to the TUN as one
//! super-segment (gro.rs). Every discard is counted by the core or here.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use super::gate::Gate;
use crate::core::ratelog::RateLimitedLog;
use crate::core::session::wire::LEN as CONTROL_LEN;
use crate::core::{Core, FromTun, FromTunSuper, FromUdp, HEADROOM, gro, tso, wire};
use crate::counters::{Counters, Discard, Traffic};
use crate::edge::batch::{self, BatchUdp};

/// Reads the TUN gives per wake-up before the loop looks elsewhere.
const TUN_READS_PER_WAKE: usize = 8;
/// The most packets one TUN read can split into (64 KB / small MSS) and the
/// most datagrams gathered before one coalescing write to the TUN.
const PACKETS: usize = tun_rs::IDEAL_BATCH_SIZE;
/// GRO trains received per wake-up before the loop looks elsewhere.
const UDP_RECVS_PER_WAKE: usize = 8;
/// The most segments in one run written to the TUN.
const MAX_RUN: usize = gro::MAX_RUN;
const MAX_PACKET: usize = 65536;

/// The buffers of the data path, allocated once. Both directions work in
/// batches: a TUN read yields up to [`PACKETS`] segments (the kernel's TSO
/// super-segment, split), which leave in GSO trains; the datagrams of a GRO
/// receive are rewritten where they lie and each run of one flow goes to the
/// TUN as one super-segment (gro.rs).
pub struct DataPath {
    counters: Arc<Counters>,
    offload: bool,
    /// One TUN read: virtio-net header and the unsplit packet.
    tun_read: Vec<u8>,
    /// Whole packets cut out of a super-segment that waits for
    /// authentication (rare: allocated on first use).
    tx: Vec<Vec<u8>>,
    tx_sizes: Vec<usize>,
    /// Wire-form TCP headers of the segments of one super-segment (tso.rs).
    hdrs: Vec<u8>,
    /// One UDP receive (a GRO train).
    udp_read: Vec<u8>,
    /// Without offloads: rebuilt packets waiting for the TUN ([IPv4][segment]).
    rx: Vec<Vec<u8>>,
    /// With offloads: the accepted datagrams of one GRO train, and the
    /// headers written in front of a run.
    accepted: Vec<std::ops::Range<usize>>,
    headers: [u8; gro::RUN_HEADER_LEN],
    io_log: RateLimitedLog,
    /// Client: packets for servers without a lease, handed to [`Auth`].
    pub need_auth: Vec<(Ipv4Addr, Vec<u8>)>,
    /// Control datagrams received, handed to the loop (rare: keepalives).
    pub controls: Vec<(SocketAddr, [u8; CONTROL_LEN])>,
    control_ranges: Vec<std::ops::Range<usize>>,
}

impl DataPath {
    pub fn new(counters: Arc<Counters>, offload: bool) -> DataPath {
        DataPath {
            counters,
            offload,
            tun_read: vec![0; tun_rs::VIRTIO_NET_HDR_LEN + MAX_PACKET],
            tx: Vec::new(),
            tx_sizes: vec![0; PACKETS],
            hdrs: vec![0; tso::MAX_SEGMENTS * tso::MAX_TCP_HEADER],
            udp_read: vec![0; MAX_PACKET],
            rx: (0..PACKETS).map(|_| Vec::with_capacity(HEADROOM + 2048)).collect(),
            accepted: Vec::with_capacity(PACKETS),
            headers: [0; gro::RUN_HEADER_LEN],
            io_log: RateLimitedLog::default(),
            need_auth: Vec::new(),
            controls: Vec::new(),
            control_ranges: Vec::new(),
        }
    }

    /// TUN to UDP: read, translate, send. A TSO super-segment leaves in GSO
    /// trains of wire headers and payload slices straight from the read
    /// buffer (tso.rs); any other packet leaves as one datagram. Returns how
    /// many reads it made.
    pub async fn tun_to_udp(&mut self, tun: &tun_rs::AsyncDevice, udp: &BatchUdp, core: &mut Core) -> Result<usize> {
        let DataPath { counters, offload, tun_read, tx, tx_sizes, hdrs, io_log, need_auth, .. } = self;
        let out = &mut Out { counters, io_log, need_auth };
        for reads in 0..TUN_READS_PER_WAKE {
            let n = match tun.try_recv(tun_read) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(reads),
                Err(e) => return Err(e).context("reading from the TUN"),
            };
            out.counters.add(Traffic::TunReads, 1);
            let now = Instant::now();
            let start = if *offload { tso::VNET_HDR_LEN } else { 0 };
            let (vnet, rest) = tun_read.split_at_mut(start.min(n));
            let Some(pkt) = rest.get_mut(..n.saturating_sub(start)) else {
                out.counters.discard(Discard::Malformed);
                continue;
            };
            let kind = match offload {
                true => tso::VnetHdr::parse(vnet).map_or(tso::Read::Other, |h| h.read_kind()),
                false => tso::Read::Single { partial_csum: None },
            };
            match kind {
                tso::Read::TcpV4 { gso_size } => match core.from_tun_super(pkt, gso_size, hdrs, now) {
                    Ok(FromTunSuper::Send { to, count, thl, payload }) => {
                        let data = pkt.get(payload).unwrap_or(&[]);
                        let parts = hdrs.chunks_exact(thl.max(1)).zip(data.chunks(gso_size)).take(count);
                        // Trains within the kernel's limits (one, once the
                        // TUN's gso_max_segs is capped).
                        let per_send = (batch::MAX_GSO_BYTES / (thl + gso_size)).clamp(1, batch::MAX_GSO_SEGMENTS);
                        out.send_pairs(udp, to, parts, per_send, now).await;
                    }
                    Ok(FromTunSuper::NeedAuth { .. }) => out.queue_split(vnet, pkt, tx, tx_sizes, now),
                    Err(_) => {} // counted by the core
                },
                tso::Read::Single { partial_csum } => {
                    if let Some((cs, co)) = partial_csum
                        && tso::complete_checksum(pkt, cs, co).is_none()
                    {
                        out.counters.discard(Discard::Malformed);
                        continue;
                    }
                    match core.from_tun(pkt, now) {
                        Ok(FromTun::Send { to, payload }) => {
                            let seg = pkt.get(payload).unwrap_or(&[]);
                            let r = udp.send(to, &[IoSlice::new(seg)], 1).await;
                            out.sent(r, to, 1, seg.len(), now);
                        }
                        Ok(FromTun::NeedAuth { server }) => out.need_auth.push((server, pkt.to_vec())),
                        Err(_) => {} // counted by the core
                    }
                }
                // A GSO type the tunnel does not carry (IPv6 TCP, UDP), or a
                // header that makes no sense: counted by what the packet is,
                // never sent.
                tso::Read::Other => {
                    let reason = wire::parse_ipv4_tcp(pkt).err().unwrap_or(Discard::Malformed);
                    out.counters.discard(reason);
                }
            }
        }
        Ok(TUN_READS_PER_WAKE)
    }

    /// Sends one control datagram (a keepalive, an answer, a challenge).
    /// Counted by the core under its own counters, not as data; a failure
    /// under `discard_io_error`.
    pub async fn send_control(&mut self, udp: &BatchUdp, to: SocketAddr, bytes: &[u8; CONTROL_LEN]) {
        if let Err(e) = udp.send(to, &[IoSlice::new(bytes)], 1).await {
            self.counters.discard(Discard::IoError);
            self.io_log.log(Instant::now(), || format!("sending a control datagram to {to}: {e}"));
        }
    }

    /// Client: packets that waited for authentication, now that it is done.
    pub async fn send_queued(&mut self, queued: VecDeque<Vec<u8>>, udp: &BatchUdp, core: &mut Core) {
        let now = Instant::now();
        for mut pkt in queued {
            match core.from_tun(&mut pkt, now) {
                Ok(FromTun::Send { to, payload }) => {
                    let seg = pkt.get(payload).unwrap_or(&[]);
                    let r = udp.send(to, &[IoSlice::new(seg)], 1).await;
                    let DataPath { counters, io_log, need_auth, .. } = self;
                    Out { counters, io_log, need_auth }.sent(r, to, 1, seg.len(), now);
                }
                // The lease was refused by the gate (map full): counted there.
                Ok(FromTun::NeedAuth { .. }) => self.counters.discard(Discard::AuthQueue),
                Err(_) => {}
            }
        }
    }

    /// UDP to TUN. With TUN offloads each GRO train is rewritten where it
    /// lies and its runs of one flow go out as one super-segment each
    /// (gro.rs): one `writev`, no copy. Without them, one write per packet.
    /// Returns how many receives it made.
    pub async fn udp_to_tun(&mut self, udp: &BatchUdp, tun: &tun_rs::AsyncDevice, core: &mut Core, gate: &mut Gate) -> usize {
        if !self.offload {
            return self.udp_to_tun_plain(udp, tun, core, gate).await;
        }
        let now = Instant::now();
        for recvs in 0..UDP_RECVS_PER_WAKE {
            let r = match udp.try_recv(&mut self.udp_read) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return recvs,
                Err(e) => {
                    // ICMP errors for earlier sends surface here (ECONNREFUSED, ...).
                    self.counters.discard(Discard::IoError);
                    self.io_log.log(now, || format!("receiving: {e}"));
                    continue;
                }
            };
            self.counters.add(Traffic::UdpRecvCalls, 1);
            let Some(train) = self.udp_read.get_mut(..r.len) else { continue };
            // 1. Check and rewrite each datagram in place.
            self.accepted.clear();
            self.control_ranges.clear();
            let src = core.accept_train(r.src, train, r.stride, now, gate, &mut self.accepted, &mut self.control_ranges);
            for c in &self.control_ranges {
                if let Some(b) = train.get(c.clone()).and_then(|b| <[u8; CONTROL_LEN]>::try_from(b).ok()) {
                    self.controls.push((r.src, b));
                }
            }
            let Some(src) = src else { continue };
            // 2. Find where the runs end (a train holds at most MAX_RUN
            //    datagrams; more would be cut into chunks), then write them:
            //    the writes need the train mutably, the search only to read.
            for chunk in self.accepted.chunks(MAX_RUN) {
                let (ends, runs) = gro::run_ends(train, chunk);
                let mut start = 0;
                for &end in ends.get(..runs).unwrap_or(&[]) {
                    let run = chunk.get(start..end).unwrap_or(&[]);
                    let count = end - start;
                    start = end;
                    if let Err(e) = write_run(tun, train, run, src, core, &mut self.headers).await {
                        self.counters.discard_n(Discard::IoError, count as u64);
                        self.io_log.log(now, || format!("writing to the TUN: {e}"));
                        continue;
                    }
                    let bytes: usize = run.iter().map(|r| r.len()).sum();
                    self.counters.add(Traffic::TunWrites, 1);
                    self.counters.add(Traffic::TunTxPackets, count as u64);
                    self.counters.add(Traffic::TunTxBytes, (bytes + count * HEADROOM) as u64);
                }
            }
        }
        UDP_RECVS_PER_WAKE
    }

    /// UDP to TUN without offloads: receive trains until the batch is full
    /// or the socket is empty, rebuild each datagram, one write each.
    async fn udp_to_tun_plain(&mut self, udp: &BatchUdp, tun: &tun_rs::AsyncDevice, core: &mut Core, gate: &mut Gate) -> usize {
        let mut recvs = 0;
        let mut ready = 0;
        let now = Instant::now();
        // Room for one more full GRO train (64 datagrams) in the batch.
        while ready + batch::MAX_GSO_SEGMENTS <= PACKETS {
            let r = match udp.try_recv(&mut self.udp_read) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.counters.discard(Discard::IoError);
                    self.io_log.log(now, || format!("receiving: {e}"));
                    continue;
                }
            };
            self.counters.add(Traffic::UdpRecvCalls, 1);
            recvs += 1;
            let train = self.udp_read.get(..r.len).unwrap_or(&[]);
            for dgram in train.chunks(r.stride) {
                let Some(out) = self.rx.get_mut(ready) else { break };
                out.clear();
                out.resize(HEADROOM, 0);
                out.extend_from_slice(dgram);
                // A discard is counted by the core.
                match core.from_udp(r.src, out, dgram.len(), now, gate) {
                    Ok(FromUdp::Tun(range)) => {
                        out.truncate(range.end);
                        ready += 1;
                    }
                    Ok(FromUdp::Control) => {
                        if let Ok(b) = <[u8; CONTROL_LEN]>::try_from(dgram) {
                            self.controls.push((r.src, b));
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        for pkt in self.rx.iter().take(ready) {
            match tun.send(pkt).await {
                Ok(_) => {
                    self.counters.add(Traffic::TunWrites, 1);
                    self.counters.add(Traffic::TunTxPackets, 1);
                    self.counters.add(Traffic::TunTxBytes, pkt.len() as u64);
                }
                Err(e) => {
                    self.counters.discard(Discard::IoError);
                    self.io_log.log(now, || format!("writing to the TUN: {e}"));
                }
            }
        }
        recvs
    }
}

/// The parts of [`DataPath`] that sending and queueing update, borrowed
/// apart from its buffers.
struct Out<'a> {
    counters: &'a Counters,
    io_log: &'a mut RateLimitedLog,
    need_auth: &'a mut Vec<(Ipv4Addr, Vec<u8>)>,
}

impl Out<'_> {
    /// Counts the outcome of a send of `count` datagrams, `bytes` in all.
    fn sent(&mut self, r: io::Result<usize>, to: SocketAddr, count: usize, bytes: usize, now: Instant) {
        match r {
            Ok(calls) => {
                self.counters.add(Traffic::UdpSendCalls, calls as u64);
                self.counters.add(Traffic::UdpTxPackets, count as u64);
                self.counters.add(Traffic::UdpTxBytes, bytes as u64);
            }
            Err(e) => {
                self.counters.discard_n(Discard::IoError, count as u64);
                self.io_log.log(now, || format!("sending to {to}: {e}"));
            }
        }
    }

    /// Sends datagrams made of (wire TCP header, payload) pairs to `to`, in
    /// GSO trains of at most `per_send`, each pair gathered by two iovecs.
    async fn send_pairs<'p>(
        &mut self,
        udp: &BatchUdp,
        to: SocketAddr,
        mut parts: impl Iterator<Item = (&'p [u8], &'p [u8])>,
        per_send: usize,
        now: Instant,
    ) {
        loop {
            let mut iov = [IoSlice::new(&[]); 2 * batch::MAX_GSO_SEGMENTS];
            let (mut k, mut bytes) = (0, 0);
            for ((h, d), slots) in parts.by_ref().take(per_send).zip(iov.chunks_exact_mut(2)) {
                if let [a, b] = slots {
                    *a = IoSlice::new(h);
                    *b = IoSlice::new(d);
                }
                bytes += h.len() + d.len();
                k += 1;
            }
            if k == 0 {
                return;
            }
            let r = udp.send(to, iov.get(..2 * k).unwrap_or(&[]), 2).await;
            self.sent(r, to, k, bytes, now);
        }
    }

    /// A super-segment for a server without a lease yet (client with
    /// authentication): cut into whole packets as the kernel would have sent
    /// them (tun-rs's split: rare, so its copies do not matter), each queued
    /// for after the handshake.
    fn queue_split(&mut self, vnet: &[u8], pkt: &mut [u8], tx: &mut Vec<Vec<u8>>, sizes: &mut [usize], now: Instant) {
        if tx.is_empty() {
            *tx = (0..sizes.len()).map(|_| vec![0; MAX_PACKET]).collect();
        }
        let split = tun_rs::VirtioNetHdr::decode(vnet).and_then(|h| tun_rs::gso_split(pkt, h, tx, sizes, 0, false));
        match split {
            Ok(k) => {
                for (buf, size) in tx.iter().zip(sizes.iter()).take(k) {
                    match buf.get(..*size).map(|p| (p, wire::parse_ipv4_tcp(p))) {
                        Some((p, Ok(t))) => self.need_auth.push((t.dst, p.to_vec())),
                        Some((_, Err(reason))) => self.counters.discard(reason),
                        None => self.counters.discard(Discard::Malformed),
                    }
                }
            }
            Err(e) => {
                self.counters.discard(Discard::Malformed);
                self.io_log.log(now, || format!("a TSO super-segment tun-rs could not split: {e}"));
            }
        }
    }
}

/// Writes one run (gro.rs) of the accepted segments `run` of `train` to the
/// TUN: the rebuilt headers, the first segment whole, the others' payloads.
async fn write_run(
    tun: &tun_rs::AsyncDevice,
    train: &mut [u8],
    run: &[std::ops::Range<usize>],
    src: Ipv4Addr,
    core: &mut Core,
    headers: &mut [u8; gro::RUN_HEADER_LEN],
) -> io::Result<()> {
    let bad = || io::Error::other("a run that does not fit its buffer");
    let (Some(first), Some(last)) = (run.first(), run.last()) else { return Ok(()) };
    let thl = train.get(first.clone()).and_then(wire::tcp_header_len).ok_or_else(bad)?;
    let (head, tail) = train.split_at_mut(first.end.min(last.end));
    let first_seg = head.get_mut(first.clone()).ok_or_else(bad)?;
    let mut rest: [&[u8]; MAX_RUN] = [&[]; MAX_RUN];
    for (slot, r) in rest.iter_mut().zip(run.iter().skip(1)) {
        let shifted = r.start.checked_sub(first.end).ok_or_else(bad)?..r.end.checked_sub(first.end).ok_or_else(bad)?;
        *slot = tail.get(shifted).ok_or_else(bad)?;
    }
    let rest = rest.get(..run.len() - 1).ok_or_else(bad)?;
    let id = core.next_ip_id();
    gro::prepare_run(headers, first_seg, rest, src, core.tun_addr(), id).ok_or_else(bad)?;
    let mut iov = [IoSlice::new(&[]); MAX_RUN + 1];
    let mut n = 0;
    for (slot, part) in iov.iter_mut().zip(
        [headers.as_slice(), &*first_seg]
            .into_iter()
            .chain(rest.iter().map(|s| s.get(thl..).unwrap_or(&[]))),
    ) {
        *slot = IoSlice::new(part);
        n += 1;
    }
    tun.send_vectored(iov.get(..n).unwrap_or(&[])).await.map(|_| ())
}


#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A super-segment for a server without a lease is queued as the whole
    /// packets the kernel would have sent, each with a valid checksum.
    #[test]
    fn a_super_segment_waiting_for_auth_is_queued_as_whole_packets() {
        let (src, dst) = (Ipv4Addr::new(198, 19, 0, 2), Ipv4Addr::new(192, 0, 2, 1));
        let gso = 1000usize;
        let mut pkt = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
        pkt.extend_from_slice(&src.octets());
        pkt.extend_from_slice(&dst.octets());
        pkt.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        pkt.extend((0..2 * gso + 10).map(|i| i as u8));
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        let c = wire::checksum(&pkt[..20]);
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
        // the kernel's partial checksum: the pseudo-header sum (length 0 for TSO)
        let pseudo = wire::fold(wire::sum_words(&pkt[12..20], 6));
        pkt[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let mut vnet = [0u8; tso::VNET_HDR_LEN];
        vnet[0] = 1; // NEEDS_CSUM
        vnet[1] = 1; // GSO_TCPV4
        vnet[2..4].copy_from_slice(&40u16.to_ne_bytes());
        vnet[4..6].copy_from_slice(&(gso as u16).to_ne_bytes());
        vnet[6..8].copy_from_slice(&20u16.to_ne_bytes());
        vnet[8..10].copy_from_slice(&16u16.to_ne_bytes());

        let counters = Counters::default();
        let (mut log, mut queue) = (RateLimitedLog::default(), Vec::new());
        let mut out = Out { counters: &counters, io_log: &mut log, need_auth: &mut queue };
        let (mut tx, mut sizes) = (Vec::new(), vec![0; 8]);
        out.queue_split(&vnet, &mut pkt, &mut tx, &mut sizes, Instant::now());
        assert_eq!(queue.len(), 3);
        for (i, (server, p)) in queue.iter().enumerate() {
            assert_eq!(*server, dst);
            let t = wire::parse_ipv4_tcp(p).unwrap();
            assert_eq!(p.len(), 40 + if i < 2 { gso } else { 10 });
            let mut seg = p[20..].to_vec();
            let c = u16::from_be_bytes([seg[16], seg[17]]);
            seg[16..18].copy_from_slice(&[0, 0]);
            assert_eq!(c, wire::tcp_checksum(t.src, t.dst, &seg), "packet {i}");
        }

        // a header tun-rs refuses: counted, nothing queued
        queue.clear();
        vnet[4..6].copy_from_slice(&0u16.to_ne_bytes());
        let mut out = Out { counters: &counters, io_log: &mut log, need_auth: &mut queue };
        out.queue_split(&vnet, &mut pkt, &mut tx, &mut sizes, Instant::now());
        assert!(queue.is_empty());
        assert_eq!(counters.discards(Discard::Malformed), 1);
    }
}
