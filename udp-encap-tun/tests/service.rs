//! Running it as a service (issue 12, SPEC decision 13), with the real binary
//! in namespaces:
//!
//! - a server and a client started from config files alone (the daemons
//!   create their TUNs and routes from `tun-address`/`route`) carry a
//!   hash-checked transfer; `status --json` agrees with the text `status`;
//! - a bad config file is refused naming the file, the line and the key;
//! - `READY=1` reaches `$NOTIFY_SOCKET` only once the TUN, the socket and the
//!   gate are up, and `STOPPING=1` on SIGTERM (what `Type=notify` needs);
//! - a real Prometheus (Debian's) scraping `--metrics-listen` sees the
//!   counters move, read back through its HTTP API;
//! - multi-WAN: one MPTCP connection over two tunnels (one per uplink)
//!   uses both and finishes intact after the first uplink goes down.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

const PORT: u16 = 40120;

fn bin(args: &[&str]) -> String {
    run_cmd(Command::new(*BIN).args(args))
}

/// `credentials server` in `art/etc`, plus one client credential `alice`.
fn credentials(art: &ArtifactDir) -> (PathBuf, PathBuf) {
    let dir = art.file("etc");
    bin(&["credentials", "server", "--dir", dir.to_str().unwrap()]);
    bin(&["credentials", "client", "--dir", dir.to_str().unwrap(), "--name", "alice"]);
    let cred = dir.join("alice.credential");
    assert!(cred.exists(), "no credential made in {}", dir.display());
    (dir, cred)
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_str().unwrap().to_string()
}

fn server_toml(etc: &Path, uplink: &str, extra: &str) -> String {
    let e = etc.display();
    format!(
        "# server\ninterface = \"tun0\"\ntun-address = \"198.18.0.1/24\"\ntun-mtu = 1400\n\
         listen-port = {PORT}\nbind-to-interface = \"{uplink}\"\n\
         cert = \"{e}/server.crt\"\nkey = \"{e}/server.key\"\nclients = \"{e}/clients.txt\"\n{extra}"
    )
}

fn client_toml(cred: &Path, uplink: &str, server: Ipv4Addr) -> String {
    format!(
        "# client\ninterface = \"tun0\"\ntun-address = \"198.19.0.2/32\"\ntun-mtu = 1400\n\
         route = [\"{server}/32\"]\nlisten-port = {PORT}\nbind-to-interface = \"{uplink}\"\n\
         endpoint-port = {PORT}\ncredential = \"{}\"\n",
        cred.display()
    )
}

