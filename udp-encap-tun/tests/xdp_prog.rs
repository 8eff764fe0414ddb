//! The gate's program, run on crafted frames (BPF_PROG_TEST_RUN through
//! aya's `TestRun`), as XDP and as the TC classifier, plus the loader's life
//! cycle: map full, pins per namespace, clean drop, and a restart after
//! kill -9.
//!
//! Every test builds its own namespace with a veth (or tun) in it and
//! attaches the real gate there from a thread that joined the namespace, the
//! way the daemon runs under `nsenter --net`. The crafted frames arrive "on"
//! that interface (its ifindex in the test context), addressed to an address
//! it holds, so the gate's FIB lookup sees them as this host's. Needs root:
//! fails (never passes silently) without it.

// Test fixtures are built here, not received from a network.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Netns, if_name, in_netns, require_root, wait_until};
use udp_encap_tun::cli::XdpMode;
use udp_encap_tun::edge::xdp::{
    PIN_CONFIG, PIN_COUNTERS, PIN_PEERS, PIN_ROOT, PIN_SESSIONS, XdpError, XdpGate,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const PORT: u16 = 40000;
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 51000);
/// The gate's own address (on the lab's veth).
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER6_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);

fn peer() -> SocketAddr {
    SocketAddr::V4(PEER)
}

fn peer6() -> SocketAddr {
    SocketAddr::from((PEER6_IP, 51000))
}

// ---------------------------------------------------------------- frames

/// An IPv6 extension header to put before the UDP header.
#[derive(Clone, Copy, Debug)]
enum Ext {
    /// Hop-by-Hop, Routing or Destination Options (next-header value), with
    /// this many bytes (a multiple of 8, at least 8).
    Generic(u8, usize),
    /// Authentication Header of this many bytes (a multiple of 4, >= 12).
    Auth(usize),
    /// Fragment header: offset in 8-byte units, More Fragments.
    Fragment(u16, bool),
}

impl Ext {
    fn next_header(self) -> u8 {
        match self {
            Ext::Generic(nh, _) => nh,
            Ext::Auth(_) => 51,
            Ext::Fragment(..) => 44,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::Generic(_, len) => {
                let mut h = vec![1u8; len]; // PadN-ish filler: the gate skips it
                h[0] = next;
                h[1] = (len / 8 - 1) as u8;
                h
            }
            Ext::Auth(len) => {
                let mut h = vec![0xa5u8; len];
                h[0] = next;
                h[1] = (len / 4 - 2) as u8;
                h
            }
            Ext::Fragment(offset, more) => {
                let field = (offset << 3) | u16::from(more);
                let mut h = vec![next, 0];
                h.extend_from_slice(&field.to_be_bytes());
                h.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]); // identification
                h
            }
        }
    }
}

/// A datagram to craft; `frame()` renders it, then fields are broken on
/// purpose by the tests.
#[derive(Clone)]
struct Dgram {
    src: SocketAddr,
    dst: IpAddr,
    dport: u16,
    /// IPv4 header length in bytes (20..=60, multiple of 4).
    ihl: usize,
    /// The UDP payload (a TCP segment when well formed).
    payload: Vec<u8>,
    /// IPv4 flags+fragment offset field.
    frag: u16,
    /// IPv4 protocol, or the IPv6 upper-layer next header.
    proto: u8,
    /// IPv6 extension headers, in order.
    ext: Vec<Ext>,
}

impl Dgram {
    fn new(src: SocketAddrV4, dport: u16) -> Dgram {
        Dgram::to(SocketAddr::V4(src), IpAddr::V4(LOCAL), dport)
    }

    fn v6(src: SocketAddr, dport: u16) -> Dgram {
        Dgram::to(src, IpAddr::V6(LOCAL6), dport)
    }

    fn to(src: SocketAddr, dst: IpAddr, dport: u16) -> Dgram {
        Dgram {
            src,
            dst,
            dport,
            ihl: 20,
            payload: tcp_segment(5, 0),
            frag: 0x4000,
            proto: 17,
            ext: Vec::new(),
        }
    }

    fn udp(&self) -> Vec<u8> {
        let udp_len = 8 + self.payload.len();
        let mut u = Vec::with_capacity(udp_len);
        u.extend_from_slice(&self.src.port().to_be_bytes());
        u.extend_from_slice(&self.dport.to_be_bytes());
        u.extend_from_slice(&(udp_len as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]); // checksum: the gate does not look
        u.extend_from_slice(&self.payload);
        u
    }

    /// IP header(s) + UDP header + payload, lengths consistent.
    fn ip_packet(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (SocketAddr::V4(src), IpAddr::V4(dst)) => {
                let udp = self.udp();
                let tot_len = self.ihl + udp.len();
                let mut p = Vec::with_capacity(tot_len);
                p.push(0x40 | (self.ihl / 4) as u8);
                p.push(0);
                p.extend_from_slice(&(tot_len as u16).to_be_bytes());
                p.extend_from_slice(&[0x12, 0x34]); // id
                p.extend_from_slice(&self.frag.to_be_bytes());
                p.push(64);
                p.push(self.proto);
                p.extend_from_slice(&[0, 0]); // checksum: the gate does not look
                p.extend_from_slice(&src.ip().octets());
                p.extend_from_slice(&dst.octets());
                // Options: NOPs up to the header length.
                p.resize(self.ihl, 1);
                p.extend_from_slice(&udp);
                p
            }
            (SocketAddr::V6(src), IpAddr::V6(dst)) => {
                let mut chain = Vec::new();
                for (i, e) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(self.proto, |n| n.next_header());
                    chain.extend(e.bytes(next));
                }
                let first = self.ext.first().map_or(self.proto, |e| e.next_header());
                let body = [chain, self.udp()].concat();
                let mut p = vec![0x60, 0, 0, 0];
                p.extend_from_slice(&(body.len() as u16).to_be_bytes());
                p.push(first);
                p.push(64);
                p.extend_from_slice(&src.ip().octets());
                p.extend_from_slice(&dst.octets());
                p.extend_from_slice(&body);
                p
            }
            _ => panic!("source and destination of different families"),
        }
    }

    fn ethertype(&self) -> u16 {
        if self.src.is_ipv4() { 0x0800 } else { 0x86dd }
    }

    /// Ethernet + IP packet.
    fn frame(&self) -> Vec<u8> {
        eth(self.ethertype(), &self.ip_packet())
    }

    /// Ethernet with VLAN tags `(TPID, TCI)`, outer first, then the packet.
    fn tagged(&self, tags: &[(u16, u16)]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for (tpid, tci) in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&self.ethertype().to_be_bytes());
        f.extend_from_slice(&self.ip_packet());
        f
    }

    /// Offset of the UDP header in `frame()`.
    fn udp_at(&self) -> usize {
        match self.src {
            SocketAddr::V4(_) => 14 + self.ihl,
            SocketAddr::V6(_) => 14 + 40 + self.ext.iter().map(|e| e.bytes(0).len()).sum::<usize>(),
        }
    }
}

fn eth(ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// A TCP header with data offset `doff` words (whatever fits in 20 + extra
/// bytes) followed by `extra` bytes.
fn tcp_segment(doff: u8, extra: usize) -> Vec<u8> {
    let mut t = vec![0u8; 20 + extra];
    t[0..2].copy_from_slice(&51000u16.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[12] = doff << 4;
    t[13] = 0x02; // SYN
    t
}

/// A control datagram as CONTROL-WIRE.md describes it: 48 bytes, kind,
/// version 1, session id, zero where a segment's data offset would be,
/// counter, kind-specific bytes, tag.
fn control(kind: u8, session: [u8; 8]) -> Vec<u8> {
    let mut c = vec![0u8; 48];
    c[0] = kind;
    c[1] = 1;
    c[4..12].copy_from_slice(&session);
    c[16..24].copy_from_slice(&7u64.to_be_bytes());
    c[24..32].copy_from_slice(&[0x5a; 8]);
    c[32..48].copy_from_slice(&[0xc3; 16]);
    c
}

const SESSION: [u8; 8] = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];

/// Offsets in an Ethernet frame with a 20-byte IPv4 header.
const IP_TOT_LEN: usize = 14 + 2;
const UDP_LEN: usize = 14 + 20 + 4;
/// The IPv6 payload length in an Ethernet frame.
const IP6_PAYLOAD_LEN: usize = 14 + 4;

fn set_u16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

// ---------------------------------------------------------------- helpers

/// A namespace with one veth pair (`a` is where the gate goes, holding
/// LOCAL and LOCAL6).
struct Lab {
    ns: Netns,
    a: String,
}

fn lab(tag: &str) -> Lab {
    require_root();
    let ns = Netns::new(tag);
    let a = if_name("xa");
    let b = if_name("xb");
    ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    // The harness turns IPv6 off in its namespaces; these need it.
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        ns.sysctl(key, "0");
    }
    // ... on `a` only: with IPv6 up, `b` would send router solicitations
    // and MLD reports into `a`, where the gate would count them under
    // whatever the verdict checks are looking at.
    ns.sysctl(&format!("net.ipv6.conf.{b}.disable_ipv6"), "1");
    ns.ip(&["link", "set", &a, "up"]);
    ns.ip(&["link", "set", &b, "up"]);
    ns.addr_add(&a, &format!("{LOCAL}/24"));
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{LOCAL6}/64"),
        "dev",
        &a,
        "nodad",
    ]);
    Lab { ns, a }
}

