//! Issue 15: sessions that survive mobile networks (SPEC decision 11).
//!
//! Each test builds real hosts in namespaces (a NAT router with nftables and
//! conntrack where the scenario needs one), runs the real daemon binary as a
//! server and a client with real TLS credentials, and strikes while a TCP
//! transfer through the tunnel is under way: the client reads its download at
//! a steady rate through a small receive buffer, so the bytes move for
//! seconds and the fault lands in the middle. The same TCP connection must
//! finish with every byte intact (SHA-256 at the far end), and the server
//! must end with one entry for the client, at its current mapping, holding
//! the generated address it had before.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::creds::CredDir;
use common::paced::{assert_download_ok, paced_download};
use common::*;

const MIB: u64 = 1024 * 1024;
/// The router's WAN address (the server sees NATed clients from it).
const WAN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

/// A server behind nothing, a client behind a NAT router (masquerade, the
/// usual home or carrier NAT), credentials for both.
struct NatLab {
    topo: Topology,
    creds: CredDir,
    _art: ArtifactDir,
    port: u16,
}

impl NatLab {
    fn new(tag: &str, port: u16) -> NatLab {
        let topo = Topology::nat_two_clients(tag);
        topo.server.add_server_tun();
        topo.client(0).add_client_tun(topo.server.addr);
        let art = ArtifactDir::new(&format!("{tag}-creds"));
        let creds = CredDir::new(&art, "server");
        NatLab { topo, creds, _art: art, port }
    }

    fn s(&self) -> &Host {
        &self.topo.server
    }

    fn c(&self) -> &Host {
        self.topo.client(0)
    }

    fn r(&self) -> &Router {
        self.topo.router.as_ref().unwrap()
    }

    fn server(&self, label: &str, extra: &[&str]) -> Daemon {
        server_on(self.s(), &self.creds, self.port, label, extra)
    }

    fn client(&self, label: &str, credential: &Path, extra: &[&str]) -> Daemon {
        client_on(self.c(), self.port, label, credential, extra)
    }

    fn dest(&self, app: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.s().addr, app)
    }

    /// Replaces the router's NAT rules (the `post` chain of `uet_nat`).
    fn nat(&self, rules: &[String]) {
        let mut set = String::from("flush chain ip uet_nat post\n");
        for r in rules {
            set.push_str(&format!("add rule ip uet_nat post {r}\n"));
        }
        self.r().ns.nft(&set);
    }

    /// The NAT forgets its mappings and hands out new public ports from
    /// 50000-50999 (TESTING.md: what a carrier NAT does after a timeout or a
    /// handover).
    fn rebind(&self) {
        self.nat(&[format!("oifname \"{}\" ip protocol {{ tcp, udp }} snat to {WAN}:50000-50999", self.r().wan)]);
        self.r().ns.run(&["conntrack", "-F"]);
    }
}

fn server_on(host: &Host, creds: &CredDir, port: u16, label: &str, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = extra.iter().map(ToString::to_string).collect();
    args.extend(creds.server_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::spawn(&host.ns, label, &daemon_args("tun0", &host.uplink, port, None, &args))
}

fn client_on(host: &Host, port: u16, label: &str, credential: &Path, extra: &[&str]) -> Daemon {
    let cred = credential.to_str().unwrap();
    let mut args = vec!["--credential", cred];
    args.extend_from_slice(extra);
    Daemon::spawn(&host.ns, label, &daemon_args("tun0", &host.uplink, port, Some(port), &args))
}

/// Waits until the server has sent `bytes` more through the tunnel than
/// `from`: the download is under way.
fn wait_moving(server: &Daemon, from: u64, bytes: u64) {
    server.wait_status(Duration::from_secs(20), "the download to be under way", |st| {
        st.counter("udp_tx_bytes") >= from + bytes
    });
}

/// The peers in the server's pinned XDP map, as bpftool shows them.
fn xdp_peers(server: &Daemon) -> std::collections::BTreeSet<std::net::SocketAddr> {
    let st = server.status();
    let pins = st
        .raw
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 4 && w[0] == "xdp" && w[2] == "pins").then(|| std::path::PathBuf::from(w[3]))
        })
        .unwrap_or_else(|| panic!("no `xdp MODE pins PATH` line:\n{}", st.raw));
    common::bpf::map_peers(&pins)
}

