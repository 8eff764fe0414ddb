//! Helpers shared by the fuzz targets: independent re-implementations of
//! what the targets check the library against.

use std::net::Ipv4Addr;

use udp_encap_tun::core::wire;

/// Offset of the TCP checksum field in a segment.
pub const TCP_CSUM: usize = 16;

/// The receiver's check of a TCP checksum, reduced to a one's complement
/// number: the folded sum over pseudo-header and segment (checksum field
/// included), with 0xffff and 0x0000 (the two zeros) both mapped to 0. The
/// segment is valid iff this is 0; an update that keeps the segment equally
/// valid or invalid keeps this value.
pub fn residue(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> u16 {
    let mut acc = wire::sum_words(&src.octets(), 0);
    acc = wire::sum_words(&dst.octets(), acc);
    acc += u64::from(wire::PROTO_TCP) + seg.len() as u64;
    let r = wire::fold(wire::sum_words(seg, acc));
    if r == 0xffff { 0 } else { r }
}

/// Whether the checksum field of `seg` is the one `wire::tcp_checksum`
/// computes for this pseudo-header (0x0000 and 0xffff are the same number).
pub fn tcp_checksum_valid(src: Ipv4Addr, dst: Ipv4Addr, seg: &[u8]) -> bool {
    let Some(field) = wire::tcp_checksum_field(seg) else { return false };
    let mut zeroed = seg.to_vec();
    if let Some(f) = zeroed.get_mut(TCP_CSUM..TCP_CSUM + 2) {
        f.fill(0);
    }
    let want = wire::tcp_checksum(src, dst, &zeroed);
    field == want || (field == 0xffff && want == 0) || (field == 0 && want == 0xffff)
}

/// Sets the checksum field of `seg` to the valid one for this pseudo-header.
pub fn fill_tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, seg: &mut [u8]) {
    if seg.len() < TCP_CSUM + 2 {
        return;
    }
    seg[TCP_CSUM] = 0;
    seg[TCP_CSUM + 1] = 0;
    let c = wire::tcp_checksum(src, dst, seg);
    seg[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
}

/// Whether a 20-byte IPv4 header's checksum verifies.
pub fn ipv4_header_valid(hdr: &[u8]) -> bool {
    hdr.len() >= wire::IPV4_HEADER_LEN && wire::fold(wire::sum_words(&hdr[..wire::IPV4_HEADER_LEN], 0)) == 0xffff
}

/// Offset of the value of the MSS option that `clamp_mss` would look at
/// (the first MSS option of length 4, walking the options the way RFC 9293
/// lays them out), or `None`. Written independently of `wire::clamp_mss`.
pub fn mss_value_offset(seg: &[u8]) -> Option<usize> {
    let doff = usize::from(*seg.get(12)? >> 4) * 4;
    let mut at = 20;
    while at < doff {
        let kind = *seg.get(at)?;
        match kind {
            0 => return None,
            1 => at += 1,
            _ => {
                let len = usize::from(*seg.get(at + 1)?);
                if len < 2 || at + len > doff {
                    return None;
                }
                if kind == 2 && len == 4 {
                    // An unchecked segment may end inside its own header.
                    return mss_at(seg, at + 2).map(|_| at + 2);
                }
                at += len;
            }
        }
    }
    None
}

/// The MSS announced at `off`.
pub fn mss_at(seg: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*seg.get(off)?, *seg.get(off + 1)?]))
}

/// Runs `wire::clamp_mss` on `seg` and checks it: it changes a segment only
/// if it is a SYN announcing more than `max_mss`, and then only the MSS
/// value (to exactly `max_mss`) and the checksum field; the MSS never grows;
/// the checksum stays exactly as valid (or invalid) as it was for the
/// pseudo-header (`src`, `dst`). Returns what clamp_mss returned.
pub fn check_clamp(seg: &mut [u8], max_mss: u16, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let before = seg.to_vec();
    let residue_before = residue(src, dst, seg);
    let valid_before = tcp_checksum_valid(src, dst, seg);
    let changed = wire::clamp_mss(seg, max_mss);
    let mss_off = mss_value_offset(&before);
    let is_syn = before.get(13).is_some_and(|f| f & 0x02 != 0);
    if let Some(off) = mss_off {
        let (old, new) = (mss_at(&before, off).unwrap(), mss_at(seg, off).unwrap());
        assert!(new <= old, "clamp_mss raised the MSS from {old} to {new}");
    }
    if !changed {
        assert_eq!(&before[..], &seg[..], "clamp_mss returned false but changed the segment");
        return false;
    }
    let off = mss_off.expect("clamp_mss changed a segment without an MSS option");
    assert!(is_syn, "clamp_mss changed a segment that is not a SYN");
    let old = mss_at(&before, off).unwrap();
    assert!(old > max_mss, "clamp_mss changed MSS {old} under the limit {max_mss}");
    assert_eq!(mss_at(seg, off), Some(max_mss), "clamp_mss set another value than the limit");
    for (i, (a, b)) in before.iter().zip(seg.iter()).enumerate() {
        if a != b {
            assert!(
                i == off || i == off + 1 || i == TCP_CSUM || i == TCP_CSUM + 1,
                "clamp_mss changed byte {i} (MSS value at {off})"
            );
        }
    }
    assert_eq!(
        residue(src, dst, seg),
        residue_before,
        "clamp_mss broke the TCP checksum (MSS value at offset {off}, {old} -> {max_mss})"
    );
    if valid_before {
        assert!(
            tcp_checksum_valid(src, dst, seg),
            "clamp_mss made a valid TCP checksum invalid (MSS value at offset {off}, {old} -> {max_mss})"
        );
    }
    true
}
