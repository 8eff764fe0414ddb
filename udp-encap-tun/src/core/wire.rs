//! Packet bytes: IPv4 and TCP headers, checksums, MSS clamping.
//!
//! Every function here takes bytes that may come from a hostile network.
//! Lengths are checked once, up front, by [`parse_ipv4_tcp`] or
//! [`parse_segment`]; after that, accessors read through `get` and can't
//! panic. Nothing here allocates or does I/O.
//!
//! ## The wire format
//!
//! One UDP datagram carries exactly one TCP segment (TCP header, options,
//! data), nothing before it and nothing after it. The inner IPv4 header is
//! not sent: each side rebuilds it. So the TCP checksum can't stay as the
//! sender's kernel computed it, because its pseudo-header names addresses the
//! receiver will replace. On the wire the TCP checksum field holds the
//! checksum computed over a pseudo-header whose source and destination
//! addresses are 0.0.0.0 (protocol 6 and the TCP length stay). The sender
//! subtracts its inner addresses, the receiver adds the ones it writes,
//! both with the incremental update of RFC 1624, so neither touches the
//! payload. A corrupt segment stays corrupt through both updates and the
//! receiving kernel drops it (TcpInCsumErrors); the UDP checksum, computed
//! and verified by the kernels, covers the datagram on the wire.

use std::net::Ipv4Addr;
use std::ops::Range;

use crate::counters::Discard;

pub const IPV4_HEADER_LEN: usize = 20;
pub const TCP_HEADER_MIN: usize = 20;
pub const PROTO_TCP: u8 = 6;
/// The largest IPv4 packet; a segment whose rebuilt packet would be longer
/// can't be written to the TUN.
pub const IPV4_MAX_LEN: usize = 65535;
/// The TTL of rebuilt packets (Linux's default).
pub const TTL: u8 = 64;

/// Field offsets inside an IPv4 header (RFC 791).
mod ipv4 {
    pub const VER_IHL: usize = 0;
    pub const TOTAL_LEN: usize = 2;
    pub const ID: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// More-fragments flag and fragment offset: non-zero means a fragment.
    pub const MF_OFFSET_MASK: u16 = 0x3fff;
    pub const DF: u16 = 0x4000;
}

/// TCP header field offsets and flags (RFC 9293).
pub mod tcp {
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECKSUM: usize = 16;
    pub const FLAG_FIN: u8 = 0x01;
    pub const FLAG_SYN: u8 = 0x02;
    pub const FLAG_PSH: u8 = 0x08;
    pub const FLAG_CWR: u8 = 0x80;
    pub const OPT_EOL: u8 = 0;
    pub const OPT_NOP: u8 = 1;
    pub const OPT_MSS: u8 = 2;
    pub const OPT_MSS_LEN: u8 = 4;
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at.checked_add(1)?)?]))
}

fn set_be16(b: &mut [u8], at: usize, v: u16) -> Option<()> {
    let end = at.checked_add(2)?;
    b.get_mut(at..end)?.copy_from_slice(&v.to_be_bytes());
    Some(())
}

fn addr(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let end = at.checked_add(4)?;
    let o: [u8; 4] = b.get(at..end)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

// ---------------------------------------------------------------- checksums

/// Adds `data` as big-endian 16-bit words to a one's complement accumulator
/// (an odd trailing byte is padded with zero, RFC 1071).
pub fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        if let [hi, lo] = c {
            acc += u64::from(u16::from_be_bytes([*hi, *lo]));
        }
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// Folds an accumulator into 16 bits with end-around carry.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (the value to store in a header field).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// The TCP checksum of `segment` for the given pseudo-header addresses.
pub fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut acc = sum_words(&src.octets(), 0);
    acc = sum_words(&dst.octets(), acc);
    acc += u64::from(PROTO_TCP);
    acc += segment.len() as u64;
    !fold(sum_words(segment, acc))
}

/// RFC 1624, eqn. 3: the checksum after a 16-bit word of the covered data
/// changed from `old` to `new`: HC' = ~(~HC + ~m + m').
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!csum) + u64::from(!old) + u64::from(new))
}

/// [`update16`] for a 32-bit field (an address) as two words.
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let c = update16(csum, (old >> 16) as u16, (new >> 16) as u16);
    update16(c, old as u16, new as u16)
}

// ---------------------------------------------------------------- parsing

/// An IPv4 packet carrying TCP, read from the TUN and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Tcp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The TCP segment inside the packet (after the 20-byte header, up to the
    /// IPv4 total length; bytes beyond it are link padding and ignored).
    pub segment: Range<usize>,
}

