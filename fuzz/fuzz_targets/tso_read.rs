//! A TUN read with offloads on: the virtio-net header, a partial checksum
//! to complete, and a TSO super-segment cut into wire datagrams
//! (`udp_encap_tun::core::tso`), on any bytes.
//!
//! Input: 10 bytes of virtio-net header (host byte order, as the kernel
//! writes it), then the packet's TCP part: header and payload (see
//! fuzz/seeds/tso_read).
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use std::net::Ipv4Addr;

use udp_encap_tun::core::tso::{self, MAX_TCP_HEADER, Read, VNET_HDR_LEN, VnetHdr};
use udp_encap_tun_fuzz::tcp_checksum_valid;

const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    let Some((vnet, seg)) = data.split_at_checked(VNET_HDR_LEN) else {
        assert!(VnetHdr::parse(data).is_none());
        return;
    };
    let hdr = VnetHdr::parse(vnet).expect("10 bytes are a header");
    let mut seg = seg.to_vec();
    match hdr.read_kind() {
        Read::Single { partial_csum: Some((start, offset)) } => {
            if tso::complete_checksum(&mut seg, start, offset).is_some() {
                assert!(start + offset + 2 <= seg.len());
            }
        }
        Read::Single { partial_csum: None } | Read::Other => {}
        Read::TcpV4 { gso_size } => {
            assert!(gso_size > 0);
            let mut hdrs = vec![0u8; 64 * MAX_TCP_HEADER];
            let Some(n) = tso::split_wire(&seg, gso_size, &mut hdrs) else { return };
            let thl = usize::from(seg[12] >> 4) * 4;
            let payload = &seg[thl..];
            assert_eq!(n, payload.len().div_ceil(gso_size));
            let seq0 = u32::from_be_bytes(seg[4..8].try_into().unwrap());
            for (i, data) in payload.chunks(gso_size).enumerate() {
                let h = &hdrs[i * thl..(i + 1) * thl];
                let dgram = [h, data].concat();
                assert!(tcp_checksum_valid(ZERO, ZERO, &dgram), "segment {i} of {n}: bad wire checksum");
                let seq = u32::from_be_bytes(h[4..8].try_into().unwrap());
                assert_eq!(seq, seq0.wrapping_add((i * gso_size) as u32));
                assert_eq!(&h[..4], &seg[..4], "ports changed");
                assert_eq!(&h[18..], &seg[18..thl], "options changed");
            }
        }
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
