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

/// The server's one entry: (peer, generated address).
fn one_entry(server: &Daemon) -> (SocketAddrV4, Ipv4Addr) {
    let st = server.status();
    assert_eq!(st.peers.len(), 1, "the server should hold exactly one entry:\n{}", st.raw);
    st.peers[0]
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