fn attach(uplink: &str, map_size: u32, mode: XdpMode, enforce: bool) -> XdpGate {
    XdpGate::attach(uplink, PORT, map_size, mode, enforce)
        .unwrap_or_else(|e| panic!("attach to {uplink}: {e} ({e:?})"))
}

fn counters(gate: &XdpGate) -> std::collections::HashMap<&'static str, u64> {
    gate.counters().expect("counters").into_iter().collect()
}

fn run(gate: &XdpGate, frame: &[u8]) -> u32 {
    gate.test_run(frame).expect("BPF_PROG_TEST_RUN")
}

/// Runs `frame`, checks the verdict and that exactly counter `reason` moved
/// by one.
fn expect(gate: &XdpGate, what: &str, frame: &[u8], verdict: u32, reason: &str) {
    let before = counters(gate);
    let got = gate
        .test_run(frame)
        .unwrap_or_else(|e| panic!("{what} ({}): BPF_PROG_TEST_RUN: {e:?}", gate.mode()));
    let after = counters(gate);
    let name = |v| {
        if v == XDP_PASS {
            "PASS"
        } else if v == XDP_DROP {
            "DROP"
        } else {
            "other"
        }
    };
    let mode = gate.mode();
    assert_eq!(
        got,
        verdict,
        "{what} ({mode}): got {} ({got}), want {}",
        name(got),
        name(verdict)
    );
    for (k, v) in &after {
        let delta = v - before.get(k).copied().unwrap_or(0);
        if *k == reason {
            assert_eq!(
                delta, 1,
                "{what} ({mode}): counter {k} moved by {delta}, want 1"
            );
        } else if k.starts_with("xdp_pass") || k.starts_with("xdp_drop") {
            assert_eq!(
                delta, 0,
                "{what} ({mode}): counter {k} moved by {delta}, want 0 (reason {reason})"
            );
        }
    }
    assert!(after.contains_key(reason), "no counter named {reason}");
}


fn netns_inode(ns: &Netns) -> u64 {
    fs::metadata(ns.path()).expect("stat netns").ino()
}

/// Whether program `id` sits at clsact ingress of `dev`: as a TCX link
/// (Linux 6.6+; bpftool 7.1 does not name the type but lists the link) or
/// as a netlink classifier (`tc filter show`).
fn tc_attached(ns: &Netns, dev: &str, id: u32) -> bool {
    let filters = ns.run(&["tc", "filter", "show", "dev", dev, "ingress"]);
    if filters.contains(&format!(" id {id} ")) {
        return true;
    }
    let links = bpftool_links();
    links
        .lines()
        .any(|l| l.contains(&format!("prog {id}")) && !l.contains("xdp"))
}

fn xdp_attached(ns: &Netns, dev: &str) -> bool {
    ns.ip(&["-o", "link", "show", "dev", dev]).contains("xdp")
}

// ---------------------------------------------------------------- verdicts

