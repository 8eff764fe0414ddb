//! The gate's decisions, shared by the XDP and the TC entry points.
//!
//! Everything here is generic over [`Packet`], the few things the two
//! program types do differently (how bytes are read, which context the FIB
//! helper takes, where the ingress ifindex and a VLAN tag the kernel already
//! took out live). Each entry point instantiates it once, so the parsing
//! rules cannot drift apart between XDP and TC.
//!
//! All functions are `#[inline(always)]`: BPF-to-BPF calls would make the
//! verifier lose the packet ranges it has proven.

use core::mem::MaybeUninit;

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, bpf_fib_lookup,
};
use udp_encap_tun_common::{
    CONTROL_KIND_MAX, CONTROL_KIND_MIN, CONTROL_LEN, CONTROL_VERSION, Config, IPV6_MAX_EXT_HEADERS,
    L2_ETHERNET, L2_NONE, PeerKey, SessionKey, TCP_MIN_HEADER, V4_MAPPED_PREFIX, counter,
};

use crate::{UET_PEERS, UET_SESSIONS};

/// What the program type can do with its packet.
pub trait Packet {
    /// Bytes in the frame, from the link header (or the IP header on a raw-IP
    /// link) to the end.
    fn len(&self) -> usize;
    /// `N` bytes at `off`, or `None` if they are not all in the packet.
    /// Direct packet access where the program type has it: `off` must be a
    /// bounded sum of header lengths the verifier can follow.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// `N` bytes at any offset, through the kernel's load-bytes helper: no
    /// packet pointer for the verifier to track, so a loop over extension
    /// headers does not multiply its states.
    fn load_var<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// `bpf_fib_lookup` with this packet's context: its return code.
    fn fib_lookup(&self, params: &mut bpf_fib_lookup) -> i64;
    /// The ifindex the packet arrived on.
    fn ifindex(&self) -> u32;
    /// The VLAN TCI the kernel already took out of the frame before the
    /// program ran (TC sees frames after the receive path's untagging), if
    /// any. XDP sees the frame as it came.
    fn stripped_vlan_tci(&self) -> Option<u16>;
}

/// The verdict (`true`: drop) and the counter it is counted under.
pub type Outcome = (bool, u32);

const PASS_OTHER: Outcome = (false, counter::PASS_OTHER);
const fn pass(reason: u32) -> Outcome {
    (false, reason)
}
const fn drop(reason: u32) -> Outcome {
    (true, reason)
}

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];
const ETH_P_8021AD: [u8; 2] = [0x88, 0xa8];
const VLAN_VID_MASK: u16 = 0x0fff;

const IPPROTO_UDP: u8 = 17;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// Flags and fragment offset (host order after `u16::from_be_bytes`).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// Fragment offset in an IPv6 Fragment header (host order), in 8-byte units.
const IP6_OFFSET: u16 = 0xfff8;

// IPv6 next-header values the program walks: the ones Linux itself walks
// on the way to a UDP socket (ip6_input: Hop-by-Hop, Routing, Fragment,
// Destination Options; AH through xfrm).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The gate: one verdict and one counter for every packet.
#[inline(always)]
pub fn gate<P: Packet>(p: &P, cfg: &Config) -> Outcome {
    if cfg.listen_port == [0, 0] {
        return PASS_OTHER;
    }
    match cfg.l2_len {
        L2_ETHERNET => {
            let Some((l3, ethertype)) = ethernet(p) else {
                return PASS_OTHER;
            };
            if ethertype == ETH_P_IP {
                ipv4(p, l3, cfg)
            } else if ethertype == ETH_P_IPV6 {
                ipv6(p, l3, cfg)
            } else {
                PASS_OTHER
            }
        }
        // A raw-IP link: the version nibble says which family. Four bytes,
        // not one: LLVM turns a one-byte check at offset 0 into
        // `data >= data_end`, from which the verifier learns no range.
        L2_NONE => match p.load::<4>(0) {
            Some([b, ..]) if b >> 4 == 4 => ipv4(p, 0, cfg),
            Some([b, ..]) if b >> 4 == 6 => ipv6(p, 0, cfg),
            _ => PASS_OTHER,
        },
        _ => PASS_OTHER,
    }
}

