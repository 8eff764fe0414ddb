//! The packet gate of udp-encap-tun, as an XDP program and as a TC
//! classifier (clsact ingress) for links where XDP cannot attach.
//!
//! Runs on the uplink (`--bind-to-interface`). For every UDP datagram (IPv4
//! or IPv6, untagged or behind up to two priority tags) to the listen port
//! it decides, in this order:
//!
//! 1. the first fragment of a fragmented datagram (IPv4 MF with offset 0, an
//!    IPv6 Fragment header with offset 0): drop (a tunnel peer never
//!    fragments, the daemon clamps the MSS so segments fit the path);
//! 2. UDP length, IP length and frame length disagree: drop;
//! 3. the payload cannot hold a TCP header (shorter than 20 bytes): drop;
//! 4. a data offset below 5 words: a control datagram in its exact shape
//!    passes if its source or its session is known, every other one drops;
//!    a data offset past the payload drops;
//! 5. enforcement on and (saddr, sport) not in `UET_PEERS`: drop;
//! 6. otherwise pass.
//!
//! A drop stands only for a datagram addressed to this host: before
//! dropping, the program asks the FIB, and what the kernel would route on
//! passes untouched (`xdp_pass_forward`). Passing needs no lookup, so the
//! hot path does not pay for it.
//!
//! Everything else (other protocols, other ports, frames of VLAN devices,
//! frames too short to say) passes untouched, and so do later fragments,
//! which carry no UDP header to match (docs/xdp.md says why that is safe).
//! An IPv6 header chain longer than the program walks is dropped when it is
//! for this host (it could hide a listen-port datagram).
//!
//! Both entry points run the same code ([`gate::gate`]) on the same maps and
//! count every packet under exactly one reason in the per-CPU array
//! `UET_COUNTERS`. No logging on the packet path: it would cost more than
//! the program itself.
#![no_std]
#![no_main]

mod gate;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup, xdp_action},
    helpers::generated::{
        bpf_fib_lookup as fib_lookup_helper, bpf_skb_load_bytes, bpf_xdp_load_bytes,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use udp_encap_tun_common::{Config, PeerKey, PeerValue, SessionKey, SessionValue, counter};

use crate::gate::{Outcome, Packet};

/// The allowed peers. Its size is set by the loader (`--xdp-map-size`);
/// a plain (not LRU) hash, so a full map refuses new keys and never evicts.
#[map(name = "UET_PEERS")]
static UET_PEERS: HashMap<PeerKey, PeerValue> = HashMap::with_max_entries(65536, 0);

/// The live sessions, by the 8 bytes of their id: a control datagram that
/// names one passes from any source (the daemon checks its proof).
#[map(name = "UET_SESSIONS")]
static UET_SESSIONS: HashMap<SessionKey, SessionValue> = HashMap::with_max_entries(65536, 0);

/// One [`Config`] record at index 0, written by the daemon.
#[map(name = "UET_CONFIG")]
static UET_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "UET_COUNTERS")]
static UET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[xdp]
pub fn udp_encap_tun(ctx: XdpContext) -> u32 {
    let (dropped, reason) = run(&Xdp(&ctx));
    count(reason);
    if dropped {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The same gate at clsact ingress. A pass is `TC_ACT_UNSPEC` (TCX_NEXT):
/// the next classifier on the interface still runs, so other programs (and
/// other instances on other ports) keep working beside this one.
#[classifier]
pub fn udp_encap_tc(ctx: TcContext) -> i32 {
    let (dropped, reason) = run(&Tc(&ctx));
    count(reason);
    if dropped {
        TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

#[inline(always)]
fn run<P: Packet>(p: &P) -> Outcome {
    let Some(cfg) = UET_CONFIG.get(0) else {
        return (false, counter::PASS_OTHER);
    };
    let cfg = *cfg;
    gate::gate(p, &cfg)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = UET_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a live array element;
        // per-CPU, so no other program writes it concurrently.
        unsafe { *c = (*c).wrapping_add(1) };
    }
}

/// Reads `N` bytes into a buffer through a load-bytes helper `f(buf, len)`.
#[inline(always)]
fn via_helper<const N: usize>(
    f: impl FnOnce(*mut core::ffi::c_void, u32) -> i64,
) -> Option<[u8; N]> {
    let mut buf = MaybeUninit::<[u8; N]>::uninit();
    if f(buf.as_mut_ptr().cast(), N as u32) != 0 {
        return None;
    }
    // SAFETY: the helper returned 0, so it wrote all N bytes.
    Some(unsafe { buf.assume_init() })
}

// ---------------------------------------------------------------- XDP

struct Xdp<'a>(&'a XdpContext);

impl Packet for Xdp<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end().saturating_sub(self.0.data())
    }

    /// Direct packet access. The comparison against `data_end` is the one
    /// the verifier needs to see before the load.
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let start = self.0.data();
        if start + off + N > self.0.data_end() {
            return None;
        }
        // SAFETY: the N bytes at start + off are inside the frame (checked
        // just above); [u8; N] has alignment 1.
        Some(unsafe { ((start + off) as *const [u8; N]).read() })
    }

    #[inline(always)]
    fn load_var<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let off = u32::try_from(off).ok()?;
        // SAFETY: the helper checks offset and length against the frame and
        // writes at most `len` bytes into the buffer it is given.
        via_helper(|buf, len| unsafe { bpf_xdp_load_bytes(self.0.ctx, off, buf, len) })
    }

    #[inline(always)]
    fn fib_lookup(&self, params: &mut bpf_fib_lookup) -> i64 {
        // SAFETY: a valid context and a params struct of the size we pass.
        unsafe {
            fib_lookup_helper(
                self.0.ctx.cast(),
                params,
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn stripped_vlan_tci(&self) -> Option<u16> {
        None
    }
}

// ---------------------------------------------------------------- TC

struct Tc<'a>(&'a TcContext);

impl Packet for Tc<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    /// Through `bpf_skb_load_bytes`, which also reads the paged part of a
    /// non-linear skb (GRO merges datagrams into fragments): direct access
    /// would only see the linear head.
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.load_var::<N>(off)
    }

    #[inline(always)]
    fn load_var<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let off = u32::try_from(off).ok()?;
        let skb = self.0.skb.skb;
        // SAFETY: the helper checks offset and length against the skb and
        // writes at most `len` bytes into the buffer it is given.
        via_helper(|buf, len| unsafe { bpf_skb_load_bytes(skb.cast(), off, buf, len) })
    }

    #[inline(always)]
    fn fib_lookup(&self, params: &mut bpf_fib_lookup) -> i64 {
        // SAFETY: a valid context and a params struct of the size we pass.
        unsafe {
            fib_lookup_helper(
                self.0.skb.skb.cast(),
                params,
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.0.skb.skb).ifindex }
    }

    #[inline(always)]
    fn stripped_vlan_tci(&self) -> Option<u16> {
        let skb = self.0.skb.skb;
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { ((*skb).vlan_present != 0).then(|| (*skb).vlan_tci as u16) }
    }
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
