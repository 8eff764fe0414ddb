//! Issue 11: IPv6 uplinks (SPEC decision 12), in namespaces with IPv6 on
//! and addresses from 2001:db8::/32 (`nodad`).
//!
//! - An IPv6-only client reaches a dual-stack server (`--endpoint-v6`):
//!   16 MiB each way hashed at the far end, `tcpdump` on the server's uplink
//!   sees no IPv4 and no TCP but the authentication, the server's entry
//!   names the client's IPv6 address, a datagram from an unknown IPv6
//!   source goes nowhere.
//! - An IPv6-only client reaches an IPv4-only server through a real NAT64
//!   (Debian's `tayga`) with `--nat64-prefix`.
//! - IPv4 and IPv6 clients at once, each with its own generated address.
//! - The MSS clamp per family, seen on the server's TUN.
//!
//! Every daemon runs with its XDP gate on (`--xdp-mode auto`): the map of
//! allowed peers holds the IPv6 clients (read back with bpftool), and the
//! gate drops an unknown IPv6 source before the daemon sees it.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::creds::CredDir;
use common::*;

const MIB: u64 = 1024 * 1024;
const S4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const S6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const C4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);

/// A TUN in `ns` without IPv6 of its own (no link-local, no MLD reports
/// into the tunnel).
fn tun(ns: &Netns, cidr: &str, mtu: u32) {
    add_tun(ns, cidr, mtu);
    ns.sysctl("net.ipv6.conf.tun0.disable_ipv6", "1");
}

/// A client TUN 198.19.0.2/32 with the server's IPv4 address routed into it.
fn client_tun(ns: &Netns, server: Ipv4Addr, mtu: u32) {
    tun(ns, CLIENT_TUN_CIDR, mtu);
    ns.ip(&["route", "add", &format!("{server}/32"), "dev", "tun0", "src", &CLIENT_TUN.to_string()]);
}

fn server(ns: &Netns, uplink: &str, creds: &CredDir, port: u16, label: &str, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = extra.iter().map(ToString::to_string).collect();
    args.extend(creds.server_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::spawn(ns, label, &daemon_args("tun0", uplink, port, None, &args))
}

fn client(ns: &Netns, uplink: &str, cred: &Path, port: u16, label: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--credential", cred.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::spawn(ns, label, &daemon_args("tun0", uplink, port, Some(port), &args))
}

/// Counter deltas between two statuses.
fn delta(a: &Status, b: &Status, k: &str) -> u64 {
    b.counter(k) - a.counter(k)
}

/// GSO and GRO at work on a socket: more datagrams than system calls, each
/// way. `what` names the side.
fn assert_batched(what: &str, a: &Status, b: &Status) {
    let (tx, sends) = (delta(a, b, "udp_tx_packets"), delta(a, b, "udp_send_calls"));
    let (rx, recvs) = (delta(a, b, "udp_rx_packets"), delta(a, b, "udp_recv_calls"));
    eprintln!("{what}: {tx} datagrams in {sends} sendmsg, {rx} datagrams in {recvs} recvmsg");
    assert!(tx > 5_000 && rx > 5_000, "{what}: too few datagrams ({tx} sent, {rx} received)\n{}", b.raw);
    assert!(tx as f64 / sends.max(1) as f64 > 1.5, "{what}: no GSO: {tx} datagrams in {sends} sendmsg\n{}", b.raw);
    assert!(rx as f64 / recvs.max(1) as f64 > 1.5, "{what}: no GRO: {rx} datagrams in {recvs} recvmsg\n{}", b.raw);
    assert_eq!(b.counter("udp_gso_refused"), 0, "{what}: GSO trains refused\n{}", b.raw);
    assert_eq!(b.counter("discard_io_error"), 0, "{what}:\n{}", b.raw);
}

/// The `xdp MODE pins PATH` line's path.
fn pin_dir(st: &Status) -> PathBuf {
    st.raw
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 4 && w[0] == "xdp" && w[2] == "pins").then(|| PathBuf::from(w[3]))
        })
        .unwrap_or_else(|| panic!("no `xdp MODE pins PATH` line:\n{}", st.raw))
}

