//! A packet read from the TUN: `wire::parse_ipv4_tcp` on any bytes, and on
//! what it accepts the rewrites `Core::from_tun` does (MSS clamp, checksum
//! to and from the wire form).
//!
//! The MSS limit is taken from the IPv4 identification field (bytes 4..6),
//! which the parser ignores, so one input is one packet.
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use std::net::Ipv4Addr;

use udp_encap_tun::core::wire;
use udp_encap_tun_fuzz::{TCP_CSUM, check_clamp, residue};

const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    let Ok(t) = wire::parse_ipv4_tcp(data) else { return };

    // The segment range lies inside the buffer, after a 20-byte header, and
    // holds a whole TCP header.
    let r = t.segment.clone();
    assert_eq!(r.start, wire::IPV4_HEADER_LEN);
    assert!(r.start <= r.end && r.end <= data.len(), "segment {r:?} outside {} bytes", data.len());
    let seg = &data[r.clone()];
    assert!(seg.len() >= wire::TCP_HEADER_MIN);
    assert_eq!(wire::check_tcp_header(seg), Ok(()));
    assert!(wire::tcp_checksum_field(seg).is_some());
    assert_eq!(t.src.octets(), data[12..16]);
    assert_eq!(t.dst.octets(), data[16..20]);

    // Rehoming to the wire form and back with the same addresses restores
    // the bytes. The one exception is the one's complement zero: a field of
    // 0xffff comes back as 0x0000 (the same number; the RFC 1624 update only
    // ever writes the 0x0000 form).
    let mut there = seg.to_vec();
    assert!(wire::rehome_checksum(&mut there, t.src, t.dst, ZERO, ZERO).is_some());
    assert_eq!(residue(ZERO, ZERO, &there), residue(t.src, t.dst, seg), "wire form changed the checksum's validity");
    let mut back = there.clone();
    assert!(wire::rehome_checksum(&mut back, ZERO, ZERO, t.src, t.dst).is_some());
    if back != seg {
        let was = u16::from_be_bytes([seg[TCP_CSUM], seg[TCP_CSUM + 1]]);
        let now = u16::from_be_bytes([back[TCP_CSUM], back[TCP_CSUM + 1]]);
        let mut expect = seg.to_vec();
        expect[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&now.to_be_bytes());
        assert!(
            was == 0xffff && now == 0 && back == expect,
            "rehoming there and back changed the segment (checksum {was:#06x} -> {now:#06x})"
        );
    }

    // The MSS clamp, both on the packet as read and on its wire form.
    let max_mss = u16::from_be_bytes([data[4], data[5]]);
    let mut clamped = seg.to_vec();
    check_clamp(&mut clamped, max_mss, t.src, t.dst);
    check_clamp(&mut there, max_mss, ZERO, ZERO);
    // The same with the limit the daemon uses for a 1500-byte path.
    let mut clamped = seg.to_vec();
    check_clamp(&mut clamped, 1460, t.src, t.dst);
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
