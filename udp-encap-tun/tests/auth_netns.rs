//! Issue 4: authentication end to end, in namespaces, with real TLS.
//!
//! Every test makes its own credentials (`udp-encap-tun credentials ...`),
//! runs the real daemon binary as a server and a client in two namespaces
//! (XDP gate on, the default in auth mode), moves bytes with the kernel's TCP
//! stack (length and SHA-256 checked at the far end) and looks at the result
//! from outside: `status` (store entries, leases, counters), `bpftool map
//! dump` of the pinned peer map, and the client namespace's kernel TCP
//! counters.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use common::creds::CredDir;
use common::paced::{Paced, assert_paced_ok, paced_transfer};
use common::*;

const MIB: u64 = 1024 * 1024;
/// The connect timeout of an application connection that is expected to fail.
const FAIL_CONNECT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- credentials

/// A copy of credential `src` at `dst` with the value of `key` replaced.
fn edited_credential(src: &Path, dst: &Path, key: &str, value: &str) -> PathBuf {
    let text = fs::read_to_string(src).unwrap();
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if !t.starts_with('#') && t.split('=').next().map(str::trim) == Some(key) {
                found = true;
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "no `{key}` in {}:\n{text}", src.display());
    fs::write(dst, out.join("\n") + "\n").unwrap();
    let mut perm = fs::metadata(dst).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o600);
    fs::set_permissions(dst, perm).unwrap();
    dst.to_path_buf()
}

fn credential_value(f: &Path, key: &str) -> String {
    let text = fs::read_to_string(f).unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no `{key}` in {}:\n{text}", f.display()))
}

// ---------------------------------------------------------------- the lab

/// Two hosts (server 192.0.2.1, client 192.0.2.2), TUNs, credentials.
struct Lab {
    topo: Topology,
    tun: String,
    creds: CredDir,
    art: ArtifactDir,
    port: u16,
}

impl Lab {
    fn new(tag: &str, port: u16) -> Lab {
        let topo = Topology::two_hosts(tag);
        let tun = topo.server.add_server_tun();
        topo.client(0).add_client_tun(topo.server.addr);
        let art = ArtifactDir::new(&format!("{tag}-creds"));
        let creds = CredDir::new(&art, "server");
        Lab {
            topo,
            tun,
            creds,
            art,
            port,
        }
    }

    fn s(&self) -> &Host {
        &self.topo.server
    }

    fn c(&self) -> &Host {
        self.topo.client(0)
    }

    fn server(&self, label: &str, extra: &[&str]) -> Daemon {
        let mut extra: Vec<String> = extra.iter().map(ToString::to_string).collect();
        extra.extend(self.creds.server_args());
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let d = Daemon::spawn(
            &self.s().ns,
            label,
            &daemon_args(&self.tun, &self.s().uplink, self.port, None, &extra),
        );
        let st = d.status();
        assert!(
            st.raw.lines().any(|l| l.trim() == "auth on"),
            "server status does not say `auth on`:\n{}",
            st.raw
        );
        assert!(
            xdp_pin_dir(&st).is_some(),
            "the XDP gate is not on in auth mode:\n{}",
            st.raw
        );
        d
    }

    fn client(&self, label: &str, credential: &Path) -> Daemon {
        self.client_with(label, credential, &[])
    }

    fn client_with(&self, label: &str, credential: &Path, extra: &[&str]) -> Daemon {
        let cred = credential.to_str().unwrap();
        let mut args = vec!["--credential", cred];
        args.extend_from_slice(extra);
        Daemon::spawn(
            &self.c().ns,
            label,
            &daemon_args("tun0", &self.c().uplink, self.port, Some(self.port), &args),
        )
    }

    fn dest(&self, app: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.s().addr, app)
    }

    /// The client's authentication/UDP source.
    fn client_src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.c().addr, self.port)
    }
}

// ---------------------------------------------------------------- observing

/// The pin directory from the `xdp MODE pins PATH` status line.
fn xdp_pin_dir(st: &Status) -> Option<PathBuf> {
    st.raw.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.len() == 4 && w[0] == "xdp" && w[2] == "pins").then(|| PathBuf::from(w[3]))
    })
}

/// Number of entries in the pinned peer map, by `bpftool -j map dump`.
fn bpf_peer_entries(server: &Daemon) -> usize {
    let st = server.status();
    let dir = xdp_pin_dir(&st).unwrap_or_else(|| panic!("no xdp pins line:\n{}", st.raw));
    let pin = dir.join("peers");
    let out = run_cmd(
        Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&pin),
    );
    // One object per element: count the "key" members (plain or formatted).
    let n = out.matches("\"key\"").count();
    if n == 0 {
        assert!(
            out.trim() == "[]",
            "unexpected bpftool output for {}: {out}",
            pin.display()
        );
    }
    n
}

/// No store entry, no map entry (status and bpftool agree).
fn assert_no_entry(server: &Daemon, why: &str) {
    let st = server.status();
    assert!(
        st.peers.is_empty(),
        "{why}: the server holds an entry:\n{}",
        st.raw
    );
    assert_eq!(
        st.counter("xdp_map_entries"),
        0,
        "{why}: XDP map not empty:\n{}",
        st.raw
    );
    assert_eq!(
        bpf_peer_entries(server),
        0,
        "{why}: bpftool shows map entries"
    );
}

/// A kernel counter of the calling namespace: `Tcp RetransSegs` from snmp or
/// `TcpExt TCPSynRetrans` from netstat (what `nstat` reads).
fn kernel_counter(ns: &Netns, file: &str, group: &str, name: &str) -> u64 {
    let path = format!("/proc/thread-self/net/{file}");
    let text = in_netns(ns, move || fs::read_to_string(&path)).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{group}:")))
        .collect();
    assert_eq!(lines.len(), 2, "no {group} in {file}:\n{text}");
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let vals: Vec<&str> = lines[1].split_whitespace().collect();
    let i = names
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("no {group} {name} in {file}"));
    vals[i].parse().unwrap()
}

