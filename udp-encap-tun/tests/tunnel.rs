//! Issue 2: the tunnel end to end, version 1 (`--insecure-no-auth`), XDP off.
//!
//! Each test builds its own namespaces (see `common`), runs the real daemon
//! binary in them, moves bytes with the kernel's TCP stack and checks length
//! and SHA-256 at the far end, and looks at the wire with tcpdump.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

/// These tests pin down version 1 of the design (datagrams create entries)
/// without the XDP gate; the gate and authentication have their own files
/// (xdp_netns.rs, auth_netns.rs), over the same topologies.
const V1: &[&str] = &["--insecure-no-auth", "--xdp-mode", "off"];
const MIB: u64 = 1024 * 1024;

fn in_pool(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 198 && o[1] == 18 && o[2] == 0 && !matches!(o[3], 0 | 1 | 255)
}

fn peer_v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(v) => v,
        SocketAddr::V6(v) => panic!("unexpected IPv6 peer {v}"),
    }
}

/// Server and two clients behind one masquerading router, both clients on
/// the same --listen-port: the server must tell them apart by (saddr, sport)
/// and carry 20 MiB each way per client, concurrently, intact; on the
/// server's uplink only UDP travels.
#[test]
fn nat_two_clients_same_port_concurrent_transfers() {
    const PORT: u16 = 40000;
    const APP: u16 = 5201;
    let topo = Topology::nat_two_clients("tnat");
    let s = &topo.server;
    let tun = s.add_server_tun();
    for c in &topo.clients {
        c.add_client_tun(s.addr);
    }
    let server = Daemon::spawn(
        &s.ns,
        "tnat-server",
        &daemon_args(&tun, &s.uplink, PORT, None, V1),
    );
    let clients: Vec<Daemon> = topo
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Daemon::spawn(
                &c.ns,
                &format!("tnat-client{}", i + 1),
                &daemon_args("tun0", &c.uplink, PORT, Some(PORT), V1),
            )
        })
        .collect();
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let mut cap = Capture::start(&s.ns, &s.uplink);

    let dest = SocketAddrV4::new(s.addr, APP);
    let handles: Vec<_> = topo
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| spawn_transfer(&c.ns, dest, Transfer::new(i as u64 + 1, 20 * MIB, 20 * MIB)))
        .collect();
    let results: Vec<ClientResult> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            h.join()
                .expect("transfer thread")
                .unwrap_or_else(|e| panic!("client{} transfer failed: {e}", i + 1))
        })
        .collect();
    let conns = app.collect(2, Duration::from_secs(60));
    for r in &results {
        assert_transfer_ok(r, &conns[&r.transfer.id]);
        assert_eq!(
            r.local.ip(),
            IpAddr::V4(CLIENT_TUN),
            "client socket not on its TUN address"
        );
    }
    let app_peers: HashSet<Ipv4Addr> = conns.values().map(|c| *peer_v4(c.peer).ip()).collect();
    assert_eq!(
        app_peers.len(),
        2,
        "the server app saw one address for two clients: {conns:?}"
    );
    assert!(
        app_peers.iter().all(|a| in_pool(*a)),
        "app peers not from the pool: {app_peers:?}"
    );

    let st = server.status();
    assert_eq!(st.mode.as_deref(), Some("server"));
    assert_eq!(
        st.peers.len(),
        2,
        "server should hold two entries:\n{}",
        st.raw
    );
    let generated: HashSet<Ipv4Addr> = st.generated().into_iter().collect();
    assert_eq!(
        generated, app_peers,
        "status entries do not match what the app saw:\n{}",
        st.raw
    );
    let real: HashSet<std::net::SocketAddr> = st.peers.iter().map(|p| p.0).collect();
    assert_eq!(real.len(), 2);
    assert!(
        real.iter()
            .all(|r| r.ip() == Ipv4Addr::new(203, 0, 113, 254)),
        "both peers should come from the router's address:\n{}",
        st.raw
    );
    assert!(st.counter("entries_created") >= 2);
    for c in &clients {
        let cs = c.status();
        assert_eq!(cs.mode.as_deref(), Some("client"));
        assert!(
            cs.counter("udp_tx_packets") > 0 && cs.counter("udp_rx_packets") > 0,
            "{}",
            cs.raw
        );
    }

    let udp = cap.count(&format!("udp port {PORT}"));
    let tcp = cap.count("tcp");
    assert_eq!(
        tcp,
        0,
        "TCP on the server's uplink:\n{}",
        cap.dump("tcp", 10)
    );
    assert!(
        udp > 1000,
        "only {udp} tunnel datagrams on the server's uplink for 80 MiB"
    );
}

