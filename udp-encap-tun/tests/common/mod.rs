//! Integration-test harness: hosts are network namespaces (TESTING.md).
//!
//! Everything a test builds is owned by a guard that undoes it on drop, panic
//! included: [`Netns`] (deletes the namespace, and with it its veths and TUNs),
//! [`Daemon`] (SIGTERM, then SIGKILL after a deadline), [`Capture`] (SIGINT to
//! tcpdump), [`AppServer`] (stops its accept loop). Declare daemons and
//! captures *after* the topology so they drop first.
//!
//! Names: every namespace is `uet-TAG-ID` and every link `PREFIX+ID`, where ID
//! is the test process's pid (hex) plus a per-process counter, so tests running
//! in parallel threads or processes never see each other.
//!
//! Only 198.18.0.0/15 and the TEST-NET ranges are used, only inside namespaces
//! made here; nothing touches the host's own interfaces, routes or firewall.
//!
//! Artifacts (daemon logs, pcaps) live in `$CARGO_TARGET_TMPDIR/uet-*`; they
//! are removed when a test passes and kept (and their path printed) when it
//! panics.

#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod bpf;
pub mod creds;
pub mod paced;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- basics

/// The daemon under test: the binary cargo built for these tests, unless
/// `UDP_ENCAP_TUN_TEST_BIN` names another build of it (`cargo xtask vm-test`
/// runs the release build under software emulation, where the debug one
/// spends seconds loading the XDP program that the tests then wait for).
pub static BIN: std::sync::LazyLock<&'static str> = std::sync::LazyLock::new(|| {
    match std::env::var("UDP_ENCAP_TUN_TEST_BIN") {
        Ok(p) if !p.is_empty() => Box::leak(p.into_boxed_str()),
        _ => env!("CARGO_BIN_EXE_udp-encap-tun"),
    }
});

/// Server TUN address (pool = 198.18.0.0/24 minus .0, .255, .1).
pub const SERVER_TUN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const SERVER_TUN_CIDR: &str = "198.18.0.1/24";
/// Client TUN address (every client namespace has its own copy).
pub const CLIENT_TUN: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
pub const CLIENT_TUN_CIDR: &str = "198.19.0.2/32";
/// TUN MTU: must be ≤ uplink MTU (veth: 1500) − 8.
pub const TUN_MTU: u32 = 1400;

/// Panics (never passes silently) when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root (network namespaces, veth, TUN, tcpdump, nftables); \
         run them as root, e.g. `sudo -E cargo test -p udp-encap-tun`"
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `PID(hex)` + a per-process counter: unique per test run, at most 10 chars
/// for a pid up to 2^22 and 9999 objects.
pub fn unique_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{}", std::process::id(), n)
}

