//! SPEC decision 10: start and stop are clean.
//!
//! Each start-up error a user can run into (a missing TUN, a TUN without
//! an IPv4 address, a missing uplink, a multi_queue TUN, the UDP port or the
//! authentication's TCP port in use, no privilege: a root-owned TUN, the
//! XDP gate, root-only credentials) ends the real daemon
//! binary at once with a non-zero exit and an error that says what is wrong
//! and how to fix it, and leaves nothing behind: no control socket, no XDP
//! program on the uplink, no pins, no TUN it made. After all of them a
//! correct start in the same namespace works, and SIGINT stops it as cleanly
//! as SIGTERM does (exit 0, program detached, pins removed).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const PORT: u16 = 40700;
const PIN_ROOT: &str = "/sys/fs/bpf/udp-encap-tun";

/// The server's credentials, made with the daemon's own command.
fn server_creds(art: &ArtifactDir) -> Vec<String> {
    let dir = art.file("creds");
    let d = dir.to_str().unwrap().to_string();
    run_cmd(Command::new(*BIN).args(["credentials", "server", "--dir", &d]));
    ["--cert", "server.crt", "--key", "server.key", "--clients", "clients.txt"]
        .chunks(2)
        .flat_map(|kv| [kv[0].to_string(), dir.join(kv[1]).to_str().unwrap().to_string()])
        .collect()
}

