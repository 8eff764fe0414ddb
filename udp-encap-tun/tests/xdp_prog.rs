//! The XDP gate's program, run on crafted frames (BPF_PROG_TEST_RUN through
//! aya's `TestRun`), plus the loader's life cycle: map full, pins per
//! namespace, clean drop, and a restart after kill -9.
//!
//! Every test builds its own namespace with a veth (or tun) in it and
//! attaches the real gate there from a thread that joined the namespace, the
//! way the daemon runs under `nsenter --net`. Needs root: fails (never
//! passes silently) without it.

// Test fixtures are built here, not received from a network.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Netns, if_name, in_netns, require_root, wait_until};
use udp_encap_tun::cli::XdpMode;
use udp_encap_tun::edge::xdp::{PIN_CONFIG, PIN_COUNTERS, PIN_PEERS, PIN_ROOT, XdpError, XdpGate};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const PORT: u16 = 40000;
const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 51000);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

// ---------------------------------------------------------------- frames

/// A datagram to craft; `frame()` renders it, then fields are broken on
/// purpose by the tests.
#[derive(Clone)]
struct Dgram {
    src: SocketAddrV4,
    dport: u16,
    /// IPv4 header length in bytes (20..=60, multiple of 4).
    ihl: usize,
    /// The UDP payload (a TCP segment when well formed).
    payload: Vec<u8>,
    /// Flags+fragment offset field.
    frag: u16,
    proto: u8,
}

impl Dgram {
    fn new(src: SocketAddrV4, dport: u16) -> Dgram {
        Dgram {
            src,
            dport,
            ihl: 20,
            payload: tcp_segment(5, 0),
            frag: 0x4000,
            proto: 17,
        }
    }