fn status_json(ns: &Netns, tun: &str) -> serde_json::Value {
    let out = ns.run(&[*BIN, "status", "--interface", tun, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
}

// ---------------------------------------------------------------- config files

#[test]
fn config_files_carry_a_tunnel_and_status_json_matches_the_text() {
    let topo = Topology::two_hosts("cfg");
    let (s, c) = (&topo.server, topo.client(0));
    let art = ArtifactDir::new("cfg");
    let (etc, cred) = credentials(&art);
    let srv_conf = write(&art.file("server.toml"), &server_toml(&etc, &s.uplink, ""));
    let cli_conf = write(&art.file("client.toml"), &client_toml(&cred, &c.uplink, s.addr));

    // Nothing but the config file on the command line; no TUN made here.
    let mut server = Daemon::spawn(&s.ns, "cfg-server", &["--config", &srv_conf]);
    let mut client = Daemon::spawn(&c.ns, "cfg-client", &["--config", &cli_conf]);
    let addr = s.ns.ip(&["-4", "addr", "show", "dev", "tun0"]);
    assert!(addr.contains("inet 198.18.0.1/24"), "the server did not make its TUN from tun-address: {addr}");
    let route = c.ns.ip(&["route", "show", &format!("{}/32", s.addr)]);
    assert!(route.contains("dev tun0") && route.contains("src 198.19.0.2"), "no route from `route`: {route}");

    let app = AppServer::start(&s.ns, SocketAddrV4::new(SERVER_TUN, 5001));
    let t = Transfer::new(7, 3 << 20, 2 << 20);
    let r = transfer_from(&c.ns, SocketAddrV4::new(s.addr, 5001), t);
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));

    // The JSON and the text, taken while nothing moves (the same text before
    // and after the JSON), must state the same facts.
    let (text, json) = wait_for(Duration::from_secs(10), "two equal status texts around a JSON one", || {
        let a = server.status();
        let j = status_json(&s.ns, "tun0");
        let b = server.status();
        (a.counters == b.counters && a.peers == b.peers).then_some((a, j))
    });
    assert_eq!(json["mode"], "server");
    assert_eq!(text.mode.as_deref(), Some("server"));
    assert_eq!(json["interface"]["name"], "tun0");
    assert!(text.raw.contains(&format!(
        "interface tun0 {}/{} mtu {}",
        json["interface"]["address"].as_str().unwrap(),
        json["interface"]["prefix"],
        json["interface"]["mtu"]
    )));
    let jc = json["counters"].as_object().expect("counters is an object");
    assert_eq!(jc.len(), text.counters.len(), "JSON counters {jc:?}\ntext:\n{}", text.raw);
    for (name, v) in &text.counters {
        assert_eq!(jc.get(name).and_then(|x| x.as_u64()), Some(*v), "counter {name}");
    }
    assert!(text.counter("tun_tx_bytes") >= 3 << 20, "{}", text.raw);
    let jp = json["peers"].as_array().unwrap();
    assert_eq!(jp.len(), 1);
    assert_eq!(text.peers.len(), 1);
    assert_eq!(jp[0]["peer"].as_str().unwrap(), text.peers[0].0.to_string());
    assert_eq!(jp[0]["address"].as_str().unwrap(), text.peers[0].1.to_string());
    assert_eq!(jp[0]["client"], "alice");
    assert_eq!(json["pool"]["entries"], 1);
    let leases = status_json(&c.ns, "tun0")["leases"].clone();
    assert_eq!(leases[0]["server"].as_str(), Some(s.addr.to_string().as_str()), "{leases}");

    // The TUNs and the client's route go with the daemons.
    assert!(server.stop().success());
    assert!(client.stop().success());
    for ns in [&s.ns, &c.ns] {
        let links = ns.ip(&["link", "show"]);
        assert!(!links.contains("tun0"), "a TUN made from the config outlived its daemon: {links}");
    }
}