/// An interface name `prefix` + unique id; panics if over 15 characters.
pub fn if_name(prefix: &str) -> String {
    let name = format!("{prefix}{}", unique_id());
    assert!(
        name.len() <= 15,
        "interface name {name} is longer than 15 characters"
    );
    name
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `deadline`.
pub fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_until`] but returns the first `Some` value.
pub fn wait_for<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion; panics with its output when it fails.
pub fn run_cmd(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory for one test's artifacts under `$CARGO_TARGET_TMPDIR`.
/// Removed on drop unless the thread is panicking (then its path is printed).
pub struct ArtifactDir {
    path: PathBuf,
}

impl ArtifactDir {
    pub fn new(tag: &str) -> ArtifactDir {
        let path =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("uet-{tag}-{}", unique_id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        ArtifactDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ArtifactDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("test artifacts kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------- namespaces

/// A network namespace `/run/netns/uet-TAG-ID` with `lo` up and IPv6 off
/// (so captures only see what the test sends), or on ([`Netns::with_ipv6`]).
/// Drop deletes it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let ns = Netns::create(tag);
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        ns
    }

    /// A namespace that keeps IPv6 on, for IPv6 uplinks. Links get no
    /// autoconfiguration and no DAD (`accept_ra` 0, `accept_dad` 0, no
    /// router solicitations), so addresses are usable at once and captures
    /// see little besides what the test sends; add addresses with `nodad`
    /// ([`Netns::addr_add6`]). Neighbour discovery still runs, as on any
    /// IPv6 link.
    pub fn with_ipv6(tag: &str) -> Netns {
        let ns = Netns::create(tag);
        for k in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{k}.accept_ra"), "0");
            ns.sysctl(&format!("net.ipv6.conf.{k}.accept_dad"), "0");
            ns.sysctl(&format!("net.ipv6.conf.{k}.router_solicitations"), "0");
        }
        ns
    }

    fn create(tag: &str) -> Netns {
        require_root();
        let name = format!("uet-{tag}-{}", unique_id());
        run_cmd(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip addr add CIDR dev DEV nodad` (IPv6: usable at once).
    pub fn addr_add6(&self, dev: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", dev, "nodad"]);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `nsenter --net=/run/netns/NAME -- program`: a command that runs inside
    /// the namespace without remounting /sys (unlike `ip netns exec`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `argv` inside the namespace to completion; panics on failure.
    pub fn run(&self, argv: &[&str]) -> String {
        let (prog, args) = argv.split_first().expect("empty argv");
        run_cmd(self.cmd(prog).args(args))
    }

    /// `ip -n NAME args...`; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        run_cmd(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    pub fn addr_add(&self, dev: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", dev]);
    }

    /// Loads an nftables ruleset (`nft -f -`) in the namespace.
    pub fn nft(&self, ruleset: &str) {
        let mut child = self
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .expect("nft stdin")
            .write_all(ruleset.as_bytes())
            .expect("write nft ruleset");
        let out = child.wait_with_output().expect("wait nft");
        assert!(
            out.status.success(),
            "nft failed in {}: {}\nruleset:\n{ruleset}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the namespace still exists in `/run/netns`.
    pub fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }
}

impl Netns {
    /// Where the daemons of this namespace keep their sessions
    /// (`--state-dir`, which `Daemon::spawn` passes unless the test gives
    /// one): per namespace, so that a daemon restarted in it resumes, and
    /// removed with it.
    pub fn state_dir(&self) -> PathBuf {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("state-{}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(self.state_dir());
        remove_pins_of(&self.path());
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// Removes the XDP pin directories of daemons that lived in the namespace at
/// `ns_path` (named `<netns inode>-<uplink>-<port>`). A daemon stopped by
/// SIGTERM removes its own; one killed with -9, or left by a failing test,
/// does not, and its namespace is about to go, so nothing can use them.
fn remove_pins_of(ns_path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(ns_path) else { return };
    let root = Path::new("/sys/fs/bpf/udp-encap-tun");
    let prefix = format!("{}-", meta.ino());
    let Ok(dirs) = fs::read_dir(root) else { return };
    for d in dirs.flatten() {
        if d.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(d.path());
        }
    }
    // The daemons remove the shared root with their last instance; do the same.
    let _ = fs::remove_dir(root);
}

/// Joins the calling thread to `ns` (setns CLONE_NEWNET).
fn enter_netns(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a valid open fd of a network namespace; affects this thread only.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        r == 0,
        "setns({}): {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// Runs `f` on a fresh thread inside `ns` and returns its result (a panic in
/// `f` propagates). Sockets created in `f` stay in `ns` and may be returned and
/// used from any thread.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(ns: &Netns, f: F) -> T {
    let path = ns.path();
    thread::scope(|s| {
        let h = s.spawn(move || {
            enter_netns(&path);
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        }
    })
}

/// Spawns `f` on a thread inside `ns`.
pub fn spawn_in_netns<T, F>(ns: &Netns, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = ns.path();
    thread::spawn(move || {
        enter_netns(&path);
        f()
    })
}

/// A veth pair `a_if` (in `a`) <-> `b_if` (in `b`), both up. Created directly
/// inside the namespaces: nothing ever appears in the host namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Creates a persistent TUN `tun0` in `ns` with `addr_cidr` and `mtu`, up.
/// Returns its name.
pub fn add_tun(ns: &Netns, addr_cidr: &str, mtu: u32) -> String {
    add_tun_named(ns, "tun0", addr_cidr, mtu)
}

pub fn add_tun_named(ns: &Netns, name: &str, addr_cidr: &str, mtu: u32) -> String {
    ns.ip(&["tuntap", "add", "dev", name, "mode", "tun"]);
    ns.addr_add(name, addr_cidr);
    ns.ip(&["link", "set", name, "mtu", &mtu.to_string(), "up"]);
    name.to_string()
}

// ---------------------------------------------------------------- topologies

/// One host: its namespace, its uplink interface and the uplink's address.
pub struct Host {
    pub ns: Netns,
    pub uplink: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// Server TUN: `tun0` 198.18.0.1/24, MTU 1400.
    pub fn add_server_tun(&self) -> String {
        add_tun(&self.ns, SERVER_TUN_CIDR, TUN_MTU)
    }

    /// Client TUN: `tun0` 198.19.0.2/32, MTU 1400, and the routing trick:
    /// `server/32 dev tun0 src 198.19.0.2` (the daemon's own datagrams still
    /// leave via the uplink because its socket is bound to it).
    pub fn add_client_tun(&self, server: Ipv4Addr) -> String {
        let tun = add_tun(&self.ns, CLIENT_TUN_CIDR, TUN_MTU);
        self.ns.ip(&[
            "route",
            "add",
            &format!("{server}/32"),
            "dev",
            &tun,
            "src",
            &CLIENT_TUN.to_string(),
        ]);
        tun
    }
}

/// The NAT router between the server and the clients.
pub struct Router {
    pub ns: Netns,
    /// Interface facing the server (masquerade goes out of it).
    pub wan: String,
    pub wan_addr: Ipv4Addr,
    /// One LAN interface per client, in client order.
    pub lans: Vec<String>,
}

/// Namespaces and addresses of a test network. Fields drop (and namespaces
/// disappear) when it goes out of scope.
pub struct Topology {
    pub server: Host,
    pub clients: Vec<Host>,
    pub router: Option<Router>,
}

impl Topology {
    /// server 192.0.2.1/24 <-> client 192.0.2.2/24 over one veth.
    pub fn two_hosts(tag: &str) -> Topology {
        let s = Netns::new(&format!("{tag}-s"));
        let c = Netns::new(&format!("{tag}-c"));
        let s_if = if_name("us");
        let c_if = if_name("uc");
        veth(&s, &s_if, &c, &c_if);
        s.addr_add(&s_if, "192.0.2.1/24");
        c.addr_add(&c_if, "192.0.2.2/24");
        Topology {
            server: Host {
                ns: s,
                uplink: s_if,
                addr: Ipv4Addr::new(192, 0, 2, 1),
            },
            clients: vec![Host {
                ns: c,
                uplink: c_if,
                addr: Ipv4Addr::new(192, 0, 2, 2),
            }],
            router: None,
        }
    }

    /// server 203.0.113.1/24 <-> router wan 203.0.113.254/24 (ip_forward,
    /// nftables masquerade out of the wan); router 198.51.100.1/30 <->
    /// client1 198.51.100.2/30 and 198.51.100.5/30 <-> client2 198.51.100.6/30;
    /// clients route by default via their router address.
    pub fn nat_two_clients(tag: &str) -> Topology {
        let s = Netns::new(&format!("{tag}-s"));
        let r = Netns::new(&format!("{tag}-r"));
        let s_if = if_name("us");
        let wan = if_name("rw");
        veth(&s, &s_if, &r, &wan);
        s.addr_add(&s_if, "203.0.113.1/24");
        r.addr_add(&wan, "203.0.113.254/24");
        r.sysctl("net.ipv4.ip_forward", "1");
        r.nft(&format!(
            "table ip uet_nat {{\n\
             \tchain post {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"{wan}\" masquerade\n\
             \t}}\n\
             }}\n"
        ));
        let mut clients = Vec::new();
        let mut lans = Vec::new();
        for (i, (gw, addr)) in [
            ((198, 51, 100, 1), (198, 51, 100, 2)),
            ((198, 51, 100, 5), (198, 51, 100, 6)),
        ]
        .into_iter()
        .enumerate()
        {
            let gw = Ipv4Addr::new(gw.0, gw.1, gw.2, gw.3);
            let addr = Ipv4Addr::new(addr.0, addr.1, addr.2, addr.3);
            let c = Netns::new(&format!("{tag}-c{}", i + 1));
            let lan = if_name("rl");
            let c_if = if_name("uc");
            veth(&r, &lan, &c, &c_if);
            r.addr_add(&lan, &format!("{gw}/30"));
            c.addr_add(&c_if, &format!("{addr}/30"));
            c.ip(&["route", "add", "default", "via", &gw.to_string()]);
            clients.push(Host {
                ns: c,
                uplink: c_if,
                addr,
            });
            lans.push(lan);
        }
        Topology {
            server: Host {
                ns: s,
                uplink: s_if,
                addr: Ipv4Addr::new(203, 0, 113, 1),
            },
            clients,
            router: Some(Router {
                ns: r,
                wan,
                wan_addr: Ipv4Addr::new(203, 0, 113, 254),
                lans,
            }),
        }
    }

    pub fn client(&self, i: usize) -> &Host {
        &self.clients[i]
    }
}

// ---------------------------------------------------------------- daemon

/// `--interface TUN --listen-port P --bind-to-interface UPLINK
/// [--endpoint-port E] EXTRA...` (client mode iff `endpoint` is given).
pub fn daemon_args(
    tun: &str,
    uplink: &str,
    listen: u16,
    endpoint: Option<u16>,
    extra: &[&str],
) -> Vec<String> {
    let mut v: Vec<String> = [
        "--interface",
        tun,
        "--listen-port",
        &listen.to_string(),
        "--bind-to-interface",
        uplink,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    if let Some(e) = endpoint {
        v.push("--endpoint-port".into());
        v.push(e.to_string());
    }
    v.extend(extra.iter().map(ToString::to_string));
    v
}

/// What `udp-encap-tun status` printed.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub mode: Option<String>,
    pub counters: HashMap<String, u64>,
    /// Server: (real peer, generated address), one per connection_store
    /// entry; an IPv6 peer reads `[2001:db8::2]:40000`.
    pub peers: Vec<(SocketAddr, Ipv4Addr)>,
    pub raw: String,
}

impl Status {
    /// Parses `counter NAME VALUE`, `peer ADDR:PORT GENERATED ...` and
    /// `mode M` lines; ignores every other line.
    pub fn parse(text: &str) -> Status {
        let mut st = Status {
            raw: text.to_string(),
            ..Status::default()
        };
        for line in text.lines() {
            let mut w = line.split_whitespace();
            match w.next() {
                Some("mode") => st.mode = w.next().map(str::to_string),
                Some("counter") => {
                    if let (Some(name), Some(Ok(v))) = (w.next(), w.next().map(str::parse::<u64>)) {
                        st.counters.insert(name.to_string(), v);
                    }
                }
                Some("peer") => {
                    if let (Some(Ok(real)), Some(Ok(generated))) = (
                        w.next().map(str::parse::<SocketAddr>),
                        w.next().map(str::parse::<Ipv4Addr>),
                    ) {
                        st.peers.push((real, generated));
                    }
                }
                _ => {}
            }
        }
        st
    }

    /// The counter `name`; panics (showing the whole output) if it is absent,
    /// so a misspelt name never reads as 0.
    pub fn counter(&self, name: &str) -> u64 {
        *self
            .counters
            .get(name)
            .unwrap_or_else(|| panic!("status has no counter {name}:\n{}", self.raw))
    }

    pub fn generated(&self) -> Vec<Ipv4Addr> {
        self.peers.iter().map(|p| p.1).collect()
    }

    /// The generated address of the entry whose real peer is `peer`.
    pub fn generated_for(&self, peer: impl Into<SocketAddr>) -> Option<Ipv4Addr> {
        let peer = peer.into();
        self.peers.iter().find(|p| p.0 == peer).map(|p| p.1)
    }

    /// The `max_mss_ipv6` line, if the daemon's socket carries IPv6.
    pub fn max_mss_ipv6(&self) -> Option<u16> {
        self.line_value("max_mss_ipv6")
    }

    /// The value after `KEY ` on the first line that starts so.
    pub fn line_value<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.raw.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

/// A running daemon in a namespace (via `nsenter --net=`, so /sys/fs/bpf
/// stays visible). Its stderr goes to `LABEL.log` in its artifact dir. Drop:
/// SIGTERM, SIGKILL after 5 s; on panic the log's tail is printed and kept.
pub struct Daemon {
    label: String,
    ns_path: PathBuf,
    interface: String,
    child: Option<Child>,
    pid: i32,
    log: PathBuf,
    dir: ArtifactDir,
}

impl Daemon {
    /// Spawns `udp-encap-tun ARGS` in `ns` and waits (10 s) until `status`
    /// answers. `RUST_LOG` defaults to `debug` unless set in the environment.
    pub fn spawn<S: AsRef<str>>(ns: &Netns, label: &str, args: &[S]) -> Daemon {
        let mut d = Daemon::spawn_no_wait(ns, label, args);
        d.wait_ready(Duration::from_secs(10));
        d
    }

    /// Spawns without waiting for the control socket (for start-up error tests).
    pub fn spawn_no_wait<S: AsRef<str>>(ns: &Netns, label: &str, args: &[S]) -> Daemon {
        Daemon::spawn_no_wait_via(ns, label, &[], args)
    }

    /// [`Daemon::spawn_no_wait`] through a wrapper that execs the daemon
    /// (`setpriv --reuid 65534 ...`): `nsenter --net=NS -- WRAPPER... BIN ARGS`.
    /// The wrapper execs, so the PID is the daemon's.
    pub fn spawn_no_wait_via<S: AsRef<str>>(ns: &Netns, label: &str, wrapper: &[&str], args: &[S]) -> Daemon {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let dir = ArtifactDir::new(label);
        let log = dir.file(&format!("{label}.log"));
        let logf = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let interface = args
            .windows(2)
            .find(|w| w[0] == "--interface")
            .map_or("tun0", |w| w[1])
            .to_string();
        let mut cmd = match wrapper.split_first() {
            None => ns.cmd(*BIN),
            Some((w, rest)) => {
                let mut c = ns.cmd(w);
                c.args(rest).arg(*BIN);
                c
            }
        };
        cmd.args(&args);
        // Also with --config: the command line wins over the file.
        if !args.contains(&"--state-dir") && args.first() != Some(&"status") {
            cmd.arg("--state-dir").arg(ns.state_dir());
        }
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log fd"))
            .stderr(logf);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "debug");
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        Daemon {
            label: label.to_string(),
            ns_path: ns.path(),
            interface,
            child: Some(child),
            pid,
            log,
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Some(exit status)` if the daemon has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("try_wait daemon")
    }

    /// Waits until `status` answers; panics at once (with the log) if the
    /// daemon exits first.
    pub fn wait_ready(&mut self, deadline: Duration) {
        let end = Instant::now() + deadline;
        loop {
            match self.try_status() {
                Ok(_) => return,
                Err(e) => {
                    if let Some(st) = self.try_exit() {
                        self.child = None;
                        panic!(
                            "daemon {} exited during start-up ({st}); log:\n{}",
                            self.label,
                            self.log_tail(60)
                        );
                    }
                    assert!(
                        Instant::now() < end,
                        "daemon {} did not answer `status` within {deadline:?}: {e}\nlog:\n{}",
                        self.label,
                        self.log_tail(60)
                    );
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `udp-encap-tun status --interface IF` in the daemon's namespace.
    pub fn try_status(&self) -> Result<Status, String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg(*BIN)
            .args(["status", "--interface", &self.interface])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run status: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "status exited with {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Status::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `status`, panicking (with the log's tail) if it fails.
    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|e| {
            panic!(
                "`status` of daemon {} failed: {e}\nlog:\n{}",
                self.label,
                self.log_tail(60)
            )
        })
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.status().counter(name)
    }

    /// Waits until `cond(status)` holds; panics with `what` and the last status.
    pub fn wait_status(
        &self,
        deadline: Duration,
        what: &str,
        mut cond: impl FnMut(&Status) -> bool,
    ) -> Status {
        let end = Instant::now() + deadline;
        loop {
            let st = self.status();
            if cond(&st) {
                return st;
            }
            assert!(
                Instant::now() < end,
                "daemon {}: timed out after {deadline:?} waiting for: {what}\nlast status:\n{}\nlog tail:\n{}",
                self.label,
                st.raw,
                self.log_tail(40)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until counter `name` ≥ `at_least`; returns its value.
    pub fn wait_counter(&self, name: &str, at_least: u64, deadline: Duration) -> u64 {
        self.wait_status(deadline, &format!("counter {name} >= {at_least}"), |s| {
            s.counter(name) >= at_least
        })
        .counter(name)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid (not reaped yet, so not reused).
        unsafe { libc::kill(self.pid, sig) };
    }

    fn wait_deadline(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait daemon") {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `deadline` for the daemon to exit by itself (a start-up
    /// error); returns its status. Panics (after SIGKILL) if it keeps running.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        assert!(self.child.is_some(), "daemon {} already stopped", self.label);
        match self.wait_deadline(deadline) {
            Some(st) => {
                self.child = None;
                st
            }
            None => {
                self.signal(libc::SIGKILL);
                let _ = self.wait_deadline(Duration::from_secs(5));
                self.child = None;
                panic!(
                    "daemon {} still running {deadline:?} after its start; log:\n{}",
                    self.label,
                    self.log_tail(40)
                );
            }
        }
    }

    /// SIGTERM and wait up to 10 s; returns the exit status. Panics (after a
    /// SIGKILL) if it does not exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// The same with SIGINT (Ctrl-C).
    pub fn interrupt(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGINT)
    }

    fn stop_with(&mut self, sig: i32) -> ExitStatus {
        assert!(
            self.child.is_some(),
            "daemon {} already stopped",
            self.label
        );
        self.signal(sig);
        match self.wait_deadline(Duration::from_secs(10)) {
            Some(st) => {
                self.child = None;
                st
            }
            None => {
                self.signal(libc::SIGKILL);
                let _ = self.wait_deadline(Duration::from_secs(5));
                self.child = None;
                panic!(
                    "daemon {} did not exit within 10 s of signal {sig}; log:\n{}",
                    self.label,
                    self.log_tail(40)
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        assert!(
            self.child.is_some(),
            "daemon {} already stopped",
            self.label
        );
        self.signal(libc::SIGKILL);
        let st = self
            .wait_deadline(Duration::from_secs(10))
            .expect("SIGKILLed daemon exits");
        self.child = None;
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            if self.try_exit().is_some() {
                self.child = None;
            } else {
                self.signal(libc::SIGTERM);
                if self.wait_deadline(Duration::from_secs(5)).is_none() {
                    self.signal(libc::SIGKILL);
                    let _ = self.wait_deadline(Duration::from_secs(5));
                }
                self.child = None;
            }
        }
        if thread::panicking() {
            eprintln!(
                "---- daemon {} log ({}), last 150 lines ----\n{}\n---- end of {} log ----",
                self.label,
                self.log.display(),
                self.log_tail(150),
                self.label
            );
        }
    }
}

// ---------------------------------------------------------------- capture

/// `tcpdump -ni IFACE -w FILE -U` in a namespace (snaplen 128: headers only).
/// [`Capture::stop`] sends SIGINT by pid; [`Capture::count`] stops it and
/// counts packets matching a filter (`tcpdump -r FILE -nn FILTER`).
pub struct Capture {
    label: String,
    ns_path: PathBuf,
    marks: u32,
    child: Option<Child>,
    pid: i32,
    file: PathBuf,
    err: PathBuf,
    dir: ArtifactDir,
}

impl Capture {
    /// Starts and waits until tcpdump says it is listening.
    pub fn start(ns: &Netns, iface: &str) -> Capture {
        Capture::start_snaplen(ns, iface, 128)
    }

    /// The same with whole packets (what `tcpdump -vv` needs to verify
    /// checksums).
    pub fn start_full(ns: &Netns, iface: &str) -> Capture {
        Capture::start_snaplen(ns, iface, 0)
    }

    fn start_snaplen(ns: &Netns, iface: &str, snaplen: u32) -> Capture {
        let dir = ArtifactDir::new(&format!("cap-{iface}"));
        let file = dir.file(&format!("{iface}.pcap"));
        let err = dir.file(&format!("{iface}.tcpdump.err"));
        let errf = File::create(&err).expect("create tcpdump stderr file");
        let child = ns
            .cmd("tcpdump")
            .args([
                "-ni",
                iface,
                "-s",
                &snaplen.to_string(),
                "-B",
                "8192",
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-w",
            ])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errf)
            .spawn()
            .expect("spawn tcpdump");
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        let mut cap = Capture {
            label: iface.to_string(),
            ns_path: ns.path(),
            marks: 0,
            child: Some(child),
            pid,
            file,
            err,
            dir,
        };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&cap.err).unwrap_or_default();
            if text.contains("listening on") {
                break;
            }
            if let Some(st) = cap
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait tcpdump"))
            {
                cap.child = None;
                panic!("tcpdump on {iface} exited with {st}: {text}");
            }
            assert!(
                Instant::now() < end,
                "tcpdump on {iface} did not start listening: {text}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        cap
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Makes sure every packet that crossed the interface so far is in the
    /// file: sends a marker frame (ethertype 0x88b5, broadcast, not IP, so no
    /// IP filter matches it) out of the interface and waits until tcpdump has
    /// written it. Packets on one interface are captured in order.
    pub fn sync(&mut self) {
        assert!(self.child.is_some(), "capture on {} is stopped", self.label);
        self.marks += 1;
        let (path, iface, n) = (self.ns_path.clone(), self.label.clone(), self.marks);
        thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&path);
                send_marker_frame(&iface, n);
            })
            .join()
            .expect("marker thread");
        });
        let want = self.marks as usize;
        wait_until(
            Duration::from_secs(10),
            &format!("capture on {} to record marker {n}", self.label),
            || {
                self.read(MARK_FILTER)
                    .is_some_and(|t| t.lines().count() >= want)
            },
        );
    }

    /// Markers need an Ethernet link (veth); on others (a TUN) `stop` cannot
    /// prove completeness and only stops.
    pub fn is_ethernet(&self) -> bool {
        fs::read_to_string(&self.err)
            .unwrap_or_default()
            .contains("link-type EN10MB")
    }

    fn read(&self, filter: &str) -> Option<String> {
        self.read_with(&[], filter)
    }

    fn read_with(&self, flags: &[&str], filter: &str) -> Option<String> {
        let mut cmd = Command::new("tcpdump");
        cmd.args(flags).arg("-nn").arg("-r").arg(&self.file);
        if !filter.is_empty() {
            cmd.arg(filter);
        }
        let out = cmd.stdin(Stdio::null()).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Syncs (see [`Capture::sync`]), then SIGINT and wait (10 s, then
    /// SIGKILL). Idempotent. Returns tcpdump's closing statistics.
    pub fn stop(&mut self) -> String {
        if self.child.is_some() && !thread::panicking() && self.is_ethernet() {
            self.sync();
        }
        self.kill()
    }

    fn kill(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(self.pid, libc::SIGINT) };
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().expect("try_wait tcpdump").is_some() {
                    break;
                }
                if Instant::now() >= end {
                    // SAFETY: as above.
                    unsafe { libc::kill(self.pid, libc::SIGKILL) };
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Stops the capture (if running) and counts packets matching `filter`
    /// (a pcap filter; "" = all, markers excluded).
    pub fn count(&mut self, filter: &str) -> usize {
        self.dump(filter, usize::MAX).lines().count()
    }

    /// Stops the capture (if running) and returns `tcpdump -vv`'s decoding
    /// of the packets matching `filter` (markers excluded): it verifies the
    /// IP, TCP and UDP checksums of whole packets (`[udp sum ok]`, `[bad udp
    /// cksum ...]`, `[no cksum]`).
    pub fn dump_verbose(&mut self, filter: &str) -> String {
        self.stop();
        let f = format!("({filter}) and not ({MARK_FILTER})");
        self.read_with(&["-vv"], &f)
            .unwrap_or_else(|| panic!("tcpdump -vv -r {} '{f}' failed", self.file.display()))
    }

    /// Stops the capture (if running) and returns the decoded packets
    /// matching `filter` (markers excluded), at most `max_lines`.
    pub fn dump(&mut self, filter: &str, max_lines: usize) -> String {
        self.stop();
        let f = if filter.is_empty() {
            format!("not ({MARK_FILTER})")
        } else {
            format!("({filter}) and not ({MARK_FILTER})")
        };
        let out = self
            .read(&f)
            .unwrap_or_else(|| panic!("tcpdump -r {} '{f}' failed", self.file.display()));
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .take(max_lines)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

const MARK_ETHERTYPE: u16 = 0x88b5;
const MARK_FILTER: &str = "ether proto 0x88b5";

/// Sends one broadcast Ethernet frame of ethertype 0x88b5 out of `iface`
/// (calling thread's namespace).
fn send_marker_frame(iface: &str, n: u32) {
    let cname = std::ffi::CString::new(iface).expect("iface name");
    // SAFETY: plain libc calls with valid arguments; the fd is closed below.
    unsafe {
        let ifindex = libc::if_nametoindex(cname.as_ptr());
        assert!(
            ifindex != 0,
            "no interface {iface}: {}",
            io::Error::last_os_error()
        );
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0x55, 0x45, 0x54, 0x01]);
        frame[12..14].copy_from_slice(&MARK_ETHERTYPE.to_be_bytes());
        frame[14..18].copy_from_slice(&n.to_be_bytes());
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = MARK_ETHERTYPE.to_be();
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let r = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        assert!(r == 60, "send marker frame on {iface}: {err}");
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("capture on {} kept in {}", self.label, self.file.display());
        }
    }
}

// ---------------------------------------------------------------- payloads

/// Deterministic pseudo-random bytes: byte `i` of stream `seed` is byte
/// `i % 8` of splitmix64(seed, i / 8).
pub fn fill_payload(seed: u64, offset: u64, buf: &mut [u8]) {
    assert!(
        offset.is_multiple_of(8),
        "payload offsets are multiples of 8"
    );
    for (word, chunk) in (offset / 8..).zip(buf.chunks_mut(8)) {
        let mut z = seed.wrapping_add(word.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

pub type Sha = [u8; 32];

pub fn hex(sha: &Sha) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

const CHUNK: usize = 64 * 1024;
/// Socket timeouts of the transfer helpers: a stalled tunnel fails the test
/// instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes `len` payload bytes of `seed`; returns their SHA-256.
pub fn send_payload(w: &mut impl Write, len: u64, seed: u64) -> io::Result<Sha> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(CHUNK as u64)).expect("chunk fits usize");
        fill_payload(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().into())
}

/// A writer that counts the bytes the inner writer accepted: what a
/// transfer really wrote, as opposed to what it was asked to write.
pub struct Counting<W> {
    pub inner: W,
    pub written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads to EOF; returns (bytes, SHA-256).
pub fn recv_to_eof(r: &mut impl Read) -> io::Result<(u64, Sha)> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, h.finalize().into()))
}

// ---------------------------------------------------------------- TCP app

/// One transfer: the client uploads `upload` bytes of `seed` and downloads
/// `download` bytes of `seed ^ DOWN`, both at once on one connection.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub id: u64,
    pub upload: u64,
    pub download: u64,
    pub seed: u64,
}

const DOWN: u64 = 0x5a5a_5a5a_0000_0001;

impl Transfer {
    pub fn new(id: u64, upload: u64, download: u64) -> Transfer {
        Transfer {
            id,
            upload,
            download,
            seed: id.wrapping_mul(0x1234_5678_9abc_def1) ^ 0xfeed,
        }
    }
}

/// What the server app saw of one connection.
#[derive(Debug, Clone)]
pub struct ServerConn {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub received: u64,
    pub received_sha: Sha,
    /// Bytes the socket accepted (counted, not the requested length).
    pub sent: u64,
    pub sent_sha: Sha,
    pub error: Option<String>,
}

/// What the client app saw.
#[derive(Debug, Clone)]
pub struct ClientResult {
    pub transfer: Transfer,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Bytes the socket accepted (counted, not the requested length).
    pub sent: u64,
    pub sent_sha: Sha,
    pub received: u64,
    pub received_sha: Sha,
}

/// Checks that both directions arrived complete and intact: each sender
/// wrote the whole requested length (counted by [`Counting`]), and length
/// and SHA-256 computed by the receiver equal what the sender wrote.
pub fn assert_transfer_ok(c: &ClientResult, s: &ServerConn) {
    assert!(
        s.error.is_none(),
        "server side of transfer {} failed: {:?}",
        c.transfer.id,
        s.error
    );
    assert_eq!(s.id, c.transfer.id, "matched the wrong connection");
    assert_eq!(
        c.sent, c.transfer.upload,
        "client did not send all of transfer {}",
        c.transfer.id
    );
    assert_eq!(
        s.received, c.transfer.upload,
        "upload {}: server received {} of {} bytes",
        c.transfer.id, s.received, c.transfer.upload
    );
    assert_eq!(
        hex(&s.received_sha),
        hex(&c.sent_sha),
        "upload {}: SHA-256 at the server differs from the client's",
        c.transfer.id
    );
    assert_eq!(
        c.received, c.transfer.download,
        "download {}: client received {} of {} bytes",
        c.transfer.id, c.received, c.transfer.download
    );
    assert_eq!(
        s.sent, c.transfer.download,
        "server did not send all of download {}",
        c.transfer.id
    );
    assert_eq!(
        hex(&c.received_sha),
        hex(&s.sent_sha),
        "download {}: SHA-256 at the client differs from the server's",
        c.transfer.id
    );
}

/// A TCP server app in a namespace: for each connection it reads a 32-byte
/// header (id, upload, download, seed), then receives the upload to EOF while
/// sending the download, and reports a [`ServerConn`].
pub struct AppServer {
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    rx: mpsc::Receiver<ServerConn>,
    handle: Option<JoinHandle<()>>,
}

impl AppServer {
    pub fn start(ns: &Netns, bind: SocketAddrV4) -> AppServer {
        let listener = in_netns(ns, move || TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("bind app server on {bind} in {}: {e}", ns.name()));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let tx = tx.clone();
                        thread::spawn(move || {
                            let conn = serve_conn(stream, peer);
                            let _ = tx.send(conn);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        eprintln!("app server accept: {e}");
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
        AppServer {
            addr: bind,
            stop,
            rx,
            handle: Some(handle),
        }
    }

    /// The next finished connection; panics after `deadline`.
    pub fn next(&self, deadline: Duration) -> ServerConn {
        self.rx.recv_timeout(deadline).unwrap_or_else(|e| {
            panic!(
                "app server on {}: no finished connection within {deadline:?}: {e}",
                self.addr
            )
        })
    }

    /// `n` finished connections, keyed by transfer id.
    pub fn collect(&self, n: usize, deadline: Duration) -> HashMap<u64, ServerConn> {
        let end = Instant::now() + deadline;
        let mut out = HashMap::new();
        while out.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            let c = self.next(left);
            out.insert(c.id, c);
        }
        out
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve_conn(mut stream: TcpStream, peer: SocketAddr) -> ServerConn {
    let local = stream.local_addr().unwrap_or(peer);
    let mut conn = ServerConn {
        id: u64::MAX,
        peer,
        local,
        received: 0,
        received_sha: [0; 32],
        sent: 0,
        sent_sha: [0; 32],
        error: None,
    };
    let r = (|| -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut hdr = [0u8; 32];
        stream.read_exact(&mut hdr)?;
        let word =
            |i: usize| u64::from_be_bytes(hdr[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        conn.id = word(0);
        let download = word(2);
        let seed = word(3) ^ DOWN;
        let mut w = Counting { inner: stream.try_clone()?, written: 0 };
        let writer = thread::spawn(move || -> io::Result<(u64, Sha)> {
            let sha = send_payload(&mut w, download, seed)?;
            w.inner.shutdown(Shutdown::Write)?;
            Ok((w.written, sha))
        });
        let recv = recv_to_eof(&mut stream);
        let sent = writer
            .join()
            .map_err(|_| io::Error::other("writer panicked"))?;
        let (n, sha) = recv?;
        conn.received = n;
        conn.received_sha = sha;
        (conn.sent, conn.sent_sha) = sent?;
        Ok(())
    })();
    if let Err(e) = r {
        conn.error = Some(e.to_string());
    }
    conn
}

/// Runs transfer `t` from `ns` to `dest` (connect timeout 10 s, I/O timeouts
/// 60 s). Upload and download run at the same time.
pub fn try_transfer_from(ns: &Netns, dest: SocketAddrV4, t: Transfer) -> io::Result<ClientResult> {
    let stream = in_netns(ns, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(dest), Duration::from_secs(10))
    })?;
    transfer_on(stream, t)
}

/// Runs transfer `t` over an already connected stream.
pub fn transfer_on(mut stream: TcpStream, t: Transfer) -> io::Result<ClientResult> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let mut hdr = Vec::with_capacity(32);
    for w in [t.id, t.upload, t.download, t.seed] {
        hdr.extend_from_slice(&w.to_be_bytes());
    }
    stream.write_all(&hdr)?;
    let mut w = Counting { inner: stream.try_clone()?, written: 0 };
    let writer = thread::spawn(move || -> io::Result<(u64, Sha)> {
        let sha = send_payload(&mut w, t.upload, t.seed)?;
        w.inner.shutdown(Shutdown::Write)?;
        Ok((w.written, sha))
    });
    let recv = recv_to_eof(&mut stream);
    let (sent, sent_sha) = writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    let (received, received_sha) = recv?;
    Ok(ClientResult {
        transfer: t,
        local,
        peer,
        sent,
        sent_sha,
        received,
        received_sha,
    })
}

/// [`try_transfer_from`], panicking on error.
pub fn transfer_from(ns: &Netns, dest: SocketAddrV4, t: Transfer) -> ClientResult {
    try_transfer_from(ns, dest, t)
        .unwrap_or_else(|e| panic!("transfer {} from {} to {dest} failed: {e}", t.id, ns.name()))
}

/// Starts [`try_transfer_from`] on a background thread.
pub fn spawn_transfer(
    ns: &Netns,
    dest: SocketAddrV4,
    t: Transfer,
) -> JoinHandle<io::Result<ClientResult>> {
    let path = ns.path();
    thread::spawn(move || {
        enter_netns(&path);
        let stream = TcpStream::connect_timeout(&SocketAddr::V4(dest), Duration::from_secs(10))?;
        transfer_on(stream, t)
    })
}

/// Waits for a [`spawn_transfer`] thread until `deadline`: a tunnel that
/// crawls (some bytes now and then, so no socket timeout fires) fails the
/// test by name instead of running into the test binary's time limit. The
/// thread is left to end on its own socket timeouts.
pub fn join_transfer(h: JoinHandle<io::Result<ClientResult>>, deadline: Duration, what: &str) -> ClientResult {
    wait_until(deadline, &format!("{what} to finish"), || h.is_finished());
    match h.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{what} failed: {e}"),
        Err(e) => std::panic::resume_unwind(e),
    }
}

// ---------------------------------------------------------------- odd packets

/// Sends `n` UDP datagrams to `dest` from the calling thread's namespace
/// (use inside [`in_netns`]).
pub fn send_udp(dest: SocketAddrV4, n: usize) {
    let s = UdpSocket::bind("0.0.0.0:0").expect("bind udp");
    for i in 0..n {
        s.send_to(format!("uet probe {i}").as_bytes(), dest)
            .expect("send udp");
    }
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `n` ICMP echo requests to `dest` through a raw socket (there is no
/// `ping` binary here); use inside [`in_netns`].
pub fn send_icmp_echo(dest: Ipv4Addr, n: u16) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw icmp socket");
    for seq in 0..n {
        let mut pkt = vec![8u8, 0, 0, 0, 0x75, 0x65, 0, 0];
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"udp-encap-tun test echo");
        let ck = inet_checksum(&pkt);
        pkt[2..4].copy_from_slice(&ck.to_be_bytes());
        s.send_to(&pkt, &SockAddr::from(SocketAddrV4::new(dest, 0)))
            .expect("send icmp echo");
    }
}

/// Opens a TCP connection attempt to `dest` from a socket whose IPv4 header
/// carries options (IP_OPTIONS NOP NOP NOP EOL: a 24-byte header), so every
/// SYN it sends has IHL 6. Waits up to `wait` for the connect (which is
/// expected to fail) and returns whether it connected. Use inside [`in_netns`].
pub fn tcp_connect_with_ip_options(dest: SocketAddrV4, wait: Duration) -> bool {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("tcp socket");
    let opts: [u8; 4] = [1, 1, 1, 0];
    // SAFETY: valid fd, pointer and length of a live buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            opts.as_ptr().cast(),
            opts.len() as libc::socklen_t,
        )
    };
    assert!(
        r == 0,
        "setsockopt IP_OPTIONS: {}",
        io::Error::last_os_error()
    );
    s.connect_timeout(&SockAddr::from(dest), wait).is_ok()
}

/// SHA-256 of `len` payload bytes of `seed` (what [`send_payload`] sends).
pub fn payload_sha(len: u64, seed: u64) -> Sha {
    let mut sink = io::sink();
    send_payload(&mut sink, len, seed).expect("sink never fails")
}

/// Reads exactly `len` bytes; returns their SHA-256.
pub fn recv_exact_sha(r: &mut impl Read, len: u64) -> io::Result<Sha> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("chunk fits usize");
        r.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize().into())
}