/// The offset of the IP header and its EtherType, past up to two VLAN tags
/// (802.1Q or 802.1ad), or `None` when the frame is not for this
/// interface's own stack.
///
/// Only priority tags (VID 0) are for this interface: Linux strips them and
/// hands the frame to the parent device, so its sockets see it (issue 14: 200
/// such datagrams passed an older gate that let all tagged frames through).
/// A tag with a VID belongs to a VLAN device (or to no one: the kernel
/// drops it as PACKET_OTHERHOST), whose sockets are not this instance's; a
/// third tag is more than Linux strips before IP. Those pass untouched.
#[inline(always)]
fn ethernet<P: Packet>(p: &P) -> Option<(usize, [u8; 2])> {
    // TC runs after the receive path moved the outer tag into the skb.
    let stripped = match p.stripped_vlan_tci() {
        Some(tci) if tci & VLAN_VID_MASK != 0 => return None,
        Some(_) => true,
        None => false,
    };
    let ethertype = p.load::<2>(ETH_HLEN - 2)?;
    if !is_vlan(ethertype) {
        return Some((ETH_HLEN, ethertype));
    }
    // TCI, then the next EtherType.
    let [t0, t1, e0, e1] = p.load::<4>(ETH_HLEN)?;
    if u16::from_be_bytes([t0, t1]) & VLAN_VID_MASK != 0 {
        return None;
    }
    if !is_vlan([e0, e1]) {
        return Some((ETH_HLEN + VLAN_HLEN, [e0, e1]));
    }
    if stripped {
        return None;
    }
    let [t0, t1, e0, e1] = p.load::<4>(ETH_HLEN + VLAN_HLEN)?;
    if u16::from_be_bytes([t0, t1]) & VLAN_VID_MASK != 0 || is_vlan([e0, e1]) {
        return None;
    }
    Some((ETH_HLEN + 2 * VLAN_HLEN, [e0, e1]))
}

#[inline(always)]
fn is_vlan(ethertype: [u8; 2]) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// An IPv4 packet at `ip`. The FIB is asked only when the verdict is a
/// drop: a datagram that passes anyway needs no answer, so the hot path (a
/// known peer's segment) does not pay for the lookup.
#[inline(always)]
fn ipv4<P: Packet>(p: &P, ip: usize, cfg: &Config) -> Outcome {
    let out = ipv4_verdict(p, ip, cfg);
    if out.0 && !ipv4_for_this_host(p, ip) {
        return pass(counter::PASS_FORWARD);
    }
    out
}

