//! The XDP gate of udp-encap-tun.
//!
//! Runs on the uplink (`--bind-to-interface`) before the kernel allocates an
//! skb. For every IPv4 UDP datagram to the listen port it decides, in this
//! order:
//!
//! 1. the first fragment of a fragmented datagram: drop (a tunnel peer never
//!    fragments, the daemon clamps the MSS so segments fit the path);
//! 2. UDP length, IPv4 total length and frame length disagree: drop;
//! 3. the payload cannot hold a TCP header (shorter than 20 bytes, or a data
//!    offset below 5 words or past the payload): drop;
//! 4. enforcement on and (saddr, sport) not in `UET_PEERS`: drop;
//! 5. otherwise pass.
//!
//! Everything else (other protocols, other ports, VLAN-tagged frames, frames
//! too short to say) passes untouched, and so do non-first fragments, which
//! carry no UDP header to match (docs/xdp.md says why that is safe).
//!
//! Every packet is counted under exactly one reason in the per-CPU array
//! `UET_COUNTERS`. No logging on the packet path: it would cost more than the
//! program itself.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use udp_encap_tun_common::{
    Config, L2_ETHERNET, L2_NONE, PeerKey, PeerValue, TCP_MIN_HEADER, counter,
};

/// The allowed peers. Its size is set by the loader (`--xdp-map-size`);
/// a plain (not LRU) hash, so a full map refuses new keys and never evicts.
#[map(name = "UET_PEERS")]
static UET_PEERS: HashMap<PeerKey, PeerValue> = HashMap::with_max_entries(65536, 0);

/// One [`Config`] record at index 0, written by the daemon.
#[map(name = "UET_CONFIG")]
static UET_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "UET_COUNTERS")]
static UET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const IPPROTO_UDP: u8 = 17;
const IPV4_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Flags and fragment offset (host order after `u16::from_be_bytes`).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[xdp]
pub fn udp_encap_tun(ctx: XdpContext) -> u32 {
    let (action, reason) = gate(&ctx);
    count(reason);
    action
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = UET_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a live array element;
        // per-CPU, so no other program writes it concurrently.
        unsafe { *c = (*c).wrapping_add(1) };
    }
}

/// A pointer to `len` bytes at `offset` from the frame start, or `None` if
/// they do not all lie inside the frame. The comparison against `data_end`
/// is the one the verifier needs to see before any load.
#[inline(always)]
fn bytes_at(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + len > end {
        return None;
    }
    Some((start + offset) as *const u8)
}

#[inline(always)]
fn u8_at(ctx: &XdpContext, offset: usize) -> Option<u8> {
    let p = bytes_at(ctx, offset, 1)?;
    // SAFETY: bounds checked by bytes_at.
    Some(unsafe { p.read() })
}

/// Reads two bytes.
///
/// # Safety
/// `p..p+2` must lie inside the frame (checked against `data_end`).
#[inline(always)]
unsafe fn read2(p: *const u8) -> [u8; 2] {
    // SAFETY: the caller checked the bounds; [u8; 2] has alignment 1.
    unsafe { (p as *const [u8; 2]).read() }
}

/// Reads four bytes.
///
/// # Safety
/// `p..p+4` must lie inside the frame (checked against `data_end`).
#[inline(always)]
unsafe fn read4(p: *const u8) -> [u8; 4] {
    // SAFETY: the caller checked the bounds; [u8; 4] has alignment 1.
    unsafe { (p as *const [u8; 4]).read() }
}