/// The IPv4 verdicts, enforcement off at the start (left on at the end).
fn ipv4_verdicts(gate: &mut XdpGate) {
    let good = Dgram::new(PEER, PORT);

    // Not for the listen port: passes untouched.
    let mut arp = eth(0x0806, &[0u8; 28]);
    expect(gate, "ARP", &arp, XDP_PASS, "xdp_pass_other");
    arp.truncate(14);
    // BPF_PROG_TEST_RUN refuses to build an skb with nothing after the
    // Ethernet header (EINVAL), so that case is XDP's only.
    if gate.mode() != "tc" {
        expect(
            gate,
            "bare Ethernet header",
            &arp,
            XDP_PASS,
            "xdp_pass_other",
        );
    }
    let tcp = Dgram {
        proto: 6,
        ..good.clone()
    };
    expect(gate, "IPv4 TCP", &tcp.frame(), XDP_PASS, "xdp_pass_other");
    let other_port = Dgram::new(PEER, PORT + 1);
    expect(
        gate,
        "UDP to another port",
        &other_port.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );
    let short_other = Dgram {
        payload: vec![1, 2, 3],
        ..other_port.clone()
    };
    expect(
        gate,
        "short UDP to another port",
        &short_other.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );
    // A tag with a VLAN id belongs to a VLAN device, not to this interface
    // (it used to be every tag: issue 14 item 6, see `vlan_tags` for the
    // priority tags that are this interface's).
    expect(
        gate,
        "VLAN-tagged (VID 5) listen-port datagram",
        &good.tagged(&[(0x8100, 0x0005)]),
        XDP_PASS,
        "xdp_pass_other",
    );
    let mut v6 = good.frame();
    v6[14] = 0x60;
    expect(gate, "IPv6 version nibble", &v6, XDP_PASS, "xdp_pass_other");
    let mut bad_ihl = good.frame();
    bad_ihl[14] = 0x44;
    expect(gate, "IHL below 5", &bad_ihl, XDP_PASS, "xdp_pass_other");
    let mut cut = good.frame();
    cut.truncate(14 + 20 + 3);
    expect(
        gate,
        "frame ends inside the UDP header",
        &cut,
        XDP_PASS,
        "xdp_pass_other",
    );

    // Well formed: passes.
    expect(
        gate,
        "well-formed segment",
        &good.frame(),
        XDP_PASS,
        "xdp_pass",
    );
    let opts = Dgram {
        ihl: 24,
        ..good.clone()
    };
    expect(
        gate,
        "IPv4 options (IHL 6)",
        &opts.frame(),
        XDP_PASS,
        "xdp_pass",
    );
    let max_opts = Dgram {
        ihl: 60,
        ..good.clone()
    };
    expect(gate, "IHL 15", &max_opts.frame(), XDP_PASS, "xdp_pass");
    let doff15 = Dgram {
        payload: tcp_segment(15, 40),
        ..good.clone()
    };
    expect(
        gate,
        "data offset 15 within payload",
        &doff15.frame(),
        XDP_PASS,
        "xdp_pass",
    );
    let data = Dgram {
        payload: tcp_segment(5, 1000),
        ..good.clone()
    };
    expect(
        gate,
        "segment with data",
        &data.frame(),
        XDP_PASS,
        "xdp_pass",
    );
    let mut padded = good.frame();
    padded.extend_from_slice(&[0u8; 6]);
    expect(
        gate,
        "Ethernet padding after the datagram",
        &padded,
        XDP_PASS,
        "xdp_pass",
    );

    // Malformed listen-port datagrams: dropped, each under its reason.
    let p19 = Dgram {
        payload: vec![0x50; 19],
        ..good.clone()
    };
    expect(
        gate,
        "19-byte payload",
        &p19.frame(),
        XDP_DROP,
        "xdp_drop_short",
    );
    let empty = Dgram {
        payload: vec![],
        ..good.clone()
    };
    expect(
        gate,
        "empty payload",
        &empty.frame(),
        XDP_DROP,
        "xdp_drop_short",
    );
    let doff4 = Dgram {
        payload: tcp_segment(4, 0),
        ..good.clone()
    };
    expect(
        gate,
        "data offset 4",
        &doff4.frame(),
        XDP_DROP,
        "xdp_drop_tcp_offset",
    );
    let doff0 = Dgram {
        payload: tcp_segment(0, 8),
        ..good.clone()
    };
    expect(
        gate,
        "data offset 0",
        &doff0.frame(),
        XDP_DROP,
        "xdp_drop_tcp_offset",
    );
    let doff_past = Dgram {
        payload: tcp_segment(6, 3),
        ..good.clone()
    };
    expect(
        gate,
        "data offset past the payload",
        &doff_past.frame(),
        XDP_DROP,
        "xdp_drop_tcp_offset",
    );

    let mut udp_long = good.frame();
    set_u16(&mut udp_long, UDP_LEN, 8 + 21);
    expect(
        gate,
        "UDP length above IPv4 length",
        &udp_long,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut udp_short = good.frame();
    set_u16(&mut udp_short, UDP_LEN, 8 + 19);
    expect(
        gate,
        "UDP length below IPv4 length",
        &udp_short,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut udp_tiny = good.frame();
    set_u16(&mut udp_tiny, UDP_LEN, 4);
    expect(
        gate,
        "UDP length below 8",
        &udp_tiny,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut truncated = good.frame();
    truncated.truncate(truncated.len() - 1);
    expect(
        gate,
        "frame shorter than the IPv4 length",
        &truncated,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut tot_small = good.frame();
    set_u16(&mut tot_small, IP_TOT_LEN, 20 + 4);
    expect(
        gate,
        "IPv4 length below IHL + 8",
        &tot_small,
        XDP_DROP,
        "xdp_drop_length",
    );

    // Fragments.
    let first = Dgram {
        frag: 0x2000,
        ..good.clone()
    };
    expect(
        gate,
        "first fragment (MF)",
        &first.frame(),
        XDP_DROP,
        "xdp_drop_fragment",
    );
    let mut later = good.clone();
    later.frag = 0x0003; // offset 24 bytes, no UDP header in it
    expect(
        gate,
        "later fragment",
        &later.frame(),
        XDP_PASS,
        "xdp_pass_fragment",
    );
    let last_other = Dgram {
        frag: 0x2000,
        ..other_port.clone()
    };
    expect(
        gate,
        "first fragment to another port",
        &last_other.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );

    // Enforcement, switched on at run time.
    gate.set_enforce(true).expect("enforce on");
    expect(
        gate,
        "unknown peer",
        &good.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    expect(
        gate,
        "malformed from unknown peer",
        &p19.frame(),
        XDP_DROP,
        "xdp_drop_short",
    );
    expect(
        gate,
        "other port, enforcement on",
        &other_port.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );
    gate.allow(peer()).expect("allow");
    assert!(gate.contains(peer()).expect("lookup"));
    expect(gate, "known peer", &good.frame(), XDP_PASS, "xdp_pass");
    let same_addr_other_port = Dgram::new(SocketAddrV4::new(*PEER.ip(), PEER.port() + 1), PORT);
    expect(
        gate,
        "known address, unknown port",
        &same_addr_other_port.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    let same_port_other_addr = Dgram::new(
        SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 8), PEER.port()),
        PORT,
    );
    expect(
        gate,
        "known port, unknown address",
        &same_port_other_addr.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    expect(
        gate,
        "malformed from known peer",
        &doff4.frame(),
        XDP_DROP,
        "xdp_drop_tcp_offset",
    );
    gate.revoke(peer()).expect("revoke");
    assert!(!gate.contains(peer()).expect("lookup"));
    expect(
        gate,
        "revoked peer",
        &good.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    gate.revoke(peer())
        .expect("revoking an absent peer is fine");
    gate.set_enforce(false).expect("enforce off");
    expect(
        gate,
        "enforcement off again",
        &good.frame(),
        XDP_PASS,
        "xdp_pass",
    );
    gate.set_enforce(true).expect("enforce on");
}

/// Issue 14 item 6: priority tags (VID 0, 802.1Q or 802.1ad, up to two) are
/// this interface's (Linux strips them and hands the frame to the parent
/// device's sockets), so the gate parses past them; a VLAN id or a third tag
/// is someone else's. Enforcement on.
fn vlan_verdicts(gate: &mut XdpGate) {
    for good in [Dgram::new(PEER, PORT), Dgram::v6(peer6(), PORT)] {
        let fam = if good.src.is_ipv4() { "IPv4" } else { "IPv6" };
        let priority = [
            ("802.1Q VID 0", vec![(0x8100, 0x0000)]),
            ("802.1Q VID 0 PCP 5", vec![(0x8100, 0xa000)]),
            ("802.1ad VID 0", vec![(0x88a8, 0x0000)]),
            (
                "802.1ad VID 0 + 802.1Q VID 0",
                vec![(0x88a8, 0x0000), (0x8100, 0x0000)],
            ),
            (
                "802.1Q VID 0 twice",
                vec![(0x8100, 0x0000), (0x8100, 0xe000)],
            ),
        ];
        for (what, tags) in &priority {
            expect(
                gate,
                &format!("{fam} unknown peer behind {what}"),
                &good.tagged(tags),
                XDP_DROP,
                "xdp_drop_unknown_peer",
            );
            let short = Dgram {
                payload: vec![0x50; 19],
                ..good.clone()
            };
            expect(
                gate,
                &format!("{fam} short payload behind {what}"),
                &short.tagged(tags),
                XDP_DROP,
                "xdp_drop_short",
            );
        }
        let foreign = [
            ("802.1Q VID 5", vec![(0x8100, 0x0005)]),
            ("802.1ad VID 4095", vec![(0x88a8, 0x0fff)]),
            ("VID 0 then VID 7", vec![(0x88a8, 0x0000), (0x8100, 0x0007)]),
            ("VID 9 then VID 0", vec![(0x88a8, 0x0009), (0x8100, 0x0000)]),
            (
                "three priority tags",
                vec![(0x88a8, 0), (0x8100, 0), (0x8100, 0)],
            ),
        ];
        for (what, tags) in &foreign {
            expect(
                gate,
                &format!("{fam} behind {what}"),
                &good.tagged(tags),
                XDP_PASS,
                "xdp_pass_other",
            );
        }
        // A frame that ends inside a tag, or right after it.
        let mut cut = good.tagged(&[(0x8100, 0)]);
        cut.truncate(16);
        expect(
            gate,
            &format!("{fam} cut in the tag"),
            &cut,
            XDP_PASS,
            "xdp_pass_other",
        );
        gate.allow(good.src).expect("allow");
        expect(
            gate,
            &format!("{fam} known peer behind 802.1ad VID 0 + 802.1Q VID 0"),
            &good.tagged(&[(0x88a8, 0), (0x8100, 0)]),
            XDP_PASS,
            "xdp_pass",
        );
        gate.revoke(good.src).expect("revoke");
    }
}

/// Issue 11: IPv6 datagrams under the same rules as IPv4; fragments and
/// extension headers are no way around the gate. Enforcement on.
fn ipv6_verdicts(gate: &mut XdpGate) {
    let good = Dgram::v6(peer6(), PORT);
    let hop = Ext::Generic(0, 8);
    let dst = Ext::Generic(60, 16);
    let rt = Ext::Generic(43, 24);

    // Not for the listen port, or not UDP: untouched.
    let other_port = Dgram::v6(peer6(), PORT + 1);
    expect(
        gate,
        "IPv6 other port",
        &other_port.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );
    let tcp6 = Dgram {
        proto: 6,
        ..good.clone()
    };
    expect(gate, "IPv6 TCP", &tcp6.frame(), XDP_PASS, "xdp_pass_other");
    let mut v4_nibble = good.frame();
    v4_nibble[14] = 0x40;
    expect(
        gate,
        "IPv6 EtherType, version 4",
        &v4_nibble,
        XDP_PASS,
        "xdp_pass_other",
    );
    let mut cut = good.frame();
    cut.truncate(14 + 39);
    // BPF_PROG_TEST_RUN on 6.18 refuses to build an skb whose IPv6 header
    // is cut short (EINVAL): XDP only.
    if gate.mode() != "tc" {
        expect(
            gate,
            "frame ends in the IPv6 header",
            &cut,
            XDP_PASS,
            "xdp_pass_other",
        );
    }
    let mut cut_udp = good.frame();
    cut_udp.truncate(14 + 40 + 7);
    expect(
        gate,
        "frame ends in the UDP header",
        &cut_udp,
        XDP_PASS,
        "xdp_pass_other",
    );
    let esp = Dgram {
        proto: 50,
        ..good.clone()
    };
    expect(gate, "ESP", &esp.frame(), XDP_PASS, "xdp_pass_other");
    let no_next = Dgram {
        proto: 59,
        ext: vec![hop],
        ..good.clone()
    };
    expect(
        gate,
        "no next header after Hop-by-Hop",
        &no_next.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );

    // Unknown peer, with and without extension headers: dropped.
    expect(
        gate,
        "IPv6 unknown peer",
        &good.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    for (what, ext) in [
        ("Hop-by-Hop", vec![hop]),
        ("Destination Options", vec![dst]),
        ("Routing", vec![rt]),
        ("Authentication Header", vec![Ext::Auth(24)]),
        (
            "Hop-by-Hop, Dest, Routing, AH, Dest",
            vec![hop, dst, rt, Ext::Auth(12), dst],
        ),
        (
            "eight headers (the bound)",
            vec![
                hop,
                dst,
                rt,
                dst,
                rt,
                Ext::Auth(16),
                dst,
                Ext::Generic(60, 2048),
            ],
        ),
    ] {
        let d = Dgram {
            ext: ext.clone(),
            ..good.clone()
        };
        expect(
            gate,
            &format!("IPv6 unknown peer behind {what}"),
            &d.frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
    }
    // Past the bound: for this host, dropped whatever follows.
    let nine = Dgram {
        ext: vec![hop, dst, rt, dst, rt, dst, rt, dst, rt],
        ..good.clone()
    };
    expect(
        gate,
        "nine extension headers",
        &nine.frame(),
        XDP_DROP,
        "xdp_drop_ext_headers",
    );
    let nine_other = Dgram {
        dport: PORT + 1,
        ..nine.clone()
    };
    expect(
        gate,
        "nine extension headers, another port",
        &nine_other.frame(),
        XDP_DROP,
        "xdp_drop_ext_headers",
    );
    let mut chain_cut = Dgram {
        ext: vec![hop, dst],
        ..good.clone()
    }
    .frame();
    chain_cut.truncate(14 + 40 + 8 + 1);
    expect(
        gate,
        "frame ends in the header chain",
        &chain_cut,
        XDP_PASS,
        "xdp_pass_other",
    );

    // Fragments: a Fragment header with offset 0 (first or atomic) for the
    // listen port is dropped; a later fragment carries no UDP header.
    for (what, ext) in [
        ("first fragment", vec![Ext::Fragment(0, true)]),
        ("atomic fragment", vec![Ext::Fragment(0, false)]),
        (
            "first fragment behind Hop-by-Hop",
            vec![hop, Ext::Fragment(0, true)],
        ),
        (
            "first fragment, then Destination Options",
            vec![Ext::Fragment(0, true), dst],
        ),
    ] {
        let d = Dgram {
            ext,
            ..good.clone()
        };
        expect(
            gate,
            &format!("IPv6 {what}"),
            &d.frame(),
            XDP_DROP,
            "xdp_drop_fragment",
        );
    }
    let later = Dgram {
        ext: vec![Ext::Fragment(3, true)],
        ..good.clone()
    };
    expect(
        gate,
        "IPv6 later fragment",
        &later.frame(),
        XDP_PASS,
        "xdp_pass_fragment",
    );
    let last = Dgram {
        ext: vec![hop, Ext::Fragment(100, false)],
        ..good.clone()
    };
    expect(
        gate,
        "IPv6 last fragment behind Hop-by-Hop",
        &last.frame(),
        XDP_PASS,
        "xdp_pass_fragment",
    );
    let first_other = Dgram {
        ext: vec![Ext::Fragment(0, true)],
        ..other_port.clone()
    };
    expect(
        gate,
        "IPv6 first fragment to another port",
        &first_other.frame(),
        XDP_PASS,
        "xdp_pass_other",
    );

    // Malformed for the listen port.
    let p19 = Dgram {
        payload: vec![0x50; 19],
        ..good.clone()
    };
    expect(
        gate,
        "IPv6 19-byte payload",
        &p19.frame(),
        XDP_DROP,
        "xdp_drop_short",
    );
    let doff4 = Dgram {
        payload: tcp_segment(4, 0),
        ..good.clone()
    };
    expect(
        gate,
        "IPv6 data offset 4",
        &doff4.frame(),
        XDP_DROP,
        "xdp_drop_tcp_offset",
    );
    let doff_past = Dgram {
        payload: tcp_segment(6, 3),
        ext: vec![dst],
        ..good.clone()
    };
    expect(
        gate,
        "IPv6 data offset past the payload, behind Dest",
        &doff_past.frame(),
        XDP_DROP,
        "xdp_drop_tcp_offset",
    );
    let mut pl_long = good.frame();
    set_u16(&mut pl_long, IP6_PAYLOAD_LEN, 8 + 21);
    expect(
        gate,
        "IPv6 payload length past the frame",
        &pl_long,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut pl_short = good.frame();
    set_u16(&mut pl_short, IP6_PAYLOAD_LEN, 8 + 19);
    expect(
        gate,
        "IPv6 payload length below UDP length",
        &pl_short,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut jumbo = good.frame();
    set_u16(&mut jumbo, IP6_PAYLOAD_LEN, 0);
    expect(
        gate,
        "IPv6 payload length 0 (jumbogram)",
        &jumbo,
        XDP_DROP,
        "xdp_drop_length",
    );
    let with_ext = Dgram {
        ext: vec![hop, dst],
        ..good.clone()
    };
    let mut udp_tiny = with_ext.frame();
    set_u16(&mut udp_tiny, with_ext.udp_at() + 4, 4);
    expect(
        gate,
        "IPv6 UDP length below 8, behind two headers",
        &udp_tiny,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut ext_short = with_ext.frame();
    set_u16(&mut ext_short, IP6_PAYLOAD_LEN, 8 + 16 + 4);
    expect(
        gate,
        "IPv6 payload length shorter than the headers",
        &ext_short,
        XDP_DROP,
        "xdp_drop_length",
    );
    let mut padded = good.frame();
    padded.extend_from_slice(&[0u8; 6]);
    expect(
        gate,
        "IPv6 unknown peer, padded",
        &padded,
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );

    // A known IPv6 peer, by address and port.
    gate.allow(peer6()).expect("allow IPv6 peer");
    assert!(gate.contains(peer6()).expect("lookup"));
    expect(gate, "IPv6 known peer", &good.frame(), XDP_PASS, "xdp_pass");
    expect(
        gate,
        "IPv6 known peer, padded",
        &padded,
        XDP_PASS,
        "xdp_pass",
    );
    for (what, ext) in [
        ("Hop-by-Hop", vec![hop]),
        (
            "Hop-by-Hop, Dest, Routing, AH, Dest",
            vec![hop, dst, rt, Ext::Auth(12), dst],
        ),
    ] {
        let d = Dgram {
            ext,
            payload: tcp_segment(5, 500),
            ..good.clone()
        };
        expect(
            gate,
            &format!("IPv6 known peer behind {what}"),
            &d.frame(),
            XDP_PASS,
            "xdp_pass",
        );
    }
    expect(
        gate,
        "IPv6 known peer, nine headers",
        &nine.frame(),
        XDP_DROP,
        "xdp_drop_ext_headers",
    );
    expect(
        gate,
        "IPv6 known peer, first fragment",
        &Dgram {
            ext: vec![Ext::Fragment(0, true)],
            ..good.clone()
        }
        .frame(),
        XDP_DROP,
        "xdp_drop_fragment",
    );
    let other_port_peer = Dgram::v6(SocketAddr::from((PEER6_IP, 51001)), PORT);
    expect(
        gate,
        "IPv6 known address, other port",
        &other_port_peer.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    let other_addr = Dgram::v6(
        SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 8), 51000)),
        PORT,
    );
    expect(
        gate,
        "IPv6 known port, other address",
        &other_addr.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    // The IPv4-mapped form of an IPv4 peer is the IPv4 peer, not an IPv6 one.
    gate.allow(peer()).expect("allow IPv4 peer");
    let mapped = Dgram::v6(
        SocketAddr::from((PEER.ip().to_ipv6_mapped(), PEER.port())),
        PORT,
    );
    assert!(
        gate.contains(SocketAddr::from((PEER.ip().to_ipv6_mapped(), PEER.port())))
            .unwrap()
    );
    let mut peers = gate.peers().expect("peers");
    peers.sort();
    assert_eq!(
        peers,
        vec![peer(), peer6()],
        "the map holds one IPv4 and one IPv6 peer"
    );
    // An IPv6 packet from an IPv4-mapped source (which Linux drops, RFC
    // 4291 2.5.5.2) is not the IPv4 peer whose key has that form.
    expect(
        gate,
        "IPv6 source ::ffff:IPv4 of a known peer",
        &mapped.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
    gate.revoke(peer()).expect("revoke IPv4 peer");
    gate.revoke(peer6()).expect("revoke IPv6 peer");
    expect(
        gate,
        "IPv6 revoked peer",
        &good.frame(),
        XDP_DROP,
        "xdp_drop_unknown_peer",
    );
}

/// Issue 15: control datagrams in their exact shape (CONTROL-WIRE.md) pass
/// when their source or their session is known, drop otherwise; one byte off
/// in a fixed field, or another length, and it is not a control datagram.
/// Enforcement on.
fn control_verdicts(gate: &mut XdpGate) {
    for src in [peer(), peer6()] {
        let fam = if src.is_ipv4() { "IPv4" } else { "IPv6" };
        let dgram = |payload: Vec<u8>| {
            let mut d = if src.is_ipv4() {
                Dgram::to(src, IpAddr::V4(LOCAL), PORT)
            } else {
                Dgram::to(src, IpAddr::V6(LOCAL6), PORT)
            };
            d.payload = payload;
            d
        };
        for kind in 1..=4u8 {
            expect(
                gate,
                &format!("{fam} control kind {kind}, unknown source and session"),
                &dgram(control(kind, SESSION)).frame(),
                XDP_DROP,
                "xdp_drop_control",
            );
        }
        // Known source.
        gate.allow(src).expect("allow");
        for kind in 1..=4u8 {
            expect(
                gate,
                &format!("{fam} control kind {kind}, known source"),
                &dgram(control(kind, SESSION)).frame(),
                XDP_PASS,
                "xdp_pass_control",
            );
        }
        gate.revoke(src).expect("revoke");
        // Known session only (a client whose address changed).
        gate.allow_session(SESSION).expect("allow session");
        assert!(gate.contains_session(SESSION).unwrap());
        assert_eq!(gate.sessions().unwrap(), vec![SESSION]);
        expect(
            gate,
            &format!("{fam} control, known session only"),
            &dgram(control(4, SESSION)).frame(),
            XDP_PASS,
            "xdp_pass_control",
        );
        let mut other_session = SESSION;
        other_session[7] ^= 1;
        expect(
            gate,
            &format!("{fam} control, another session"),
            &dgram(control(4, other_session)).frame(),
            XDP_DROP,
            "xdp_drop_control",
        );
        // A known session does not let data through from an unknown source.
        expect(
            gate,
            &format!("{fam} data from an unknown source, session known"),
            &dgram(tcp_segment(5, 28)).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        // One byte off in each fixed field: not a control datagram.
        let bad: [(&str, usize, u8); 9] = [
            ("kind 0", 0, 0),
            ("kind 5", 0, 5),
            ("version 0", 1, 0),
            ("version 2", 1, 2),
            ("byte 2", 2, 1),
            ("byte 3", 3, 0x80),
            ("byte 12 (data offset) 0x01", 12, 0x01),
            ("byte 13", 13, 1),
            ("byte 15", 15, 0xff),
        ];
        for (what, at, value) in bad {
            let mut c = control(1, SESSION);
            c[at] = value;
            expect(
                gate,
                &format!("{fam} control with {what}"),
                &dgram(c).frame(),
                XDP_DROP,
                "xdp_drop_tcp_offset",
            );
        }
        let mut c = control(1, SESSION);
        c[14] = 7;
        expect(
            gate,
            &format!("{fam} control with byte 14"),
            &dgram(c).frame(),
            XDP_DROP,
            "xdp_drop_tcp_offset",
        );
        // Byte 12 with a data offset of 5 or more makes it a TCP segment.
        let mut c = control(1, SESSION);
        c[12] = 0x50;
        expect(
            gate,
            &format!("{fam} control bytes with data offset 5"),
            &dgram(c).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        // Wrong lengths.
        for len in [20usize, 47, 49, 64] {
            let mut c = control(1, SESSION);
            c.resize(len, 0);
            expect(
                gate,
                &format!("{fam} control of {len} bytes"),
                &dgram(c).frame(),
                XDP_DROP,
                "xdp_drop_tcp_offset",
            );
        }
        let mut c = control(1, SESSION);
        c.truncate(19);
        expect(
            gate,
            &format!("{fam} control of 19 bytes"),
            &dgram(c).frame(),
            XDP_DROP,
            "xdp_drop_short",
        );
        gate.revoke_session(SESSION).expect("revoke session");
        assert!(!gate.contains_session(SESSION).unwrap());
        gate.revoke_session(SESSION)
            .expect("revoking an absent session is fine");
        expect(
            gate,
            &format!("{fam} control, session revoked"),
            &dgram(control(4, SESSION)).frame(),
            XDP_DROP,
            "xdp_drop_control",
        );
        // Enforcement off (version 1): nothing to check against.
        gate.set_enforce(false).unwrap();
        expect(
            gate,
            &format!("{fam} control, enforcement off"),
            &dgram(control(2, SESSION)).frame(),
            XDP_PASS,
            "xdp_pass_control",
        );
        gate.set_enforce(true).unwrap();
    }
}

#[test]
fn verdicts_on_crafted_frames() {
    let lab = lab("xdpv");
    in_netns(&lab.ns, || {
        let mut gate = attach(&lab.a, 1024, XdpMode::Generic, false);
        assert_eq!(gate.mode(), "generic");
        ipv4_verdicts(&mut gate);
        vlan_verdicts(&mut gate);
        ipv6_verdicts(&mut gate);
        control_verdicts(&mut gate);
    });
}

/// Issue 14 item 9: the same program logic as a TC classifier (forced on a
/// veth; on PPP links `auto` gets there by itself where XDP cannot attach),
/// the same verdicts and counters.
#[test]
fn tc_classifier_gives_the_same_verdicts() {
    let lab = lab("xdptc");
    in_netns(&lab.ns, || {
        let mut gate = attach(&lab.a, 1024, XdpMode::Tc, false);
        assert_eq!(gate.mode(), "tc");
        assert!(!xdp_attached(&lab.ns, &lab.a), "TC mode attached XDP too");
        let id = gate.program_id().expect("program id");
        assert!(
            tc_attached(&lab.ns, &lab.a, id),
            "program {id} is not at clsact ingress of {}",
            lab.a
        );
        ipv4_verdicts(&mut gate);
        vlan_verdicts(&mut gate);
        ipv6_verdicts(&mut gate);
        control_verdicts(&mut gate);
        drop(gate);
        assert!(
            !tc_attached(&lab.ns, &lab.a, id),
            "classifier {id} left on {} after drop",
            lab.a
        );
    });
}

/// Under `auto`, an interface whose XDP hook another program holds gets the
/// TC classifier instead of no gate.
#[test]
fn auto_falls_back_to_tc_when_xdp_is_taken() {
    let lab = lab("xdpat");
    in_netns(&lab.ns, || {
        let first = attach(&lab.a, 8, XdpMode::Generic, true);
        let second = XdpGate::attach(&lab.a, PORT + 1, 8, XdpMode::Auto, true)
            .unwrap_or_else(|e| panic!("auto with XDP taken: {e} ({e:?})"));
        assert_eq!(second.mode(), "tc");
        // Each guards its own port, on the same interface.
        let to_second = Dgram::new(PEER, PORT + 1);
        expect(
            &second,
            "unknown peer, second gate's port",
            &to_second.frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &second,
            "first gate's port, seen by the second",
            &Dgram::new(PEER, PORT).frame(),
            XDP_PASS,
            "xdp_pass_other",
        );
        expect(
            &first,
            "unknown peer, first gate's port",
            &Dgram::new(PEER, PORT).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
    });
}

/// Issue 14 item 10: only what is addressed to this host is gated. With
/// forwarding on, a datagram for the listen port number routed through this
/// host passes untouched (`xdp_pass_forward`) whatever it looks like, and so
/// does one the kernel will refuse to route (no route); with forwarding off
/// the packet can only be for this host, so the gate acts (it used to act on
/// every destination). The FIB decides, so an address added at run time (a
/// handover) is this host's at once.
#[test]
fn forwarded_traffic_passes_untouched() {
    let lab = lab("xdpfw");
    // A LAN behind `b`, the far side of the veth.
    lab.ns.ip(&[
        "neigh",
        "add",
        "198.51.100.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        &lab.a,
    ]);
    lab.ns.ip(&[
        "route",
        "add",
        "203.0.113.0/24",
        "via",
        "198.51.100.2",
        "dev",
        &lab.a,
    ]);
    lab.ns.ip(&[
        "-6",
        "neigh",
        "add",
        "2001:db8:100::2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        &lab.a,
    ]);
    lab.ns.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:203::/64",
        "via",
        "2001:db8:100::2",
        "dev",
        &lab.a,
    ]);
    let lan4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
    let lan6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 5));
    let nowhere4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
    in_netns(&lab.ns, || {
        let gate = attach(&lab.a, 8, XdpMode::Generic, true);
        let forwarding = |on: bool| {
            let v = if on { "1" } else { "0" };
            lab.ns.sysctl("net.ipv4.conf.all.forwarding", v);
            lab.ns
                .sysctl(&format!("net.ipv4.conf.{}.forwarding", lab.a), v);
            lab.ns.sysctl("net.ipv6.conf.all.forwarding", v);
        };
        let for_lan = |dst: IpAddr| {
            let src = if dst.is_ipv4() { peer() } else { peer6() };
            Dgram::to(src, dst, PORT)
        };

        forwarding(true);
        // An address assigned nowhere with no route either: the FIB answers
        // "not forwarded" as for a local one, and the kernel drops it before
        // any socket, so the gate may as well (it used to for every
        // address assigned nowhere).
        expect(
            &gate,
            "IPv4 address with no route",
            &for_lan(nowhere4).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        // With a default route, an address assigned nowhere is routed on.
        lab.ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "198.51.100.2",
            "dev",
            &lab.a,
        ]);
        for (what, dst) in [
            ("IPv4 LAN host", lan4),
            ("IPv6 LAN host", lan6),
            ("IPv4 address by the default route", nowhere4),
        ] {
            let d = for_lan(dst);
            expect(
                &gate,
                &format!("{what}, unknown peer"),
                &d.frame(),
                XDP_PASS,
                "xdp_pass_forward",
            );
            let short = Dgram {
                payload: vec![1; 5],
                ..d.clone()
            };
            expect(
                &gate,
                &format!("{what}, short payload"),
                &short.frame(),
                XDP_PASS,
                "xdp_pass_forward",
            );
            let first = if dst.is_ipv4() {
                Dgram {
                    frag: 0x2000,
                    ..d.clone()
                }
            } else {
                Dgram {
                    ext: vec![Ext::Fragment(0, true)],
                    ..d.clone()
                }
            };
            expect(
                &gate,
                &format!("{what}, first fragment"),
                &first.frame(),
                XDP_PASS,
                "xdp_pass_forward",
            );
            expect(
                &gate,
                &format!("{what}, control datagram"),
                &Dgram {
                    payload: control(1, SESSION),
                    ..d.clone()
                }
                .frame(),
                XDP_PASS,
                "xdp_pass_forward",
            );
            expect(
                &gate,
                &format!("{what}, behind a priority tag"),
                &d.tagged(&[(0x8100, 0)]),
                XDP_PASS,
                "xdp_pass_forward",
            );
        }
        let nine = Dgram {
            ext: vec![Ext::Generic(60, 8); 9],
            ..for_lan(lan6)
        };
        expect(
            &gate,
            "IPv6 LAN host, nine extension headers",
            &nine.frame(),
            XDP_PASS,
            "xdp_pass_forward",
        );
        // This host's own addresses are still gated while it forwards.
        expect(
            &gate,
            "IPv4 this host, forwarding on",
            &Dgram::new(PEER, PORT).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &gate,
            "IPv6 this host, forwarding on",
            &Dgram::v6(peer6(), PORT).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &gate,
            "IPv6 this host, nine headers",
            &Dgram {
                ext: vec![Ext::Generic(60, 8); 9],
                ..Dgram::v6(peer6(), PORT)
            }
            .frame(),
            XDP_DROP,
            "xdp_drop_ext_headers",
        );
        // A new address (a handover) is this host's at once.
        lab.ns.addr_add(&lab.a, "203.0.113.5/32");
        expect(
            &gate,
            "IPv4 address just added here",
            &for_lan(lan4).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        lab.ns.ip(&["addr", "del", "203.0.113.5/32", "dev", &lab.a]);
        expect(
            &gate,
            "IPv4 address just removed",
            &for_lan(lan4).frame(),
            XDP_PASS,
            "xdp_pass_forward",
        );

        // Forwarding off: nothing can be routed through, so it is for us.
        forwarding(false);
        expect(
            &gate,
            "IPv4 LAN host, forwarding off",
            &for_lan(lan4).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &gate,
            "IPv4 no route, forwarding off",
            &for_lan(nowhere4).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &gate,
            "IPv6 LAN host, forwarding off",
            &for_lan(lan6).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
    });
}

/// On a raw-IP device (tun, wwan in raw-ip mode) the frame starts with the
/// IP header; the gate learns that from the link type.
#[test]
fn raw_ip_uplink() {
    require_root();
    let ns = Netns::new("xdpr");
    let tun = if_name("xt");
    ns.ip(&["tuntap", "add", "dev", &tun, "mode", "tun"]);
    ns.ip(&["link", "set", &tun, "up"]);
    ns.addr_add(&tun, &format!("{LOCAL}/24"));
    in_netns(&ns, || {
        let gate = attach(&tun, 16, XdpMode::Auto, true);
        assert_eq!(gate.mode(), "generic", "tun has no native XDP");
        let good = Dgram::new(PEER, PORT);
        expect(
            &gate,
            "unknown peer (raw IP)",
            &good.ip_packet(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        let p19 = Dgram {
            payload: vec![0x50; 19],
            ..good.clone()
        };
        expect(
            &gate,
            "short payload (raw IP)",
            &p19.ip_packet(),
            XDP_DROP,
            "xdp_drop_short",
        );
        let other = Dgram::new(PEER, PORT + 1);
        expect(
            &gate,
            "other port (raw IP)",
            &other.ip_packet(),
            XDP_PASS,
            "xdp_pass_other",
        );
        // The version nibble picks the family on a raw-IP link.
        let good6 = Dgram::v6(peer6(), PORT);
        expect(
            &gate,
            "IPv6 unknown peer (raw IP)",
            &good6.ip_packet(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        // An Ethernet frame on a raw-IP link is not IP: untouched.
        expect(
            &gate,
            "Ethernet frame on a raw link",
            &good.frame(),
            XDP_PASS,
            "xdp_pass_other",
        );
    });
}

// ---------------------------------------------------------------- the map

#[test]
fn full_map_refuses_new_peers_and_never_evicts() {
    let lab = lab("xdpf");
    in_netns(&lab.ns, || {
        let mut gate = attach(&lab.a, 2, XdpMode::Generic, true);
        let peer = |i: u8| SocketAddr::from((Ipv4Addr::new(203, 0, 113, i), 40000 + u16::from(i)));
        gate.allow(peer(1)).expect("first");
        gate.allow(peer(2)).expect("second");
        gate.allow(peer(2))
            .expect("allowing a present peer again is fine when full");
        match gate.allow(peer(3)) {
            Err(XdpError::MapFull {
                peer: p,
                capacity: 2,
            }) => assert_eq!(p, peer(3)),
            other => panic!("third peer in a map of 2: {other:?}"),
        }
        let mut live = gate.peers().expect("peers");
        live.sort();
        assert_eq!(live, vec![peer(1), peer(2)], "a live entry was evicted");
        let c = counters(&gate);
        assert_eq!(c["xdp_map_full"], 1);
        assert_eq!(c["xdp_map_entries"], 2);
        for i in [1, 2] {
            let f = Dgram::to(peer(i), IpAddr::V4(LOCAL), PORT).frame();
            expect(&gate, "live peer of a full map", &f, XDP_PASS, "xdp_pass");
        }
        expect(
            &gate,
            "refused peer",
            &Dgram::to(peer(3), IpAddr::V4(LOCAL), PORT).frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        gate.revoke(peer(1)).expect("revoke");
        gate.allow(peer(3)).expect("room again after a revoke");
        assert_eq!(counters(&gate)["xdp_map_entries"], 2);
    });
}

// ---------------------------------------------------------------- life cycle

#[test]
fn pins_are_per_namespace_and_go_away_on_drop() {
    let one = lab("xdpp1");
    let two = lab("xdpp2");
    // The same interface name in both namespaces: only the netns inode in the
    // pin path keeps the two instances apart.
    two.ns.ip(&["link", "set", &two.a, "down"]);
    two.ns.ip(&["link", "set", &two.a, "name", &one.a]);
    two.ns.ip(&["link", "set", &one.a, "up"]);
    let dev = one.a.clone();

    let (tx_stop, rx_stop) = std::sync::mpsc::channel::<()>();
    let (tx_dir, rx_dir) = std::sync::mpsc::channel::<PathBuf>();
    std::thread::scope(|s| {
        let dev2 = dev.clone();
        let two_ns = &two.ns;
        let h = s.spawn(move || {
            in_netns(two_ns, move || {
                let gate = attach(&dev2, 8, XdpMode::Generic, true);
                tx_dir.send(gate.pin_dir().to_path_buf()).expect("send");
                let _ = rx_stop.recv();
            })
        });
        let dir_two = rx_dir
            .recv_timeout(Duration::from_secs(60))
            .expect("second gate attached");

        in_netns(&one.ns, || {
            // Forced native: veth supports it (auto picks generic on a veth,
            // see xdp.rs; the daemon tests cover that).
            let mut gate = attach(&dev, 8, XdpMode::Native, true);
            assert_eq!(gate.mode(), "native", "veth supports native XDP");
            let dir = gate.pin_dir().to_path_buf();
            assert_eq!(
                dir,
                Path::new(PIN_ROOT).join(format!("{}-{dev}-{PORT}", netns_inode(&one.ns)))
            );
            assert_ne!(dir, dir_two, "two namespaces share a pin directory");
            for name in [PIN_PEERS, PIN_SESSIONS, PIN_CONFIG, PIN_COUNTERS] {
                assert!(
                    dir.join(name).exists(),
                    "{name} is not pinned in {}",
                    dir.display()
                );
                assert!(
                    dir_two.join(name).exists(),
                    "{name} is not pinned in {}",
                    dir_two.display()
                );
            }
            assert!(xdp_attached(&one.ns, &dev));

            // The pinned maps are what bpftool shows: our entries, wire
            // order, one key layout for both families (docs/xdp.md).
            gate.allow(peer()).expect("allow");
            gate.allow(peer6()).expect("allow IPv6");
            gate.allow_session(SESSION).expect("allow session");
            // Shown with --nocapture: the dumps docs/xdp.md quotes.
            for pin in [PIN_PEERS, PIN_SESSIONS] {
                let path = dir.join(pin);
                let out = Command::new("bpftool")
                    .args(["map", "dump", "pinned"])
                    .arg(&path)
                    .output()
                    .expect("run bpftool");
                println!(
                    "# bpftool map dump pinned {}\n{}",
                    path.display(),
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            let mut peers = common::bpf::map_dump(&dir.join(PIN_PEERS));
            peers.sort();
            // 198.51.100.7:51000 = ::ffff:c633:6407, c7 38;
            // [2001:db8:100::7]:51000.
            let v4_key: Vec<u8> = [
                &[0u8; 10][..],
                &[0xff, 0xff, 0xc6, 0x33, 0x64, 0x07, 0xc7, 0x38, 0, 0],
            ]
            .concat();
            let v6_key: Vec<u8> = [
                &[0x20u8, 0x01, 0x0d, 0xb8, 0x01, 0x00][..],
                &[0; 9],
                &[0x07, 0xc7, 0x38, 0, 0],
            ]
            .concat();
            assert_eq!(
                peers,
                vec![(v4_key, vec![1, 0, 0, 0]), (v6_key, vec![1, 0, 0, 0]),],
                "bpftool's view of the peers map"
            );
            assert_eq!(
                common::bpf::map_dump(&dir.join(PIN_SESSIONS)),
                vec![(SESSION.to_vec(), vec![1, 0, 0, 0])],
                "bpftool's view of the sessions map"
            );

            drop(gate);
            assert!(!dir.exists(), "{} left behind after drop", dir.display());
            assert!(
                !xdp_attached(&one.ns, &dev),
                "program still attached after drop"
            );
        });
        // The other instance was not disturbed.
        assert!(
            dir_two.join(PIN_PEERS).exists(),
            "dropping one gate removed the other's pins"
        );
        assert!(xdp_attached(&two.ns, &dev));
        tx_stop.send(()).expect("stop");
        h.join().expect("second gate thread");
    });
}

/// A second gate on an interface that already has one is refused (the kernel
/// allows one XDP program per interface) and leaves the first one's pins.
#[test]
fn second_gate_on_the_same_interface_is_refused() {
    let lab = lab("xdp2");
    in_netns(&lab.ns, || {
        let first = attach(&lab.a, 8, XdpMode::Generic, true);
        match XdpGate::attach(&lab.a, PORT, 8, XdpMode::Generic, true) {
            Err(XdpError::Attach { .. }) => {}
            other => panic!("second attach: {other:?}"),
        }
        assert!(
            first.pin_dir().join(PIN_PEERS).exists(),
            "the refused gate removed live pins"
        );
        assert_eq!(run(&first, &Dgram::new(PEER, PORT).frame()), XDP_DROP);
        // Auto would fall back to TC here; a forced XDP mode is refused.
    });
}

const CHILD_ENV: &str = "UET_XDP_KILL9_CHILD";

/// Not a test of its own: the process `restart_after_kill_9` (and its TC
/// twin) starts and kills. Attaches a gate (XDP generic, or TC) in the
/// namespace named by the environment, allows PEER,
/// then waits to be killed (and exits by itself after a minute, so it never
/// outlives a parent that died).
#[test]
#[ignore = "helper process for restart_after_kill_9"]
fn kill9_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(',');
    let (Some(ns_path), Some(dev)) = (parts.next(), parts.next()) else {
        panic!("{CHILD_ENV}: NETNS,DEV[,tc]");
    };
    let mode = if parts.next() == Some("tc") {
        XdpMode::Tc
    } else {
        XdpMode::Generic
    };
    let f = fs::File::open(ns_path).expect("open netns");
    // SAFETY: a valid netns fd; affects only this thread.
    let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    let mut gate = attach(dev, 8, mode, true);
    gate.allow(peer()).expect("allow");
    println!("READY {}", gate.pin_dir().display());
    std::thread::sleep(Duration::from_secs(60));
}

/// Kills (only) its child on drop, if it still runs.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn restart_after_kill_9() {
    let lab = lab("xdpk");
    let dir = Path::new(PIN_ROOT).join(format!("{}-{}-{PORT}", netns_inode(&lab.ns), lab.a));
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(exe)
        .args([
            "--exact",
            "kill9_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{},{}", lab.ns.path().display(), lab.a))
        .stdout(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut child = ChildGuard(child);
    wait_until(
        Duration::from_secs(60),
        "the child's gate to pin its maps",
        || dir.join(PIN_PEERS).exists() && xdp_attached(&lab.ns, &lab.a),
    );

    // SIGKILL to the child's own PID (Child::kill), nothing else.
    child.0.kill().expect("kill -9 child");
    child.0.wait().expect("reap child");
    assert!(
        !xdp_attached(&lab.ns, &lab.a),
        "the program outlived its process: attach is not link-based"
    );
    assert!(
        dir.join(PIN_PEERS).exists(),
        "expected stale pins after kill -9 (the scenario under test)"
    );

    in_netns(&lab.ns, || {
        let mut gate = attach(&lab.a, 8, XdpMode::Generic, true);
        assert_eq!(gate.pin_dir(), dir);
        assert_eq!(
            gate.peers().expect("peers"),
            vec![],
            "the stale map's entries came back"
        );
        assert_eq!(
            run(&gate, &Dgram::new(PEER, PORT).frame()),
            XDP_DROP,
            "stale entry still lets the peer in"
        );
        // The pinned map is the new one: an entry made now shows through it.
        // Another peer than the dead run's, so the stale map (which holds
        // PEER) cannot pass for the new one: the pin shows the new entry
        // (bpftool reads the pin, not the gate's handle), and the program
        // attached now lets that peer in.
        let fresh = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 8), 51001);
        gate.allow(fresh.into()).expect("allow a peer in the restarted gate");
        let dump = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(dir.join(PIN_PEERS))
            .output()
            .expect("run bpftool");
        assert!(dump.status.success(), "bpftool: {}", String::from_utf8_lossy(&dump.stderr));
        // bpftool wraps a 20-byte key over two lines: join the tokens.
        let text = String::from_utf8_lossy(&dump.stdout).to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ");
        // 198.51.100.8:51001 = c6 33 64 08 c7 39
        assert!(
            text.contains("c6 33 64 08 c7 39 00 00") && !text.contains("c6 33 64 07 c7 38"),
            "the pinned peers map is not the restarted gate's (want only 198.51.100.8:51001):\n{text}"
        );
        assert_eq!(
            run(&gate, &Dgram::new(fresh, PORT).frame()),
            XDP_PASS,
            "the entry made now does not reach the attached program"
        );
        drop(gate);
        assert!(!dir.exists(), "pins left after a clean stop");
    });
}

// ---------------------------------------------------------------- cost

/// Not a test: a measurement (no timing assertions belong in tests). The
/// kernel's own average time per run of the attached program
/// (BPF_PROG_TEST_RUN with `repeat`), for the frames of the hot path, with
/// forwarding off and on (on: the FIB lookup does a full route lookup
/// instead of stopping at the interface's forwarding flag). Run with
/// `cargo test -p udp-encap-tun --test xdp_prog -- --ignored --nocapture
/// measure_program_cost`.
#[test]
#[ignore = "a measurement, run by hand"]
fn measure_program_cost() {
    const REPEAT: u32 = 1_000_000;
    let lab = lab("xdpcost");
    in_netns(&lab.ns, || {
        for mode in [XdpMode::Generic, XdpMode::Tc] {
            let mut gate = attach(&lab.a, 1024, mode, true);
            gate.allow(peer()).unwrap();
            gate.allow(peer6()).unwrap();
            let known4 = Dgram {
                payload: tcp_segment(5, 1380),
                ..Dgram::new(PEER, PORT)
            };
            let known6 = Dgram {
                payload: tcp_segment(5, 1360),
                ..Dgram::v6(peer6(), PORT)
            };
            let unknown4 = Dgram::new(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 9), 1), PORT);
            let other = Dgram::new(PEER, PORT + 1);
            let cases: [(&str, Vec<u8>); 5] = [
                ("IPv4 known peer, 1400 B", known4.frame()),
                (
                    "IPv4 known peer behind a priority tag",
                    known4.tagged(&[(0x8100, 0)]),
                ),
                ("IPv6 known peer, 1400 B", known6.frame()),
                ("IPv4 unknown peer (drop)", unknown4.frame()),
                ("IPv4 other port (untouched)", other.frame()),
            ];
            for forwarding in ["0", "1"] {
                lab.ns.sysctl("net.ipv4.conf.all.forwarding", forwarding);
                lab.ns.sysctl("net.ipv6.conf.all.forwarding", forwarding);
                for (what, frame) in &cases {
                    // Best of three: other load on the machine only adds.
                    let best = (0..3)
                        .map(|_| gate.test_run_repeat(frame, REPEAT).expect("test run").1)
                        .min()
                        .unwrap();
                    println!(
                        "cost {:7} forwarding {forwarding}: {:>5} ns/run  {what}",
                        gate.mode(),
                        best.as_nanos()
                    );
                }
            }
        }
    });
}

/// `bpftool map show pinned PATH`: the map's id.
fn pinned_map_id(path: &Path) -> u32 {
    let out = common::run_cmd(
        Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(path),
    );
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no map id in `{out}`"))
}

/// The id of the `udp_encap_tc` program that uses map `map_id` (bpftool
/// fails when there is no program of that name at all).
fn tc_prog_using(map_id: u32) -> Option<u32> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "name", "udp_encap_tc"])
        .output()
        .expect("run bpftool");
    let out = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = out.split_whitespace().collect();
    let mut id = None;
    for w in words.windows(2) {
        if w[1] == "sched_cls" {
            id = w[0].trim_end_matches(':').parse().ok();
        }
        if w[0] == "map_ids" && w[1].split(',').any(|m| m.parse() == Ok(map_id)) {
            return id;
        }
    }
    None
}

/// kill -9 of a TC-mode gate. With TCX (Linux 6.6+) the classifier goes with
/// the process, like XDP. Before 6.6 it is a netlink classifier and stays:
/// the next start (here in XDP mode, which does not touch TC) finds the
/// stale pins and zeroes their config, so the leftover classifier now passes
/// everything (its config map, read by id, is all zero); a later start in TC
/// mode replaces it at the same priority and handle: one classifier, the new
/// one.
#[test]
fn restart_after_kill_9_tc() {
    let lab = lab("xdpkt");
    let dir = Path::new(PIN_ROOT).join(format!("{}-{}-{PORT}", netns_inode(&lab.ns), lab.a));
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(exe)
        .args([
            "--exact",
            "kill9_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{},{},tc", lab.ns.path().display(), lab.a),
        )
        .stdout(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut child = ChildGuard(child);
    wait_until(
        Duration::from_secs(60),
        "the child's classifier to pin its maps",
        || dir.join(PIN_CONFIG).exists() && dir.join(PIN_COUNTERS).exists(),
    );
    let config_id = pinned_map_id(&dir.join(PIN_CONFIG));
    let stale = tc_prog_using(config_id).expect("the child's classifier is loaded");
    assert!(
        tc_attached(&lab.ns, &lab.a, stale),
        "the child's classifier is not attached"
    );

    // SIGKILL to the child's own PID (Child::kill), nothing else.
    child.0.kill().expect("kill -9 child");
    child.0.wait().expect("reap child");
    let netlink = tc_attached(&lab.ns, &lab.a, stale);
    let filters = || {
        lab.ns
            .run(&["tc", "filter", "show", "dev", &lab.a, "ingress"])
    };
    if !netlink {
        // TCX: gone with its process, like the XDP link.
        wait_until(
            Duration::from_secs(10),
            "the killed classifier to be freed",
            || tc_prog_using(config_id).is_none(),
        );
    }

    in_netns(&lab.ns, || {
        let xdp = attach(&lab.a, 8, XdpMode::Generic, true);
        assert_eq!(xdp.peers().unwrap(), vec![], "stale entries came back");
        if netlink {
            // The leftover classifier still runs, on its own (now unpinned)
            // config: zeroed, so it passes everything.
            let dump = common::run_cmd(Command::new("bpftool").args([
                "map",
                "dump",
                "id",
                &config_id.to_string(),
            ]));
            assert!(
                dump.contains("value: 00 00 00 00"),
                "the stale classifier's config was not disarmed:\n{dump}"
            );
        }
        drop(xdp);

        let tc = attach(&lab.a, 8, XdpMode::Tc, true);
        let id = tc.program_id().expect("program id");
        assert!(
            tc_attached(&lab.ns, &lab.a, id),
            "the new classifier is not attached"
        );
        assert!(
            !tc_attached(&lab.ns, &lab.a, stale),
            "the stale classifier {stale} is still attached beside {id}:\n{}",
            filters()
        );
        assert_eq!(
            // One line per classifier: "... handle 0x9c40 udp_encap_tc
            // direct-action not_in_hw id N name udp_encap_tc ...".
            filters()
                .lines()
                .filter(|l| l.contains("udp_encap_tc"))
                .count(),
            usize::from(netlink),
            "classifiers at ingress:\n{}",
            filters()
        );
        assert_eq!(
            run(&tc, &Dgram::new(PEER, PORT).frame()),
            XDP_DROP,
            "stale entry still lets the peer in"
        );
        drop(tc);
        assert!(
            !tc_attached(&lab.ns, &lab.a, id),
            "classifier left after a clean stop"
        );
        assert!(!dir.exists(), "pins left after a clean stop");
    });
}

/// `bpftool link show`. It exits 255 when a link goes away while it walks
/// them (other tests' links come and go): retried until one walk completes.
fn bpftool_links() -> String {
    for _ in 0..20 {
        let out = Command::new("bpftool")
            .args(["link", "show"])
            .output()
            .expect("run bpftool");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("bpftool link show kept failing");
}

/// Hostile input, the kernel's way: thousands of frames mutated from valid
/// ones (bytes flipped, cut short, grown, tags and extension headers put
/// in), each run through the XDP program and the TC classifier. Every one
/// gets a verdict (pass or drop) and moves exactly one verdict counter, a
/// drop counter exactly when it is dropped. (The verifier has already
/// proved the program cannot read out of bounds; this checks its logic
/// keeps the one-verdict-one-counter promise on inputs nobody wrote down.)
#[test]
fn mutated_frames_each_get_one_verdict_and_one_counter() {
    const FRAMES: u32 = 1500;
    let lab = lab("xdpmut");
    // xorshift64*: deterministic, so a failure names a reproducible frame.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let seeds: Vec<Vec<u8>> = vec![
        Dgram::new(PEER, PORT).frame(),
        Dgram {
            payload: control(1, SESSION),
            ..Dgram::new(PEER, PORT)
        }
        .frame(),
        Dgram {
            ihl: 28,
            frag: 0x2000,
            ..Dgram::new(PEER, PORT)
        }
        .tagged(&[(0x8100, 0)]),
        Dgram::v6(peer6(), PORT).frame(),
        Dgram {
            ext: vec![
                Ext::Generic(0, 8),
                Ext::Fragment(0, true),
                Ext::Generic(60, 16),
            ],
            ..Dgram::v6(peer6(), PORT)
        }
        .tagged(&[(0x88a8, 0), (0x8100, 0)]),
        Dgram {
            payload: control(4, SESSION),
            ext: vec![Ext::Auth(12)],
            ..Dgram::v6(peer6(), PORT)
        }
        .frame(),
    ];
    in_netns(&lab.ns, || {
        for mode in [XdpMode::Generic, XdpMode::Tc] {
            let mut gate = attach(&lab.a, 64, mode, true);
            gate.allow(peer()).unwrap();
            gate.allow_session(SESSION).unwrap();
            for i in 0..FRAMES {
                let mut f = seeds[(next() % seeds.len() as u64) as usize].clone();
                for _ in 0..(1 + next() % 4) {
                    let at = (next() % f.len() as u64) as usize;
                    match next() % 6 {
                        0 => f.truncate(at.max(15)),
                        1 => f.extend((0..next() % 64).map(|_| next() as u8)),
                        2 => f[at] = next() as u8,
                        3 => f[at] ^= 1 << (next() % 8),
                        // Lengths and ports are where the checks are.
                        4 => {
                            let field = [16usize, 18, 36, 38, 58, 60][(next() % 6) as usize];
                            if field + 2 <= f.len() {
                                f[field..field + 2].copy_from_slice(&(next() as u16).to_be_bytes());
                            }
                        }
                        _ => f.insert(at, next() as u8),
                    }
                }
                // The TC test run refuses frames with nothing past Ethernet.
                if gate.mode() == "tc" && f.len() <= 14 {
                    continue;
                }
                let before = counters(&gate);
                let verdict = match gate.test_run(&f) {
                    Ok(v) => v,
                    // The skb test run refuses some malformed IPv6 frames
                    // outright (EINVAL): the kernel would not hand them to TC.
                    Err(_) if gate.mode() == "tc" => continue,
                    Err(e) => panic!("frame {i} ({}): {e:?}\n{f:02x?}", gate.mode()),
                };
                let after = counters(&gate);
                let moved: Vec<(&str, u64)> = after
                    .iter()
                    .filter(|(k, _)| k.starts_with("xdp_pass") || k.starts_with("xdp_drop"))
                    .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
                    .filter(|(_, d)| *d != 0)
                    .collect();
                assert!(
                    verdict == XDP_PASS || verdict == XDP_DROP,
                    "frame {i} ({}): verdict {verdict}\n{f:02x?}",
                    gate.mode()
                );
                assert!(
                    moved.len() == 1 && moved[0].1 == 1,
                    "frame {i} ({}): counters moved {moved:?}\n{f:02x?}",
                    gate.mode()
                );
                let reason = moved[0].0;
                assert_eq!(
                    verdict == XDP_DROP,
                    reason.starts_with("xdp_drop"),
                    "frame {i} ({}): verdict {verdict} counted as {reason}\n{f:02x?}",
                    gate.mode()
                );
            }
        }
    });
}