/// An idle entry expires (--entry-timeout 2s); the server app's data for it is
/// then discarded as no_entry and nothing leaves the uplink; when the client
/// speaks again a new entry appears and a fresh connection works.
#[test]
fn idle_entry_expires_and_returns() {
    const PORT: u16 = 40100;
    let topo = Topology::two_hosts("texp");
    let s = &topo.server;
    let c = topo.client(0);
    let tun = s.add_server_tun();
    c.add_client_tun(s.addr);
    let mut sargs = daemon_args(&tun, &s.uplink, PORT, None, V1);
    sargs.extend(["--entry-timeout".to_string(), "2s".to_string()]);
    let server = Daemon::spawn(&s.ns, "texp-server", &sargs);
    let _client = Daemon::spawn(
        &c.ns,
        "texp-client",
        &daemon_args("tun0", &c.uplink, PORT, Some(PORT), V1),
    );

    // A connection that exchanges data, then stays open and idle.
    let listener = in_netns(&s.ns, || TcpListener::bind("0.0.0.0:5301")).expect("bind 5301");
    let dest = SocketAddr::V4(SocketAddrV4::new(s.addr, 5301));
    let mut cs = in_netns(&c.ns, || {
        TcpStream::connect_timeout(&dest, Duration::from_secs(10))
    })
    .expect("connect through the tunnel");
    let (mut ss, peer) = listener.accept().expect("accept");
    for st in [&cs, &ss] {
        st.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        st.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    let first = *peer_v4(peer).ip();
    assert!(in_pool(first), "peer {peer} not from the pool");
    let up = send_payload(&mut cs, 100_000, 1).unwrap();
    assert_eq!(
        hex(&recv_exact_sha(&mut ss, 100_000).unwrap()),
        hex(&up),
        "upload corrupted"
    );
    let down = send_payload(&mut ss, 100_000, 2).unwrap();
    assert_eq!(
        hex(&recv_exact_sha(&mut cs, 100_000).unwrap()),
        hex(&down),
        "download corrupted"
    );

    let st = server.status();
    assert_eq!(
        st.generated(),
        vec![first],
        "one entry for the connection's peer:\n{}",
        st.raw
    );
    let created = st.counter("entries_created");

    // Idle: the entry goes away by itself.
    let st = server.wait_status(Duration::from_secs(15), "the idle entry to expire", |st| {
        st.peers.is_empty() && st.counter("entries_expired") >= 1
    });

    // Everything still open must be quiet before the silent-uplink check.
    wait_tcp_quiet_except(&s.ns, 5301);
    let mut cap = Capture::start(&s.ns, &s.uplink);
    let no_entry = st.counter("discard_no_entry");
    ss.write_all(&[0x42; 4000])
        .expect("write to the idle connection");
    server.wait_counter("discard_no_entry", no_entry + 1, Duration::from_secs(10));
    let st = server.status();
    assert!(
        st.peers.is_empty(),
        "server traffic created an entry:\n{}",
        st.raw
    );
    let leaked = cap.count("ip");
    assert_eq!(
        leaked,
        0,
        "packets left the uplink without an entry:\n{}",
        cap.dump("ip", 10)
    );

    // The client speaks again: a new entry, and a fresh connection works.
    cs.write_all(b"still there?").expect("client write");
    server.wait_status(
        Duration::from_secs(10),
        "a new entry after the client spoke",
        |st| st.peers.len() == 1 && st.counter("entries_created") > created,
    );
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5302));
    let r = transfer_from(
        &c.ns,
        SocketAddrV4::new(s.addr, 5302),
        Transfer::new(7, MIB, MIB),
    );
    let conn = app.next(Duration::from_secs(30));
    assert_transfer_ok(&r, &conn);
    let st = server.status();
    assert_eq!(st.generated(), vec![*peer_v4(conn.peer).ip()], "{}", st.raw);
    drop((cs, ss));
}