/// The server's one entry: (peer, generated address).
fn one_entry(server: &Daemon) -> (SocketAddrV4, Ipv4Addr) {
    let st = server.status();
    assert_eq!(st.peers.len(), 1, "the server should hold exactly one entry:\n{}", st.raw);
    match st.peers[0] {
        (std::net::SocketAddr::V4(peer), addr) => (peer, addr),
        (peer, _) => panic!("an IPv6 peer {peer} in an IPv4 test:\n{}", st.raw),
    }
}

/// A download of `total` bytes read at 64 KiB every `gap`, from the client
/// namespace, started; with the server's counters before it.
struct Download {
    h: thread::JoinHandle<std::io::Result<common::paced::PacedResult>>,
    id: u64,
    total: u64,
}

fn start_download(lab_client: &Netns, dest: SocketAddrV4, id: u64, total: u64, gap: Duration) -> Download {
    let h = paced_download(lab_client, dest, id, total, 64 * 1024, gap, Duration::from_secs(60));
    Download { h, id, total }
}

impl Download {
    fn finish(self, app: &AppServer, what: &str) {
        let r = self.h.join().unwrap().unwrap_or_else(|e| panic!("{what}: the download failed: {e}"));
        let conn = app.next(Duration::from_secs(60));
        assert_download_ok(&r, &conn, self.total, self.id);
    }
}

// ---------------------------------------------------------------- 1. NAT rebinding

/// The client's NAT loses its state mid-download and maps the client to new
/// public ports. The client, only receiving, hears nothing for a keepalive
/// interval, sends a keepalive from the new mapping; the server challenges
/// that path, the client answers, and the session moves there with its
/// generated address. The download finishes intact on the same connection.
#[test]
fn nat_rebinding_mid_download_moves_the_session() {
    const PORT: u16 = 43000;
    const APP: u16 = 5701;
    let lab = NatLab::new("srebind", PORT);
    let alice = lab.creds.client("alice");
    let server = lab.server("srebind-server", &[]);
    let client = lab.client("srebind-client", &alice, &["--keepalive", "2s"]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    // 12 MiB at 64 KiB every 40 ms: about 8 s of download.
    let dl = start_download(&lab.c().ns, lab.dest(APP), 1, 12 * MIB, Duration::from_millis(40));
    wait_moving(&server, 0, 2 * MIB);
    let (before, addr) = one_entry(&server);
    assert_eq!(*before.ip(), WAN);
    lab.rebind();
    let t = Instant::now();
    dl.finish(&app, "through a NAT rebinding");
    eprintln!("download finished {:?} after the rebinding", t.elapsed());

    let (after, addr2) = one_entry(&server);
    assert_eq!(addr2, addr, "the generated address changed");
    assert_eq!(*after.ip(), WAN);
    assert!((50000..=50999).contains(&after.port()), "the entry is not at the new mapping: {after}");
    assert_eq!(xdp_peers(&server), [after.into()].into(), "the XDP map should hold the new mapping only");
    let st = server.status();
    assert!(st.counter("migrations") >= 1, "{}", st.raw);
    assert_eq!(st.counter("entries_created"), 1, "one session all along:\n{}", st.raw);
    assert_eq!(st.counter("auth_granted"), 1, "no new authentication was needed:\n{}", st.raw);
    assert!(server.log_text().contains(&format!("moved from {before} to {after}")), "{}", server.log_tail(20));
    let cs = client.status();
    assert!(cs.counter("keepalives_answered") >= 1, "{}", cs.raw);
}

// ---------------------------------------------------------------- 2. address change

/// The client's uplink address changes mid-download (handover, DHCP
/// renumbering): a socket bound to the device sends from the new address,
/// and the session follows it.
#[test]
fn address_change_mid_download_moves_the_session() {
    const PORT: u16 = 43100;
    const APP: u16 = 5711;
    let topo = Topology::two_hosts("saddr");
    let (s, c) = (&topo.server, topo.client(0));
    s.add_server_tun();
    c.add_client_tun(s.addr);
    let art = ArtifactDir::new("saddr-creds");
    let creds = CredDir::new(&art, "server");
    let alice = creds.client("alice");
    let server = server_on(s, &creds, PORT, "saddr-server", &[]);
    let client = client_on(c, PORT, "saddr-client", &alice, &["--keepalive", "2s"]);
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    let dl = start_download(&c.ns, SocketAddrV4::new(s.addr, APP), 2, 12 * MIB, Duration::from_millis(40));
    wait_moving(&server, 0, 2 * MIB);
    let (before, addr) = one_entry(&server);
    assert_eq!(before, SocketAddrV4::new(c.addr, PORT));
    // The new address first, then the old one goes (keep the new one when
    // the primary is deleted).
    c.ns.sysctl(&format!("net.ipv4.conf.{}.promote_secondaries", c.uplink), "1");
    c.ns.addr_add(&c.uplink, "192.0.2.3/24");
    c.ns.ip(&["addr", "del", "192.0.2.2/24", "dev", &c.uplink]);
    dl.finish(&app, "through an address change");

    let (after, addr2) = one_entry(&server);
    assert_eq!(after, SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), PORT));
    assert_eq!(addr2, addr, "the generated address changed");
    assert_eq!(xdp_peers(&server), [after.into()].into(), "the XDP map should hold the new address only");
    assert!(server.counter("migrations") >= 1);
    let _ = client;
}