#[inline(always)]
fn ipv4_verdict<P: Packet>(p: &P, ip: usize, cfg: &Config) -> Outcome {
    // Anything that is not a complete IPv4 header we can read passes: it
    // cannot be shown to be for the listen port, and the kernel's own IPv4
    // input drops what is broken.
    let Some(h) = p.load::<IPV4_MIN_HLEN>(ip) else {
        return PASS_OTHER;
    };
    let [
        b0,
        _,
        t0,
        t1,
        _,
        _,
        f0,
        f1,
        _,
        proto,
        _,
        _,
        s0,
        s1,
        s2,
        s3,
        ..,
    ] = h;
    if b0 >> 4 != 4 {
        return PASS_OTHER;
    }
    let ihl = usize::from(b0 & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN || proto != IPPROTO_UDP {
        return PASS_OTHER;
    }
    let frag = u16::from_be_bytes([f0, f1]);
    if frag & IP_OFFSET != 0 {
        // A later fragment: no UDP header, the port is unknown.
        return pass(counter::PASS_FRAGMENT);
    }

    let udp = ip + ihl;
    let Some([sp0, sp1, dp0, dp1, l0, l1, _, _]) = p.load::<UDP_HLEN>(udp) else {
        return PASS_OTHER;
    };
    if [dp0, dp1] != cfg.listen_port {
        return PASS_OTHER;
    }

    // From here on the datagram is for the listen port; `ipv4` undoes every
    // drop below for a datagram not addressed to this host.
    if frag & IP_MF != 0 {
        return drop(counter::DROP_FRAGMENT);
    }
    let tot_len = usize::from(u16::from_be_bytes([t0, t1]));
    let udp_len = usize::from(u16::from_be_bytes([l0, l1]));
    // tot_len >= ihl + 8 first, so the subtraction below cannot wrap; the
    // frame may be longer than the datagram (Ethernet padding), never shorter.
    if tot_len < ihl + UDP_HLEN || ip + tot_len > p.len() || udp_len != tot_len - ihl {
        return drop(counter::DROP_LENGTH);
    }
    let mut key = MaybeUninit::<PeerKey>::uninit();
    let key = key_v4(&mut key, [s0, s1, s2, s3], [sp0, sp1]);
    payload::<P, false>(p, udp + UDP_HLEN, udp_len - UDP_HLEN, Some(key), cfg)
}

/// The IPv4-mapped key of (saddr, sport), built in place in five volatile
/// word stores: built field by field, its ten zero bytes become a call to a
/// byte-by-byte memset loop, and a key moved into place a memcpy.
#[inline(always)]
fn key_v4(slot: &mut MaybeUninit<PeerKey>, saddr: [u8; 4], sport: [u8; 2]) -> &PeerKey {
    let w = slot.as_mut_ptr().cast::<u32>();
    // SAFETY: PeerKey is 20 bytes aligned to 4: five u32 words, each written.
    unsafe {
        w.write_volatile(0);
        w.add(1).write_volatile(0);
        w.add(2)
            .write_volatile(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        w.add(3).write_volatile(u32::from_ne_bytes(saddr));
        w.add(4)
            .write_volatile(u32::from_ne_bytes([sport[0], sport[1], 0, 0]));
        &*slot.as_ptr()
    }
}

/// An IPv6 packet at `ip`; as for IPv4, the FIB is asked only on a drop.
#[inline(always)]
fn ipv6<P: Packet>(p: &P, ip: usize, cfg: &Config) -> Outcome {
    let (out, udp) = ipv6_verdict(p, ip, cfg);
    if out.0 && !ipv6_for_this_host(p, ip, udp) {
        return pass(counter::PASS_FORWARD);
    }
    out
}

/// The verdict, and the offset of the UDP header when the walk got there.
#[inline(always)]
fn ipv6_verdict<P: Packet>(p: &P, ip: usize, cfg: &Config) -> (Outcome, Option<usize>) {
    let Some(h) = p.load::<IPV6_HLEN>(ip) else {
        return (PASS_OTHER, None);
    };
    let [b0, _, _, _, pl0, pl1, next, _, s @ ..] = h;
    if b0 >> 4 != 6 {
        return (PASS_OTHER, None);
    }
    let (saddr, _) = split_addrs(s);
    let payload_len = usize::from(u16::from_be_bytes([pl0, pl1]));

    if !is_ext_header(next) {
        // The common case, no extension header: constant offsets, direct
        // packet access all the way.
        if next != IPPROTO_UDP {
            return (PASS_OTHER, None);
        }
        let udp = ip + IPV6_HLEN;
        return (
            udp6::<P, false>(p, ip, udp, payload_len, saddr, false, cfg),
            Some(udp),
        );
    }

    // Walk the chain, at most IPV6_MAX_EXT_HEADERS headers, through the
    // load-bytes helper (the offsets are sums of lengths from the packet).
    let mut off = ip + IPV6_HLEN;
    let mut nh = next;
    let mut fragment = false;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        if nh == NEXTHDR_FRAGMENT {
            let Some([n, _, o0, o1]) = p.load_var::<4>(off) else {
                return (PASS_OTHER, None);
            };
            if u16::from_be_bytes([o0, o1]) & IP6_OFFSET != 0 {
                // A later fragment: what follows is data, not headers.
                return (pass(counter::PASS_FRAGMENT), None);
            }
            fragment = true;
            nh = n;
            off += 8;
        } else if is_ext_header(nh) {
            let Some([n, l]) = p.load_var::<2>(off) else {
                return (PASS_OTHER, None);
            };
            // AH counts its length in 4-byte units minus 2 (RFC 4302), the
            // others in 8-byte units minus 1 (RFC 8200).
            off += if nh == NEXTHDR_AUTH {
                (usize::from(l) + 2) * 4
            } else {
                (usize::from(l) + 1) * 8
            };
            nh = n;
        } else {
            break;
        }
    }
    if is_ext_header(nh) {
        // Past the bound: the program cannot tell whether a UDP header for
        // the listen port follows, so for this host it is dropped (longer
        // chains than RFC 8200 orders are no one's tunnel traffic); `ipv6`
        // lets routed traffic pass untouched.
        return (drop(counter::DROP_EXT_HEADERS), None);
    }
    if nh != IPPROTO_UDP {
        return (PASS_OTHER, None);
    }
    (
        udp6::<P, true>(p, ip, off, payload_len, saddr, fragment, cfg),
        Some(off),
    )
}

/// An IPv6 UDP header at `udp`; `VAR`: its offset came from the extension
/// header walk, read through the helper.
#[inline(always)]
fn udp6<P: Packet, const VAR: bool>(
    p: &P,
    ip: usize,
    udp: usize,
    payload_len: usize,
    saddr: [u8; 16],
    fragment: bool,
    cfg: &Config,
) -> Outcome {
    let Some([sp0, sp1, dp0, dp1, l0, l1, _, _]) = read::<P, VAR, UDP_HLEN>(p, udp) else {
        return PASS_OTHER;
    };
    if [dp0, dp1] != cfg.listen_port {
        return PASS_OTHER;
    }
    // A tunnel peer never fragments, nor sends atomic fragments (RFC 8021).
    if fragment {
        return drop(counter::DROP_FRAGMENT);
    }
    let udp_len = usize::from(u16::from_be_bytes([l0, l1]));
    // The extension headers' bytes, then the UDP datagram, fill the payload
    // length exactly. A jumbogram (payload length 0) fails this too.
    let ext = udp - ip - IPV6_HLEN;
    if payload_len < ext + UDP_HLEN
        || ip + IPV6_HLEN + payload_len > p.len()
        || udp_len != payload_len - ext
    {
        return drop(counter::DROP_LENGTH);
    }
    // An IPv4-mapped source (which Linux drops, RFC 4291 2.5.5.2) must not
    // match the key of the IPv4 peer it spells.
    let key = PeerKey::new(saddr, [sp0, sp1]);
    let key = (key.addr.first_chunk::<12>() != Some(&V4_MAPPED_PREFIX)).then_some(&key);
    payload::<P, VAR>(p, udp + UDP_HLEN, udp_len - UDP_HLEN, key, cfg)
}

/// The UDP payload of a listen-port datagram for this host, whose lengths
/// agree: a TCP segment (data) or a control datagram.
#[inline(always)]
fn payload<P: Packet, const VAR: bool>(
    p: &P,
    at: usize,
    len: usize,
    key: Option<&PeerKey>,
    cfg: &Config,
) -> Outcome {
    if len < TCP_MIN_HEADER {
        return drop(counter::DROP_SHORT);
    }
    // The first 16 bytes: a TCP header's data offset is byte 12; a control
    // datagram's fixed fields are bytes 0..16.
    let Some(b) = read::<P, VAR, 16>(p, at) else {
        // Unreachable after the length checks, but the verifier wants it.
        return drop(counter::DROP_LENGTH);
    };
    let [
        kind,
        version,
        z2,
        z3,
        i0,
        i1,
        i2,
        i3,
        i4,
        i5,
        i6,
        i7,
        doff,
        z13,
        z14,
        z15,
    ] = b;
    let doff_words = doff >> 4;
    if doff_words >= 5 {
        if usize::from(doff_words) * 4 > len {
            return drop(counter::DROP_TCP_OFFSET);
        }
        if cfg.enforce != 0 && !peer_known(key) {
            return drop(counter::DROP_UNKNOWN_PEER);
        }
        return pass(counter::PASS);
    }
    // A data offset below 5: not a TCP segment. Only a control datagram in
    // its exact shape goes on (CONTROL-WIRE: 48 bytes, version 1, kind 1..4,
    // bytes 2..4 and 12..16 zero).
    let shape = len == CONTROL_LEN
        && version == CONTROL_VERSION
        && (CONTROL_KIND_MIN..=CONTROL_KIND_MAX).contains(&kind)
        && z2 | z3 | doff | z13 | z14 | z15 == 0;
    if !shape {
        return drop(counter::DROP_TCP_OFFSET);
    }
    let session = SessionKey {
        id: [i0, i1, i2, i3, i4, i5, i6, i7],
    };
    if cfg.enforce == 0 || peer_known(key) || UET_SESSIONS.get_ptr(session).is_some() {
        pass(counter::PASS_CONTROL)
    } else {
        drop(counter::DROP_CONTROL)
    }
}

#[inline(always)]
fn peer_known(key: Option<&PeerKey>) -> bool {
    key.is_some_and(|k| UET_PEERS.get_ptr(k).is_some())
}

#[inline(always)]
fn read<P: Packet, const VAR: bool, const N: usize>(p: &P, off: usize) -> Option<[u8; N]> {
    if VAR {
        p.load_var::<N>(off)
    } else {
        p.load::<N>(off)
    }
}

#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    matches!(
        nh,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST
    )
}

