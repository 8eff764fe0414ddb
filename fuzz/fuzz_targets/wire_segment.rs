//! A datagram payload from a peer: `wire::parse_segment`, `clamp_mss` and
//! `write_ipv4_header` on any bytes, as `Core::from_udp` uses them.
//!
//! Input: 2 bytes MSS limit, 4 bytes source, 4 bytes destination, 2 bytes
//! IPv4 id, then the payload (see fuzz/seeds/wire_segment).
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use std::net::Ipv4Addr;

use udp_encap_tun::core::wire;
use udp_encap_tun_fuzz::{check_clamp, ipv4_header_valid, residue};

const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const PREFIX: usize = 12;

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    let Some((head, payload)) = data.split_at_checked(PREFIX) else { return };
    let max_mss = u16::from_be_bytes([head[0], head[1]]);
    let src = Ipv4Addr::new(head[2], head[3], head[4], head[5]);
    let dst = Ipv4Addr::new(head[6], head[7], head[8], head[9]);
    let id = u16::from_be_bytes([head[10], head[11]]);

    let parsed = wire::parse_segment(payload);
    if parsed.is_ok() {
        assert!(payload.len() >= wire::TCP_HEADER_MIN);
        assert!(payload.len() <= wire::IPV4_MAX_LEN - wire::IPV4_HEADER_LEN);
        let doff = usize::from(payload[12] >> 4) * 4;
        assert!((wire::TCP_HEADER_MIN..=payload.len()).contains(&doff));
    }

    // clamp_mss must not panic on unchecked bytes either, and keeps the
    // checksum as valid as it was for any pseudo-header.
    let mut seg = payload.to_vec();
    check_clamp(&mut seg, max_mss, ZERO, ZERO);
    let mut seg = payload.to_vec();
    check_clamp(&mut seg, max_mss, src, dst);

    // What from_udp does: headroom, clamp, rehome, header.
    let mut buf = vec![0xa5u8; wire::IPV4_HEADER_LEN];
    buf.extend_from_slice(payload);
    let (hdr, rest) = buf.split_at_mut(wire::IPV4_HEADER_LEN);
    let wire_residue = residue(ZERO, ZERO, rest);
    wire::clamp_mss(rest, max_mss);
    let rehomed = wire::rehome_checksum(rest, ZERO, ZERO, src, dst);
    assert_eq!(rehomed.is_some(), payload.len() >= 18, "rehome_checksum needs exactly the checksum field");
    if rehomed.is_some() {
        assert_eq!(residue(src, dst, rest), wire_residue, "clamp + rehome changed the checksum's validity");
    }
    let built = wire::write_ipv4_header(hdr, src, dst, payload.len(), id);
    assert_eq!(built.is_some(), payload.len() + wire::IPV4_HEADER_LEN <= wire::IPV4_MAX_LEN);
    if built.is_some() {
        assert!(ipv4_header_valid(&buf), "IPv4 header checksum does not verify");
        assert_eq!(usize::from(u16::from_be_bytes([buf[2], buf[3]])), buf.len());
        if parsed.is_ok() {
            let t = wire::parse_ipv4_tcp(&buf).expect("a checked segment under a built header must parse");
            assert_eq!((t.src, t.dst, t.segment), (src, dst, wire::IPV4_HEADER_LEN..buf.len()));
        }
    }
    // A header buffer shorter than 20 bytes is refused, not indexed.
    let short = usize::from(id % 20);
    assert!(wire::write_ipv4_header(&mut vec![0; short], src, dst, payload.len(), id).is_none());
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