/// The peers in the pinned XDP map (`bpftool map dump`, common/bpf.rs).
fn xdp_peers(st: &Status) -> Vec<SocketAddr> {
    common::bpf::map_peers(&pin_dir(st)).into_iter().collect()
}

/// A 20-byte TCP header, data offset 5, ACK: the shape of a tunnel segment.
fn segment_shaped() -> [u8; 20] {
    [0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]
}

/// `n` segment-shaped datagrams from `src` to `dst`, sent from `ns`.
fn send_from(ns: &Netns, src: SocketAddr, dst: SocketAddr, n: usize) {
    in_netns(ns, || {
        let s = UdpSocket::bind(src).unwrap_or_else(|e| panic!("bind {src}: {e}"));
        for _ in 0..n {
            s.send_to(&segment_shaped(), dst).unwrap();
        }
    });
}

// ------------------------------------------------------------ two hosts

/// A dual-stack server (192.0.2.1 and 2001:db8:1::1 on one uplink) and a
/// client whose uplink has only IPv6 (2001:db8:1::2), over one veth.
struct TwoHosts {
    s: Netns,
    c: Netns,
    s_if: String,
    c_if: String,
    creds: CredDir,
    _art: ArtifactDir,
}

impl TwoHosts {
    fn new(tag: &str) -> TwoHosts {
        let s = Netns::with_ipv6(&format!("{tag}-s"));
        let c = Netns::with_ipv6(&format!("{tag}-c"));
        let (s_if, c_if) = (if_name("us"), if_name("uc"));
        veth(&s, &s_if, &c, &c_if);
        s.addr_add(&s_if, &format!("{S4}/24"));
        s.addr_add6(&s_if, &format!("{S6}/64"));
        c.addr_add6(&c_if, &format!("{C6}/64"));
        tun(&s, SERVER_TUN_CIDR, TUN_MTU);
        client_tun(&c, S4, TUN_MTU);
        let art = ArtifactDir::new(&format!("{tag}-creds"));
        let creds = CredDir::new(&art, "server");
        TwoHosts { s, c, s_if, c_if, creds, _art: art }
    }
}