/// Established connections on `port` are fine (idle), anything else that may
/// still send (a closing socket) is waited for.
fn wait_tcp_quiet_except(ns: &Netns, port: u16) {
    wait_until(
        Duration::from_secs(10),
        "closing TCP sockets to finish",
        || {
            tcp_sockets(ns)
                .iter()
                .all(|(l, _, st)| st == "0A" || st == "06" || (st == "01" && l.port() == port))
        },
    );
}

/// Packets the server cannot carry are discarded and counted under the right
/// reason, and none of them leaves the uplink: UDP and ICMP (not_tcp), TCP
/// with IP options (ip_options), TCP to a pool address without an entry
/// (no_entry). A live client is connected meanwhile, and still works after.
#[test]
fn server_discards_untunnelable_packets() {
    const PORT: u16 = 40200;
    const APP: u16 = 5401;
    let topo = Topology::two_hosts("tdis");
    let s = &topo.server;
    let c = topo.client(0);
    let tun = s.add_server_tun();
    c.add_client_tun(s.addr);
    let server = Daemon::spawn(
        &s.ns,
        "tdis-server",
        &daemon_args(&tun, &s.uplink, PORT, None, V1),
    );
    let _client = Daemon::spawn(
        &c.ns,
        "tdis-client",
        &daemon_args("tun0", &c.uplink, PORT, Some(PORT), V1),
    );
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(s.addr, APP);

    // A live entry (so a daemon that misroutes has somewhere to send).
    let r = transfer_from(&c.ns, dest, Transfer::new(1, 200_000, 200_000));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    let live = server.status();
    assert_eq!(live.peers.len(), 1, "{}", live.raw);
    assert!(
        !live.generated().contains(&Ipv4Addr::new(198, 18, 0, 50))
            && !live.generated().contains(&Ipv4Addr::new(198, 18, 0, 77))
    );
    wait_tcp_quiet(&s.ns, Duration::from_secs(10));
    wait_tcp_quiet(&c.ns, Duration::from_secs(10));

    let mut cap = Capture::start(&s.ns, &s.uplink);
    let b = server.status();
    let (not_tcp, opts, no_entry) = (
        b.counter("discard_not_tcp"),
        b.counter("discard_ip_options"),
        b.counter("discard_no_entry"),
    );
    let unassigned = Ipv4Addr::new(198, 18, 0, 50);

    in_netns(&s.ns, || send_udp(SocketAddrV4::new(unassigned, 9), 5));
    let st = server.wait_status(
        Duration::from_secs(10),
        "5 UDP datagrams counted as not_tcp",
        |st| st.counter("discard_not_tcp") >= not_tcp + 5,
    );
    assert_eq!(
        st.counter("discard_ip_options"),
        opts,
        "UDP counted as ip_options:\n{}",
        st.raw
    );
    assert_eq!(
        st.counter("discard_no_entry"),
        no_entry,
        "UDP counted as no_entry:\n{}",
        st.raw
    );

    in_netns(&s.ns, || send_icmp_echo(unassigned, 3));
    let st = server.wait_status(
        Duration::from_secs(10),
        "3 ICMP echoes counted as not_tcp",
        |st| st.counter("discard_not_tcp") >= not_tcp + 8,
    );
    assert_eq!(
        st.counter("discard_ip_options"),
        opts,
        "ICMP counted as ip_options:\n{}",
        st.raw
    );
    assert_eq!(
        st.counter("discard_no_entry"),
        no_entry,
        "ICMP counted as no_entry:\n{}",
        st.raw
    );
    let not_tcp = st.counter("discard_not_tcp");

    let connected = in_netns(&s.ns, || {
        tcp_connect_with_ip_options(
            SocketAddrV4::new(unassigned, 80),
            Duration::from_millis(1500),
        )
    });
    assert!(!connected, "a SYN with IP options got an answer");
    let st = server.wait_status(
        Duration::from_secs(10),
        "TCP with IP options counted as ip_options",
        |st| st.counter("discard_ip_options") > opts,
    );
    assert_eq!(
        st.counter("discard_not_tcp"),
        not_tcp,
        "TCP with options counted as not_tcp:\n{}",
        st.raw
    );
    assert_eq!(
        st.counter("discard_no_entry"),
        no_entry,
        "options should be checked before the entry:\n{}",
        st.raw
    );
    let opts = st.counter("discard_ip_options");

    let r = in_netns(&s.ns, || {
        TcpStream::connect_timeout(
            &SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 77), 80)),
            Duration::from_millis(1500),
        )
    });
    assert!(
        r.is_err(),
        "a connection to an unassigned pool address succeeded"
    );
    let st = server.wait_status(
        Duration::from_secs(10),
        "TCP to an unassigned address counted as no_entry",
        |st| st.counter("discard_no_entry") > no_entry,
    );
    assert_eq!(st.counter("discard_not_tcp"), not_tcp, "{}", st.raw);
    assert_eq!(st.counter("discard_ip_options"), opts, "{}", st.raw);

    let leaked = cap.count("ip");
    assert_eq!(
        leaked,
        0,
        "discarded packets left the uplink:\n{}",
        cap.dump("ip", 10)
    );

    // Bad input did not hurt the live peer.
    let r = transfer_from(&c.ns, dest, Transfer::new(2, 500_000, 500_000));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
}