// ---------------------------------------------------------------- 3. TCP and UDP apart

/// A NAT that maps the client's TCP (authentication) and UDP (datagrams)
/// from the same port to different public ports: the server learns the UDP
/// mapping from the UDP proof, the client gets through at once, and new
/// connections and client restarts leave exactly one entry (no leak).
#[test]
fn a_nat_that_maps_tcp_and_udp_apart() {
    const PORT: u16 = 43200;
    const APP: u16 = 5721;
    let lab = NatLab::new("ssplit", PORT);
    let wan = lab.r().wan.clone();
    lab.nat(&[
        format!("oifname \"{wan}\" ip protocol tcp snat to {WAN}:41000-41999"),
        format!("oifname \"{wan}\" ip protocol udp snat to {WAN}:52000-52999"),
    ]);
    let alice = lab.creds.client("alice");
    let server = lab.server("ssplit-server", &[]);
    let mut client = lab.client("ssplit-client", &alice, &[]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    let fresh = ArtifactDir::new("ssplit-fresh-state");
    for round in 0..3u64 {
        if round == 2 {
            // A client that lost its state starts a session of its own
            // from the same socket: the abandoned one goes.
            client.kill9();
            let dir = fresh.path().to_str().unwrap().to_string();
            client = lab.client("ssplit-client2", &alice, &["--state-dir", &dir]);
        }
        let r = transfer_from(&lab.c().ns, lab.dest(APP), Transfer::new(30 + round, MIB, MIB));
        assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
        let (peer, _) = one_entry(&server);
        assert!((52000..=52999).contains(&peer.port()), "round {round}: the entry is not at the UDP mapping: {peer}");
    }
    let st = server.status();
    assert_eq!(st.counter("auth_granted"), 2, "the first client and the one without its state:\n{}", st.raw);
    assert_eq!(st.counter("xdp_drop_unknown_peer"), 0, "{}", st.raw);
    let log = server.log_text();
    assert!(
        log.lines().any(|l| l.contains("authenticated") && l.contains(&format!("{WAN}:41"))),
        "the authentication came from the TCP mapping:\n{}",
        server.log_tail(30)
    );
}

// ---------------------------------------------------------------- 4. server restart

/// The server is killed mid-download and started again a second later: it
/// resumes the session from its state directory with the same generated
/// address and refills its XDP map before it reads a datagram; the
/// download finishes on the same connection.
#[test]
fn server_restart_mid_download_resumes_the_session() {
    const PORT: u16 = 43300;
    const APP: u16 = 5731;
    let lab = NatLab::new("ssrv", PORT);
    let alice = lab.creds.client("alice");
    let mut server = lab.server("ssrv-server1", &[]);
    let client = lab.client("ssrv-client", &alice, &["--keepalive", "2s"]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    let dl = start_download(&lab.c().ns, lab.dest(APP), 4, 12 * MIB, Duration::from_millis(40));
    wait_moving(&server, 0, 2 * MIB);
    let (peer, addr) = one_entry(&server);
    server.kill9();
    thread::sleep(Duration::from_secs(1));
    let server = lab.server("ssrv-server2", &[]);
    assert_eq!(one_entry(&server), (peer, addr), "the restarted server resumed another entry");
    assert_eq!(xdp_peers(&server), [peer.into()].into(), "the XDP map was not refilled before traffic");
    assert_eq!(server.counter("sessions_resumed"), 1);
    dl.finish(&app, "through a server restart");
    assert_eq!(one_entry(&server), (peer, addr));
    let st = server.status();
    assert_eq!(st.counter("auth_granted"), 0, "the client did not need to authenticate again:\n{}", st.raw);
    assert!(server.log_text().contains("resumed 1 saved session(s)"), "{}", server.log_tail(20));
    let _ = client;
}

// ---------------------------------------------------------------- 5. client restart

/// The client daemon is killed mid-download and restarted: it resumes its
/// session from its state directory, lets the server's datagrams through
/// its gate at once and proves its path without waiting for the
/// application; the download finishes on the same connection.
#[test]
fn client_restart_mid_download_resumes_the_session() {
    const PORT: u16 = 43400;
    const APP: u16 = 5741;
    let lab = NatLab::new("scli", PORT);
    let alice = lab.creds.client("alice");
    let server = lab.server("scli-server", &[]);
    let mut client = lab.client("scli-client1", &alice, &["--keepalive", "2s"]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    let dl = start_download(&lab.c().ns, lab.dest(APP), 5, 12 * MIB, Duration::from_millis(40));
    wait_moving(&server, 0, 2 * MIB);
    let (peer, addr) = one_entry(&server);
    client.kill9();
    thread::sleep(Duration::from_millis(500));
    let client = lab.client("scli-client2", &alice, &["--keepalive", "2s"]);
    assert_eq!(client.counter("sessions_resumed"), 1);
    dl.finish(&app, "through a client restart");
    assert_eq!(one_entry(&server), (peer, addr));
    assert_eq!(server.counter("auth_granted"), 1, "one authentication all along");
    assert_eq!(client.counter("auth_granted"), 0, "the restarted client resumed without TLS");
}

// ---------------------------------------------------------------- 6. idle NAT timeout

/// A connection stays idle for 25 s behind a NAT whose UDP mappings time
/// out after 10 s. With `--keepalive 4s` the mapping stays open, and the
/// server's push after the idle period arrives within 3 s.
#[test]
fn idle_connection_behind_a_short_nat_timeout_gets_the_servers_push() {
    const PORT: u16 = 43500;
    const APP: u16 = 5751;
    let lab = NatLab::new("sidle", PORT);
    lab.r().ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "10");
    lab.r().ns.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", "10");
    let alice = lab.creds.client("alice");
    let server = lab.server("sidle-server", &[]);
    let client = lab.client("sidle-client", &alice, &["--keepalive", "4s"]);

    // The server application: accept, say hello, wait to be told, push.
    let listener = in_netns(&lab.s().ns, move || TcpListener::bind(("0.0.0.0", APP))).unwrap();
    let (push_tx, push_rx) = mpsc::channel::<()>();
    let srv = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"hello").unwrap();
        push_rx.recv().unwrap();
        s.write_all(b"push!").unwrap();
        s
    });
    let dest = lab.dest(APP);
    let (got_tx, got_rx) = mpsc::channel::<Vec<u8>>();
    let cli = spawn_in_netns(&lab.c().ns, move || {
        let mut s = TcpStream::connect_timeout(&dest.into(), Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        got_tx.send(b.to_vec()).unwrap();
        s.read_exact(&mut b).unwrap();
        got_tx.send(b.to_vec()).unwrap();
    });
    assert_eq!(got_rx.recv_timeout(Duration::from_secs(15)).unwrap(), b"hello");
    // Idle, far past the NAT's UDP timeout.
    thread::sleep(Duration::from_secs(25));
    push_tx.send(()).unwrap();
    let got = got_rx.recv_timeout(Duration::from_secs(3));
    assert_eq!(
        got.as_deref(),
        Ok(&b"push!"[..]),
        "the server's push did not arrive within 3 s after 25 s idle\nclient:\n{}\nserver:\n{}",
        client.log_tail(20),
        server.log_tail(20)
    );
    cli.join().unwrap();
    drop(srv.join().unwrap());
    let cs = client.status();
    assert!(cs.counter("keepalives_sent") >= 5, "25 s at 4 s keepalives:\n{}", cs.raw);
    assert!(cs.counter("keepalives_answered") >= 5, "{}", cs.raw);
    let (peer, _) = one_entry(&server);
    assert_eq!(*peer.ip(), WAN);
}