#[inline(always)]
fn split_addrs(s: [u8; 32]) -> ([u8; 16], [u8; 16]) {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        a8,
        a9,
        a10,
        a11,
        a12,
        a13,
        a14,
        a15,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
        b8,
        b9,
        b10,
        b11,
        b12,
        b13,
        b14,
        b15,
    ] = s;
    (
        [
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
        ],
        [
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
        ],
    )
}

// ---------------------------------------------------------------- this host?

/// Whether the kernel would deliver this packet to this host rather than
/// route it on (SPEC decision 8: forwarded traffic passes untouched). The
/// FIB answers by itself when addresses change (a client's uplink address
/// changes at every handover), so there is no address list to keep in step.
///
/// * `NOT_FWDED`: the route is local (or broadcast, multicast): for us.
/// * `FWD_DISABLED`: this interface does not forward, so the kernel delivers
///   the packet here or drops it: either way the gate may act.
/// * success and the other "would forward" answers (no neighbour yet, needs
///   fragmenting): routed through: not ours.
/// * blackhole, unreachable, prohibit: the kernel drops it (or answers with
///   an ICMP error); it never reaches a socket: not ours to count.
/// * an error from the helper itself: for us, so the gate fails closed.
#[inline(always)]
fn for_this_host(rc: i64) -> bool {
    rc < 0
        || rc == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED)
        || rc == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED)
}