#[test]
fn a_bad_config_file_names_the_file_the_line_and_the_key() {
    let art = ArtifactDir::new("badcfg");
    for (text, line, key, says) in [
        ("interface = \"tun0\"\nbind-to-interface = \"eth0\"\nlisten-port = 0\n", 3, "listen-port", "not in 1..=65535"),
        ("interface = \"tun0\"\n\nlisten_port = 1\n", 3, "listen_port", "did you mean `listen-port`"),
        ("entry-timeout = \"soon\"\n", 1, "entry-timeout", "not a duration"),
    ] {
        let path = write(&art.file("bad.toml"), text);
        let out = Command::new(*BIN).args(["--config", &path]).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        let want = format!("config file {path} line {line}, key `{key}`");
        assert!(err.contains(&want), "{text:?}: expected `{want}` in: {err}");
        assert!(err.contains(says), "{text:?}: expected `{says}` in: {err}");
    }
    // A combination clap refuses says which options came from the file.
    let path = write(&art.file("both.toml"), "interface = \"t\"\nlisten-port = 1\nbind-to-interface = \"e\"\ncert = \"/c\"\n");
    let out = Command::new(*BIN).args(["--config", &path, "--insecure-no-auth"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be used with") && err.contains(&format!("(from {path}:")), "{err}");
}

// ---------------------------------------------------------------- sd_notify

/// A daemon started by hand (to give it `$NOTIFY_SOCKET`); SIGKILL on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

#[test]
fn ready_only_when_up_and_stopping_on_sigterm() {
    let topo = Topology::two_hosts("ntfy");
    let s = &topo.server;
    let art = ArtifactDir::new("ntfy");
    let sock_path = art.file("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conf = write(
        &art.file("s.toml"),
        &format!(
            "interface = \"tun0\"\ntun-address = \"198.18.0.1/24\"\nlisten-port = {PORT}\n\
             bind-to-interface = \"{}\"\ninsecure-no-auth = true\n",
            s.uplink
        ),
    );
    let log = std::fs::File::create(art.file("daemon.log")).unwrap();
    let mut child = Proc(
        s.ns.cmd(*BIN)
            .args(["--config", &conf])
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let recv = |what: &str| -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no {what} on NOTIFY_SOCKET: {e}\nlog:\n{}", std::fs::read_to_string(art.file("daemon.log")).unwrap_or_default())
        });
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv("READY=1");
    assert!(first.lines().any(|l| l == "READY=1"), "first notification is not READY=1: {first:?}");
    assert!(first.contains("STATUS=server on tun0"), "{first:?}");
    // Ready means up: the TUN, the status socket and the gate answer at once.
    let st = s.ns.run(&[*BIN, "status", "--interface", "tun0"]);
    assert!(st.contains("interface tun0 198.18.0.1/24"), "{st}");
    assert!(st.contains("xdp generic pins "), "the gate is not up at READY=1: {st}");
    // SIGHUP (ExecReload) is announced too, then ready again.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) };
    let r = recv("RELOADING=1");
    assert!(r.lines().any(|l| l == "RELOADING=1") && r.contains("MONOTONIC_USEC="), "{r:?}");
    assert!(recv("READY=1 after the reload").lines().any(|l| l == "READY=1"));
    // SAFETY: as above.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let stop = recv("STOPPING=1");
    assert!(stop.lines().any(|l| l == "STOPPING=1"), "{stop:?}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------- Prometheus

/// Debian's prometheus in a namespace, scraping `target` every second.
struct Prometheus {
    _child: Proc,
    api: SocketAddrV4,
    ns_path: PathBuf,
}

impl Prometheus {
    fn start(ns: &Netns, art: &ArtifactDir, target: SocketAddrV4) -> Prometheus {
        let conf = write(
            &art.file("prometheus.yml"),
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: uet\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        );
        let api = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090);
        let log = std::fs::File::create(art.file("prometheus.log")).unwrap();
        let child = ns
            .cmd("prometheus")
            .arg(format!("--config.file={conf}"))
            .arg(format!("--storage.tsdb.path={}", art.file("tsdb").display()))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus ({e}): install it with `cargo xtask deps` (apt prometheus)"));
        Prometheus { _child: Proc(child), api, ns_path: ns.path() }
    }

    /// `GET path` on the HTTP API (HTTP/1.0, so the body is not chunked).
    fn get(&self, path: &str) -> io::Result<String> {
        let api = self.api;
        let path = path.to_string();
        let ns = self.ns_path.clone();
        thread::spawn(move || -> io::Result<String> {
            let f = std::fs::File::open(&ns)?;
            use std::os::fd::AsRawFd;
            // SAFETY: a valid netns fd; affects this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut s = TcpStream::connect_timeout(&SocketAddr::V4(api), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
        })
        .join()
        .unwrap()
    }

    /// The value of the instant query `q` when it has exactly one series.
    fn query(&self, q: &str) -> Option<(serde_json::Value, f64)> {
        let body = self.get(&format!("/api/v1/query?query={q}")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?;
        (r.len() == 1).then(|| {
            let value = r[0]["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
            (r[0]["metric"].clone(), value)
        })
    }
}

#[test]
fn prometheus_scrapes_the_counters_as_they_move() {
    let topo = Topology::two_hosts("prom");
    let (s, c) = (&topo.server, topo.client(0));
    let art = ArtifactDir::new("prom");
    let (etc, cred) = credentials(&art);
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9477);
    let srv_conf = write(
        &art.file("server.toml"),
        &server_toml(&etc, &s.uplink, &format!("metrics-listen = \"{metrics}\"\n")),
    );
    let cli_conf = write(&art.file("client.toml"), &client_toml(&cred, &c.uplink, s.addr));
    let server = Daemon::spawn(&s.ns, "prom-server", &["--config", &srv_conf]);
    let _client = Daemon::spawn(&c.ns, "prom-client", &["--config", &cli_conf]);
    let prom = Prometheus::start(&s.ns, &art, metrics);

    let q = "udp_encap_tun_tun_tx_bytes_total";
    let (labels, before) = wait_for(Duration::from_secs(60), "prometheus to scrape the daemon", || prom.query(q));
    assert_eq!(labels["interface"], "tun0", "{labels}");
    assert_eq!(labels["mode"], "server", "{labels}");
    assert_eq!(labels["job"], "uet", "{labels}");
    assert_eq!(prom.query("up").map(|v| v.1), Some(1.0));

    let app = AppServer::start(&s.ns, SocketAddrV4::new(SERVER_TUN, 5001));
    let t = Transfer::new(9, 4 << 20, 1 << 20);
    let r = transfer_from(&c.ns, SocketAddrV4::new(s.addr, 5001), t);
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));

    // Prometheus sees the upload arrive: the counter moved by at least its
    // size, and the gauges show the client's entry.
    let after = wait_for(Duration::from_secs(30), "prometheus to see the transfer", || {
        prom.query(q).map(|v| v.1).filter(|v| *v >= before + (4u64 << 20) as f64)
    });
    let now = server.counter("tun_tx_bytes") as f64;
    assert!(after <= now, "prometheus saw {after}, more than the daemon's own {now}");
    assert_eq!(prom.query("udp_encap_tun_entries").map(|v| v.1), Some(1.0));
    assert_eq!(prom.query("udp_encap_tun_xdp_map_entries").map(|v| v.1), Some(1.0));
    let granted = wait_for(Duration::from_secs(10), "auth_granted in prometheus", || {
        prom.query("udp_encap_tun_auth_granted_total").map(|v| v.1).filter(|v| *v >= 1.0)
    });
    assert!(granted >= 1.0);
    drop(prom);
}

// ---------------------------------------------------------------- multi-WAN

const MPTCP: i32 = 262;
const SERVER_UP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// Three namespaces: a client with two uplinks (c0, c1), a router, a
/// server; both client links limited to 20 Mbit/s (tbf) so one alone cannot
/// carry the transfer.
struct MultiWan {
    cli: Netns,
    _rtr: Netns,
    srv: Netns,
    c: [String; 2],
    s0: String,
}

impl MultiWan {
    fn new() -> MultiWan {
        let cli = Netns::new("mw-c");
        let rtr = Netns::new("mw-r");
        let srv = Netns::new("mw-s");
        let c = [if_name("mc"), if_name("mc")];
        let r = [if_name("mr"), if_name("mr")];
        let (rw, s0) = (if_name("mw"), if_name("ms"));
        for i in 0..2 {
            veth(&cli, &c[i], &rtr, &r[i]);
            let (a, b) = ([198, 51, 100, 2 + 4 * i as u8], [198, 51, 100, 1 + 4 * i as u8]);
            cli.addr_add(&c[i], &format!("{}/30", Ipv4Addr::from(a)));
            rtr.addr_add(&r[i], &format!("{}/30", Ipv4Addr::from(b)));
            let metric = (100 * (i + 1)).to_string();
            cli.ip(&["route", "add", "default", "via", &Ipv4Addr::from(b).to_string(), "dev", &c[i], "metric", &metric]);
            for (ns, dev) in [(&cli, &c[i]), (&rtr, &r[i])] {
                ns.run(&["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "20mbit", "burst", "32kbit", "latency", "100ms"]);
            }
        }
        veth(&rtr, &rw, &srv, &s0);
        rtr.addr_add(&rw, "203.0.113.254/24");
        srv.addr_add(&s0, "203.0.113.1/24");
        srv.ip(&["route", "add", "default", "via", "203.0.113.254"]);
        rtr.sysctl("net.ipv4.ip_forward", "1");
        MultiWan { cli, _rtr: rtr, srv, c, s0 }
    }
}

fn mptcp_socket() -> socket2::Socket {
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::from(MPTCP)))
        .expect("an MPTCP socket (net.mptcp.enabled=1, kernel with CONFIG_MPTCP)")
}

#[test]
fn multiwan_mptcp_uses_both_tunnels_and_survives_losing_the_first_uplink() {
    let mw = MultiWan::new();
    let art = ArtifactDir::new("mw");
    let (etc, cred) = credentials(&art);
    let srv_conf = write(&art.file("srv.toml"), &server_toml(&etc, &mw.s0, ""));
    let mut confs = Vec::new();
    for i in 0..2 {
        let route = if i == 0 { format!("route = [\"{SERVER_UP}/32\"]\n") } else { String::new() };
        confs.push(write(
            &art.file(&format!("wan{i}.toml")),
            &format!(
                "interface = \"tun{i}\"\ntun-address = \"198.19.{i}.2/32\"\ntun-mtu = 1400\n{route}\
                 listen-port = {}\nbind-to-interface = \"{}\"\nendpoint-port = {PORT}\ncredential = \"{}\"\n",
                40200 + i,
                mw.c[i],
                cred.display()
            ),
        ));
    }
    let _server = Daemon::spawn(&mw.srv, "mw-server", &["--config", &srv_conf]);
    let wan0 = Daemon::spawn(&mw.cli, "mw-wan0", &["--config", &confs[0], "--interface", "tun0"]);
    let wan1 = Daemon::spawn(&mw.cli, "mw-wan1", &["--config", &confs[1], "--interface", "tun1"]);
    // tun1's address is routed by its own table; MPTCP adds a subflow from it.
    mw.cli.ip(&["rule", "add", "from", "198.19.1.2", "table", "102"]);
    mw.cli.ip(&["route", "add", &format!("{SERVER_UP}/32"), "dev", "tun1", "src", "198.19.1.2", "table", "102"]);
    for ns in [&mw.cli, &mw.srv] {
        ns.sysctl("net.mptcp.enabled", "1");
        ns.ip(&["mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "4"]);
    }
    mw.cli.ip(&["mptcp", "endpoint", "add", "198.19.1.2", "dev", "tun1", "subflow"]);

    // The server application keeps listening: the kernel answers an MP_JOIN
    // SYN with a RST once the listener is gone.
    let listener = in_netns(&mw.srv, || {
        let l = mptcp_socket();
        l.set_reuse_address(true).unwrap();
        l.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5001)).into()).unwrap();
        l.listen(8).unwrap();
        l
    });
    let len: u64 = 12 << 20;
    let seed = 0x3a11_7e5d;
    let received = Arc::new(AtomicU64::new(0));
    let got = received.clone();
    let reader = thread::spawn(move || -> io::Result<(u64, Sha)> {
        let (conn, _) = listener.accept()?;
        let mut s: TcpStream = conn.into();
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok((got.load(Ordering::Relaxed), h.finalize().into()))
    });
    let cli_path = mw.cli.path();
    let writer = thread::spawn(move || -> io::Result<()> {
        let f = std::fs::File::open(&cli_path)?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid netns fd; affects this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let s = mptcp_socket();
        s.connect_timeout(&SocketAddr::from((SERVER_UP, 5001)).into(), Duration::from_secs(10))?;
        let mut s: TcpStream = s.into();
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        send_payload(&mut s, len, seed)?;
        s.shutdown(std::net::Shutdown::Write)
    });

    // At 20 Mbit/s a link, 12 MiB take 2.5 s over both: strike at half.
    wait_until(Duration::from_secs(60), "half the transfer to arrive", || received.load(Ordering::Relaxed) >= len / 2);
    let at_fault = received.load(Ordering::Relaxed);
    let (tx0, tx1) = (wan0.counter("udp_tx_bytes"), wan1.counter("udp_tx_bytes"));
    mw.cli.ip(&["link", "set", &mw.c[0], "down"]);
    assert!(at_fault < len, "the transfer ended before the fault");
    assert!(tx0 > 1 << 20 && tx1 > 1 << 20, "before the fault both tunnels must carry the connection: {tx0} and {tx1} bytes");

    writer.join().unwrap().expect("the MPTCP sender failed after the first uplink went down");
    let (n, sha) = reader.join().unwrap().expect("the MPTCP receiver failed");
    assert_eq!(n, len, "bytes received");
    assert_eq!(hex(&sha), hex(&payload_sha(len, seed)), "the data arrived damaged");
    let tx1_end = wan1.counter("udp_tx_bytes");
    assert!(tx1_end > tx1 + (2 << 20), "tunnel 1 did not carry the rest: {tx1} -> {tx1_end} bytes");
}