// ---------------------------------------------------------------- 7. an attacker on the path

/// What the attacker did.
#[derive(Debug, Default)]
struct Attack {
    seen: u64,
    copies: u64,
    forged: u64,
    replays: u64,
}

/// An attacker in the router who sees the client's datagrams (an AF_PACKET
/// socket on the client's side of the router) and sends each control
/// datagram again from its own (address, port): a copy at once, a forgery
/// (one bit of the counter flipped), and every copy again 2 s later.
fn attacker(r: &Router, server: SocketAddrV4, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> thread::JoinHandle<Attack> {
    let lan = r.lans[0].clone();
    spawn_in_netns(&r.ns, move || {
        use std::os::fd::AsRawFd;
        let fd = packet_socket(&lan);
        let out = std::net::UdpSocket::bind(("0.0.0.0", 6666)).unwrap();
        let mut a = Attack::default();
        let mut kept: Vec<Vec<u8>> = Vec::new();
        let mut last_replay = Instant::now();
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: a valid fd and a buffer of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                let f = &buf[..n as usize];
                // Ethernet, IPv4 UDP to the server's listen port, 48 bytes with
                // the control marker where a segment has its data offset.
                if f.len() >= 14 + 20 + 8 + 48 && f[12..14] == [0x08, 0x00] && f[23] == 17 {
                    let ihl = usize::from(f[14] & 0x0f) * 4;
                    let u = 14 + ihl;
                    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
                    let dport = u16::from_be_bytes([f[u + 2], f[u + 3]]);
                    let len = usize::from(u16::from_be_bytes([f[u + 4], f[u + 5]]));
                    if dst == *server.ip() && dport == server.port() && len == 56 && f.len() >= u + 56 && f[u + 8 + 12] == 0 {
                        let payload = f[u + 8..u + 56].to_vec();
                        a.seen += 1;
                        out.send_to(&payload, server).unwrap();
                        a.copies += 1;
                        let mut forged = payload.clone();
                        forged[23] ^= 1;
                        out.send_to(&forged, server).unwrap();
                        a.forged += 1;
                        kept.push(payload);
                    }
                }
            }
            if last_replay.elapsed() >= Duration::from_secs(2) {
                for p in &kept {
                    out.send_to(p, server).unwrap();
                    a.replays += 1;
                }
                last_replay = Instant::now();
            }
        }
        a
    })
}