/// `bpf_fib_lookup` on an 8-byte boundary, so it can be zeroed in words.
#[repr(C, align(8))]
struct FibParams(bpf_fib_lookup);

const FIB_WORDS: usize = core::mem::size_of::<FibParams>() / 8;
const _: () = assert!(core::mem::size_of::<FibParams>().is_multiple_of(8));

/// Runs the FIB lookup on parameters `fill` sets on a zeroed struct
/// (tot_len 0: no MTU check). Zeroed in place by volatile word stores: a
/// plain zeroing, or a struct moved into place, becomes a call to a
/// byte-by-byte memset loop.
#[inline(always)]
fn lookup<P: Packet>(p: &P, fill: impl FnOnce(&mut bpf_fib_lookup)) -> bool {
    let mut params = MaybeUninit::<FibParams>::uninit();
    let words = params.as_mut_ptr().cast::<u64>();
    for i in 0..FIB_WORDS {
        // SAFETY: `i` words into an 8-aligned struct of FIB_WORDS words.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written; all-zero is a valid bpf_fib_lookup
    // (integers, byte arrays and unions of them).
    let f = unsafe { &mut (*params.as_mut_ptr()).0 };
    fill(f);
    f.ifindex = p.ifindex();
    for_this_host(p.fib_lookup(f))
}

/// Whether the IPv4 packet at `ip` is addressed to this host. Called on
/// the drop path only, so it reads the header again rather than keep its
/// fields alive on the hot path (in registers the helper call clobbers).
/// Bytes it cannot read: for us (fail closed; the verdict read them).
#[inline(always)]
fn ipv4_for_this_host<P: Packet>(p: &P, ip: usize) -> bool {
    let Some(
        [
            b0,
            tos,
            _,
            _,
            _,
            _,
            _,
            _,
            _,
            _,
            _,
            _,
            s0,
            s1,
            s2,
            s3,
            d0,
            d1,
            d2,
            d3,
        ],
    ) = p.load::<IPV4_MIN_HLEN>(ip)
    else {
        return true;
    };
    let udp = ip + usize::from(b0 & 0x0f) * 4;
    let Some([sp0, sp1, dp0, dp1]) = p.load_var::<4>(udp) else {
        return true;
    };
    lookup(p, |f| {
        f.family = AF_INET;
        f.l4_protocol = IPPROTO_UDP;
        // Network byte order in the struct: the wire bytes, reinterpreted.
        f.sport = u16::from_ne_bytes([sp0, sp1]);
        f.dport = u16::from_ne_bytes([dp0, dp1]);
        f.__bindgen_anon_2.tos = tos;
        f.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([s0, s1, s2, s3]);
        f.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([d0, d1, d2, d3]);
    })
}

/// Whether the IPv6 packet at `ip` (its UDP header at `udp`, if the walk got
/// there) is addressed to this host; on the drop path only, as for IPv4.
#[inline(always)]
fn ipv6_for_this_host<P: Packet>(p: &P, ip: usize, udp: Option<usize>) -> bool {
    let Some(h) = p.load_var::<IPV6_HLEN>(ip) else {
        return true;
    };
    let [b0, b1, b2, b3, _, _, _, _, s @ ..] = h;
    let (saddr, daddr) = split_addrs(s);
    let ports = match udp {
        Some(off) => p.load_var::<4>(off),
        None => None,
    };
    lookup(p, |f| {
        f.family = AF_INET6;
        if let Some([sp0, sp1, dp0, dp1]) = ports {
            f.l4_protocol = IPPROTO_UDP;
            f.sport = u16::from_ne_bytes([sp0, sp1]);
            f.dport = u16::from_ne_bytes([dp0, dp1]);
        }
        // Traffic class and flow label, for the FIB's policy rules.
        f.__bindgen_anon_2.flowinfo = u32::from_ne_bytes([b0 & 0x0f, b1, b2, b3]);
        f.__bindgen_anon_3.ipv6_src = words(saddr);
        f.__bindgen_anon_4.ipv6_dst = words(daddr);
    })
}

/// An address as the four `__be32` words of `bpf_fib_lookup`.
#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        a8,
        a9,
        a10,
        a11,
        a12,
        a13,
        a14,
        a15,
    ] = a;
    [
        u32::from_ne_bytes([a0, a1, a2, a3]),
        u32::from_ne_bytes([a4, a5, a6, a7]),
        u32::from_ne_bytes([a8, a9, a10, a11]),
        u32::from_ne_bytes([a12, a13, a14, a15]),
    ]
}
