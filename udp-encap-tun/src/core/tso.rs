//! What a TUN read with offloads on (IFF_VNET_HDR) hands over, turned into
//! wire datagrams without copying the payload.
//!
//! Each read starts with a virtio-net header. A packet without GSO may carry
//! a partial checksum (the pseudo-header sum only, as with any checksum
//! offload) that must be completed. A TSO super-segment (GSO_TCPV4) is one
//! IPv4 header, one TCP header and up to 64 KB of payload that the kernel
//! expects to be cut every `gso_size` bytes. The wire form of segment `i` is
//! a TCP header and that segment's payload, so [`split_wire`] writes only the
//! headers (sequence number advanced, FIN and PSH on the last, CWR on the
//! first, the address-free checksum of the wire format) into a small arena;
//! the payload stays where the read put it and goes out by iovec. This is the
//! split wireguard-go and tun-rs do, minus their copy of every segment into a
//! buffer of its own and minus the checksum over the addresses that the core
//! would then move (RFC 1624) to the wire form.

use super::wire::{self, PROTO_TCP};
use super::wire::tcp::{CHECKSUM as TCP_CSUM, FLAG_CWR, FLAG_FIN, FLAG_PSH, FLAGS as TCP_FLAGS, SEQ as TCP_SEQ};

/// `struct virtio_net_hdr` without MRG_RXBUF: what precedes every read.
pub const VNET_HDR_LEN: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// The checksum at csum_start + csum_offset is partial
/// (VIRTIO_NET_HDR_F_NEEDS_CSUM, linux/virtio_net.h; tun-rs does not export it).
pub const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
/// Set with GSO_TCPV4 when the segments carry ECN's CWR (first one only).
const GSO_ECN: u8 = 0x80;
/// The longest TCP header (data offset 15).
pub const MAX_TCP_HEADER: usize = 60;
/// The most segments a super-segment is split into: 64 KB of the smallest
/// MSS Linux sends (TCP_MIN_SND_MSS, 48).
pub const MAX_SEGMENTS: usize = 1366;

/// The virtio-net header, in the host's byte order (the TUN's default
/// without TUNSETVNETLE/BE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// What one TUN read holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// One packet; `partial_csum` is (csum_start, csum_offset) when its
    /// transport checksum still has to be completed.
    Single { partial_csum: Option<(usize, usize)> },
    /// A TSO super-segment, cut every `gso_size` payload bytes.
    TcpV4 { gso_size: usize },
    /// A GSO type the tunnel does not carry (IPv6 TCP, UDP) or a TSO header
    /// without a segment size: discarded, counted by what the packet is.
    Other,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let u16_at = |i: usize| Some(u16::from_ne_bytes([*b.get(i)?, *b.get(i + 1)?]));
        Some(VnetHdr {
            flags: *b.first()?,
            gso_type: *b.get(1)?,
            hdr_len: u16_at(2)?,
            gso_size: u16_at(4)?,
            csum_start: u16_at(6)?,
            csum_offset: u16_at(8)?,
        })
    }

    pub fn read_kind(&self) -> Read {
        match self.gso_type & !GSO_ECN {
            GSO_NONE => Read::Single {
                partial_csum: (self.flags & F_NEEDS_CSUM != 0)
                    .then_some((usize::from(self.csum_start), usize::from(self.csum_offset))),
            },
            GSO_TCPV4 if self.gso_size > 0 => Read::TcpV4 { gso_size: usize::from(self.gso_size) },
            _ => Read::Other,
        }
    }
}

/// Completes a partial checksum: the 16-bit field at `start + offset` holds
/// the pseudo-header sum; the checksum covers `pkt[start..]`. `None` if the
/// field is not inside the packet.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    if at.checked_add(2)? > pkt.len() {
        return None;
    }
    let sum = wire::fold(tun_rs::checksum_no_fold(pkt.get(start..)?, 0));
    pkt.get_mut(at..at + 2)?.copy_from_slice(&(!sum).to_be_bytes());
    Some(())
}