    /// IPv4 header + UDP header + payload, lengths consistent.
    fn ip_packet(&self) -> Vec<u8> {
        let udp_len = 8 + self.payload.len();
        let tot_len = self.ihl + udp_len;
        let mut p = Vec::with_capacity(tot_len);
        p.push(0x40 | (self.ihl / 4) as u8);
        p.push(0);
        p.extend_from_slice(&(tot_len as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34]); // id
        p.extend_from_slice(&self.frag.to_be_bytes());
        p.push(64);
        p.push(self.proto);
        p.extend_from_slice(&[0, 0]); // checksum: the gate does not look
        p.extend_from_slice(&self.src.ip().octets());
        p.extend_from_slice(&LOCAL.octets());
        // Options: NOPs up to the header length.
        p.resize(self.ihl, 1);
        p.extend_from_slice(&self.src.port().to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        p.extend_from_slice(&(udp_len as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.payload);
        p
    }

    /// Ethernet + IPv4 packet.
    fn frame(&self) -> Vec<u8> {
        eth(0x0800, &self.ip_packet())
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

/// Offsets in an Ethernet frame with a 20-byte IPv4 header.
const IP_TOT_LEN: usize = 14 + 2;
const UDP_LEN: usize = 14 + 20 + 4;

fn set_u16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

// ---------------------------------------------------------------- helpers

/// A namespace with one veth pair (`a` is where the gate goes).
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
    ns.ip(&["link", "set", &a, "up"]);
    ns.ip(&["link", "set", &b, "up"]);
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
    let got = run(gate, frame);
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
    assert_eq!(
        got,
        verdict,
        "{what}: got {} ({got}), want {}",
        name(got),
        name(verdict)
    );
    for (k, v) in &after {
        let delta = v - before.get(k).copied().unwrap_or(0);
        if *k == reason {
            assert_eq!(delta, 1, "{what}: counter {k} moved by {delta}, want 1");
        } else if k.starts_with("xdp_pass") || k.starts_with("xdp_drop") {
            assert_eq!(
                delta, 0,
                "{what}: counter {k} moved by {delta}, want 0 (reason {reason})"
            );
        }
    }
    assert!(after.contains_key(reason), "no counter named {reason}");
}

fn netns_inode(ns: &Netns) -> u64 {
    fs::metadata(ns.path()).expect("stat netns").ino()
}

fn xdp_attached(ns: &Netns, dev: &str) -> bool {
    ns.ip(&["-o", "link", "show", "dev", dev]).contains("xdp")
}

// ---------------------------------------------------------------- verdicts

#[test]
fn verdicts_on_crafted_frames() {
    let lab = lab("xdpv");
    in_netns(&lab.ns, || {
        let mut gate = attach(&lab.a, 1024, XdpMode::Generic, false);
        let good = Dgram::new(PEER, PORT);

        // Not for the listen port: passes untouched.
        let mut arp = eth(0x0806, &[0u8; 28]);
        expect(&gate, "ARP", &arp, XDP_PASS, "xdp_pass_other");
        arp.truncate(14);
        expect(
            &gate,
            "bare Ethernet header",
            &arp,
            XDP_PASS,
            "xdp_pass_other",
        );
        let tcp = Dgram {
            proto: 6,
            ..good.clone()
        };
        expect(&gate, "IPv4 TCP", &tcp.frame(), XDP_PASS, "xdp_pass_other");
        let other_port = Dgram::new(PEER, PORT + 1);
        expect(
            &gate,
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
            &gate,
            "short UDP to another port",
            &short_other.frame(),
            XDP_PASS,
            "xdp_pass_other",
        );
        let mut vlan = vec![
            0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x81, 0x00, 0x00, 0x05, 0x08, 0x00,
        ];
        vlan.extend_from_slice(&good.ip_packet());
        expect(
            &gate,
            "VLAN-tagged listen-port datagram",
            &vlan,
            XDP_PASS,
            "xdp_pass_other",
        );
        let mut v6 = good.frame();
        v6[14] = 0x60;
        expect(
            &gate,
            "IPv6 version nibble",
            &v6,
            XDP_PASS,
            "xdp_pass_other",
        );
        let mut bad_ihl = good.frame();
        bad_ihl[14] = 0x44;
        expect(&gate, "IHL below 5", &bad_ihl, XDP_PASS, "xdp_pass_other");
        let mut cut = good.frame();
        cut.truncate(14 + 20 + 3);
        expect(
            &gate,
            "frame ends inside the UDP header",
            &cut,
            XDP_PASS,
            "xdp_pass_other",
        );

        // Well formed: passes.
        expect(
            &gate,
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
            &gate,
            "IPv4 options (IHL 6)",
            &opts.frame(),
            XDP_PASS,
            "xdp_pass",
        );
        let max_opts = Dgram {
            ihl: 60,
            ..good.clone()
        };
        expect(&gate, "IHL 15", &max_opts.frame(), XDP_PASS, "xdp_pass");
        let doff15 = Dgram {
            payload: tcp_segment(15, 40),
            ..good.clone()
        };
        expect(
            &gate,
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
            &gate,
            "segment with data",
            &data.frame(),
            XDP_PASS,
            "xdp_pass",
        );
        let mut padded = good.frame();
        padded.extend_from_slice(&[0u8; 6]);
        expect(
            &gate,
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
            &gate,
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
            &gate,
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
            &gate,
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
            &gate,
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
            &gate,
            "data offset past the payload",
            &doff_past.frame(),
            XDP_DROP,
            "xdp_drop_tcp_offset",
        );

        let mut udp_long = good.frame();
        set_u16(&mut udp_long, UDP_LEN, 8 + 21);
        expect(
            &gate,
            "UDP length above IPv4 length",
            &udp_long,
            XDP_DROP,
            "xdp_drop_length",
        );
        let mut udp_short = good.frame();
        set_u16(&mut udp_short, UDP_LEN, 8 + 19);
        expect(
            &gate,
            "UDP length below IPv4 length",
            &udp_short,
            XDP_DROP,
            "xdp_drop_length",
        );
        let mut udp_tiny = good.frame();
        set_u16(&mut udp_tiny, UDP_LEN, 4);
        expect(
            &gate,
            "UDP length below 8",
            &udp_tiny,
            XDP_DROP,
            "xdp_drop_length",
        );
        let mut truncated = good.frame();
        truncated.truncate(truncated.len() - 1);
        expect(
            &gate,
            "frame shorter than the IPv4 length",
            &truncated,
            XDP_DROP,
            "xdp_drop_length",
        );
        let mut tot_small = good.frame();
        set_u16(&mut tot_small, IP_TOT_LEN, 20 + 4);
        expect(
            &gate,
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
            &gate,
            "first fragment (MF)",
            &first.frame(),
            XDP_DROP,
            "xdp_drop_fragment",
        );
        let mut later = good.clone();
        later.frag = 0x0003; // offset 24 bytes, no UDP header in it
        expect(
            &gate,
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
            &gate,
            "first fragment to another port",
            &last_other.frame(),
            XDP_PASS,
            "xdp_pass_other",
        );

        // Enforcement, switched on at run time.
        gate.set_enforce(true).expect("enforce on");
        expect(
            &gate,
            "unknown peer",
            &good.frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &gate,
            "malformed from unknown peer",
            &p19.frame(),
            XDP_DROP,
            "xdp_drop_short",
        );
        expect(
            &gate,
            "other port, enforcement on",
            &other_port.frame(),
            XDP_PASS,
            "xdp_pass_other",
        );
        gate.allow(PEER).expect("allow");
        assert!(gate.contains(PEER).expect("lookup"));
        expect(&gate, "known peer", &good.frame(), XDP_PASS, "xdp_pass");
        let same_addr_other_port = Dgram::new(SocketAddrV4::new(*PEER.ip(), PEER.port() + 1), PORT);
        expect(
            &gate,
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
            &gate,
            "known port, unknown address",
            &same_port_other_addr.frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        expect(
            &gate,
            "malformed from known peer",
            &doff4.frame(),
            XDP_DROP,
            "xdp_drop_tcp_offset",
        );
        gate.revoke(PEER).expect("revoke");
        assert!(!gate.contains(PEER).expect("lookup"));
        expect(
            &gate,
            "revoked peer",
            &good.frame(),
            XDP_DROP,
            "xdp_drop_unknown_peer",
        );
        gate.revoke(PEER).expect("revoking an absent peer is fine");
        gate.set_enforce(false).expect("enforce off");
        expect(
            &gate,
            "enforcement off again",
            &good.frame(),
            XDP_PASS,
            "xdp_pass",
        );
    });
}

/// On a raw-IP device (tun, wwan in raw-ip mode) the frame starts with the
/// IPv4 header; the gate learns that from the link type.
#[test]
fn raw_ip_uplink() {
    require_root();
    let ns = Netns::new("xdpr");
    let tun = if_name("xt");
    ns.ip(&["tuntap", "add", "dev", &tun, "mode", "tun"]);
    ns.ip(&["link", "set", &tun, "up"]);
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
        // An Ethernet frame on a raw-IP link is not IPv4: untouched.
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
        let peer = |i: u8| SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, i), 40000 + u16::from(i));
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
            let f = Dgram::new(peer(i), PORT).frame();
            expect(&gate, "live peer of a full map", &f, XDP_PASS, "xdp_pass");
        }
        expect(
            &gate,
            "refused peer",
            &Dgram::new(peer(3), PORT).frame(),
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
            for name in [PIN_PEERS, PIN_CONFIG, PIN_COUNTERS] {
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

            // The pinned map is what bpftool shows: our entry, wire order.
            gate.allow(PEER).expect("allow");
            let dump = Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(dir.join(PIN_PEERS))
                .output()
                .expect("run bpftool");
            let text = String::from_utf8_lossy(&dump.stdout).to_lowercase();
            assert!(
                dump.status.success(),
                "bpftool: {}",
                String::from_utf8_lossy(&dump.stderr)
            );
            // 198.51.100.7:51000 = c6 33 64 07 c7 38
            assert!(
                text.contains("c6 33 64 07 c7 38 00 00"),
                "bpftool dump lacks the peer key:\n{text}"
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
    });
}

const CHILD_ENV: &str = "UET_XDP_KILL9_CHILD";

/// Not a test of its own: the process `restart_after_kill_9` starts and kills.
/// Attaches a gate in the namespace named by the environment, allows PEER,
/// then waits to be killed (and exits by itself after a minute, so it never
/// outlives a parent that died).
#[test]
#[ignore = "helper process for restart_after_kill_9"]
fn kill9_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (ns_path, dev) = spec.split_once(',').expect("NETNS,DEV");
    let f = fs::File::open(ns_path).expect("open netns");
    // SAFETY: a valid netns fd; affects only this thread.
    let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    let mut gate = attach(dev, 8, XdpMode::Generic, true);
    gate.allow(PEER).expect("allow");
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
        gate.allow(fresh).expect("allow a peer in the restarted gate");
        let dump = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(dir.join(PIN_PEERS))
            .output()
            .expect("run bpftool");
        assert!(dump.status.success(), "bpftool: {}", String::from_utf8_lossy(&dump.stderr));
        let text = String::from_utf8_lossy(&dump.stdout).to_lowercase();
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