fn syn_retrans(ns: &Netns) -> u64 {
    kernel_counter(ns, "netstat", "TcpExt", "TCPSynRetrans")
}

fn retrans_segs(ns: &Netns) -> u64 {
    kernel_counter(ns, "snmp", "Tcp", "RetransSegs")
}

/// `nstat` as an operator would run it (printed for the log; the assertion
/// uses /proc directly, the same numbers).
fn nstat(ns: &Netns) -> String {
    ns.run(&["nstat", "-asz", "TcpRetransSegs", "TcpExtTCPSynRetrans"])
}

fn lease_line(client: &Daemon) -> Option<String> {
    client
        .status()
        .raw
        .lines()
        .find(|l| l.starts_with("lease "))
        .map(str::to_string)
}

/// A socket bound to the uplink (SO_BINDTODEVICE, like the daemon's), so a
/// connection to the server from the client namespace does not go into the
/// TUN (where the server's address is routed).
fn uplink_socket(dev: &str, src: Ipv4Addr) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.bind_device(Some(dev.as_bytes())).unwrap();
    s.bind(&SockAddr::from(SocketAddrV4::new(src, 0))).unwrap();
    s
}

/// Connection attempt expected to fail: the application's connect through the
/// tunnel must not succeed within [`FAIL_CONNECT`].
fn assert_app_connect_fails(ns: &Netns, dest: SocketAddrV4, why: &str) {
    let r = in_netns(ns, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(dest), FAIL_CONNECT)
    });
    assert!(r.is_err(), "{why}: the application connected to {dest}");
}

// ---------------------------------------------------------------- paced transfer

// ---------------------------------------------------------------- 1. good client

/// A client with a good credential authenticates on demand, its first
/// connection does not wait for a SYN retransmission (the SYN waits in the
/// client's queue while TLS runs), and 2 MiB each way arrive intact. The
/// server shows the peer (the client's uplink address and listen-port), one
/// grant, one XDP map entry; the client shows its lease.
#[test]
fn good_client_first_connection_without_syn_retransmission() {
    const PORT: u16 = 42000;
    const APP: u16 = 5601;
    let lab = Lab::new("agood", PORT);
    let alice = lab.creds.client("alice");
    let server = lab.server("agood-server", &[]);
    let client = lab.client("agood-client", &alice);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    assert_no_entry(&server, "before any traffic");
    assert!(lease_line(&client).is_none(), "a lease before any traffic");

    let ns = &lab.c().ns;
    eprintln!("client nstat before:\n{}", nstat(ns));
    let (syn0, re0) = (syn_retrans(ns), retrans_segs(ns));
    let r = transfer_from(ns, lab.dest(APP), Transfer::new(1, 2 * MIB, 2 * MIB));
    let conn = app.next(Duration::from_secs(30));
    assert_transfer_ok(&r, &conn);
    let (syn1, re1) = (syn_retrans(ns), retrans_segs(ns));
    eprintln!("client nstat after:\n{}", nstat(ns));
    assert_eq!(
        syn1 - syn0,
        0,
        "the first connection needed a SYN retransmission (TcpExtTCPSynRetrans \
         {syn0} -> {syn1}, TcpRetransSegs {re0} -> {re1}): the queued SYN was not \
         sent right after authentication\nclient log:\n{}",
        client.log_tail(30)
    );
    assert_eq!(r.local.ip(), IpAddr::V4(CLIENT_TUN));

    let st = server.status();
    assert_eq!(st.peers.len(), 1, "one entry:\n{}", st.raw);
    assert_eq!(
        st.peers[0].0,
        SocketAddr::V4(lab.client_src()),
        "the entry is keyed by the client's uplink address and listen-port:\n{}",
        st.raw
    );
    assert_eq!(
        SocketAddr::V4(SocketAddrV4::new(st.peers[0].1, r.local.port())),
        conn.peer,
        "the app saw another address than the entry's generated one:\n{}",
        st.raw
    );
    assert_eq!(st.counter("auth_granted"), 1, "{}", st.raw);
    assert_eq!(st.counter("discard_auth_failure"), 0, "{}", st.raw);
    assert_eq!(st.counter("xdp_map_entries"), 1, "{}", st.raw);
    assert_eq!(bpf_peer_entries(&server), 1, "bpftool map dump");
    let lease = lease_line(&client).expect("the client holds a lease");
    assert!(
        lease.starts_with(&format!("lease {}", lab.s().addr)),
        "lease for the wrong server: {lease}"
    );
    let cs = client.status();
    assert_eq!(cs.counter("discard_auth_queue"), 0, "{}", cs.raw);
    assert_eq!(cs.counter("discard_auth_failure"), 0, "{}", cs.raw);
}

// ---------------------------------------------------------------- 2. bad credentials

