//! Receive-side coalescing: the segments of one TCP flow that arrive in one
//! UDP GRO train go into the TUN as one TCP super-segment.
//!
//! A GRO train holds the datagrams one peer sent back to back, typically one
//! TSO super-segment its kernel cut into MSS-sized pieces. Written to the TUN
//! one by one they cost a system call and a pass through the receiving TCP
//! stack each. Instead, consecutive segments of one flow are written as one
//! packet with a virtio-net header that says GSO_TCPV4 and NEEDS_CSUM: one
//! `writev` straight from the receive buffer (the rebuilt headers in front,
//! the payloads gathered in place), no copy in user space, no checksum pass.
//! The TCP checksum travels as checksum-partial (SPEC decision 5); the data
//! was covered on the wire by the UDP checksum the receiving kernel checked.
//!
//! The rules follow Linux's `tcp_gro_receive`, on the safe side: same ports,
//! acknowledgement, window and option bytes (timestamps included);
//! consecutive sequence numbers; equal payload sizes, a shorter one only last;
//! PSH only on the last segment (it ends the run and is set on the merged
//! header); SYN, FIN, RST, URG, CWR and ECE segments, and segments without
//! payload, are never merged. Pure: no I/O.

use std::net::Ipv4Addr;
use std::ops::Range;

use super::wire::{self, IPV4_HEADER_LEN, IPV4_MAX_LEN};
use super::tso::F_NEEDS_CSUM as NEEDS_CSUM;
use super::wire::tcp::{ACK, CHECKSUM, DATA_OFFSET, FLAG_PSH, FLAGS, SEQ, WINDOW};

/// Bytes of the virtio-net header that precedes a packet written to the TUN.
pub const VNET_LEN: usize = super::tso::VNET_HDR_LEN;
/// The headers the daemon writes in front of a run: virtio-net and IPv4.
pub const RUN_HEADER_LEN: usize = VNET_LEN + IPV4_HEADER_LEN;

/// The most segments a run holds: a UDP GRO train carries at most 64
/// datagrams (UDP_GRO_CNT_MAX), and one run comes from one train.
pub const MAX_RUN: usize = 64;

/// FIN, SYN, RST, URG, ECE, CWR: a segment carrying any of them stands alone.
const FLAGS_ALONE: u8 = 0x01 | 0x02 | 0x04 | 0x20 | 0x40 | 0x80;

