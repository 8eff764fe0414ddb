//! Checks the test harness itself, without the daemon: namespaces come and go
//! (panic included), a TCP transfer over a plain veth arrives intact, the
//! capture counts what crossed, the NAT topology masquerades, IP options
//! really reach the wire, and `status` output parses.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::*;

#[test]
fn netns_guard_removes_namespace_even_after_panic() {
    require_root();
    let name = {
        let ns = Netns::new("st-ns");
        assert!(Netns::exists(ns.name()));
        ns.name().to_string()
    };
    assert!(!Netns::exists(&name), "namespace {name} survived its guard");

    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let ns = Netns::new("st-pn");
        let a = if_name("sa");
        let b = if_name("sb");
        let other = Netns::new("st-pn2");
        veth(&ns, &a, &other, &b);
        tx.send((ns.name().to_string(), other.name().to_string()))
            .unwrap();
        panic!("deliberate panic inside a test body");
    })
    .join();
    assert!(r.is_err(), "the thread should have panicked");
    let (n1, n2) = rx.recv().unwrap();
    assert!(
        !Netns::exists(&n1) && !Netns::exists(&n2),
        "namespaces survived a panic"
    );
}

#[test]
fn payload_is_deterministic_and_chunk_independent() {
    let mut a = vec![0u8; 64];
    let mut b = vec![0u8; 64];
    fill_payload(7, 0, &mut a);
    fill_payload(7, 0, &mut b[..32]);
    fill_payload(7, 32, &mut b[32..]);
    assert_eq!(a, b);
    fill_payload(8, 0, &mut b);
    assert_ne!(a, b, "different seeds give different bytes");
    assert_eq!(payload_sha(100_000, 3), payload_sha(100_000, 3));
    assert_ne!(payload_sha(100_000, 3), payload_sha(100_001, 3));
}

#[test]
fn status_parses_counters_and_peers() {
    let st = Status::parse(
        "mode server\ninterface tun0\ncounter tun_rx_packets 123\ncounter discard_not_tcp 0\n\
         peer 203.0.113.254:12345 198.18.0.2 idle_ms 1234\npeer 203.0.113.254:1024 198.18.0.3 idle_ms 5\n\
         peer [2001:db8::2]:40000 198.18.0.4 idle_ms 7\nmax_mss_ipv6 1340\n",
    );
    assert_eq!(st.mode.as_deref(), Some("server"));
    assert_eq!(st.counter("tun_rx_packets"), 123);
    assert_eq!(st.counter("discard_not_tcp"), 0);
    assert_eq!(
        st.peers,
        vec![
            (
                "203.0.113.254:12345".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 2)
            ),
            (
                "203.0.113.254:1024".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 3)
            ),
            (
                "[2001:db8::2]:40000".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 4)
            ),
        ]
    );
    assert_eq!(st.generated_for(std::net::SocketAddr::from(("2001:db8::2".parse::<std::net::Ipv6Addr>().unwrap(), 40000))), Some(Ipv4Addr::new(198, 18, 0, 4)));
    assert_eq!(st.max_mss_ipv6(), Some(1340));
    let missing = std::panic::catch_unwind(|| st.counter("no_such_counter"));
    assert!(missing.is_err(), "a missing counter must not read as 0");
}

#[test]
fn tcp_over_plain_veth_arrives_intact_and_capture_counts_it() {
    let topo = Topology::two_hosts("st-veth");
    let s = &topo.server;
    let c = topo.client(0);
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5001));
    let mut cap = Capture::start(&s.ns, &s.uplink);

    let t = Transfer::new(1, 3_000_000, 2_000_000);
    let res = transfer_from(&c.ns, SocketAddrV4::new(s.addr, 5001), t);
    let conn = app.next(Duration::from_secs(30));
    assert_transfer_ok(&res, &conn);
    assert_eq!(conn.peer.ip(), std::net::IpAddr::V4(c.addr));
    assert_eq!(res.sent_sha, payload_sha(t.upload, t.seed));

    // Also through in_netns: a UDP datagram the capture must see.
    in_netns(&c.ns, || send_udp(SocketAddrV4::new(s.addr, 9), 3));
    let tcp = cap.count("tcp port 5001");
    let udp = cap.count("udp dst port 9");
    assert!(
        tcp > 100,
        "capture saw only {tcp} TCP packets of a 5 MB transfer"
    );
    assert_eq!(udp, 3, "capture saw {udp} of 3 UDP datagrams");
}

#[test]
fn nat_topology_masquerades_both_clients() {
    let topo = Topology::nat_two_clients("st-nat");
    let s = &topo.server;
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5002));
    let dest = SocketAddrV4::new(s.addr, 5002);
    let hs: Vec<_> = (0..2)
        .map(|i| {
            spawn_transfer(
                &topo.client(i).ns,
                dest,
                Transfer::new(10 + i as u64, 500_000, 500_000),
            )
        })
        .collect();
    let results: Vec<_> = hs
        .into_iter()
        .map(|h| h.join().unwrap().expect("transfer via NAT"))
        .collect();
    let conns = app.collect(2, Duration::from_secs(30));
    for r in &results {
        let c = &conns[&r.transfer.id];
        assert_transfer_ok(r, c);
        assert_eq!(
            c.peer.ip(),
            std::net::IpAddr::V4(Ipv4Addr::new(203, 0, 113, 254)),
            "not masqueraded"
        );
    }
}

#[test]
fn ip_options_reach_the_wire_and_icmp_is_sent() {
    let topo = Topology::two_hosts("st-opt");
    let s = &topo.server;
    let c = topo.client(0);
    let mut cap = Capture::start(&s.ns, &s.uplink);
    in_netns(&c.ns, || {
        // Nothing listens on port 7: the server answers RST, connect fails fast.
        assert!(!tcp_connect_with_ip_options(
            SocketAddrV4::new(s.addr, 7),
            Duration::from_secs(2)
        ));
        send_icmp_echo(s.addr, 2);
    });
    let with_opts = cap.count("tcp dst port 7 and ip[0] & 0xf > 5");
    let echo = cap.count("icmp[icmptype] == icmp-echo");
    assert!(
        with_opts >= 1,
        "no SYN with IP options seen:\n{}",
        cap.dump("", 20)
    );
    assert_eq!(echo, 2);
}