/// TCP sockets of `ns` as (local, remote, state) from
/// `/proc/thread-self/net/tcp` (state in the kernel's hex: 01 ESTABLISHED,
/// 06 TIME_WAIT, 0A LISTEN, ...).
pub fn tcp_sockets(ns: &Netns) -> Vec<(SocketAddrV4, SocketAddrV4, String)> {
    let text = in_netns(ns, || fs::read_to_string("/proc/thread-self/net/tcp"))
        .expect("read /proc/net/tcp");
    let addr = |s: &str| -> SocketAddrV4 {
        let (a, p) = s.split_once(':').expect("addr:port");
        let a = u32::from_str_radix(a, 16).expect("hex addr");
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a)),
            u16::from_str_radix(p, 16).expect("hex port"),
        )
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() > 3).then(|| (addr(w[1]), addr(w[2]), w[3].to_string()))
        })
        .collect()
}

/// Waits until no TCP socket of `ns` is in a state that may still send
/// (anything but LISTEN and TIME_WAIT), e.g. before a capture that must stay
/// silent.
pub fn wait_tcp_quiet(ns: &Netns, deadline: Duration) {
    let end = Instant::now() + deadline;
    loop {
        let last: Vec<_> = tcp_sockets(ns)
            .into_iter()
            .filter(|s| s.2 != "0A" && s.2 != "06")
            .collect();
        if last.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "TCP sockets in {} still active after {deadline:?}: {last:?}",
            ns.name()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// An AF_PACKET socket on `ifname` of the calling thread's namespace, with a
/// 2 ms receive timeout and a 4 MB receive buffer.
pub fn packet_socket(ifname: &str) -> OwnedFd {
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain libc calls with valid arguments; the fd is owned below.
    unsafe {
        let ifindex = libc::if_nametoindex(cname.as_ptr());
        assert!(ifindex != 0, "no interface {ifname}");
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        let r = libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert!(
            r == 0,
            "bind AF_PACKET to {ifname}: {}",
            io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 2000,
        };
        let buf: libc::c_int = 4 << 20;
        for (opt, p, l) in [
            (
                libc::SO_RCVTIMEO,
                (&raw const tv).cast::<libc::c_void>(),
                std::mem::size_of::<libc::timeval>(),
            ),
            (
                libc::SO_RCVBUFFORCE,
                (&raw const buf).cast(),
                std::mem::size_of::<libc::c_int>(),
            ),
        ] {
            let r = libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                p,
                l as libc::socklen_t,
            );
            assert!(r == 0, "setsockopt {opt}: {}", io::Error::last_os_error());
        }
        fd
    }
}
