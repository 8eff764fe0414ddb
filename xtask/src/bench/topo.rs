//! The benchmark's hosts: two namespaces joined by two veth pairs (one for
//! the tunnel's UDP, one for the raw path), a TUN in each, the two daemons and
//! an iperf3 server. Everything is named after this process's PID and torn
//! down by `Drop` on every exit path; SIGINT/SIGTERM only raise a flag that
//! the polling loops check, so an interrupted run unwinds through the same
//! guards.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::deps;

// ---- interruption ----

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag instead of killing the process, so that the
/// guards run. Children in the foreground group get Ctrl-C too; they are
/// reaped by PID in the guards anyway.
pub fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Sleep in small steps, failing early on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

// ---- commands ----

/// Run quietly, return stdout, fail with stderr.
pub fn sh(prog: &str, args: &[&str]) -> Result<String> {
    deps::output(Command::new(prog).args(args))
}

/// Wait for a child with a deadline, polling so Ctrl-C is noticed. On timeout
/// or interruption the child is killed (by its PID) and reaped.
pub fn wait_child(
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> Result<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if interrupted() || Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("{what} did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A background process stopped by PID (SIGTERM, SIGKILL after 3 s) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("could not start {name}: `{}`", deps::show(cmd)))?;
        Ok(Proc {
            name: name.into(),
            child,
            log: log.into(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fail (with the tail of its log) if it has exited.
    pub fn ensure_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited ({st}); last lines of its log:\n{}",
                self.name,
                self.log_tail(15)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .get(lines.len().saturating_sub(n)..)
            .unwrap_or_default()
            .iter()
            .map(|l| format!("   | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's PID (not yet reaped, so not reused).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench: {} (pid {pid}) ignored SIGTERM for 3 s: SIGKILL",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds (utime + stime, all threads) of a process, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat: field {} missing", i + 3))
    };
    let ticks = get(11)? + get(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Run `f` on a thread that has joined the network namespace `ns`: sockets it
/// creates live there. (setns(CLONE_NEWNET) affects only the calling thread.)
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on an fd we own; it changes only this thread's netns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns({path}): {}", std::io::Error::last_os_error());
        }
        drop(file);
        f()
    }))
}

// ---- the topology ----

pub const SRV_UPLINK: &str = "192.0.2.1";
pub const CLI_UPLINK: &str = "192.0.2.2";
pub const SRV_RAW: &str = "198.51.100.1";
pub const CLI_RAW: &str = "198.51.100.2";
/// `--ipv6`: the same veth pairs' IPv6 addresses (the uplink's carry the
/// tunnel's UDP, the raw pair's the raw IPv6 TCP).
pub const SRV_UPLINK6: &str = "2001:db8:1::1";
pub const CLI_UPLINK6: &str = "2001:db8:1::2";
pub const SRV_RAW6: &str = "2001:db8:2::1";
pub const CLI_RAW6: &str = "2001:db8:2::2";
pub const SRV_TUN: &str = "198.18.0.1";
pub const CLI_TUN: &str = "198.19.0.2";
pub const DAEMON_PORT: u16 = 12345;
pub const IPERF_PORT: u16 = 5201;
pub const RR_PORT: u16 = 5202;
/// The veth pairs' MTU (the kernel's default for veth).
pub const VETH_MTU: u32 = 1500;
/// The most the TUN may have on a VETH_MTU uplink: the wire adds 8 bytes.
pub const MAX_TUN_MTU: u32 = VETH_MTU - 8;
/// The TUNs' MTU unless --tun-mtu says otherwise: the README's example, and
/// every figure in docs/bench.md up to now was measured with it.
pub const DEFAULT_TUN_MTU: u32 = 1400;

/// Names of everything this run creates.
pub struct Names {
    pub srv: String,
    pub cli: String,
    pub up_s: String,
    pub up_c: String,
    pub raw_s: String,
    pub raw_c: String,
    pub tun_s: String,
    pub tun_c: String,
}

impl Names {
    pub fn new(id: u32) -> Names {
        // Interface names stay under 16 bytes; the daemons' status sockets and
        // XDP pins are named after the interfaces, so those are unique too.
        Names {
            srv: format!("uet-bench-srv-{id}"),
            cli: format!("uet-bench-cli-{id}"),
            up_s: format!("bu{id}s"),
            up_c: format!("bu{id}c"),
            raw_s: format!("br{id}s"),
            raw_c: format!("br{id}c"),
            tun_s: format!("bt{id}s"),
            tun_c: format!("bt{id}c"),
        }
    }
}

/// Owns the namespaces, the processes in them and the scratch directory.
/// Drop stops the processes first, then deletes the namespaces (and with them
/// every veth and TUN), then the scratch directory.
pub struct Topology {
    pub names: Names,
    pub work: PathBuf,
    pub bin: PathBuf,
    pub server: Option<Proc>,
    pub client: Option<Proc>,
    pub iperf: Option<Proc>,
    /// The client reaches the server over the uplink's IPv6 addresses
    /// (`--endpoint-v6`), set by [`Topology::restart_daemons`].
    pub client_ipv6: bool,
    made_ns: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.iperf.take();
        self.client.take();
        self.server.take();
        for ns in self.made_ns.drain(..).rev() {
            if let Err(e) = sh("ip", &["netns", "del", &ns]) {
                eprintln!("bench: cleanup: {e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

impl Topology {
    /// Build both namespaces, both veth pairs and both TUNs; with `ipv6`
    /// the veths get IPv6 addresses too (`nodad`: usable at once).
    pub fn build(bin: &Path, tun_mtu: u32, ipv6: bool) -> Result<Topology> {
        let id = std::process::id();
        let names = Names::new(id);
        let work = std::env::temp_dir().join(format!("uet-bench-{id}"));
        std::fs::create_dir_all(&work)?;
        let mut t = Topology {
            names,
            work,
            bin: bin.into(),
            server: None,
            client: None,
            iperf: None,
            client_ipv6: false,
            made_ns: Vec::new(),
        };
        let n = &t.names;
        let (srv, cli) = (n.srv.clone(), n.cli.clone());
        for ns in [&srv, &cli] {
            sh("ip", &["netns", "add", ns])?;
            t.made_ns.push(ns.clone());
            sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        let n = &t.names;
        // Uplink: the tunnel's UDP travels here (the XDP gate sits on it).
        // Raw: a second pair with its own subnet, so the raw TCP never meets
        // the XDP program nor a route into the TUN.
        for (s, c, sa, ca) in [
            (&n.up_s, &n.up_c, SRV_UPLINK, CLI_UPLINK),
            (&n.raw_s, &n.raw_c, SRV_RAW, CLI_RAW),
        ] {
            sh(
                "ip",
                &[
                    "link", "add", s, "netns", &srv, "type", "veth", "peer", "name", c, "netns",
                    &cli,
                ],
            )?;
            sh(
                "ip",
                &["-n", &srv, "addr", "add", &format!("{sa}/24"), "dev", s],
            )?;
            sh(
                "ip",
                &["-n", &cli, "addr", "add", &format!("{ca}/24"), "dev", c],
            )?;
            sh("ip", &["-n", &srv, "link", "set", s, "up"])?;
            sh("ip", &["-n", &cli, "link", "set", c, "up"])?;
        }
        if ipv6 {
            for (ns, dev, addr) in [
                (&srv, &n.up_s, SRV_UPLINK6),
                (&cli, &n.up_c, CLI_UPLINK6),
                (&srv, &n.raw_s, SRV_RAW6),
                (&cli, &n.raw_c, CLI_RAW6),
            ] {
                sh("ip", &["-n", ns, "addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"])?;
            }
        }
        let mtu = tun_mtu.to_string();
        for (ns, tun, addr) in [
            (&srv, &n.tun_s, format!("{SRV_TUN}/24")),
            (&cli, &n.tun_c, format!("{CLI_TUN}/32")),
        ] {
            sh(
                "ip",
                &["-n", ns, "tuntap", "add", "dev", tun, "mode", "tun"],
            )?;
            sh("ip", &["-n", ns, "addr", "add", &addr, "dev", tun])?;
            if ipv6 {
                // No link-local address nor MLD reports into the tunnel
                // (they would be counted as discard_not_tcp).
                let key = format!("net.ipv6.conf.{tun}.disable_ipv6=1");
                sh("ip", &["netns", "exec", ns, "sysctl", "-qw", &key])?;
            }
            sh("ip", &["-n", ns, "link", "set", tun, "mtu", &mtu, "up"])?;
        }
        sh(
            "ip",
            &[
                "-n",
                &cli,
                "route",
                "add",
                &format!("{SRV_UPLINK}/32"),
                "dev",
                &n.tun_c,
                "src",
                CLI_TUN,
            ],
        )?;
        Ok(t)
    }

    fn nsenter(&self, ns: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).arg("--");
        c
    }

    /// `ip netns exec NS PROG ARGS` (for iperf3, sysctl, cat).
    pub fn netns_exec(&self, ns: &str, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, prog]);
        c
    }

    /// Stops both daemons (SIGTERM, by PID) and starts them again with
    /// other options; `tag` names their new log files.
    pub fn restart_daemons(&mut self, xdp_mode: &str, busy_poll: u32, tag: &str, client_ipv6: bool) -> Result<()> {
        self.client.take();
        self.server.take();
        self.client_ipv6 = client_ipv6;
        self.spawn_daemons(xdp_mode, busy_poll, tag)
    }

    /// Both daemons (insecure-no-auth: the benchmark measures the data
    /// path), each in its namespace; waits until each answers.
    fn spawn_daemons(&mut self, xdp_mode: &str, busy_poll: u32, tag: &str) -> Result<()> {
        let port = DAEMON_PORT.to_string();
        let busy_poll = busy_poll.to_string();
        for server in [true, false] {
            let n = &self.names;
            let (role, ns, tun, up) = if server {
                ("server", &n.srv, &n.tun_s, &n.up_s)
            } else {
                ("client", &n.cli, &n.tun_c, &n.up_c)
            };
            let v6 = format!("{SRV_UPLINK}={SRV_UPLINK6}");
            let endpoint = ["--endpoint-port", port.as_str(), "--endpoint-v6", v6.as_str()];
            let n_endpoint = match (server, self.client_ipv6) {
                (true, _) => 0,
                (false, false) => 2,
                (false, true) => 4,
            };
            let mut cmd = self.nsenter(ns);
            cmd.arg(&self.bin)
                .args(["--interface", tun, "--listen-port", &port, "--bind-to-interface", up])
                .args(endpoint.get(..n_endpoint).unwrap_or_default())
                .args(["--insecure-no-auth", "--xdp-mode", xdp_mode, "--busy-poll", &busy_poll]);
            println!(
                "bench: ({role} ns) {}",
                deps::show(&cmd).trim_start_matches("nsenter ")
            );
            let proc = Proc::spawn(
                &format!("{role} daemon"),
                &mut cmd,
                &self.work.join(format!("{role}{tag}.log")),
            )?;
            if server {
                self.server = Some(proc);
            } else {
                self.client = Some(proc);
            }
        }
        for server in [true, false] {
            self.wait_status(server)?;
        }
        Ok(())
    }

    /// Start both daemons and the iperf3 server; wait until each answers.
    pub fn start(&mut self, xdp_mode: &str, busy_poll: u32) -> Result<()> {
        self.spawn_daemons(xdp_mode, busy_poll, "")?;
        let mut cmd = self.netns_exec(&self.names.srv.clone(), "iperf3");
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()]);
        self.iperf = Some(Proc::spawn(
            "iperf3 server",
            &mut cmd,
            &self.work.join("iperf3-server.log"),
        )?);
        let srv = self.names.srv.clone();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .netns_exec(&srv, "ss")
                .args(["-Htln", &format!("sport = :{IPERF_PORT}")])
                .output()?;
            if !out.stdout.is_empty() {
                break;
            }
            if let Some(p) = self.iperf.as_mut() {
                p.ensure_alive()?;
            }
            if Instant::now() > end {
                bail!("iperf3 -s did not listen on port {IPERF_PORT} within 10 s");
            }
            sleep(Duration::from_millis(50))?;
        }
        Ok(())
    }

    fn wait_status(&mut self, server: bool) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            check_interrupted()?;
            let p = if server {
                self.server.as_mut()
            } else {
                self.client.as_mut()
            };
            if let Some(p) = p {
                p.ensure_alive()?;
            }
            if self.status(server).is_ok() {
                return Ok(());
            }
            if Instant::now() > end {
                let p = if server { &self.server } else { &self.client };
                bail!(
                    "the {} daemon runs but `status` did not answer within 15 s; its log:\n{}",
                    if server { "server" } else { "client" },
                    p.as_ref().map(|p| p.log_tail(15)).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `udp-encap-tun status` as it prints it.
    pub fn status_text(&self, server: bool) -> Result<String> {
        let (ns, tun) = if server {
            (&self.names.srv, &self.names.tun_s)
        } else {
            (&self.names.cli, &self.names.tun_c)
        };
        let mut cmd = self.nsenter(ns);
        cmd.arg(&self.bin).args(["status", "--interface", tun]);
        deps::output(&mut cmd)
    }

    /// `udp-encap-tun status`: the `counter NAME VALUE` lines as a map.
    pub fn status(&self, server: bool) -> Result<BTreeMap<String, u64>> {
        let text = self.status_text(server)?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == "counter").then_some(())?;
                Some((w.next()?.to_string(), w.next()?.parse().ok()?))
            })
            .collect())
    }

    pub fn daemon_cpu(&self) -> Result<(f64, f64)> {
        let s = self.server.as_ref().context("no server daemon")?.pid();
        let c = self.client.as_ref().context("no client daemon")?.pid();
        Ok((cpu_seconds(s)?, cpu_seconds(c)?))
    }

    pub fn ensure_daemons_alive(&mut self) -> Result<()> {
        for p in [
            self.server.as_mut(),
            self.client.as_mut(),
            self.iperf.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            p.ensure_alive()?;
        }
        Ok(())
    }

    /// Kernel-side drop counters of one namespace: UDP socket errors and the
    /// TUN's queue drops (packets the daemon did not read in time).
    pub fn kernel_drops(&self, server: bool) -> Result<BTreeMap<String, u64>> {
        let (ns, tun) = if server {
            (&self.names.srv, &self.names.tun_s)
        } else {
            (&self.names.cli, &self.names.tun_c)
        };
        let mut m = BTreeMap::new();
        let snmp = deps::output(self.netns_exec(ns, "cat").arg("/proc/net/snmp"))?;
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        if let [head, vals, ..] = udp.as_slice() {
            for (k, v) in head.split_whitespace().zip(vals.split_whitespace()).skip(1) {
                if matches!(k, "InErrors" | "RcvbufErrors" | "SndbufErrors") {
                    m.insert(format!("udp_{k}"), v.parse().unwrap_or(0));
                }
            }
        }
        let link = sh("ip", &["-n", ns, "-s", "-j", "link", "show", "dev", tun])?;
        let v: serde_json::Value = serde_json::from_str(&link).context("ip -j link")?;
        for (dir, key) in [("tx", "dropped"), ("rx", "dropped"), ("tx", "errors")] {
            let n = v
                .pointer(&format!("/0/stats64/{dir}/{key}"))
                .and_then(serde_json::Value::as_u64);
            m.insert(format!("tun_{dir}_{key}"), n.unwrap_or(0));
        }
        Ok(m)
    }
}