/// Pin directories of daemons in `ns` (`<netns inode>-<iface>-<port>`).
fn pins_of(ns: &Netns) -> Vec<String> {
    let ino = fs::metadata(ns.path()).unwrap().ino();
    fs::read_dir(PIN_ROOT)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{ino}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn xdp_on(ns: &Netns, dev: &str) -> bool {
    ns.ip(&["-d", "link", "show", "dev", dev]).contains("prog/xdp")
}

/// One namespace with an uplink (a veth whose peer stays in it, 192.0.2.1/24)
/// and a server TUN `tun0` (198.18.0.1/24).
struct Host1 {
    ns: Netns,
    uplink: String,
    art: ArtifactDir,
    creds: Vec<String>,
}

impl Host1 {
    fn new(tag: &str) -> Host1 {
        let ns = Netns::new(tag);
        let (a, b) = (if_name("ua"), if_name("ub"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ns.ip(&["link", "set", &a, "up"]);
        ns.ip(&["link", "set", &b, "up"]);
        ns.addr_add(&a, "192.0.2.1/24");
        add_tun(&ns, SERVER_TUN_CIDR, TUN_MTU);
        let art = ArtifactDir::new(tag);
        let creds = server_creds(&art);
        Host1 { ns, uplink: a, art, creds }
    }

    /// A server's arguments on `tun` and `uplink`, with credentials.
    fn args(&self, tun: &str, uplink: &str) -> Vec<String> {
        let extra: Vec<&str> = self.creds.iter().map(String::as_str).collect();
        daemon_args(tun, uplink, PORT, None, &extra)
    }

    /// Starts the daemon (through `wrapper`, if any) and checks that it
    /// fails as a user should see it: a non-zero exit within 10 s, an error
    /// line with every phrase of `says`, and nothing left behind (no control
    /// socket answers, no XDP program on the uplink, no pins). Returns the
    /// log.
    fn start_fails(&self, label: &str, wrapper: &[&str], args: &[String], says: &[&str]) -> String {
        let mut d = Daemon::spawn_no_wait_via(&self.ns, label, wrapper, args);
        let st = d.wait_exit(Duration::from_secs(10));
        let log = d.log_text();
        assert!(!st.success(), "{label}: exited with {st}, want a failure; log:\n{log}");
        let err = log
            .lines()
            .find(|l| l.starts_with("udp-encap-tun: error:"))
            .unwrap_or_else(|| panic!("{label}: no `udp-encap-tun: error:` line; log:\n{log}"));
        for phrase in says {
            assert!(err.contains(phrase), "{label}: the error does not say `{phrase}`:\n{err}");
        }
        eprintln!("{label}: {st}: {err}");
        assert!(
            d.try_status().is_err(),
            "{label}: a status socket answers after the daemon exited"
        );
        assert!(!xdp_on(&self.ns, &self.uplink), "{label}: an XDP program stayed on the uplink");
        assert_eq!(pins_of(&self.ns), Vec::<String>::new(), "{label}: pins left in {PIN_ROOT}");
        log
    }
}

#[test]
fn start_up_errors_say_what_is_wrong_and_leave_nothing_behind() {
    let h = Host1::new("sfail");
    let up = h.uplink.clone();

    // A TUN that does not exist: refused, and not created either.
    let missing = "uetnotun0";
    h.start_fails(
        "missing-tun",
        &[],
        &h.args(missing, &up),
        &[&format!("interface {missing} does not exist"), &format!("ip tuntap add dev {missing} mode tun")],
    );
    let out = h.ns.cmd("ip").args(["link", "show", missing]).output().unwrap();
    assert!(!out.status.success(), "the daemon created {missing}");

    h.start_fails(
        "missing-uplink",
        &[],
        &h.args("tun0", "uetnolink0"),
        &["uplink interface uetnolink0 (--bind-to-interface) does not exist", "ip link"],
    );

    h.ns.ip(&["tuntap", "add", "dev", "tunnoaddr", "mode", "tun"]);
    h.ns.ip(&["link", "set", "tunnoaddr", "up"]);
    h.start_fails(
        "tun-without-ipv4",
        &[],
        &h.args("tunnoaddr", &up),
        &["TUN tunnoaddr has no IPv4 address", "ip addr add"],
    );

    h.ns.ip(&["tuntap", "add", "dev", "tunmq", "mode", "tun", "multi_queue"]);
    h.ns.addr_add("tunmq", "198.18.1.1/24");
    h.ns.ip(&["link", "set", "tunmq", "up"]);
    h.start_fails(
        "multi-queue-tun",
        &[],
        &h.args("tunmq", &up),
        &["tunmq cannot be opened as a TUN device", "multi_queue", "ip tuntap add dev tunmq mode tun"],
    );

    // The UDP port held by another program: it keeps it.
    let holder = in_netns(&h.ns, || UdpSocket::bind(("0.0.0.0", PORT))).unwrap();
    h.start_fails(
        "udp-port-in-use",
        &[],
        &h.args("tun0", &up),
        &[&format!("UDP port {PORT} is already in use"), "--listen-port"],
    );
    assert_eq!(holder.local_addr().unwrap().port(), PORT);
    drop(holder);

    // The authentication's TCP port held: this error comes after the XDP
    // gate attached, which must go again with its pins.
    let holder = in_netns(&h.ns, || TcpListener::bind(("0.0.0.0", PORT))).unwrap();
    let log = h.start_fails(
        "tcp-port-in-use",
        &[],
        &h.args("tun0", &up),
        &[&format!("listen for authentication on TCP port {PORT}"), "another program"],
    );
    assert!(
        log.contains("XDP gate attached"),
        "the TCP port case failed before the gate attached, so it proves less than it says:\n{log}"
    );
    drop(holder);

    // No privilege: an ordinary user (nobody). A TUN made without an owner
    // (`ip tuntap add` without `user`) opens for anyone who may open /dev/net/tun,
    // and --xdp-mode auto goes on without the gate (a warning), so what
    // stops such a user depends on where the privilege is missing. Debian's
    // udev makes /dev/net/tun 0666, but a host without udev (a container, a
    // fresh CI machine) may have it 0600, where every case below would stop
    // at the device node instead of where it means to: the daemon gets a
    // 0666 node of its own in a private mount namespace, so the cases are
    // the same on every host and the host's /dev is not touched.
    let nobody = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o mode=755 uet-devnet /dev/net && mknod -m 666 /dev/net/tun c 10 200 \
         && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" \"$@\"",
    ];
    // a TUN owned by root (`user root`, as the README makes it): refused
    // although the device node opens;
    h.ns.ip(&["tuntap", "add", "dev", "tunroot", "mode", "tun", "user", "0"]);
    h.ns.addr_add("tunroot", "198.18.2.1/24");
    h.ns.ip(&["link", "set", "tunroot", "up"]);
    h.start_fails(
        "no-privilege-tun",
        &nobody,
        &h.args("tunroot", &up),
        &["not allowed to open TUN tunroot", "run as root", "CAP_NET_ADMIN"],
    );
    // the XDP gate asked for explicitly;
    let mut args = h.args("tun0", &up);
    args.extend(["--xdp-mode".to_string(), "generic".to_string()]);
    h.start_fails(
        "no-privilege-xdp",
        &nobody,
        &args,
        &[&format!("cannot attach the XDP gate to {up}"), "run as root (or with CAP_BPF and CAP_NET_ADMIN)"],
    );
    // the server's key and certificate, readable by root only.
    h.start_fails(
        "no-privilege-credentials",
        &nobody,
        &h.args("tun0", &up),
        &["cannot read certificate", "Permission denied", "check the path and its permissions"],
    );

    // Nothing of all that blocks a correct start; SIGINT stops it cleanly.
    let mut d = Daemon::spawn(&h.ns, "sfail-good", &h.args("tun0", &up));
    assert!(xdp_on(&h.ns, &up), "the good start attached no XDP gate");
    assert_eq!(pins_of(&h.ns).len(), 1, "the good start's pins");
    let st = d.interrupt();
    assert!(st.success(), "SIGINT: exited with {st}; log:\n{}", d.log_tail(20));
    let log = d.log_text();
    for says in ["SIGINT: stopping", "XDP gate detached", "stopped cleanly"] {
        assert!(log.contains(says), "after SIGINT the log does not say `{says}`:\n{}", d.log_tail(20));
    }
    assert!(!xdp_on(&h.ns, &up), "XDP program left on the uplink after SIGINT");
    assert_eq!(pins_of(&h.ns), Vec::<String>::new(), "pins left after SIGINT");
    assert!(d.try_status().is_err(), "a status socket answers after SIGINT");
    assert!(Path::new(&h.art.file("creds")).exists());
}