/// Splits the TCP part of a super-segment, `seg` (its TCP header, `thl`
/// bytes, then the payload), into segments of `gso_size` payload bytes (the
/// last may be shorter). Writes segment `i`'s wire-form TCP header to
/// `hdrs[i * thl..(i + 1) * thl]`; its payload is
/// `seg[thl + i * gso_size..]`, at most `gso_size` bytes. Returns the number
/// of segments, or `None` if `seg` is not a TCP header with payload, the
/// arena is too small or there would be more than [`MAX_SEGMENTS`].
pub fn split_wire(seg: &[u8], gso_size: usize, hdrs: &mut [u8]) -> Option<usize> {
    let thl = wire::tcp_header_len(seg)?;
    if gso_size == 0 {
        return None;
    }
    let template = seg.get(..thl)?;
    let payload = seg.get(thl..)?;
    if payload.is_empty() {
        return None;
    }
    let count = payload.len().div_ceil(gso_size);
    if count > MAX_SEGMENTS || count.checked_mul(thl)? > hdrs.len() {
        return None;
    }
    let seq0 = u32::from_be_bytes(template.get(TCP_SEQ..TCP_SEQ + 4)?.try_into().ok()?);
    let flags0 = *template.get(TCP_FLAGS)?;
    let step = u32::try_from(gso_size).ok()?;
    for (i, (hdr, data)) in hdrs.chunks_exact_mut(thl).zip(payload.chunks(gso_size)).enumerate() {
        hdr.copy_from_slice(template);
        let seq = seq0.wrapping_add(step.wrapping_mul(u32::try_from(i).ok()?));
        hdr.get_mut(TCP_SEQ..TCP_SEQ + 4)?.copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i > 0 {
            flags &= !FLAG_CWR;
        }
        if i + 1 < count {
            flags &= !(FLAG_FIN | FLAG_PSH);
        }
        *hdr.get_mut(TCP_FLAGS)? = flags;
        hdr.get_mut(TCP_CSUM..TCP_CSUM + 2)?.copy_from_slice(&[0, 0]);
        // The pseudo-header of the wire format: zero addresses, protocol,
        // length. The payload starts at an even offset (thl is a multiple of
        // 4), so its sum adds to the header's as is.
        let len = u64::try_from(thl + data.len()).ok()?;
        let sum = wire::sum_words(hdr, u64::from(PROTO_TCP) + len);
        let sum = tun_rs::checksum_no_fold(data, sum);
        hdr.get_mut(TCP_CSUM..TCP_CSUM + 2)?.copy_from_slice(&(!wire::fold(sum)).to_be_bytes());
    }
    Some(count)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

    /// A TCP header (doff 8: timestamps), seq 1000, the given flags, then
    /// `len` payload bytes counting up.
    fn super_seg(flags: u8, len: usize) -> Vec<u8> {
        let mut s = vec![
            0x9c, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xe8, 0, 0, 0, 7, 0x80, flags, 0x01, 0xf5, 0xaa, 0xbb, 0, 0, // base
            1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2, // NOP NOP timestamps
        ];
        s.extend((0..len).map(|i| (i * 7 + 3) as u8));
        s
    }

    fn wire_valid(seg: &[u8]) -> bool {
        let mut s = seg.to_vec();
        let c = u16::from_be_bytes([s[16], s[17]]);
        s[16] = 0;
        s[17] = 0;
        wire::tcp_checksum(ZERO, ZERO, &s) == c
    }

    #[test]
    fn vnet_header_kinds() {
        let mut b = [0u8; 10];
        assert_eq!(VnetHdr::parse(&b).unwrap().read_kind(), Read::Single { partial_csum: None });
        b[0] = F_NEEDS_CSUM;
        b[6..8].copy_from_slice(&20u16.to_ne_bytes());
        b[8..10].copy_from_slice(&16u16.to_ne_bytes());
        assert_eq!(VnetHdr::parse(&b).unwrap().read_kind(), Read::Single { partial_csum: Some((20, 16)) });
        b[1] = GSO_TCPV4 | GSO_ECN;
        b[4..6].copy_from_slice(&1348u16.to_ne_bytes());
        assert_eq!(VnetHdr::parse(&b).unwrap().read_kind(), Read::TcpV4 { gso_size: 1348 });
        b[4..6].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(VnetHdr::parse(&b).unwrap().read_kind(), Read::Other, "gso_size 0");
        b[1] = 4; // TCPV6
        assert_eq!(VnetHdr::parse(&b).unwrap().read_kind(), Read::Other);
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn partial_checksum_is_completed() {
        let src = Ipv4Addr::new(198, 19, 0, 2);
        let dst = Ipv4Addr::new(192, 0, 2, 1);
        let mut seg = super_seg(0x18, 101);
        // what the kernel leaves: the folded pseudo-header sum, not inverted
        let pseudo = wire::fold(wire::sum_words(&[&src.octets()[..], &dst.octets()[..]].concat(), 6 + seg.len() as u64));
        seg[16..18].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut seg, 0, 16).unwrap();
        let c = u16::from_be_bytes([seg[16], seg[17]]);
        seg[16..18].copy_from_slice(&[0, 0]);
        assert_eq!(c, wire::tcp_checksum(src, dst, &seg));
        let end = seg.len() - 1;
        assert_eq!(complete_checksum(&mut seg, 0, end), None);
        assert_eq!(complete_checksum(&mut seg, usize::MAX, 2), None);
    }

    #[test]
    fn split_matches_cutting_by_hand() {
        for (flags, len, gso) in [(0x18 | FLAG_FIN | FLAG_CWR, 4 * 1336 + 17, 1336), (0x10, 3 * 100, 100), (0x19, 1, 1336)] {
            let seg = super_seg(flags, len);
            let mut hdrs = vec![0u8; 64 * MAX_TCP_HEADER];
            let n = split_wire(&seg, gso, &mut hdrs).unwrap();
            assert_eq!(n, len.div_ceil(gso));
            let payload = &seg[32..];
            for i in 0..n {
                let h = &hdrs[i * 32..(i + 1) * 32];
                let data = &payload[i * gso..((i + 1) * gso).min(len)];
                let dgram = [h, data].concat();
                assert!(wire_valid(&dgram), "segment {i} of {n}: bad wire checksum");
                let seq = u32::from_be_bytes(h[4..8].try_into().unwrap());
                assert_eq!(seq, 1000 + (i * gso) as u32);
                let last = i + 1 == n;
                assert_eq!(h[13] & (FLAG_FIN | FLAG_PSH), if last { flags & (FLAG_FIN | FLAG_PSH) } else { 0 });
                assert_eq!(h[13] & FLAG_CWR, if i == 0 { flags & FLAG_CWR } else { 0 });
                assert_eq!(h[13] & 0x10, 0x10, "ACK kept");
                assert_eq!(&h[..4], &seg[..4], "ports");
                assert_eq!(&h[8..13], &seg[8..13], "ack number and offset");
                assert_eq!(&h[14..16], &seg[14..16], "window");
                assert_eq!(&h[18..], &seg[18..32], "urgent pointer and options");
            }
        }
    }

    #[test]
    fn split_refuses_what_it_cannot_cut() {
        let mut hdrs = vec![0u8; 4 * 32];
        assert_eq!(split_wire(&super_seg(0x10, 0), 100, &mut hdrs), None, "no payload");
        assert_eq!(split_wire(&super_seg(0x10, 500), 0, &mut hdrs), None, "gso_size 0");
        assert_eq!(split_wire(&super_seg(0x10, 500), 100, &mut hdrs), None, "arena too small");
        assert_eq!(split_wire(&super_seg(0x10, 400), 100, &mut hdrs), Some(4));
        let mut bad = super_seg(0x10, 400);
        bad[12] = 0x40; // doff 4
        assert_eq!(split_wire(&bad, 100, &mut hdrs), None);
        bad[12] = 0xf0; // doff 15: longer than what is there
        assert_eq!(split_wire(&bad[..50], 100, &mut hdrs), None);
        assert_eq!(split_wire(&[], 100, &mut hdrs), None);
        let mut big = vec![0u8; (MAX_SEGMENTS + 1) * 20];
        assert_eq!(split_wire(&super_seg(0x10, MAX_SEGMENTS + 1), 1, &mut big), None, "too many segments");
    }

    #[test]
    fn no_input_panics() {
        let mut hdrs = vec![0u8; 8 * MAX_TCP_HEADER];
        let mut x = 0x1234_5678_u32;
        for len in 0..200 {
            let mut b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            for gso in [0, 1, 7, 64, usize::MAX] {
                let _ = split_wire(&b, gso, &mut hdrs);
            }
            let _ = VnetHdr::parse(&b).map(|h| h.read_kind());
            let _ = complete_checksum(&mut b, len / 3, len / 2);
        }
    }
}
