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

/// The MSS announced by each SYN that `tcpdump -r` printed (`mss N` in
/// the options), in capture order.
fn syn_mss(dump: &str) -> Vec<u16> {
    dump.lines()
        .filter_map(|l| {
            let at = l.find("[mss ")? + 5;
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// SPEC decision 6 with a path where the MSS clamp must act both ways: the
/// server's uplink has MTU 1300 (the client's 1500), both TUNs 1400. The
/// server warns at start-up that its TUN MTU is more than the uplink's
/// minus 8 (the client, whose TUN fits, does not) and clamps to
/// 1300 - 8 - 40 = 1252: the client's SYN (1360, what the client's kernel
/// and daemon allow) reaches the server's TCP as 1252 (wire to TUN), and the
/// server kernel's SYN-ACK (1360) reaches the client's TCP as 1252 (TUN to
/// wire); `mss_clamped` counts both. Then 4 MiB each way arrive intact in
/// datagrams that fit the 1300-byte link unfragmented (a 1360-byte segment
/// would not: the server's veth drops what exceeds its MTU).
#[test]
fn mss_clamp_fits_a_smaller_uplink_both_ways() {
    const PORT: u16 = 40300;
    const APP: u16 = 5601;
    let topo = Topology::two_hosts("tmss");
    let s = &topo.server;
    let c = topo.client(0);
    s.ns.ip(&["link", "set", &s.uplink, "mtu", "1300"]);
    // The kernel cuts GSO trains before the wire (the daemons still send
    // trains), so the capture sees each datagram at its real size.
    for h in [s, c] {
        h.ns.run(&["ethtool", "-K", &h.uplink, "tx-udp-segmentation", "off"]);
    }
    let tun = s.add_server_tun();
    c.add_client_tun(s.addr);
    let server = Daemon::spawn(
        &s.ns,
        "tmss-server",
        &daemon_args(&tun, &s.uplink, PORT, None, V1),
    );
    let client = Daemon::spawn(
        &c.ns,
        "tmss-client",
        &daemon_args("tun0", &c.uplink, PORT, Some(PORT), V1),
    );
    let warning = format!(
        "the MTU of {tun} (1400) is more than the MTU of {} (1300) minus 8",
        s.uplink
    );
    assert!(
        server.log_text().contains(&warning),
        "no start-up MTU warning in the server log (want `{warning}`):\n{}",
        server.log_tail(20)
    );
    assert!(
        !client.log_text().contains("is more than the MTU of"),
        "the client warned about an MTU that fits:\n{}",
        client.log_tail(20)
    );
    let max_mss = |d: &Daemon| {
        let st = d.status();
        st.raw
            .lines()
            .find_map(|l| l.strip_prefix("max_mss ")?.trim().parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no max_mss in status:\n{}", st.raw))
    };
    assert_eq!(max_mss(&server), 1252, "server: min(1400, 1300 - 8) - 40");
    assert_eq!(max_mss(&client), 1360, "client: min(1400, 1500 - 8) - 40");

    // A first, small connection (its segments fit any path): the MSS that
    // each end's TCP was told, seen on its TUN.
    let mut s_tun = Capture::start(&s.ns, &tun);
    let mut c_tun = Capture::start(&c.ns, "tun0");
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(s.addr, APP);
    let r = transfer_from(&c.ns, dest, Transfer::new(1, 1000, 1000));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    // SYN (client to server) as the server's TCP got it from its TUN, and
    // SYN-ACK (server to client) as the client's TCP got it from its TUN.
    let syn_at_server = s_tun.dump(&format!("tcp dst port {APP} and tcp[13] & 0x12 == 0x02"), 20);
    let synack_at_client = c_tun.dump(&format!("tcp src port {APP} and tcp[13] & 0x12 == 0x12"), 20);
    eprintln!("server TUN, SYN:\n{syn_at_server}\nclient TUN, SYN-ACK:\n{synack_at_client}");
    for (what, dump) in [
        ("the SYN the server's TCP received (wire to TUN)", &syn_at_server),
        ("the SYN-ACK the client's TCP received (TUN to wire)", &synack_at_client),
    ] {
        let mss = syn_mss(dump);
        assert!(
            !mss.is_empty() && mss.iter().all(|m| *m == 1252),
            "{what} announced MSS {mss:?}, want 1252:\n{dump}"
        );
    }
    let st = server.status();
    assert!(
        st.counter("mss_clamped") >= 2,
        "the server clamped fewer than the SYN and the SYN-ACK:\n{}",
        st.raw
    );
    let cs = client.status();
    assert_eq!(
        cs.counter("mss_clamped"),
        0,
        "the client clamped although its kernel's MSS fits its path:\n{}",
        cs.raw
    );

    // Bulk: full-size segments. On the client's side of the link: its own
    // datagrams before the server's veth could drop an oversized one, the
    // server's after it. Without the clamp the transfer crawls rather than
    // stops (what does not fit is lost, small segments get through): a
    // deadline, not a hang.
    let mut wire = Capture::start(&c.ns, &c.uplink);
    let h = spawn_transfer(&c.ns, dest, Transfer::new(2, 4 * MIB, 4 * MIB));
    let r = join_transfer(h, Duration::from_secs(60), "4 MiB each way over the 1300-byte link");
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    let st = server.status();
    assert_eq!(st.counter("discard_io_error"), 0, "{}", st.raw);
    // Nothing on the link was fragmented or larger than the server's MTU
    // (an Ethernet frame of at most 14 + 1300 bytes).
    let big = wire.count("greater 1315");
    let frags = wire.count("ip[6:2] & 0x3fff != 0");
    let tunnel = wire.count(&format!("udp port {PORT}"));
    assert!(tunnel > 3000, "only {tunnel} tunnel datagrams for 8 MiB");
    assert_eq!(big, 0, "frames above the MTU:\n{}", wire.dump("greater 1315", 5));
    assert_eq!(frags, 0, "IP fragments:\n{}", wire.dump("ip[6:2] & 0x3fff != 0", 5));
}

/// `Udp InCsumErrors` of a namespace (/proc/net/snmp): datagrams the
/// kernel dropped for a bad checksum.
fn udp_csum_errors(ns: &Netns) -> u64 {
    let text = in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp")).unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let i = rows[0].split_whitespace().position(|w| w == "InCsumErrors").expect("InCsumErrors");
    rows[1].split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// A UDP header (checksum over the IPv4 pseudo-header of `src` -> `dst`,
/// plus `bad_by` on purpose) followed by `payload`.
fn udp_datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], bad_by: u16) -> Vec<u8> {
    use udp_encap_tun::core::wire::{fold, sum_words};
    let len = 8 + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&src.port().to_be_bytes());
    d.extend_from_slice(&dst.port().to_be_bytes());
    d.extend_from_slice(&(len as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut acc = sum_words(&src.ip().octets(), 0);
    acc = sum_words(&dst.ip().octets(), acc);
    acc += 17 + len as u64;
    let c = match !fold(sum_words(&d, acc)) {
        0 => 0xffff,
        c => c,
    };
    d[6..8].copy_from_slice(&c.wrapping_add(bad_by).to_be_bytes());
    d
}

/// SPEC decision 5 on the wire. Set: with checksum offload off on both
/// uplinks (so the sending kernel finishes each checksum before the capture
/// sees the frame; a veth otherwise hands it on unfinished), `tcpdump -vv`
/// finds every tunnel datagram of a 1 MiB exchange `[udp sum ok]`, none
/// without a checksum or with a bad one. Verified: a wire-format SYN from a
/// new port with a wrong UDP checksum is dropped by the server's kernel
/// (`InCsumErrors`) and creates no entry; the same datagram with its right
/// checksum does.
#[test]
fn udp_checksums_are_set_on_the_wire_and_verified() {
    const PORT: u16 = 40400;
    const APP: u16 = 5701;
    let topo = Topology::two_hosts("tcks");
    let s = &topo.server;
    let c = topo.client(0);
    for h in [s, c] {
        h.ns.run(&["ethtool", "-K", &h.uplink, "tx", "off"]);
    }
    let tun = s.add_server_tun();
    c.add_client_tun(s.addr);
    let server = Daemon::spawn(&s.ns, "tcks-server", &daemon_args(&tun, &s.uplink, PORT, None, V1));
    let _client = Daemon::spawn(&c.ns, "tcks-client", &daemon_args("tun0", &c.uplink, PORT, Some(PORT), V1));
    let mut cap = Capture::start_full(&c.ns, &c.uplink);
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let r = transfer_from(&c.ns, SocketAddrV4::new(s.addr, APP), Transfer::new(1, MIB, MIB));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    let dump = cap.dump_verbose(&format!("udp port {PORT}"));
    let ok = dump.matches("[udp sum ok]").count();
    let bad = dump.matches("bad udp cksum").count();
    let none = dump.matches("[no cksum]").count();
    eprintln!("tunnel datagrams on the wire: {ok} sum ok, {bad} bad, {none} without a checksum");
    let example = |what: &str| {
        dump.lines()
            .find(|l| l.contains(what))
            .unwrap_or_default()
            .to_string()
    };
    assert!(ok > 500, "only {ok} datagrams with a verified UDP checksum for 2 MiB:\n{}", example(""));
    assert_eq!(none, 0, "datagrams without a UDP checksum: {}", example("[no cksum]"));
    assert_eq!(bad, 0, "datagrams with a bad UDP checksum: {}", example("bad udp cksum"));

    // A SYN in the wire format: TCP checksum over the 0.0.0.0 pseudo-header.
    let mut syn = vec![0u8; 20];
    syn[0..2].copy_from_slice(&43001u16.to_be_bytes());
    syn[2..4].copy_from_slice(&80u16.to_be_bytes());
    syn[12] = 5 << 4;
    syn[13] = 0x02;
    syn[14..16].copy_from_slice(&1000u16.to_be_bytes());
    let tc = udp_encap_tun::core::wire::tcp_checksum(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &syn);
    syn[16..18].copy_from_slice(&tc.to_be_bytes());
    let (src, dst) = (SocketAddrV4::new(c.addr, 43001), SocketAddrV4::new(s.addr, PORT));
    let send = |bad_by: u16| {
        let (dev, d) = (c.uplink.clone(), udp_datagram(src, dst, &syn, bad_by));
        in_netns(&c.ns, move || {
            use socket2::{Domain, Protocol, SockAddr, Socket, Type};
            // A raw UDP socket: the kernel adds the IPv4 header and leaves
            // the UDP header, checksum included, as written.
            let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).expect("raw UDP socket");
            raw.bind_device(Some(dev.as_bytes())).unwrap();
            raw.send_to(&d, &SockAddr::from(SocketAddrV4::new(*dst.ip(), 0))).expect("send raw datagram");
        });
    };
    let has_peer = |st: &Status| st.peers.iter().any(|p| p.0 == SocketAddr::V4(src));
    let errs = udp_csum_errors(&s.ns);
    send(1);
    wait_until(Duration::from_secs(10), "the server's kernel to drop the bad checksum", || {
        udp_csum_errors(&s.ns) > errs
    });
    let st = server.status();
    assert!(!has_peer(&st), "a datagram with a bad UDP checksum created an entry:\n{}", st.raw);
    send(0);
    server.wait_status(Duration::from_secs(10), "the same datagram, checksum right, to create an entry", has_peer);
    assert_eq!(udp_csum_errors(&s.ns), errs + 1, "the good datagram was counted as a checksum error");
}