/// Checks a packet read from the TUN in the order the design gives: not
/// IPv4 TCP, then a header longer than 20 bytes, then anything malformed.
pub fn parse_ipv4_tcp(pkt: &[u8]) -> Result<Ipv4Tcp, Discard> {
    let ver_ihl = *pkt.get(ipv4::VER_IHL).ok_or(Discard::Malformed)?;
    if ver_ihl >> 4 != 4 {
        // IPv6 or anything else routed into the TUN: the tunnel carries IPv4 TCP only.
        return Err(Discard::NotTcp);
    }
    if pkt.len() < IPV4_HEADER_LEN {
        return Err(Discard::Malformed);
    }
    let proto = *pkt.get(ipv4::PROTO).ok_or(Discard::Malformed)?;
    if proto != PROTO_TCP {
        return Err(Discard::NotTcp);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < IPV4_HEADER_LEN {
        return Err(Discard::Malformed);
    }
    if ihl > IPV4_HEADER_LEN {
        return Err(Discard::IpOptions);
    }
    let total = usize::from(be16(pkt, ipv4::TOTAL_LEN).ok_or(Discard::Malformed)?);
    if total > pkt.len() || total < IPV4_HEADER_LEN {
        return Err(Discard::Malformed);
    }
    let frag = be16(pkt, ipv4::FLAGS_FRAG).ok_or(Discard::Malformed)?;
    if frag & ipv4::MF_OFFSET_MASK != 0 {
        // A fragment holds part of a segment; one datagram must carry a whole one.
        return Err(Discard::Malformed);
    }
    let segment = IPV4_HEADER_LEN..total;
    check_tcp_header(pkt.get(segment.clone()).ok_or(Discard::Malformed)?)?;
    Ok(Ipv4Tcp {
        src: addr(pkt, ipv4::SRC).ok_or(Discard::Malformed)?,
        dst: addr(pkt, ipv4::DST).ok_or(Discard::Malformed)?,
        segment,
    })
}

/// The length of `seg`'s TCP header from its data offset, if that is at
/// least 5 words and fits inside `seg` (so the whole fixed header is there).
pub fn tcp_header_len(seg: &[u8]) -> Option<usize> {
    let len = usize::from(seg.get(tcp::DATA_OFFSET)? >> 4) * 4;
    (TCP_HEADER_MIN..=seg.len()).contains(&len).then_some(len)
}

/// Checks that `seg` can be a TCP segment: a full header, a data offset of
/// at least 5 words that fits inside it.
pub fn check_tcp_header(seg: &[u8]) -> Result<(), Discard> {
    tcp_header_len(seg).map(|_| ()).ok_or(Discard::Malformed)
}

/// Checks a datagram payload received from a peer: one TCP segment that
/// fits in an IPv4 packet once a header is put on top.
pub fn parse_segment(payload: &[u8]) -> Result<(), Discard> {
    if payload.len() > IPV4_MAX_LEN - IPV4_HEADER_LEN {
        return Err(Discard::Malformed);
    }
    check_tcp_header(payload)
}

// ---------------------------------------------------------------- rewriting

/// The TCP checksum field of a segment, or `None` if it is too short.
pub fn tcp_checksum_field(seg: &[u8]) -> Option<u16> {
    be16(seg, tcp::CHECKSUM)
}

/// Rewrites the checksum of a checked segment from the pseudo-header
/// (`from_src`, `from_dst`) to (`to_src`, `to_dst`). With 0.0.0.0 on one side
/// this converts to or from the wire form (module docs).
pub fn rehome_checksum(
    seg: &mut [u8],
    from_src: Ipv4Addr,
    from_dst: Ipv4Addr,
    to_src: Ipv4Addr,
    to_dst: Ipv4Addr,
) -> Option<()> {
    let c = be16(seg, tcp::CHECKSUM)?;
    let c = update32(c, from_src.to_bits(), to_src.to_bits());
    let c = update32(c, from_dst.to_bits(), to_dst.to_bits());
    set_be16(seg, tcp::CHECKSUM, c)
}

/// Lowers the MSS option of a SYN segment to `max_mss` if it announces more,
/// keeping the checksum valid. Returns true if it changed the segment.
/// Options that do not parse are left alone: the receiving stack judges them.
pub fn clamp_mss(seg: &mut [u8], max_mss: u16) -> bool {
    let Some(flags) = seg.get(tcp::FLAGS) else { return false };
    if flags & tcp::FLAG_SYN == 0 {
        return false;
    }
    let Some(doff) = seg.get(tcp::DATA_OFFSET).map(|d| usize::from(d >> 4) * 4) else {
        return false;
    };
    let mut at = TCP_HEADER_MIN;
    while at < doff {
        match seg.get(at) {
            None | Some(&tcp::OPT_EOL) => return false,
            Some(&tcp::OPT_NOP) => at += 1,
            Some(&kind) => {
                let Some(&len) = seg.get(at + 1) else { return false };
                let len = usize::from(len);
                if len < 2 || at + len > doff {
                    return false;
                }
                if kind == tcp::OPT_MSS && len == usize::from(tcp::OPT_MSS_LEN) {
                    let Some(mss) = be16(seg, at + 2) else { return false };
                    if mss <= max_mss {
                        return false;
                    }
                    let Some(c) = be16(seg, tcp::CHECKSUM) else { return false };
                    // At an odd offset the field straddles two of the words
                    // the checksum adds, and counts there byte-swapped
                    // (RFC 1071, "byte order independence"). Found by fuzzing.
                    let c = if (at + 2).is_multiple_of(2) {
                        update16(c, mss, max_mss)
                    } else {
                        update16(c, mss.swap_bytes(), max_mss.swap_bytes())
                    };
                    return set_be16(seg, at + 2, max_mss).is_some()
                        && set_be16(seg, tcp::CHECKSUM, c).is_some();
                }
                at += len;
            }
        }
    }
    false
}

/// Writes a complete IPv4 header for a TCP segment of `seg_len` bytes into
/// `hdr` (20 bytes): IHL 5, DF (the segments are sized to fit the path, MSS
/// clamping), TTL 64, the header checksum.
pub fn write_ipv4_header(
    hdr: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    seg_len: usize,
    id: u16,
) -> Option<()> {
    let total = u16::try_from(seg_len.checked_add(IPV4_HEADER_LEN)?).ok()?;
    let h = hdr.get_mut(..IPV4_HEADER_LEN)?;
    h.fill(0);
    *h.get_mut(ipv4::VER_IHL)? = 0x45;
    set_be16(h, ipv4::TOTAL_LEN, total)?;
    set_be16(h, ipv4::ID, id)?;
    set_be16(h, ipv4::FLAGS_FRAG, ipv4::DF)?;
    *h.get_mut(ipv4::TTL)? = TTL;
    *h.get_mut(ipv4::PROTO)? = PROTO_TCP;
    h.get_mut(ipv4::SRC..ipv4::SRC + 4)?.copy_from_slice(&src.octets());
    h.get_mut(ipv4::DST..ipv4::DST + 4)?.copy_from_slice(&dst.octets());
    let c = checksum(h);
    set_be16(h, ipv4::CHECKSUM, c)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    /// A SYN from 198.19.0.2:40000 to 192.0.2.1:80 with MSS 1460, SACK-permitted,
    /// timestamps, NOP, window scale 7, as Linux sends it (checksum filled in below).
    fn syn_packet() -> Vec<u8> {
        let mut p = vec![
            0x45, 0x00, 0x00, 0x3c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, // ver..csum
            198, 19, 0, 2, 192, 0, 2, 1, // src, dst
            0x9c, 0x40, 0x00, 0x50, // ports 40000 -> 80
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // seq, ack
            0xa0, 0x02, 0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00, // doff 10, SYN, win, csum, urg
            0x02, 0x04, 0x05, 0xb4, // MSS 1460
            0x04, 0x02, // SACK permitted
            0x08, 0x0a, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, // timestamps
            0x01, // NOP
            0x03, 0x03, 0x07, // window scale 7
        ];
        let ipc = checksum(&p[..20]);
        p[10..12].copy_from_slice(&ipc.to_be_bytes());
        let tc = tcp_checksum(A, B, &p[20..]);
        p[36..38].copy_from_slice(&tc.to_be_bytes());
        p
    }

    fn tcp_ok(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> bool {
        // The receiver's check: the sum over pseudo-header and segment,
        // checksum included, folds to all ones.
        let mut acc = sum_words(&src.octets(), 0);
        acc = sum_words(&dst.octets(), acc);
        acc += u64::from(PROTO_TCP) + seg.len() as u64;
        fold(sum_words(seg, acc)) == 0xffff
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        // odd length pads with zero
        assert_eq!(fold(sum_words(&[0x01], 0)), 0x0100);
    }

    #[test]
    fn ipv4_header_checksum_of_a_real_header() {
        // A header captured from Linux: 45 00 00 73 00 00 40 00 40 11 b8 61 c0 a8 00 01 c0 a8 00 c7
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn parses_a_syn() {
        let p = syn_packet();
        let t = parse_ipv4_tcp(&p).unwrap();
        assert_eq!((t.src, t.dst, t.segment), (A, B, 20..60));
        assert!(tcp_ok(A, B, &p[20..]));
    }

    #[test]
    fn discards_in_the_designs_order() {
        let mut udp = syn_packet();
        udp[9] = 17;
        assert_eq!(parse_ipv4_tcp(&udp), Err(Discard::NotTcp));
        let mut v6 = syn_packet();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4_tcp(&v6), Err(Discard::NotTcp));
        let mut opts = syn_packet();
        opts[0] = 0x46;
        assert_eq!(parse_ipv4_tcp(&opts), Err(Discard::IpOptions));
        // UDP with options is "not TCP" first
        udp[0] = 0x46;
        assert_eq!(parse_ipv4_tcp(&udp), Err(Discard::NotTcp));
    }

    #[test]
    fn malformed_packets() {
        let p = syn_packet();
        assert_eq!(parse_ipv4_tcp(&[]), Err(Discard::Malformed));
        assert_eq!(parse_ipv4_tcp(&p[..19]), Err(Discard::Malformed));
        assert_eq!(parse_ipv4_tcp(&p[..39]), Err(Discard::Malformed), "total length beyond the bytes");
        let mut short_ihl = p.clone();
        short_ihl[0] = 0x44;
        assert_eq!(parse_ipv4_tcp(&short_ihl), Err(Discard::Malformed));
        let mut tiny_total = p.clone();
        tiny_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(parse_ipv4_tcp(&tiny_total), Err(Discard::Malformed));
        let mut no_tcp_room = p.clone();
        no_tcp_room[2..4].copy_from_slice(&39u16.to_be_bytes());
        assert_eq!(parse_ipv4_tcp(&no_tcp_room), Err(Discard::Malformed));
        let mut frag = p.clone();
        frag[6] = 0x20; // MF
        assert_eq!(parse_ipv4_tcp(&frag), Err(Discard::Malformed));
        let mut late_frag = p.clone();
        late_frag[6..8].copy_from_slice(&0x0001u16.to_be_bytes());
        assert_eq!(parse_ipv4_tcp(&late_frag), Err(Discard::Malformed));
        let mut doff_low = p.clone();
        doff_low[32] = 0x40;
        assert_eq!(parse_ipv4_tcp(&doff_low), Err(Discard::Malformed));
        let mut doff_high = p.clone();
        doff_high[32] = 0xf0; // 60 bytes of header in a 40-byte segment
        assert_eq!(parse_ipv4_tcp(&doff_high), Err(Discard::Malformed));
    }

    #[test]
    fn trailing_padding_is_ignored() {
        let mut p = syn_packet();
        p.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(parse_ipv4_tcp(&p).unwrap().segment, 20..60);
    }

    #[test]
    fn segment_checks() {
        let p = syn_packet();
        assert_eq!(parse_segment(&p[20..]), Ok(()));
        assert_eq!(parse_segment(&p[20..39]), Err(Discard::Malformed));
        assert_eq!(parse_segment(&[]), Err(Discard::Malformed));
        let huge = vec![0x50u8; IPV4_MAX_LEN];
        assert_eq!(parse_segment(&huge), Err(Discard::Malformed));
    }

    #[test]
    fn wire_checksum_round_trip_to_new_addresses() {
        let p = syn_packet();
        let mut seg = p[20..].to_vec();
        // sender: to the wire form
        rehome_checksum(&mut seg, A, B, ZERO, ZERO).unwrap();
        assert!(tcp_ok(ZERO, ZERO, &seg), "wire form is valid for a zero-address pseudo-header");
        assert_eq!(tcp_checksum_field(&seg), Some(tcp_checksum(ZERO, ZERO, &{
            let mut s = seg.clone();
            s[16] = 0;
            s[17] = 0;
            s
        })));
        // receiver: to its own addresses
        let (generated, own) = (Ipv4Addr::new(198, 18, 0, 7), Ipv4Addr::new(198, 18, 0, 1));
        rehome_checksum(&mut seg, ZERO, ZERO, generated, own).unwrap();
        assert!(tcp_ok(generated, own, &seg));
    }

    #[test]
    fn incremental_update_matches_full_recompute_over_many_values() {
        // Deterministic sweep over data and addresses, including the values
        // around 0x0000/0xffff where one's complement has two zeros.
        let mut x: u32 = 0x1234_5678;
        for round in 0..2000u32 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let len = 20 + (x as usize % 40);
            let mut seg: Vec<u8> = (0..len).map(|i| (x.rotate_left(i as u32) ^ round) as u8).collect();
            seg[12] = 0x50;
            let s1 = Ipv4Addr::from_bits(x);
            let d1 = Ipv4Addr::from_bits(x.rotate_left(7));
            let s2 = Ipv4Addr::from_bits(if round % 5 == 0 { 0xffff_ffff } else { x ^ 0xa5a5 });
            let d2 = Ipv4Addr::from_bits(round);
            seg[16] = 0;
            seg[17] = 0;
            let c = tcp_checksum(s1, d1, &seg);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            rehome_checksum(&mut seg, s1, d1, s2, d2).unwrap();
            assert!(tcp_ok(s2, d2, &seg), "round {round}");
        }
    }

    #[test]
    fn clamps_mss_of_a_syn_and_keeps_checksum() {
        let p = syn_packet();
        let mut seg = p[20..].to_vec();
        assert!(clamp_mss(&mut seg, 1360));
        assert_eq!(&seg[20..24], &[0x02, 0x04, 0x05, 0x50]);
        assert!(tcp_ok(A, B, &seg));
        // a second pass changes nothing; neither does a larger limit
        assert!(!clamp_mss(&mut seg, 1360));
        assert!(!clamp_mss(&mut seg, 1400));
    }

    #[test]
    fn mss_clamp_leaves_non_syn_and_odd_options_alone() {
        let p = syn_packet();
        let mut ack = p[20..].to_vec();
        ack[13] = 0x10;
        let before = ack.clone();
        assert!(!clamp_mss(&mut ack, 536));
        assert_eq!(ack, before);
        // an option whose length runs past the header
        let mut bad = p[20..].to_vec();
        bad[21] = 40;
        assert!(!clamp_mss(&mut bad, 536));
        // a zero-length option would loop forever if not rejected
        let mut zero = p[20..].to_vec();
        zero[20] = 0x08;
        zero[21] = 0;
        assert!(!clamp_mss(&mut zero, 536));
        // MSS after NOPs is found
        let mut nops = p[20..].to_vec();
        nops[20..24].copy_from_slice(&[1, 1, 1, 1]);
        nops[24..26].copy_from_slice(&[2, 4]);
        // bytes 26..28 (the old timestamp start) become MSS 0x0a00 = 2560
        nops[26..28].copy_from_slice(&[0x0a, 0x00]);
        nops[28..40].copy_from_slice(&[1; 12]);
        nops[16] = 0;
        nops[17] = 0;
        let c = tcp_checksum(A, B, &nops);
        nops[16..18].copy_from_slice(&c.to_be_bytes());
        assert!(clamp_mss(&mut nops, 1400));
        assert_eq!(&nops[26..28], &1400u16.to_be_bytes());
        assert!(tcp_ok(A, B, &nops));
    }

    #[test]
    fn clamps_an_mss_option_at_an_odd_offset() {
        // The fuzzer's find: options NOP, MSS 1460, NOP x3 put the MSS value
        // at segment offset 23. A SYN from 198.19.0.2 to 192.0.2.1.
        let pkt: Vec<u8> = (0..48)
            .map(|i| {
                let hex = "45000030055040004006ad61c6130002c00002019c40005000000001000000007002faf0b637000001020405b4010101";
                u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).unwrap()
            })
            .collect();
        let t = parse_ipv4_tcp(&pkt).unwrap();
        let mut seg = pkt[t.segment.clone()].to_vec();
        assert!(tcp_ok(t.src, t.dst, &seg), "the fixture is valid");
        assert!(clamp_mss(&mut seg, 1360));
        assert_eq!(&seg[23..25], &1360u16.to_be_bytes());
        assert!(tcp_ok(t.src, t.dst, &seg), "still valid after clamping at an odd offset");
    }

    #[test]
    fn builds_a_valid_ipv4_header() {
        let mut h = [0xffu8; 20];
        write_ipv4_header(&mut h, B, A, 40, 0x1234).unwrap();
        let expected_without_checksum = [
            0x45, 0x00, 0x00, 0x3c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0, 0, 192, 0, 2, 1, 198,
            19, 0, 2,
        ];
        assert_eq!(h[..10], expected_without_checksum[..10]);
        assert_eq!(h[12..], expected_without_checksum[12..]);
        assert_eq!(u16::from_be_bytes([h[10], h[11]]), checksum(&expected_without_checksum));
        assert_eq!(fold(sum_words(&h, 0)), 0xffff, "header checksum verifies");
        assert!(write_ipv4_header(&mut h, B, A, 65516, 0).is_none(), "too long for IPv4");
        assert!(write_ipv4_header(&mut [0u8; 19], B, A, 40, 0).is_none());
    }
}