/// The fields that decide whether two segments can merge.
#[derive(Debug, Clone, Copy)]
struct View {
    seq: u32,
    flags: u8,
    header: usize,
    payload: usize,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

fn view(seg: &[u8]) -> Option<View> {
    let header = wire::tcp_header_len(seg)?;
    Some(View { seq: be32(seg, SEQ)?, flags: *seg.get(FLAGS)?, header, payload: seg.len() - header })
}

/// Bytes that must be equal for two segments of one run: ports, the
/// acknowledgement number, data offset and window, and the options.
fn same_flow(a: &[u8], b: &[u8], header: usize) -> bool {
    [0..4, ACK..ACK + 4, DATA_OFFSET..DATA_OFFSET + 1, WINDOW..WINDOW + 2, wire::TCP_HEADER_MIN..header]
        .into_iter()
        .all(|r| matches!((a.get(r.clone()), b.get(r)), (Some(x), Some(y)) if x == y))
}

/// Where the run that starts at `segs[start]` ends (exclusive). `segs` are
/// checked segments of one peer, in arrival order.
pub fn run_end(segs: &[&[u8]], start: usize) -> usize {
    let next = start + 1;
    let Some(first_seg) = segs.get(start) else { return next };
    let Some(first) = view(first_seg) else { return next };
    if first.payload == 0 || first.flags & (FLAGS_ALONE | FLAG_PSH) != 0 {
        return next;
    }
    let mut end = next;
    let mut expect = first.seq.wrapping_add(first.payload as u32);
    let mut total = first.header + first.payload;
    while let Some(seg) = segs.get(end) {
        let Some(v) = view(seg) else { break };
        let flags_ok = v.flags == first.flags || v.flags == first.flags | FLAG_PSH;
        if !flags_ok
            || v.header != first.header
            || v.seq != expect
            || v.payload == 0
            || v.payload > first.payload
            || IPV4_HEADER_LEN + total + v.payload > IPV4_MAX_LEN
            || !same_flow(first_seg, seg, first.header)
        {
            break;
        }
        end += 1;
        total += v.payload;
        expect = expect.wrapping_add(v.payload as u32);
        if v.payload < first.payload || v.flags & FLAG_PSH != 0 {
            break; // nothing may follow a short or a PSH segment
        }
    }
    end
}

/// Where the runs of the segments `chunk` (ranges of `train`, at most
/// [`MAX_RUN`] are looked at) end: `ends[..runs]`, each an index into
/// `chunk`, the last one its length. Found in one pass before any run is
/// written, since writing needs the train mutably.
pub fn run_ends(train: &[u8], chunk: &[Range<usize>]) -> ([usize; MAX_RUN], usize) {
    let mut segs: [&[u8]; MAX_RUN] = [&[]; MAX_RUN];
    for (slot, range) in segs.iter_mut().zip(chunk) {
        *slot = train.get(range.clone()).unwrap_or(&[]);
    }
    let segs = segs.get(..chunk.len().min(MAX_RUN)).unwrap_or(&[]);
    let (mut ends, mut runs, mut start) = ([0; MAX_RUN], 0, 0);
    while start < segs.len() {
        start = run_end(segs, start).clamp(start + 1, segs.len());
        if let Some(e) = ends.get_mut(runs) {
            *e = start;
            runs += 1;
        }
    }
    (ends, runs)
}

/// Prepares the run `segs` (as [`run_end`] found it) for the TUN: writes the
/// virtio-net and IPv4 headers into `headers`, and, for a run of more than
/// one segment, turns the first segment's header into the merged one (PSH of
/// the last, checksum-partial over the pseudo-header). `first` is the first
/// segment, mutable; `rest` the others. Returns the IPv4 total length.
pub fn prepare_run(
    headers: &mut [u8; RUN_HEADER_LEN],
    first: &mut [u8],
    rest: &[&[u8]],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
) -> Option<usize> {
    let v = view(first)?;
    let mut tcp_len = first.len();
    for s in rest {
        tcp_len = tcp_len.checked_add(s.len().checked_sub(v.header)?)?;
    }
    let (vnet, ip) = headers.split_at_mut(VNET_LEN);
    wire::write_ipv4_header(ip, src, dst, tcp_len, id)?;
    let hdr = if rest.is_empty() {
        // One segment: its checksum is complete and the kernel checks it.
        tun_rs::VirtioNetHdr::default()
    } else {
        if rest.last().and_then(|s| s.get(FLAGS)).is_some_and(|f| f & FLAG_PSH != 0) {
            *first.get_mut(FLAGS)? |= FLAG_PSH;
        }
        // Checksum-partial: the field holds the pseudo-header sum, not
        // complemented; the kernel completes it only if it has to.
        let mut acc = wire::sum_words(&src.octets(), 0);
        acc = wire::sum_words(&dst.octets(), acc);
        acc += u64::from(wire::PROTO_TCP) + tcp_len as u64;
        first.get_mut(CHECKSUM..CHECKSUM + 2)?.copy_from_slice(&wire::fold(acc).to_be_bytes());
        tun_rs::VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: tun_rs::VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: u16::try_from(IPV4_HEADER_LEN + v.header).ok()?,
            gso_size: u16::try_from(v.payload).ok()?,
            csum_start: IPV4_HEADER_LEN as u16,
            csum_offset: CHECKSUM as u16,
        }
    };
    hdr.encode(vnet).ok()?;
    Some(IPV4_HEADER_LEN + tcp_len)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 7);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    /// A segment 40000 -> 5201, ack 77, window 500, timestamps option, `len`
    /// bytes of payload starting at `seq`, with a valid checksum.
    fn seg(seq: u32, len: usize, flags: u8) -> Vec<u8> {
        let mut s = vec![0x9c, 0x40, 0x14, 0x51];
        s.extend_from_slice(&seq.to_be_bytes());
        s.extend_from_slice(&77u32.to_be_bytes());
        s.extend_from_slice(&[0x80, flags, 0x01, 0xf4, 0, 0, 0, 0]);
        s.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8]);
        s.extend((0..len).map(|i| (seq as usize + i) as u8));
        let c = wire::tcp_checksum(SRC, DST, &s);
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }

    const ACKF: u8 = 0x10;

    fn ends(segs: &[Vec<u8>]) -> Vec<(usize, usize)> {
        let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < refs.len() {
            let e = run_end(&refs, i);
            assert!(e > i);
            out.push((i, e));
            i = e;
        }
        out
    }

    #[test]
    fn a_train_of_one_flow_is_one_run() {
        let s: Vec<_> = (0..5).map(|i| seg(1000 + i * 100, 100, ACKF)).collect();
        assert_eq!(ends(&s), vec![(0, 5)]);
        // a shorter last one joins and ends the run
        let mut s2 = s.clone();
        s2.push(seg(1500, 40, ACKF));
        s2.push(seg(1540, 100, ACKF));
        assert_eq!(ends(&s2), vec![(0, 6), (6, 7)]);
        // PSH joins as the last
        let mut s3 = s.clone();
        s3.push(seg(1500, 100, ACKF | FLAG_PSH));
        s3.push(seg(1600, 100, ACKF));
        assert_eq!(ends(&s3), vec![(0, 6), (6, 7)]);
    }

    #[test]
    fn run_ends_find_every_run_of_a_train_at_once() {
        // three in order, a PSH one that ends that run, a pure ACK, two more in order
        let segs = [
            seg(0, 100, ACKF),
            seg(100, 100, ACKF),
            seg(200, 100, ACKF | FLAG_PSH),
            seg(300, 0, ACKF),
            seg(300, 100, ACKF),
            seg(400, 100, ACKF),
        ];
        let train = segs.concat();
        let mut ranges = Vec::new();
        for s in &segs {
            let at = ranges.last().map_or(0, |r: &Range<usize>| r.end);
            ranges.push(at..at + s.len());
        }
        let (e, n) = run_ends(&train, &ranges);
        assert_eq!(&e[..n], &[3, 4, 6]);
        assert_eq!(run_ends(&train, &[]).1, 0);
        // garbage stands alone and the last end is always the chunk's length
        let (e, n) = run_ends(&[0u8; 30], &[0..10, 10..20, 20..30]);
        assert_eq!(&e[..n], &[1, 2, 3]);
    }

    #[test]
    fn runs_break_where_the_kernel_would() {
        // a gap in sequence numbers (reordering, loss)
        assert_eq!(ends(&[seg(0, 100, ACKF), seg(200, 100, ACKF)]), vec![(0, 1), (1, 2)]);
        // FIN, SYN, RST, URG stand alone, before and after
        for f in [0x01, 0x02, 0x04, 0x20] {
            let s = vec![seg(0, 100, ACKF), seg(100, 100, ACKF | f), seg(200, 100, ACKF)];
            assert_eq!(ends(&s), vec![(0, 1), (1, 2), (2, 3)], "flag {f:#x}");
        }
        // a PSH first segment stands alone
        assert_eq!(ends(&[seg(0, 100, ACKF | FLAG_PSH), seg(100, 100, ACKF)]), vec![(0, 1), (1, 2)]);
        // pure ACKs stand alone
        assert_eq!(ends(&[seg(0, 0, ACKF), seg(0, 0, ACKF)]), vec![(0, 1), (1, 2)]);
        // a longer segment after the first
        assert_eq!(ends(&[seg(0, 100, ACKF), seg(100, 200, ACKF)]), vec![(0, 1), (1, 2)]);
        // another ack number, window, option value or port
        for at in [8usize, 15, 31, 1] {
            let mut b = seg(100, 100, ACKF);
            b[at] ^= 1;
            assert_eq!(ends(&[seg(0, 100, ACKF), b]), vec![(0, 1), (1, 2)], "byte {at}");
        }
        // never past the IPv4 length limit
        let big: Vec<_> = (0..60).map(|i| seg(i * 1400, 1400, ACKF)).collect();
        for (s, e) in ends(&big) {
            let len: usize = big[s..e].iter().map(|x| x.len() - 32).sum::<usize>() + 32 + 20;
            assert!(len <= IPV4_MAX_LEN);
        }
        // a truncated header stands alone and stops a run
        assert_eq!(ends(&[seg(0, 100, ACKF), vec![0x9c, 0x40]]), vec![(0, 1), (1, 2)]);
    }

    #[test]
    fn a_single_segment_goes_as_it_is() {
        let mut s = seg(0, 100, ACKF | FLAG_PSH);
        let before = s.clone();
        let mut h = [0u8; RUN_HEADER_LEN];
        let total = prepare_run(&mut h, &mut s, &[], SRC, DST, 9).unwrap();
        assert_eq!(total, 20 + s.len());
        assert_eq!(s, before, "segment untouched, checksum complete");
        assert_eq!(&h[..VNET_LEN], &[0u8; VNET_LEN], "no GSO, no checksum offload");
        let mut pkt = h[VNET_LEN..].to_vec();
        pkt.extend_from_slice(&s);
        let t = wire::parse_ipv4_tcp(&pkt).unwrap();
        assert_eq!((t.src, t.dst), (SRC, DST));
    }

    #[test]
    fn a_run_becomes_one_gso_packet_the_kernel_can_cut_back() {
        let mut segs: Vec<_> = (0..4).map(|i| seg(5000 + i * 100, 100, ACKF)).collect();
        segs.push(seg(5400, 30, ACKF | FLAG_PSH));
        let originals = segs.clone();
        let (first, rest) = segs.split_at_mut(1);
        let rest: Vec<&[u8]> = rest.iter().map(|s| s.as_slice()).collect();
        let mut h = [0u8; RUN_HEADER_LEN];
        let total = prepare_run(&mut h, &mut first[0], &rest, SRC, DST, 3).unwrap();
        assert_eq!(total, 20 + 32 + 430);
        let hdr = tun_rs::VirtioNetHdr::decode(&h[..VNET_LEN]).unwrap();
        assert_eq!(hdr.flags, NEEDS_CSUM);
        assert_eq!(hdr.gso_type, tun_rs::VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!((hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset), (52, 100, 20, 16));
        // The merged packet as the kernel sees it.
        let mut pkt = h[VNET_LEN..].to_vec();
        pkt.extend_from_slice(&first[0]);
        for s in &rest {
            pkt.extend_from_slice(&s[32..]);
        }
        assert_eq!(pkt.len(), total);
        let t = wire::parse_ipv4_tcp(&pkt).unwrap();
        assert_eq!(t.segment.len(), 32 + 430);
        assert_eq!(pkt[20 + 13], ACKF | FLAG_PSH, "PSH of the last on the merged header");
        // Completing the partial checksum gives a valid one.
        let mut tcp = pkt[20..].to_vec();
        let partial = u16::from_be_bytes([tcp[16], tcp[17]]);
        tcp[16] = 0;
        tcp[17] = 0;
        let full = !wire::fold(wire::sum_words(&tcp, u64::from(partial)));
        assert_eq!(full, wire::tcp_checksum(SRC, DST, &tcp));
        // Cutting it back at gso_size gives the original payloads in order.
        let payload: Vec<u8> = originals.iter().flat_map(|s| s[32..].to_vec()).collect();
        assert_eq!(&pkt[52..], payload.as_slice());
    }
}