/// An attacker who sees the client's datagrams sends copies, replays and
/// forgeries from its own (address, port), and for two seconds the router
/// drops the client's own keepalives so that the attacker's copy is the
/// first the server sees. Nothing moves: replays and forgeries are refused
/// (counted), the fresh copy only earns a challenge the attacker cannot
/// answer, and the session stays on the client's path with its address; the
/// download finishes intact.
#[test]
fn copies_replays_and_forgeries_from_elsewhere_move_nothing() {
    const PORT: u16 = 43600;
    const APP: u16 = 5761;
    let lab = NatLab::new("sattack", PORT);
    let alice = lab.creds.client("alice");
    // A 6 s lease: the client proves its session every 2 s while it works,
    // so there are keepalives to copy during the download.
    let server = lab.server("sattack-server", &["--entry-timeout", "6s"]);
    let client = lab.client("sattack-client", &alice, &[]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    let dl = start_download(&lab.c().ns, lab.dest(APP), 7, 12 * MIB, Duration::from_millis(40));
    wait_moving(&server, 0, MIB);
    let (home, addr) = one_entry(&server);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let att = attacker(lab.r(), SocketAddrV4::new(lab.s().addr, PORT), stop.clone());
    // Let copies and replays flow, then make the copy win the race once.
    let st = server.wait_status(Duration::from_secs(15), "the attacker's copies to be refused", |st| {
        st.counter("discard_control") >= 4
    });
    // Copies that arrive after their originals are replays: refused
    // without a challenge (the one so far is the binding's).
    assert_eq!(st.counter("challenges"), 1, "a copy was taken for fresh:\n{}", st.raw);
    let lan = &lab.r().lans[0];
    lab.r().ns.nft(&format!(
        "table ip uet_attack {{\n chain drop_keepalives {{\n  type filter hook forward priority 0;\n  \
         iifname \"{lan}\" udp dport {PORT} udp length 56 @th,64,8 1 drop\n }}\n}}\n"
    ));
    let challenged = server.wait_status(Duration::from_secs(10), "a challenge to the attacker's copy", |st| {
        st.counter("challenges") >= 2
    });
    lab.r().ns.nft("delete table ip uet_attack");
    dl.finish(&app, "under attack");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let a = att.join().unwrap();
    eprintln!("attacker: {a:?}");
    assert!(a.copies >= 3 && a.replays >= 1, "the attacker had too little to work with: {a:?}");

    assert_eq!(one_entry(&server), (home, addr), "the session moved or changed its address");
    assert_eq!(xdp_peers(&server), [home.into()].into(), "the attacker's address got into the XDP map");
    let st = server.status();
    assert_eq!(st.counter("migrations"), 0, "{}", st.raw);
    assert!(st.counter("discard_control") >= a.forged, "forgeries not all refused:\n{}", st.raw);
    assert!(challenged.counter("challenges") >= 2, "the copy never came first");
    let log = server.log_text();
    assert!(!log.contains("moved from"), "{}", server.log_tail(20));
    let cs = client.status();
    assert_eq!(cs.counter("auth_granted"), 1, "the client had to authenticate again:\n{}", cs.raw);
}

// ---------------------------------------------------------------- 8. no pool leak

/// While UDP to the server is blocked, the client authenticates (TCP gets
/// through) but cannot prove its UDP path, again and again, backing off:
/// each unproven session lapses after 10 s, so the server never holds more
/// than two of them, and once UDP passes the client ends with exactly one
/// entry.
#[test]
fn failed_bindings_leave_no_entries_behind() {
    const PORT: u16 = 43700;
    const APP: u16 = 5771;
    let lab = NatLab::new("sleak", PORT);
    lab.r().ns.nft(&format!(
        "table ip uet_block {{\n chain block_udp {{\n  type filter hook forward priority 0;\n  udp dport {PORT} drop\n }}\n}}\n"
    ));
    let alice = lab.creds.client("alice");
    let server = lab.server("sleak-server", &[]);
    let client = lab.client("sleak-client", &alice, &[]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    // An application keeps trying (its SYNs keep starting authentications).
    let dest = lab.dest(APP);
    let trying = spawn_in_netns(&lab.c().ns, move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Ok(s) = TcpStream::connect_timeout(&dest.into(), Duration::from_secs(5)) {
                return Some(s);
            }
        }
        None
    });
    let t = Instant::now();
    let mut most = 0;
    while t.elapsed() < Duration::from_secs(22) {
        let st = server.status();
        let held = st.raw.lines().filter(|l| l.starts_with("pending ") || l.starts_with("peer ")).count();
        most = most.max(held);
        assert!(held <= 2, "{held} entries held for one client that cannot bind:\n{}", st.raw);
        thread::sleep(Duration::from_millis(250));
    }
    let st = server.status();
    assert!(st.counter("auth_granted") >= 2, "the client did not keep trying:\n{}", st.raw);
    assert!(most >= 1, "no session was ever held");
    assert!(st.counter("entries_expired") >= 1, "{}", st.raw);
    assert!(client.log_text().contains("no answer to our path proof"), "{}", client.log_tail(20));

    lab.r().ns.nft("delete table ip uet_block");
    let stream = trying.join().unwrap().expect("the application connects once UDP passes");
    let r = transfer_on(stream, Transfer::new(8, MIB, MIB)).expect("transfer");
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    server.wait_status(Duration::from_secs(15), "the unproven sessions to lapse", |st| {
        !st.raw.lines().any(|l| l.starts_with("pending "))
    });
    one_entry(&server);
}