/// The verdict and the counter it is counted under.
#[inline(always)]
fn gate(ctx: &XdpContext) -> (u32, u32) {
    const PASS_OTHER: (u32, u32) = (xdp_action::XDP_PASS, counter::PASS_OTHER);
    let Some(cfg) = UET_CONFIG.get(0) else {
        return PASS_OTHER;
    };
    let cfg = *cfg;
    if cfg.listen_port == [0, 0] {
        return PASS_OTHER;
    }
    // Two constant offsets rather than one variable one: the verifier then
    // sees fixed packet offsets for the IPv4 header.
    match cfg.l2_len {
        L2_ETHERNET => {
            // VLAN-tagged frames (0x8100/0x88a8) are for a VLAN device, not
            // for this interface's socket: pass them with the rest.
            let Some(eth) = bytes_at(ctx, 0, ETH_HLEN) else {
                return PASS_OTHER;
            };
            // SAFETY: the 14 bytes at eth are inside the frame.
            if unsafe { read2(eth.add(12)) } != ETH_P_IP {
                return PASS_OTHER;
            }
            ipv4(ctx, ETH_HLEN, &cfg)
        }
        L2_NONE => ipv4(ctx, 0, &cfg),
        _ => PASS_OTHER,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, ip: usize, cfg: &Config) -> (u32, u32) {
    const PASS_OTHER: (u32, u32) = (xdp_action::XDP_PASS, counter::PASS_OTHER);
    const fn drop(reason: u32) -> (u32, u32) {
        (xdp_action::XDP_DROP, reason)
    }

    // Anything that is not a complete IPv4 header we can read passes: it
    // cannot be shown to be for the listen port, and the kernel's own IPv4
    // input drops what is broken. One bounds check for the fixed header, then
    // plain loads: a chain of Options here compiles into code the verifier
    // rejects (pointer arithmetic on the "is some" flags).
    let Some(iph) = bytes_at(ctx, ip, IPV4_MIN_HLEN) else {
        return PASS_OTHER;
    };
    // SAFETY: the 20 bytes at iph are inside the frame.
    let (b0, tot_len, frag, proto, saddr) = unsafe {
        (
            iph.read(),
            read2(iph.add(2)),
            read2(iph.add(6)),
            iph.add(9).read(),
            read4(iph.add(12)),
        )
    };
    if b0 >> 4 != 4 {
        return PASS_OTHER;
    }
    let ihl = usize::from(b0 & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return PASS_OTHER;
    }
    if proto != IPPROTO_UDP {
        return PASS_OTHER;
    }
    let frag = u16::from_be_bytes(frag);
    if frag & IP_OFFSET != 0 {
        // A later fragment: no UDP header, the port is unknown.
        return (xdp_action::XDP_PASS, counter::PASS_FRAGMENT);
    }

    let udp = ip + ihl;
    let Some(udph) = bytes_at(ctx, udp, UDP_HLEN) else {
        return PASS_OTHER;
    };
    // SAFETY: the 8 bytes at udph are inside the frame.
    let (sport, dport, udp_len) = unsafe { (read2(udph), read2(udph.add(2)), read2(udph.add(4))) };
    if dport != cfg.listen_port {
        return PASS_OTHER;
    }

    // From here on the datagram is for the listen port.
    if frag & IP_MF != 0 {
        return drop(counter::DROP_FRAGMENT);
    }
    let tot_len = usize::from(u16::from_be_bytes(tot_len));
    let udp_len = usize::from(u16::from_be_bytes(udp_len));
    let frame_len = ctx.data_end().saturating_sub(ctx.data());
    // tot_len >= ihl + 8 first, so the subtraction below cannot wrap; the
    // frame may be longer than the datagram (Ethernet padding), never shorter.
    if tot_len < ihl + UDP_HLEN || ip + tot_len > frame_len || udp_len != tot_len - ihl {
        return drop(counter::DROP_LENGTH);
    }
    let payload = udp_len - UDP_HLEN;
    if payload < TCP_MIN_HEADER {
        return drop(counter::DROP_SHORT);
    }
    let tcp = udp + UDP_HLEN;
    // Byte 12 of the TCP header: data offset in its high nibble.
    let Some(doff) = u8_at(ctx, tcp + 12) else {
        // Unreachable after the length checks, but the verifier wants it.
        return drop(counter::DROP_LENGTH);
    };
    let doff = usize::from(doff >> 4) * 4;
    if doff < TCP_MIN_HEADER || doff > payload {
        return drop(counter::DROP_TCP_OFFSET);
    }

    if cfg.enforce != 0 {
        let key = PeerKey::new(saddr, sport);
        if UET_PEERS.get_ptr(key).is_none() {
            return drop(counter::DROP_UNKNOWN_PEER);
        }
    }
    (xdp_action::XDP_PASS, counter::PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// Dual licence: the kernel refuses GPL-only helpers to a non-GPL program.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