/// Wrong secret, a client the server never added, a revoked client, and a
/// client whose pin is another server's: no entry, no map entry, the failure
/// counted, the app connection fails, and UDP from the client's address is
/// dropped in XDP. The pin mismatch never sends the secret: the credential
/// there is alice's real one (only the pin differs), and the server counts no
/// bad credential and grants nothing.
#[test]
fn bad_credentials_get_nothing() {
    const PORT: u16 = 42100;
    const APP: u16 = 5611;
    let lab = Lab::new("abad", PORT);
    let alice = lab.creds.client("alice");
    let bob = lab.creds.client("bob");
    lab.creds.revoke("bob");
    let other = CredDir::new(&lab.art, "other");
    let carol = other.client("carol");
    assert_ne!(other.pin, lab.creds.pin);

    let secret = credential_value(&alice, "secret");
    let flipped: String = secret
        .chars()
        .enumerate()
        .map(|(i, ch)| {
            if i == 0 {
                if ch == '0' { '1' } else { '0' }
            } else {
                ch
            }
        })
        .collect();
    let wrong_secret = edited_credential(
        &alice,
        &lab.art.file("wrong-secret.credential"),
        "secret",
        &flipped,
    );
    let never_added = edited_credential(
        &carol,
        &lab.art.file("never-added.credential"),
        "server-pin",
        &lab.creds.pin,
    );
    let wrong_pin = edited_credential(
        &alice,
        &lab.art.file("wrong-pin.credential"),
        "server-pin",
        &other.pin,
    );

    enum Expect {
        BadCredential,
        TlsRejected,
    }
    let cases = [
        ("wrong secret", wrong_secret, Expect::BadCredential),
        ("never added", never_added, Expect::BadCredential),
        ("revoked", bob, Expect::BadCredential),
        ("pin of another server", wrong_pin, Expect::TlsRejected),
    ];
    for (i, (what, cred, expect)) in cases.iter().enumerate() {
        // A fresh server per case: the per-source rate limit starts full.
        let server = lab.server(&format!("abad-server{i}"), &[]);
        let mut client = lab.client(&format!("abad-client{i}"), cred);
        let _app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

        assert_app_connect_fails(&lab.c().ns, lab.dest(APP), what);
        let st = match expect {
            Expect::BadCredential => server.wait_status(
                Duration::from_secs(10),
                &format!("{what}: auth_bad_credential counted"),
                |st| st.counter("auth_bad_credential") >= 1,
            ),
            Expect::TlsRejected => server.wait_status(
                Duration::from_secs(10),
                &format!("{what}: a TLS error / early close counted"),
                |st| st.counter("auth_tls_error") + st.counter("auth_closed_early") >= 1,
            ),
        };
        if let Expect::TlsRejected = expect {
            assert_eq!(
                st.counter("auth_bad_credential"),
                0,
                "{what}: the server saw a credential, so the client sent its secret to an \
                 untrusted server:\n{}",
                st.raw
            );
        }
        assert_eq!(st.counter("auth_granted"), 0, "{what}:\n{}", st.raw);
        assert!(
            st.counter("discard_auth_failure") >= 1,
            "{what}:\n{}",
            st.raw
        );
        assert_no_entry(&server, what);
        let cs = client.status();
        assert!(
            lease_line(&client).is_none(),
            "{what}: the client holds a lease:\n{}",
            cs.raw
        );
        let nonzero = |st: &Status| {
            let mut v: Vec<String> = st
                .counters
                .iter()
                .filter(|(k, v)| k.starts_with("auth_") && **v > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            v.sort();
            v.join(", ")
        };
        eprintln!(
            "{what}: server [{}], client [{}]",
            nonzero(&st),
            nonzero(&cs)
        );
        // The client counts its own view of the failure, and the packets it
        // dropped because of it (queued for authentication, then dropped).
        let client_saw = match expect {
            Expect::BadCredential => cs.counter("auth_bad_credential"),
            Expect::TlsRejected => cs.counter("auth_tls_error"),
        };
        assert!(
            client_saw >= 1 && cs.counter("discard_auth_queue") >= 1,
            "{what}: the client did not count the failed authentication and its dropped \
             packets:\n{}",
            cs.raw
        );
        assert_eq!(cs.counter("auth_granted"), 0, "{what}:\n{}", cs.raw);
        assert_eq!(
            cs.counter("udp_tx_packets"),
            0,
            "{what}: the client sent tunnel datagrams without a lease:\n{}",
            cs.raw
        );
        assert_eq!(
            st.counter("udp_rx_packets"),
            0,
            "{what}: a tunnel datagram reached the server's socket:\n{}",
            st.raw
        );

        // Datagrams from the client's own (address, port) are dropped in XDP.
        client.stop();
        let drops = st.counter("xdp_drop_unknown_peer");
        let src = lab.client_src();
        let dst = SocketAddrV4::new(lab.s().addr, PORT);
        let dev = lab.c().uplink.clone();
        in_netns(&lab.c().ns, move || {
            let u = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
            u.bind_device(Some(dev.as_bytes())).unwrap();
            u.bind(&SockAddr::from(src)).unwrap();
            // A well-formed TCP segment (ACK, data offset 5, 8 bytes of
            // data), so only the missing map entry can drop it.
            let mut seg = [0u8; 28];
            seg[0..2].copy_from_slice(&5000u16.to_be_bytes());
            seg[2..4].copy_from_slice(&80u16.to_be_bytes());
            seg[12] = 0x50;
            seg[13] = 0x10;
            seg[14..16].copy_from_slice(&1000u16.to_be_bytes());
            for _ in 0..5 {
                u.send_to(&seg, &SockAddr::from(dst)).unwrap();
            }
        });
        let st = server.wait_status(
            Duration::from_secs(10),
            &format!("{what}: 5 datagrams dropped in XDP"),
            |st| st.counter("xdp_drop_unknown_peer") >= drops + 5,
        );
        assert_eq!(st.counter("udp_rx_packets"), 0, "{what}:\n{}", st.raw);
        assert_no_entry(&server, what);
    }
}

// ---------------------------------------------------------------- 3. lease

/// A 12 s transfer at a steady rate with 3 s leases: the client renews while
/// data flows (at least 3 grants), the peer keeps its generated address, no
/// packet is refused for want of an entry, both hashes match. After the
/// client stops, the entry leaves the store and the map by itself.
#[test]
fn transfer_runs_through_renewals_then_entry_lapses() {
    const PORT: u16 = 42200;
    const APP: u16 = 5621;
    let lab = Lab::new("alease", PORT);
    let alice = lab.creds.client("alice");
    let server = lab.server("alease-server", &["--entry-timeout", "3s"]);
    // Keepalives off: leases are renewed by authentication while traffic
    // flows (with keepalives on, proofs renew them instead: see
    // session_netns.rs).
    let mut client = lab.client_with("alease-client", &alice, &["--keepalive", "0"]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    let re0 = retrans_segs(&lab.c().ns);
    // 240 chunks of 16 KiB every 50 ms: 12 s, 3.75 MiB up; 1 MiB down.
    let h = paced_transfer(
        &lab.c().ns,
        lab.dest(APP),
        Paced {
            id: 21,
            chunk: 16 * 1024,
            chunks: 240,
            gap: Duration::from_millis(50),
            download: MIB,
            io_timeout: Duration::from_secs(20),
        },
    );
    let mut generated = std::collections::BTreeSet::new();
    let mut samples = 0;
    while !h.is_finished() {
        let st = server.status();
        for p in &st.peers {
            assert_eq!(p.0, SocketAddr::V4(lab.client_src()), "unexpected peer:\n{}", st.raw);
            generated.insert(p.1);
        }
        samples += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let r = h.join().unwrap().expect("paced transfer through renewals");
    let conn = app.next(Duration::from_secs(10));
    assert_paced_ok(&r, &conn, MIB, 21);
    assert_eq!(
        generated.len(),
        1,
        "the peer's generated address changed during renewals ({samples} samples): {generated:?}"
    );
    let st = server.status();
    eprintln!(
        "renewals: auth_granted {}, client TcpRetransSegs +{}; client nstat:\n{}",
        st.counter("auth_granted"),
        retrans_segs(&lab.c().ns) - re0,
        lab.c().ns.run(&[
            "nstat",
            "-asz",
            "TcpRetransSegs",
            "TcpExtTCPLossProbes",
            "TcpExtTCPTimeouts",
            "TcpExtTCPSynRetrans",
            "TcpExtTCPLostRetransmit",
            "TcpExtTCPFastRetrans",
            "TcpExtTCPSpuriousRTOs"
        ])
    );
    assert!(
        st.counter("auth_granted") >= 3,
        "12 s with 3 s leases needs renewals:\n{}",
        st.raw
    );
    assert_eq!(
        st.counter("entries_expired"),
        0,
        "the entry lapsed mid-transfer:\n{}",
        st.raw
    );
    assert_eq!(st.counter("discard_auth_failure"), 0, "{}", st.raw);
    assert_eq!(st.counter("xdp_drop_unknown_peer"), 0, "{}", st.raw);
    assert_eq!(st.counter("entries_created"), 1, "{}", st.raw);
    let cs = client.status();
    assert_eq!(cs.counter("discard_auth_queue"), 0, "{}", cs.raw);
    assert_eq!(cs.counter("discard_auth_failure"), 0, "{}", cs.raw);

    // The client goes away: the lease is not renewed, the entry lapses.
    assert!(client.stop().success());
    server.wait_status(
        Duration::from_secs(15),
        "the entry to expire after the client stopped",
        |st| st.peers.is_empty() && st.counter("xdp_map_entries") == 0,
    );
    assert!(server.counter("entries_expired") >= 1);
    assert_no_entry(&server, "after the lease lapsed");
}

/// `credentials revoke` during a long transfer: the server drops the entry at
/// once (store and map), the transfer stalls and fails, and the client's
/// renewal attempts are refused as bad credential.
#[test]
fn revocation_during_transfer_ends_the_entry() {
    const PORT: u16 = 42300;
    const APP: u16 = 5631;
    let lab = Lab::new("arevoke", PORT);
    let alice = lab.creds.client("alice");
    // 6 s leases (renewal every 4 s): removal within a second or two is
    // the revocation's doing, not a lapse.
    let server = lab.server("arevoke-server", &["--entry-timeout", "6s"]);
    let client = lab.client("arevoke-client", &alice);
    let _app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));

    // 30 s worth of upload; it cannot finish once revoked.
    let h = paced_transfer(
        &lab.c().ns,
        lab.dest(APP),
        Paced {
            id: 31,
            chunk: 16 * 1024,
            chunks: 600,
            gap: Duration::from_millis(50),
            download: 0,
            io_timeout: Duration::from_secs(4),
        },
    );
    // Wait for renewals (proofs of the session, answered), so the
    // revocation hits a live, renewing client.
    client.wait_counter("keepalives_answered", 2, Duration::from_secs(15));
    assert_eq!(server.status().peers.len(), 1);
    let bad0 = server.counter("auth_bad_credential");
    lab.creds.revoke("alice");
    let t0 = Instant::now();
    server.wait_status(
        Duration::from_secs(5),
        "the revoked client's entry to go (store and map)",
        |st| st.peers.is_empty() && st.counter("xdp_map_entries") == 0,
    );
    eprintln!("revocation removed the entry after {:?}", t0.elapsed());
    assert_no_entry(&server, "after revocation");
    assert_eq!(
        server.counter("entries_expired"),
        0,
        "the entry lapsed instead of being removed by the revocation"
    );
    assert!(
        server.log_text().contains("client alice revoked: entry"),
        "no revocation in the server log:\n{}",
        server.log_tail(20)
    );
    let st = server.wait_status(
        Duration::from_secs(10),
        "the revoked client's renewal counted as bad credential",
        |st| st.counter("auth_bad_credential") > bad0,
    );
    let granted = st.counter("auth_granted");
    let r = h.join().unwrap();
    assert!(
        r.is_err(),
        "the transfer completed although the client was revoked: {r:?}"
    );
    let st = server.status();
    assert_eq!(
        st.counter("auth_granted"),
        granted,
        "a revoked client was granted again:\n{}",
        st.raw
    );
    assert!(st.peers.is_empty(), "{}", st.raw);
    assert!(
        lease_line(&client).is_none(),
        "the revoked client still shows a lease"
    );
    let _ = client;
}

// ---------------------------------------------------------------- 4. silent connections

/// Opens `n` silent TCP connections from `src` (any port) to `dest`, bound to
/// `dev`; returns the connected ones (refused/failed ones are not returned).
fn silent_connections(dev: &str, src: Ipv4Addr, dest: SocketAddrV4, n: usize) -> Vec<Socket> {
    (0..n)
        .filter_map(|_| {
            let s = uplink_socket(dev, src);
            s.connect_timeout(&SockAddr::from(dest), Duration::from_secs(2))
                .ok()
                .map(|()| s)
        })
        .collect()
}

/// Reads until EOF or reset; returns true if the server ended the connection
/// within `deadline`.
fn ended_by_server(s: &Socket, deadline: Duration) -> bool {
    s.set_read_timeout(Some(deadline)).unwrap();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
    match s.recv(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    }
}

/// `--auth-timeout 5s`: a connection that sends nothing is ended by the
/// server at the deadline (auth_timeout counted). 100 silent connections
/// from one source (all but 8 refused at once by the per-source bound), then
/// 100 spread over 10 source addresses: the total bound is reached and holds
/// (exactly 64 held open, every other one refused at once, the log naming
/// the total bound). Neither stops a good client from authenticating and
/// transferring once the silent ones time out.
#[test]
fn silent_connections_time_out_and_do_not_lock_out_a_good_client() {
    const PORT: u16 = 42400;
    const APP: u16 = 5641;
    /// The server's bound on authentication connections open at once
    /// (ServerAuthConfig::max_connections), and per source address.
    const TOTAL: usize = 64;
    const PER_SOURCE: usize = 8;
    let lab = Lab::new("asilent", PORT);
    let alice = lab.creds.client("alice");
    // Long enough that the spread's held connections are still held when
    // counted, short enough that a good client gets in after them.
    let server = lab.server("asilent-server", &["--auth-timeout", "5s"]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let c = lab.c();
    // .10 and .11 for the first phases; .30-.40 for the spread, fresh
    // sources that no rate limit knows (failed attempts take tokens).
    for i in (10..=11).chain(30..=40) {
        c.ns.addr_add(&c.uplink, &format!("192.0.2.{i}/24"));
    }
    let dest = SocketAddrV4::new(lab.s().addr, PORT);
    let dev = c.uplink.clone();

    // One silent connection: ended at the deadline.
    let d2 = dev.clone();
    let (ended, took) = in_netns(&c.ns, move || {
        let s = uplink_socket(&d2, Ipv4Addr::new(192, 0, 2, 10));
        s.connect_timeout(&SockAddr::from(dest), Duration::from_secs(3))
            .expect("raw connect to the authentication port");
        let t = Instant::now();
        (ended_by_server(&s, Duration::from_secs(15)), t.elapsed())
    });
    assert!(
        ended,
        "a silent connection was not ended within 15 s (--auth-timeout 5s)"
    );
    eprintln!("silent connection ended after {took:?}");
    let st = server.wait_counter("auth_timeout", 1, Duration::from_secs(5));
    assert_eq!(st, 1);

    let client = lab.client("asilent-client", &alice);

    // 100 silent connections from one source, held open while the good
    // client works.
    let d3 = dev.clone();
    let one_source = in_netns(&c.ns, move || {
        silent_connections(&d3, Ipv4Addr::new(192, 0, 2, 11), dest, 100)
    });
    let st = server.status();
    eprintln!(
        "one source: {} of 100 connected; too_many_connections {}",
        one_source.len(),
        st.counter("auth_too_many_connections")
    );
    assert!(
        st.counter("auth_too_many_connections") >= 1,
        "100 connections from one source, none refused:\n{}",
        st.raw
    );
    let r = transfer_from(&c.ns, lab.dest(APP), Transfer::new(41, MIB, MIB));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    assert_eq!(server.counter("auth_granted"), 1);
    drop(one_source);

    // 100 spread over 10 addresses: 8 of each address's 10 pass the
    // per-source bound, and of those 80 the total bound holds 64.
    wait_silent_gone(&server);
    let before = server.status();
    // The debug log tells the two bounds apart (informational: RUST_LOG
    // may be set otherwise).
    let total_refusals = |d: &Daemon| {
        d.log_text()
            .matches("refused: too many authentication connections")
            .count()
    };
    let total0 = total_refusals(&server);
    let d4 = dev.clone();
    let t = Instant::now();
    let spread = in_netns(&c.ns, move || {
        (30u8..40)
            .flat_map(|i| silent_connections(&d4, Ipv4Addr::new(192, 0, 2, i), dest, 10))
            .collect::<Vec<_>>()
    });
    // Every connection the server takes from its accept queue is decided
    // at once: refused with a RST (closed on the spot) or held, silent and
    // open. Once the queue is empty, the server's established connections
    // on the port are the held ones (`ss`, as an operator would count).
    let refused_now = |st: &Status| {
        st.counter("auth_too_many_connections") - before.counter("auth_too_many_connections")
    };
    // (Twice the same count 100 ms apart: a connection taken from the queue
    // a moment ago is decided by now.)
    let mut last = usize::MAX;
    let held = wait_for(Duration::from_secs(10), "the server to take every spread connection", || {
        thread::sleep(Duration::from_millis(100));
        let n = established_on(&lab.s().ns, PORT);
        let settled = accept_queue(&lab.s().ns, PORT) == 0 && n == last;
        last = n;
        settled.then_some(n)
    });
    let st = server.status();
    eprintln!(
        "spread: {} of 100 connected in {:?}, {held} held, {} refused; log: {} total-bound refusals",
        spread.len(),
        t.elapsed(),
        refused_now(&st),
        total_refusals(&server) - total0
    );
    assert_eq!(
        st.counter("auth_timeout"),
        before.counter("auth_timeout"),
        "silent connections timed out before they were counted (--auth-timeout 5s):\n{}",
        st.raw
    );
    assert_eq!(
        held, TOTAL,
        "{held} spread connections held open, want the total bound {TOTAL}:\n{}",
        st.raw
    );
    // Every connection beyond the bound was refused (one whose RST came
    // before its connect returned is refused but not in `spread`).
    assert!(
        refused_now(&st) >= (spread.len() - TOTAL) as u64,
        "{} refused of the {} beyond the bound:\n{}",
        refused_now(&st),
        spread.len() - TOTAL,
        st.raw
    );
    // The client's side agrees: exactly the held ones are still open.
    wait_until(Duration::from_secs(5), "the client to see the refusals", || {
        open_and_reset(&spread).0 == TOTAL
    });
    // The per-source bound alone refuses at most 10 - 8 of each address's
    // 10: more refusals than that are the total bound's.
    assert!(
        refused_now(&st) > (10 * (10 - PER_SOURCE)) as u64,
        "no more refusals than the per-source bound explains: the total bound never acted:\n{}",
        st.raw
    );
    // It holds: one more from a fresh address is refused too.
    let d5 = dev.clone();
    let extra = in_netns(&c.ns, move || silent_connections(&d5, Ipv4Addr::new(192, 0, 2, 40), dest, 1));
    let refused = refused_now(&st);
    let st = server.wait_status(Duration::from_secs(10), "a 65th connection refused", |st| {
        refused_now(st) > refused
    });
    assert_eq!(established_on(&lab.s().ns, PORT), TOTAL, "{}", st.raw);
    drop(extra);
    // The deadline frees the slots: the held connections time out.
    server.wait_status(Duration::from_secs(20), "the 64 held connections to time out", |st| {
        st.counter("auth_timeout") >= before.counter("auth_timeout") + TOTAL as u64
    });
    // The good client's lease may still be valid; make it authenticate anew:
    // a fresh client daemon (no lease, no saved session) needs the server now.
    drop(client);
    let granted = server.counter("auth_granted");
    let fresh = ArtifactDir::new("asilent-fresh-state");
    let fresh_dir = fresh.path().to_str().unwrap().to_string();
    let client = lab.client_with("asilent-client2", &alice, &["--state-dir", &fresh_dir]);
    let t = Instant::now();
    let r = transfer_from(&c.ns, lab.dest(APP), Transfer::new(42, MIB, MIB));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    eprintln!(
        "good client authenticated and transferred {:?} after the spread flood began",
        t.elapsed()
    );
    let st = server.status();
    assert!(st.counter("auth_granted") > granted, "{}", st.raw);
    assert!(
        st.counter("auth_timeout") >= 2,
        "silent connections not timed out:\n{}",
        st.raw
    );
    drop(spread);
    drop(client);
}

/// Among `socks`: (still open, ended by the server), without waiting. A
/// refused connection got a RST, a timed-out one a FIN.
fn open_and_reset(socks: &[Socket]) -> (usize, usize) {
    let open = socks
        .iter()
        .filter(|s| {
            let mut buf = [0u8; 1];
            // SAFETY: valid socket fd and a one-byte live buffer.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(*s),
                    buf.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
        })
        .count();
    (open, socks.len() - open)
}

/// Established TCP connections of `ns` with local port `port` (`ss -tn`).
fn established_on(ns: &Netns, port: u16) -> usize {
    ns.run(&["ss", "-Htn", "state", "established", &format!("sport = :{port}")])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Connections waiting in the accept queue of the TCP listener on `port`
/// in `ns` (`ss -ltn`'s Recv-Q).
fn accept_queue(ns: &Netns, port: u16) -> u64 {
    let out = ns.run(&["ss", "-Hltn", &format!("sport = :{port}")]);
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Between the phases: the one-source silent connections have been ended
/// (timed out or closed by us).
fn wait_silent_gone(server: &Daemon) {
    server.wait_status(
        Duration::from_secs(10),
        "the one-source silent connections to be gone",
        // The first probe's timeout, plus the 8 the per-source bound let in.
        |st| st.counter("auth_timeout") + st.counter("auth_closed_early") > 8,
    );
}

// ---------------------------------------------------------------- re-authentication

/// The client daemon restarts twice, once cleanly and once killed: each new
/// instance resumes the saved session (no new grant, the same generated
/// address) and carries a transfer at once; the one authentication left no
/// TIME_WAIT on its 4-tuple on either side. Then the server restarts
/// without its state (a wiped disk): it has forgotten the session, its XDP
/// gate drops the client's datagrams without an answer, and the client
/// notices from its unanswered keepalives and authenticates again (its log
/// says why), long before its lease would have
/// been renewed or run out: with the default 300 s lease neither happens
/// within the test's deadline, so the re-authentication can only come from
/// the silence.
#[test]
fn client_restarts_resume_and_a_server_that_forgot_is_noticed() {
    const PORT: u16 = 42500;
    const APP: u16 = 5651;
    let lab = Lab::new("areauth", PORT);
    let alice = lab.creds.client("alice");
    let mut server = lab.server("areauth-server", &[]);
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let auth_tuple = |ns: &Netns| -> Vec<(SocketAddrV4, SocketAddrV4, String)> {
        tcp_sockets(ns)
            .into_iter()
            .filter(|(l, r, _)| l.port() == PORT || r.port() == PORT)
            .collect()
    };
    let keepalive = ["--keepalive", "1s"];

    let mut client = lab.client_with("areauth-client0", &alice, &keepalive);
    let mut generated = None;
    for round in 0..3u64 {
        match round {
            1 => {
                assert!(client.stop().success());
                client = lab.client_with("areauth-client1", &alice, &keepalive);
            }
            2 => {
                client.kill9();
                client = lab.client_with("areauth-client2", &alice, &keepalive);
            }
            _ => {}
        }
        let r = transfer_from(
            &lab.c().ns,
            lab.dest(APP),
            Transfer::new(50 + round, 256 * 1024, 256 * 1024),
        );
        assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
        let st = server.status();
        assert_eq!(
            st.counter("auth_granted"),
            1,
            "round {round}: the restarted client resumes its session, no new grant:\n{}",
            st.raw
        );
        assert_eq!(st.peers.len(), 1, "{}", st.raw);
        let g = st.peers[0].1;
        assert_eq!(*generated.get_or_insert(g), g, "round {round}: the generated address changed");
        if round > 0 {
            let cs = client.status();
            assert_eq!(cs.counter("sessions_resumed"), 1, "round {round}:\n{}", cs.raw);
            assert_eq!(cs.counter("auth_granted"), 0, "round {round}: resumed without TLS:\n{}", cs.raw);
        }
        let left: Vec<_> = auth_tuple(&lab.c().ns)
            .into_iter()
            .filter(|s| s.2 == "06")
            .collect();
        assert!(
            left.is_empty(),
            "client holds TIME_WAIT on the auth tuple: {left:?}"
        );
        let left: Vec<_> = auth_tuple(&lab.s().ns)
            .into_iter()
            .filter(|s| s.2 == "06")
            .collect();
        assert!(
            left.is_empty(),
            "server holds TIME_WAIT on the auth tuple: {left:?}"
        );
    }

    // The server restarts without its state (kill -9, a fresh --state-dir).
    server.kill9();
    let fresh = ArtifactDir::new("areauth-server-fresh-state");
    let fresh_dir = fresh.path().to_str().unwrap().to_string();
    let server = lab.server("areauth-server2", &["--state-dir", &fresh_dir]);
    assert_no_entry(&server, "a server without its state");
    let cs = client.wait_status(
        Duration::from_secs(20),
        "the client to authenticate again with the server that forgot it",
        |st| st.counter("auth_granted") >= 1,
    );
    let log = client.log_text();
    let why = log
        .lines()
        .find(|l| l.contains("authenticating with") && l.contains("again"))
        .unwrap_or_else(|| panic!("no re-authentication in the client log:\n{}", client.log_tail(30)));
    assert!(
        why.contains("the server stopped answering"),
        "re-authenticated for another reason than the silence: {why}"
    );
    assert!(
        !log.contains("ran out"),
        "the lease ran out before the client noticed:\n{}",
        client.log_tail(30)
    );
    assert!(cs.counter("keepalives_sent") >= 3, "{}", cs.raw);
    let r = transfer_from(&lab.c().ns, lab.dest(APP), Transfer::new(60, 256 * 1024, 256 * 1024));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    let st = server.status();
    assert_eq!(st.counter("auth_granted"), 1, "{}", st.raw);
    assert_eq!(st.peers.len(), 1, "{}", st.raw);
    let _ = client;
}

// ---------------------------------------------------------------- pool

/// SPEC decision 4 end to end, with two real clients behind a NAT: a pool
/// outside the TUN's subnet (`--pool 198.18.5.9/32`, routed into the TUN as
/// the README says) gives alice 198.18.5.9, which the server's application
/// sees as her address; that one address is then the whole pool, so bob,
/// with a good credential, is refused: the server counts `discard_pool_full`
/// and logs it, bob holds no lease and his connection fails, while alice
/// keeps her address and transfers again intact (never an address reuse).
#[test]
fn pool_outside_the_tun_subnet_and_a_full_pool_refuses_a_real_peer() {
    const PORT: u16 = 42600;
    const APP: u16 = 5661;
    let topo = Topology::nat_two_clients("apool");
    let s = &topo.server;
    let tun = s.add_server_tun();
    s.ns.ip(&["route", "add", "198.18.5.9/32", "dev", &tun]);
    for c in &topo.clients {
        c.add_client_tun(s.addr);
    }
    let art = ArtifactDir::new("apool-creds");
    let creds = CredDir::new(&art, "server");
    let (alice, bob) = (creds.client("alice"), creds.client("bob"));
    let mut extra = vec!["--pool".to_string(), "198.18.5.9/32".to_string()];
    extra.extend(creds.server_args());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let server = Daemon::spawn(&s.ns, "apool-server", &daemon_args(&tun, &s.uplink, PORT, None, &extra));
    let st = server.status();
    assert!(
        st.raw.lines().any(|l| l.starts_with("pool 198.18.5.9/32 capacity 1 ")),
        "the pool is not the one given:\n{}",
        st.raw
    );
    let client = |i: usize, cred: &Path, label: &str| {
        let c = topo.client(i);
        Daemon::spawn(
            &c.ns,
            label,
            &daemon_args("tun0", &c.uplink, PORT, Some(PORT), &["--credential", cred.to_str().unwrap()]),
        )
    };
    let app = AppServer::start(&s.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let dest = SocketAddrV4::new(s.addr, APP);

    let alice_d = client(0, &alice, "apool-alice");
    let r = transfer_from(&topo.client(0).ns, dest, Transfer::new(1, MIB, MIB));
    let conn = app.next(Duration::from_secs(30));
    assert_transfer_ok(&r, &conn);
    let outside = Ipv4Addr::new(198, 18, 5, 9);
    assert_eq!(conn.peer.ip(), IpAddr::V4(outside), "the app saw alice at another address");
    let st = server.status();
    assert_eq!(st.generated(), vec![outside], "{}", st.raw);

    let bob_d = client(1, &bob, "apool-bob");
    assert_app_connect_fails(&topo.client(1).ns, dest, "bob with the pool full");
    let st = server.wait_status(Duration::from_secs(10), "bob refused as pool full", |st| {
        st.counter("discard_pool_full") >= 1
    });
    assert_eq!(st.generated(), vec![outside], "bob got an address or alice lost hers:\n{}", st.raw);
    assert_eq!(st.counter("xdp_map_entries"), 1, "{}", st.raw);
    assert_eq!(st.counter("auth_granted"), 1, "{}", st.raw);
    assert!(
        server.log_text().contains("every address of the pool is taken"),
        "no pool-full line in the server log:\n{}",
        server.log_tail(20)
    );
    let bs = bob_d.status();
    assert!(lease_line(&bob_d).is_none(), "bob holds a lease:\n{}", bs.raw);
    assert!(
        bs.counter("auth_refused") >= 1 && bs.counter("discard_auth_queue") >= 1,
        "bob did not count the refusal and the packets it cost:\n{}",
        bs.raw
    );

    let r = transfer_from(&topo.client(0).ns, dest, Transfer::new(2, MIB, MIB));
    let conn = app.next(Duration::from_secs(30));
    assert_transfer_ok(&r, &conn);
    assert_eq!(conn.peer.ip(), IpAddr::V4(outside));
    drop((alice_d, bob_d));
}

// ---------------------------------------------------------------- discards

/// SPEC decision 7 seen from outside: with the XDP gate off (so every
/// datagram reaches the daemon), datagrams that look like TCP segments but
/// come from an (address, port) without an entry count as
/// `discard_unauthenticated` at the server, and ones that cannot be a
/// segment (too short, a data offset below 5) as `discard_malformed`, each
/// exactly once, creating nothing; a datagram to the client from another
/// source than its server's (address, endpoint port) counts as
/// `discard_unauthenticated` at the client.
/// The authenticated client's transfer afterwards is intact.
#[test]
fn unauthenticated_and_malformed_datagrams_are_counted() {
    const PORT: u16 = 42700;
    const APP: u16 = 5671;
    let lab = Lab::new("adisc", PORT);
    let alice = lab.creds.client("alice");
    let mut sargs = vec!["--xdp-mode".to_string(), "off".to_string()];
    sargs.extend(lab.creds.server_args());
    let sargs: Vec<&str> = sargs.iter().map(String::as_str).collect();
    let server = Daemon::spawn(
        &lab.s().ns,
        "adisc-server",
        &daemon_args(&lab.tun, &lab.s().uplink, PORT, None, &sargs),
    );
    let client = Daemon::spawn(
        &lab.c().ns,
        "adisc-client",
        &daemon_args(
            "tun0",
            &lab.c().uplink,
            PORT,
            Some(PORT),
            &["--credential", alice.to_str().unwrap(), "--xdp-mode", "off"],
        ),
    );
    let app = AppServer::start(&lab.s().ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP));
    let r = transfer_from(&lab.c().ns, lab.dest(APP), Transfer::new(1, MIB, MIB));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
    // No tunnel traffic of its own from here on: the counters move only by
    // what this test sends.
    wait_tcp_quiet(&lab.c().ns, Duration::from_secs(10));
    wait_tcp_quiet(&lab.s().ns, Duration::from_secs(10));

    let seg = |doff: u8, len: usize| {
        let mut p = vec![0u8; len];
        if len >= 20 {
            p[0..2].copy_from_slice(&5000u16.to_be_bytes());
            p[2..4].copy_from_slice(&80u16.to_be_bytes());
            p[12] = doff << 4;
            p[13] = 0x10;
        }
        p
    };
    let b = server.status();
    let dev = lab.c().uplink.clone();
    let (src, to) = (SocketAddrV4::new(lab.c().addr, PORT + 7), SocketAddrV4::new(lab.s().addr, PORT));
    in_netns(&lab.c().ns, move || {
        let u = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        u.bind_device(Some(dev.as_bytes())).unwrap();
        u.bind(&SockAddr::from(src)).unwrap();
        // Well formed, from a port without an entry.
        for _ in 0..5 {
            u.send_to(&seg(5, 28), &SockAddr::from(to)).unwrap();
        }
        // Malformed: 10 bytes; data offset 4.
        for p in [seg(5, 10), seg(5, 10), seg(5, 10), seg(4, 28), seg(4, 28)] {
            u.send_to(&p, &SockAddr::from(to)).unwrap();
        }
    });
    let st = server.wait_status(Duration::from_secs(10), "5 unauthenticated and 5 malformed", |st| {
        st.counter("discard_unauthenticated") >= b.counter("discard_unauthenticated") + 5
            && st.counter("discard_malformed") >= b.counter("discard_malformed") + 5
    });
    for k in ["discard_unauthenticated", "discard_malformed"] {
        assert_eq!(st.counter(k), b.counter(k) + 5, "{k}:\n{}", st.raw);
    }
    for k in ["udp_rx_packets", "tun_tx_packets", "entries_created", "discard_pool_full"] {
        assert_eq!(st.counter(k), b.counter(k), "{k} moved:\n{}", st.raw);
    }
    assert_eq!(st.peers.len(), 1, "{}", st.raw);

    // To the client, from its server's address but another port.
    let cb = client.status();
    let dst = lab.client_src();
    in_netns(&lab.s().ns, move || {
        let u = std::net::UdpSocket::bind(("192.0.2.1", PORT + 9)).unwrap();
        for _ in 0..3 {
            u.send_to(&seg(5, 28), dst).unwrap();
        }
    });
    let cs = client.wait_status(Duration::from_secs(10), "3 unauthenticated at the client", |st| {
        st.counter("discard_unauthenticated") >= cb.counter("discard_unauthenticated") + 3
    });
    assert_eq!(cs.counter("discard_unauthenticated"), cb.counter("discard_unauthenticated") + 3, "{}", cs.raw);
    assert_eq!(cs.counter("tun_tx_packets"), cb.counter("tun_tx_packets"), "{}", cs.raw);

    let r = transfer_from(&lab.c().ns, lab.dest(APP), Transfer::new(2, MIB, MIB));
    assert_transfer_ok(&r, &app.next(Duration::from_secs(30)));
}