/// A client whose uplink has only IPv6 reaches a dual-stack server by
/// `--endpoint-v6 192.0.2.1=2001:db8:1::1`: 16 MiB each way hashed at the
/// far end; on the server's uplink no IPv4 at all, and no TCP but the
/// authentication (over IPv6); the server's entry names the client's IPv6
/// address, and the application sees the generated address; GSO and GRO
/// batch on both dual-stack sockets; a datagram from an unknown IPv6 source
/// is dropped by XDP before the daemon sees it (`xdp_drop_unknown_peer`);
/// the XDP map holds the client's IPv6 address.
#[test]
fn ipv6_only_client_reaches_dual_stack_server() {
    const PORT: u16 = 43610;
    const APP: u16 = 5611;
    let lab = TwoHosts::new("v6only");
    let alice = lab.creds.client("alice");
    let srv = server(&lab.s, &lab.s_if, &lab.creds, PORT, "v6only-server", &[]);
    let endpoint = format!("{S4}={S6}");
    let cli = client(&lab.c, &lab.c_if, &alice, PORT, "v6only-client", &["--endpoint-v6", endpoint.as_str()]);
    let mut cap = Capture::start(&lab.s, &lab.s_if);

    let app = AppServer::start(&lab.s, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    // A first small transfer brings the session up; the big one is measured.
    assert_transfer_ok(&transfer_from(&lab.c, SocketAddrV4::new(S4, APP), Transfer::new(1, 4096, 4096)), &app.next(Duration::from_secs(30)));
    let (s0, c0) = (srv.status(), cli.status());
    let r = transfer_from(&lab.c, SocketAddrV4::new(S4, APP), Transfer::new(2, 16 * MIB, 16 * MIB));
    let conn = app.next(Duration::from_secs(120));
    assert_transfer_ok(&r, &conn);
    let (s1, c1) = (srv.status(), cli.status());

    // The entry names the client's IPv6 address; the app sees its generated one.
    let peer = SocketAddr::from((C6, PORT));
    assert_eq!(s1.peers.len(), 1, "one entry:\n{}", s1.raw);
    assert_eq!(s1.peers[0].0, peer, "the entry is keyed by the client's IPv6 address:\n{}", s1.raw);
    assert!(s1.raw.contains(&format!("peer [{C6}]:{PORT} ")), "status shows [addr]:port:\n{}", s1.raw);
    assert_eq!(conn.peer.ip(), IpAddr::V4(s1.peers[0].1), "the app saw another address than the generated one");
    assert_eq!(s1.line_value::<String>("families").as_deref(), Some("ipv4+ipv6"), "{}", s1.raw);
    assert!(
        c1.raw.contains(&format!("lease {S4} ")) && c1.raw.contains(&format!("path [{S6}]:{PORT} ")),
        "the client's lease goes to the server's IPv6 address:\n{}",
        c1.raw
    );
    // Full-size segments on both dual-stack sockets, batched both ways.
    assert_batched("server", &s0, &s1);
    assert_batched("client", &c0, &c1);

    assert_eq!(xdp_peers(&s1), vec![peer], "the XDP map holds the client's IPv6 address");

    // An IPv6 source the server never authenticated.
    let stranger: Ipv6Addr = "2001:db8:1::99".parse().unwrap();
    lab.c.addr_add6(&lab.c_if, &format!("{stranger}/64"));
    let before = srv.status();
    send_from(&lab.c, SocketAddr::from((stranger, PORT + 1)), SocketAddr::from((S6, PORT)), 50);
    let st = srv.wait_status(Duration::from_secs(5), "XDP drops the stranger", |st| {
        delta(&before, st, "xdp_drop_unknown_peer") >= 50
    });
    assert_eq!(delta(&before, &st, "discard_unauthenticated"), 0, "it reached the daemon:\n{}", st.raw);
    assert_eq!(delta(&before, &st, "udp_rx_packets"), 0, "it reached the daemon:\n{}", st.raw);
    let st = srv.status();
    assert_eq!(st.peers.len(), 1, "the stranger got an entry:\n{}", st.raw);

    // The wire: only IPv6; TCP only for the authentication.
    let ipv4 = cap.count("ip");
    let udp6 = cap.count(&format!("ip6 and udp port {PORT}"));
    let auth6 = cap.count(&format!("ip6 and tcp port {PORT}"));
    let other_tcp = cap.count(&format!("tcp and not port {PORT}"));
    eprintln!("server uplink: {udp6} UDP/IPv6 packets, {auth6} TCP/IPv6 (authentication), {ipv4} IPv4, {other_tcp} other TCP");
    assert_eq!(ipv4, 0, "IPv4 on the uplink:\n{}", cap.dump("ip", 10));
    assert_eq!(other_tcp, 0, "TCP outside the tunnel:\n{}", cap.dump(&format!("tcp and not port {PORT}"), 10));
    assert!(auth6 > 0, "the authentication did not cross IPv6");
    assert!(udp6 > 1_000, "only {udp6} UDP/IPv6 packets for 32 MiB");
}

// ------------------------------------------------------------ NAT64

/// `tayga -d` in a namespace, ended by its pid on drop.
struct Tayga {
    child: Option<Child>,
    log: PathBuf,
}

impl Tayga {
    /// The TESTING.md recipe: a `nat64` TUN with 198.18.3.1, the prefix
    /// 2001:db8:64::/96, a dynamic pool 198.18.3.0/24, routes for both into
    /// the TUN and forwarding on for both families.
    fn start(ns: &Netns, art: &ArtifactDir) -> Tayga {
        let data = art.file("tayga-data");
        std::fs::create_dir_all(&data).unwrap();
        let conf = art.file("tayga.conf");
        std::fs::write(
            &conf,
            format!(
                "tun-device nat64\nipv4-addr 198.18.3.1\nprefix 2001:db8:64::/96\n\
                 dynamic-pool 198.18.3.0/24\ndata-dir {}\n",
                data.display()
            ),
        )
        .unwrap();
        let conf = conf.to_str().unwrap().to_string();
        ns.run(&["tayga", "-c", &conf, "--mktun"]);
        ns.ip(&["link", "set", "nat64", "up"]);
        ns.ip(&["route", "add", "198.18.3.0/24", "dev", "nat64"]);
        ns.ip(&["route", "add", "2001:db8:64::/96", "dev", "nat64"]);
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1");
        let log = art.file("tayga.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = ns
            .cmd("tayga")
            .args(["-c", &conf, "-d"])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn tayga (apt install tayga)");
        Tayga { child: Some(child), log }
    }
}

impl Drop for Tayga {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                thread::sleep(Duration::from_millis(20));
            }
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: as above.
                unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
                let _ = c.wait();
            }
        }
        if thread::panicking() {
            eprintln!("---- tayga log ----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// A client on an IPv6-only uplink (2001:db8:2::2, default route to the
/// router) reaches an IPv4-only server (203.0.113.1, IPv6 off in its
/// namespace) through a real NAT64, Debian's `tayga` in the router, with
/// `--nat64-prefix 2001:db8:64::/96`: the datagrams and the authentication
/// go to 2001:db8:64::cb00:7101 (RFC 6052), the server sees the client at
/// its pool address 198.18.3.x, and 8 MiB each way arrive intact.
#[test]
fn ipv6_only_client_reaches_ipv4_only_server_through_nat64() {
    const PORT: u16 = 43620;
    const APP: u16 = 5621;
    let server4 = Ipv4Addr::new(203, 0, 113, 1);
    let s = Netns::new("nat64-s");
    let r = Netns::with_ipv6("nat64-r");
    let c = Netns::with_ipv6("nat64-c");
    let (s_if, wan, lan, c_if) = (if_name("us"), if_name("rw"), if_name("rl"), if_name("uc"));
    veth(&s, &s_if, &r, &wan);
    veth(&r, &lan, &c, &c_if);
    s.addr_add(&s_if, &format!("{server4}/24"));
    s.ip(&["route", "add", "198.18.3.0/24", "via", "203.0.113.254"]);
    r.addr_add(&wan, "203.0.113.254/24");
    r.addr_add6(&lan, "2001:db8:2::1/64");
    c.addr_add6(&c_if, "2001:db8:2::2/64");
    c.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
    let art = ArtifactDir::new("nat64");
    let _tayga = Tayga::start(&r, &art);
    tun(&s, SERVER_TUN_CIDR, TUN_MTU);
    client_tun(&c, server4, TUN_MTU);
    let creds = CredDir::new(&art, "server");
    let alice = creds.client("alice");

    let srv = server(&s, &s_if, &creds, PORT, "nat64-server", &[]);
    let cli = client(&c, &c_if, &alice, PORT, "nat64-client", &["--nat64-prefix", "2001:db8:64::/96"]);
    let mut cap = Capture::start(&c, &c_if);

    let app = AppServer::start(&s, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let res = transfer_from(&c, SocketAddrV4::new(server4, APP), Transfer::new(1, 8 * MIB, 8 * MIB));
    let conn = app.next(Duration::from_secs(120));
    assert_transfer_ok(&res, &conn);

    let st = srv.status();
    assert_eq!(st.peers.len(), 1, "one entry:\n{}", st.raw);
    let (peer, generated) = st.peers[0];
    match peer {
        SocketAddr::V4(p) => {
            assert_eq!(&p.ip().octets()[..3], &[198, 18, 3], "not from tayga's pool: {p}\n{}", st.raw);
            assert_eq!(p.port(), PORT, "tayga keeps ports\n{}", st.raw);
        }
        SocketAddr::V6(_) => panic!("an IPv4-only server saw an IPv6 peer:\n{}", st.raw),
    }
    assert_eq!(conn.peer.ip(), IpAddr::V4(generated));
    let cs = cli.status();
    let path = format!("path [2001:db8:64::cb00:7101]:{PORT} ");
    assert!(cs.raw.contains(&path), "the client's path is the server's address in the prefix:\n{}", cs.raw);
    assert_eq!(cs.line_value::<String>("families").as_deref(), Some("ipv6"), "{}", cs.raw);
    let ipv4 = cap.count("ip");
    let udp6 = cap.count(&format!("ip6 and udp and dst host 2001:db8:64::cb00:7101 and dst port {PORT}"));
    assert_eq!(ipv4, 0, "IPv4 on the client's IPv6-only uplink:\n{}", cap.dump("ip", 10));
    assert!(udp6 > 100, "only {udp6} datagrams to the NAT64 address");
}

// ------------------------------------------------------------ one LAN, both families

/// A server on a dual-stack LAN (a bridge in its own namespace), a client
/// with IPv4 only (192.0.2.2, IPv6 off) and one with IPv6 only
/// (2001:db8:1::2), each with its own credential; every TUN at `mtu`.
struct MixedLan {
    s: Netns,
    c4: Netns,
    c6: Netns,
    _sw: Netns,
    s_if: String,
    c4_if: String,
    c6_if: String,
    creds: CredDir,
    _art: ArtifactDir,
}

impl MixedLan {
    fn new(tag: &str, mtu: u32) -> MixedLan {
        let sw = Netns::new(&format!("{tag}-sw"));
        sw.ip(&["link", "add", "br0", "type", "bridge"]);
        sw.ip(&["link", "set", "br0", "up"]);
        let s = Netns::with_ipv6(&format!("{tag}-s"));
        let c4 = Netns::new(&format!("{tag}-c4"));
        let c6 = Netns::with_ipv6(&format!("{tag}-c6"));
        let mut ifs = Vec::new();
        for ns in [&s, &c4, &c6] {
            let (host_if, port_if) = (if_name("ue"), if_name("bp"));
            veth(ns, &host_if, &sw, &port_if);
            sw.ip(&["link", "set", &port_if, "master", "br0"]);
            ifs.push(host_if);
        }
        let [s_if, c4_if, c6_if] = <[String; 3]>::try_from(ifs).unwrap();
        s.addr_add(&s_if, &format!("{S4}/24"));
        s.addr_add6(&s_if, &format!("{S6}/64"));
        c4.addr_add(&c4_if, &format!("{C4}/24"));
        c6.addr_add6(&c6_if, &format!("{C6}/64"));
        tun(&s, SERVER_TUN_CIDR, mtu);
        client_tun(&c4, S4, mtu);
        client_tun(&c6, S4, mtu);
        let art = ArtifactDir::new(&format!("{tag}-creds"));
        let creds = CredDir::new(&art, "server");
        MixedLan { s, c4, c6, _sw: sw, s_if, c4_if, c6_if, creds, _art: art }
    }

    fn daemons(&self, tag: &str, port: u16) -> (Daemon, Daemon, Daemon) {
        let srv = server(&self.s, &self.s_if, &self.creds, port, &format!("{tag}-server"), &[]);
        let alice = self.creds.client("alice");
        let bob = self.creds.client("bob");
        let c4 = client(&self.c4, &self.c4_if, &alice, port, &format!("{tag}-c4"), &[]);
        let endpoint = format!("{S4}={S6}");
        let c6 = client(&self.c6, &self.c6_if, &bob, port, &format!("{tag}-c6"), &["--endpoint-v6", endpoint.as_str()]);
        (srv, c4, c6)
    }
}

/// One server serves an IPv4 and an IPv6 client at once: two entries, one
/// keyed by 192.0.2.2:PORT and one by [2001:db8:1::2]:PORT, with two
/// different generated addresses, and 8 MiB each way on both connections
/// at the same time arrive intact, each from its own generated address; the
/// XDP map holds both peers.
#[test]
fn ipv4_and_ipv6_clients_served_at_once() {
    const PORT: u16 = 43630;
    const APP: u16 = 5631;
    let lan = MixedLan::new("mixed", TUN_MTU);
    let (srv, _c4, _c6) = lan.daemons("mixed", PORT);
    let app = AppServer::start(&lan.s, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(S4, APP);
    let t4 = spawn_transfer(&lan.c4, dest, Transfer::new(4, 8 * MIB, 8 * MIB));
    let t6 = spawn_transfer(&lan.c6, dest, Transfer::new(6, 8 * MIB, 8 * MIB));
    let conns = app.collect(2, Duration::from_secs(120));
    let r4 = t4.join().unwrap().expect("IPv4 client's transfer");
    let r6 = t6.join().unwrap().expect("IPv6 client's transfer");
    assert_transfer_ok(&r4, &conns[&4]);
    assert_transfer_ok(&r6, &conns[&6]);

    let st = srv.status();
    assert_eq!(st.peers.len(), 2, "two entries:\n{}", st.raw);
    let g4 = st.generated_for(SocketAddrV4::new(C4, PORT)).unwrap_or_else(|| panic!("no entry for {C4}:\n{}", st.raw));
    let g6 = st.generated_for(SocketAddr::from((C6, PORT))).unwrap_or_else(|| panic!("no entry for {C6}:\n{}", st.raw));
    assert_ne!(g4, g6, "one generated address for two clients:\n{}", st.raw);
    assert_eq!(conns[&4].peer.ip(), IpAddr::V4(g4), "IPv4 client's connection");
    assert_eq!(conns[&6].peer.ip(), IpAddr::V4(g6), "IPv6 client's connection");
    assert!(st.raw.contains(&format!("peer {C4}:{PORT} {g4} ")), "{}", st.raw);
    assert!(st.raw.contains(&format!("peer [{C6}]:{PORT} {g6} ")), "{}", st.raw);
    let mut want = vec![SocketAddr::from((C4, PORT)), SocketAddr::from((C6, PORT))];
    want.sort();
    assert_eq!(xdp_peers(&st), want, "the XDP map holds both clients");
}

/// The MSS options of the SYNs from `from` to `to` in tcpdump's lines
/// (`IP 198.18.0.2.40000 > 198.18.0.1.5641: Flags [S], ..., options [mss 1432,...]`).
fn mss_of(syns: &str, from: Ipv4Addr, to: Ipv4Addr) -> Vec<u16> {
    let host = |a: &str| a.trim_end_matches(':').rsplit_once('.').map(|(h, _)| h.to_string());
    syns.lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let at = w.iter().position(|x| *x == "IP");
            at.is_some_and(|i| {
                w.get(i + 1).and_then(|a| host(a)) == Some(from.to_string())
                    && w.get(i + 3).and_then(|a| host(a)) == Some(to.to_string())
            })
        })
        .filter_map(|l| l.split("mss ").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// The MSS clamp per family, on the wire: every TUN at 1492 on 1500-byte
/// links, so an IPv4 path carries MSS 1452 (1500 - 48) and an IPv6 one 1432
/// (1500 - 68). The kernels announce 1452 (TUN 1492 - 40) everywhere; what
/// arrives through the IPv6 path, the IPv6 client's SYN on the server's TUN
/// and the server's SYN-ACK on that client's TUN, carries 1432, clamped by
/// the sending daemon (`mss_clamped` +1 on the IPv6 client and +1 on the
/// server); through the IPv4 path both carry 1452, untouched. Full-size
/// segments then cross both paths: 4 MiB each way intact, no GSO train
/// refused, no send error.
#[test]
fn mss_clamp_follows_the_path_family() {
    const PORT: u16 = 43640;
    const APP: u16 = 5641;
    let lan = MixedLan::new("mss6", 1492);
    let (srv, c4, c6) = lan.daemons("mss6", PORT);
    let st = srv.status();
    assert_eq!(st.line_value::<u16>("max_mss"), Some(1452), "{}", st.raw);
    assert_eq!(st.max_mss_ipv6(), Some(1432), "{}", st.raw);
    let mut caps = [Capture::start(&lan.s, "tun0"), Capture::start(&lan.c4, "tun0"), Capture::start(&lan.c6, "tun0")];
    let app = AppServer::start(&lan.s, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(S4, APP);
    let (s0, c40, c60) = (srv.status(), c4.status(), c6.status());
    for (ns, id) in [(&lan.c4, 4), (&lan.c6, 6)] {
        let r = transfer_from(ns, dest, Transfer::new(id, 4 * MIB, 4 * MIB));
        assert_transfer_ok(&r, &app.next(Duration::from_secs(60)));
    }
    let (s1, c41, c61) = (srv.status(), c4.status(), c6.status());
    let g4 = s1.generated_for(SocketAddrV4::new(C4, PORT)).unwrap();
    let g6 = s1.generated_for(SocketAddr::from((C6, PORT))).unwrap();
    let [on_s, on_c4, on_c6] = caps.each_mut().map(|c| c.dump("tcp[tcpflags] & tcp-syn != 0", 100));
    eprintln!("SYNs on the server's TUN:\n{on_s}\non the IPv4 client's:\n{on_c4}\non the IPv6 client's:\n{on_c6}");
    // Through the IPv6 path: clamped by the sender's daemon.
    assert_eq!(mss_of(&on_c6, CLIENT_TUN, S4), vec![1452], "the IPv6 client's kernel announces the TUN's MSS");
    assert_eq!(mss_of(&on_s, g6, SERVER_TUN), vec![1432], "the IPv6 client's SYN as it arrives");
    assert_eq!(mss_of(&on_s, SERVER_TUN, g6), vec![1452], "the server's kernel announces the TUN's MSS");
    assert_eq!(mss_of(&on_c6, S4, CLIENT_TUN), vec![1432], "the server's SYN-ACK as it reaches the IPv6 client");
    // Through the IPv4 path: the TUN's MSS fits, nothing is clamped.
    assert_eq!(mss_of(&on_s, g4, SERVER_TUN), vec![1452], "the IPv4 client's SYN");
    assert_eq!(mss_of(&on_c4, S4, CLIENT_TUN), vec![1452], "the server's SYN-ACK to the IPv4 client");
    assert_eq!(delta(&c60, &c61, "mss_clamped"), 1, "the IPv6 client clamps its SYN\n{}", c61.raw);
    assert_eq!(delta(&c40, &c41, "mss_clamped"), 0, "the IPv4 client has nothing to clamp\n{}", c41.raw);
    assert_eq!(delta(&s0, &s1, "mss_clamped"), 1, "the server clamps its SYN-ACK to the IPv6 client only\n{}", s1.raw);
    for (what, st) in [("server", &s1), ("IPv4 client", &c41), ("IPv6 client", &c61)] {
        assert_eq!(st.counter("udp_gso_refused"), 0, "{what}: a train did not fit\n{}", st.raw);
        assert_eq!(st.counter("discard_io_error"), 0, "{what}: a datagram did not fit\n{}", st.raw);
    }
}