/// Client routing: the server's address is routed into the client's TUN,
/// yet the tunnel's own datagrams leave via the uplink; on the client's
/// uplink there is only UDP between the two tunnel ports.
#[test]
fn client_routing_carries_tcp_as_udp_only() {
    const SPORT: u16 = 41000;
    const CPORT: u16 = 41001;
    const APP: u16 = 5501;
    let topo = Topology::two_hosts("trt");
    let s = &topo.server;
    let c = topo.client(0);
    let tun = s.add_server_tun();
    c.add_client_tun(s.addr);
    let route = c.ns.ip(&["route", "get", &s.addr.to_string()]);
    assert!(
        route.contains("dev tun0"),
        "server address not routed into the TUN: {route}"
    );
    let mut server = Daemon::spawn(
        &s.ns,
        "trt-server",
        &daemon_args(&tun, &s.uplink, SPORT, None, V1),
    );
    let mut client = Daemon::spawn(
        &c.ns,
        "trt-client",
        &daemon_args("tun0", &c.uplink, CPORT, Some(SPORT), V1),
    );
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let mut cap = Capture::start(&c.ns, &c.uplink);

    let r = transfer_from(
        &c.ns,
        SocketAddrV4::new(s.addr, APP),
        Transfer::new(1, 2 * MIB, 2 * MIB),
    );
    let conn = app.next(Duration::from_secs(30));
    assert_transfer_ok(&r, &conn);
    assert_eq!(r.local.ip(), IpAddr::V4(CLIENT_TUN));
    assert!(
        in_pool(*peer_v4(conn.peer).ip()),
        "server app saw {}",
        conn.peer
    );
    assert_eq!(
        peer_v4(conn.peer).port(),
        r.local.port(),
        "the tunnel must keep TCP ports"
    );

    let all = cap.count("ip");
    let tunnel = cap.count(&format!(
        "udp and ((src host {c} and src port {CPORT} and dst host {s} and dst port {SPORT}) or \
         (src host {s} and src port {SPORT} and dst host {c} and dst port {CPORT}))",
        c = c.addr,
        s = s.addr
    ));
    let out = cap.count(&format!("udp and src port {CPORT}"));
    let back = cap.count(&format!("udp and dst port {CPORT}"));
    assert!(
        out > 0 && back > 0,
        "no tunnel traffic seen ({out} out, {back} back)"
    );
    assert_eq!(
        all,
        tunnel,
        "the client's uplink carried something else than the tunnel's UDP:\n{}",
        cap.dump(&format!("not (udp and (port {CPORT} or port {SPORT}))"), 10)
    );

    // SIGTERM stops both cleanly.
    for (d, name) in [(&mut client, "client"), (&mut server, "server")] {
        let st = d.stop();
        assert!(st.success(), "{name} exited with {st} on SIGTERM");
    }
}