/// `--max-entries-per-client`: a second instance of the same credential
/// past the limit is refused with its own counter, and told why.
#[test]
fn a_credential_holds_at_most_max_entries_per_client() {
    const PORT: u16 = 43750;
    const APP: u16 = 5776;
    let lab = NatLab::new("slimit", PORT);
    let alice = lab.creds.client("alice");
    let server = lab.server("slimit-server", &["--max-entries-per-client", "1"]);
    let first = lab.client("slimit-client1", &alice, &[]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let r = transfer_from(&lab.c().ns, lab.dest(APP), Transfer::new(9, 64 * 1024, 64 * 1024));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    // The same credential in the second client host.
    let c2 = lab.topo.client(1);
    c2.add_client_tun(lab.s().addr);
    let second = client_on(c2, PORT, "slimit-client2", &alice, &[]);
    let dest = lab.dest(APP);
    let r = in_netns(&c2.ns, move || TcpStream::connect_timeout(&dest.into(), Duration::from_secs(3)));
    assert!(r.is_err(), "the second instance got through");
    let st = server.wait_status(Duration::from_secs(10), "the refusal counted", |st| st.counter("discard_client_limit") >= 1);
    assert_eq!(st.peers.len(), 1, "{}", st.raw);
    assert!(
        second.log_text().contains("--max-entries-per-client"),
        "the client was not told why:\n{}",
        second.log_tail(20)
    );
    let _ = first;
}

// ---------------------------------------------------------------- 9. two uplinks

/// One client host with two uplinks through one NAT router, one tunnel and
/// one daemon per uplink (the same credential, different listen ports): two
/// sessions. The NAT of the second uplink rebinds mid-download: that
/// session moves, the other stays where it was, and both downloads finish
/// intact.
#[test]
fn two_uplinks_of_one_client_stay_two_sessions_through_a_rebinding() {
    const PORTS: [u16; 2] = [43800, 43801];
    const SPORT: u16 = 43800;
    const APP: u16 = 5781;
    let s = Netns::new("sduo-s");
    let r = Netns::new("sduo-r");
    let c = Netns::new("sduo-c");
    let (s_if, wan) = (if_name("us"), if_name("rw"));
    veth(&s, &s_if, &r, &wan);
    s.addr_add(&s_if, "203.0.113.1/24");
    r.addr_add(&wan, "203.0.113.254/24");
    r.sysctl("net.ipv4.ip_forward", "1");
    r.nft(&format!(
        "table ip uet_nat {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"{wan}\" masquerade\n }}\n}}\n"
    ));
    let mut lans = Vec::new();
    let mut ups = Vec::new();
    for (i, (gw, me)) in [("198.51.100.1", "198.51.100.2"), ("198.51.100.5", "198.51.100.6")].into_iter().enumerate() {
        let (lan, up) = (if_name("rl"), if_name("uc"));
        veth(&r, &lan, &c, &up);
        r.addr_add(&lan, &format!("{gw}/30"));
        c.addr_add(&up, &format!("{me}/30"));
        c.ip(&["route", "add", "default", "via", gw, "dev", &up, "metric", &(100 + i).to_string()]);
        lans.push(lan);
        ups.push(up);
    }
    let server_addr = Ipv4Addr::new(203, 0, 113, 1);
    add_tun(&s, SERVER_TUN_CIDR, TUN_MTU);
    // tun0 by the main table, tun1 for traffic from its own address.
    let tuns = [("tun0", Ipv4Addr::new(198, 19, 0, 2)), ("tun1", Ipv4Addr::new(198, 19, 1, 2))];
    add_tun_named(&c, tuns[0].0, &format!("{}/32", tuns[0].1), TUN_MTU);
    add_tun_named(&c, tuns[1].0, &format!("{}/32", tuns[1].1), TUN_MTU);
    c.ip(&["route", "add", &format!("{server_addr}/32"), "dev", "tun0", "src", &tuns[0].1.to_string()]);
    c.ip(&["rule", "add", "from", &tuns[1].1.to_string(), "table", "102"]);
    c.ip(&["route", "add", &format!("{server_addr}/32"), "dev", "tun1", "src", &tuns[1].1.to_string(), "table", "102"]);

    let art = ArtifactDir::new("sduo-creds");
    let creds = CredDir::new(&art, "server");
    let alice = creds.client("alice");
    let server = Daemon::spawn(&s, "sduo-server", &{
        let mut a = daemon_args("tun0", &s_if, SPORT, None, &[]);
        a.extend(creds.server_args());
        a
    });
    let cred = alice.to_str().unwrap();
    let daemons: Vec<Daemon> = (0..2)
        .map(|i| {
            Daemon::spawn(
                &c,
                &format!("sduo-client{i}"),
                &daemon_args(tuns[i].0, &ups[i], PORTS[i], Some(SPORT), &["--credential", cred, "--keepalive", "2s"]),
            )
        })
        .collect();
    let app = AppServer::start(&s, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(server_addr, APP);
    let dls: Vec<_> = (0..2u64)
        .map(|i| {
            let h = common::paced::paced_download_from(&c, Some(tuns[i as usize].1), dest, 90 + i, 8 * MIB, 64 * 1024, Duration::from_millis(40), Duration::from_secs(60));
            Download { h, id: 90 + i, total: 8 * MIB }
        })
        .collect();
    let st = server.wait_status(Duration::from_secs(20), "two sessions of alice", |st| st.peers.len() == 2);
    let mut before = st.peers.clone();
    before.sort();
    assert!(st.raw.lines().filter(|l| l.starts_with("peer ") && l.contains("client alice")).count() == 2, "{}", st.raw);
    wait_moving(&server, 0, 2 * MIB);
    // The second uplink's NAT forgets it and maps it elsewhere.
    r.nft(&format!(
        "flush chain ip uet_nat post\n\
         add rule ip uet_nat post iifname \"{}\" oifname \"{wan}\" ip protocol {{ tcp, udp }} snat to {WAN}:51000-51999\n\
         add rule ip uet_nat post oifname \"{wan}\" masquerade\n",
        lans[1]
    ));
    r.run(&["conntrack", "-D", "-s", "198.51.100.6"]);
    let mut results = Vec::new();
    for dl in dls {
        let id = dl.id;
        let res = dl.h.join().unwrap().unwrap_or_else(|e| panic!("download {id}: {e}"));
        results.push((id, res));
    }
    let conns = app.collect(2, Duration::from_secs(60));
    for (id, res) in &results {
        assert_download_ok(res, &conns[id], 8 * MIB, *id);
    }
    let st = server.status();
    assert_eq!(st.peers.len(), 2, "two sessions at the end:\n{}", st.raw);
    let moved: Vec<_> = st.peers.iter().filter(|p| !before.contains(p)).collect();
    let kept: Vec<_> = st.peers.iter().filter(|p| before.contains(p)).collect();
    assert_eq!(kept.len(), 1, "the first uplink's session should not move:\n{}", st.raw);
    assert_eq!(moved.len(), 1, "the second uplink's session should have moved:\n{}", st.raw);
    assert!((51000..=51999).contains(&moved[0].0.port()), "{}", st.raw);
    let old_addr = before.iter().find(|p| !st.peers.contains(p)).unwrap().1;
    assert_eq!(moved[0].1, old_addr, "the moved session kept its generated address");
    assert_eq!(st.counter("migrations"), 1, "{}", st.raw);
    drop(daemons);
}

// ---------------------------------------------------------------- 10. authentication fan-out

/// Open descriptors of process `pid`.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Any local program can route traffic into the client's TUN: 2000
/// non-blocking connects to distinct addresses (a /21 routed into the TUN,
/// nobody answering there) once made the client start as many
/// authentications, 1795 descriptors. Now at most 8 run at once, at most
/// 256 servers are tracked (the rest counted under `discard_auth_busy`),
/// the daemon's descriptors stay bounded, and the live session with the
/// real server keeps carrying data meanwhile.
#[test]
fn client_authentication_fan_out_is_bounded() {
    const PORT: u16 = 43900;
    const APP: u16 = 5791;
    let topo = Topology::two_hosts("sfan");
    let (s, c) = (&topo.server, topo.client(0));
    s.add_server_tun();
    c.add_client_tun(s.addr);
    c.ns.ip(&["route", "add", "198.19.8.0/21", "dev", "tun0", "src", &CLIENT_TUN.to_string()]);
    // The authentications' own connects go out of the uplink and vanish
    // in the server's host (it does not forward): each waits its timeout.
    c.ns.ip(&["route", "add", "default", "via", &s.addr.to_string()]);
    let art = ArtifactDir::new("sfan-creds");
    let creds = CredDir::new(&art, "server");
    let alice = creds.client("alice");
    let server = server_on(s, &creds, PORT, "sfan-server", &[]);
    let client = client_on(c, PORT, "sfan-client", &alice, &[]);
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(s.addr, APP);
    let r = transfer_from(&c.ns, dest, Transfer::new(100, MIB, MIB));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    let base = open_fds(client.pid());

    // The flood, and a transfer with the real server under way through it.
    let flood = spawn_in_netns(&c.ns, move || {
        let mut socks = Vec::new();
        for i in 0..2000u32 {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 8, 0)) + i);
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.set_nonblocking(true).unwrap();
            let _ = sock.connect(&SocketAddrV4::new(ip, 80).into());
            socks.push(sock);
        }
        thread::sleep(Duration::from_secs(8));
        socks.len()
    });
    let dl = start_download(&c.ns, dest, 101, 8 * MIB, Duration::from_millis(40));
    let mut most = 0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(7) {
        most = most.max(open_fds(client.pid()));
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(flood.join().unwrap(), 2000);
    dl.finish(&app, "with a flood of authentications");
    eprintln!("client descriptors: {base} before, at most {most} during the flood");
    assert!(most <= base + 16, "the client held {most} descriptors ({base} before the flood)");
    let cs = client.status();
    assert!(cs.counter("discard_auth_busy") > 0, "{}", cs.raw);
    assert!(cs.counter("auth_connect_error") + cs.counter("auth_timeout") >= 8, "{}", cs.raw);
    assert_eq!(one_entry(&server).0, SocketAddrV4::new(c.addr, PORT));
}
