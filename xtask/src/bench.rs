//! `cargo xtask bench`: tunnel versus raw veth, measured in the same run.
//!
//! Builds its own hosts (two namespaces named after this PID; see
//! `bench/topo.rs`): the tunnel's UDP runs over one veth pair, the raw path
//! over a second pair, so the raw TCP meets neither the TUN nor the XDP gate
//! and keeps the veth's MTU 1500 and GSO/GRO. For 1 and 4 flows, both
//! directions, iperf3 runs alternate tunnel, raw, tunnel, raw ... and the
//! medians and their ratio are reported (the ratio is what travels between
//! machines). Each tunnel run also reads utime+stime of both daemons from
//! /proc/PID/stat before and after, divided by the bytes iperf3 moved. A
//! request/response test (64 B each way, one TCP connection, TCP_NODELAY)
//! measures latency through the tunnel and raw, alternated the same way.
//!
//! Output: a Markdown table on stdout (paste it into the README),
//! `bench-out/results.json` and `bench-out/bench.svg`.

mod report;
mod rr;
mod topo;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{deps, ebpf};
use topo::{Topology, sh};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// iperf3 runs per case and path (tunnel and raw alternate: A B A B ...).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// A short smoke run: 2 runs of 1 s (overrides --runs and --seconds).
    #[arg(long)]
    quick: bool,
    /// Use this daemon binary instead of building target/release/udp-encap-tun
    /// (e.g. to compare a saved "before" binary with today's).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// The daemons' --xdp-mode (auto: the gate on the uplink, as users run it).
    #[arg(long, default_value = "auto", value_parser = ["auto", "native", "generic", "off"])]
    xdp_mode: String,
    /// The daemons' --busy-poll in microseconds (0: they sleep in epoll at
    /// once, as by default).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    busy_poll: u32,
    /// The TUNs' MTU: at most 1492, the 1500-byte veth's MTU minus the 8
    /// bytes the wire adds (the raw path has the veth's whole 1500).
    #[arg(long, value_name = "BYTES", default_value_t = topo::DEFAULT_TUN_MTU,
          value_parser = clap::value_parser!(u32).range(576..=i64::from(topo::MAX_TUN_MTU)))]
    tun_mtu: u32,
    /// Also measure the tunnel over IPv6: after the IPv4 cases the daemons
    /// restart with the client reaching the server over the uplink veth's
    /// IPv6 addresses (`--endpoint-v6`), and the same cases run against the
    /// raw IPv6 path (the raw veth's IPv6 addresses), alternated the same
    /// way. The IPv4 figures of the same run come first, for comparison.
    #[arg(long)]
    ipv6: bool,
    /// Where results.json and bench.svg go (relative: to the workspace root).
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    out: PathBuf,
}

/// One throughput case.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub flows: u32,
    /// iperf3 -R: the server sends.
    pub reverse: bool,
}

impl Case {
    pub fn label(&self) -> String {
        format!(
            "{} flow{}, {}",
            self.flows,
            if self.flows == 1 { "" } else { "s" },
            if self.reverse {
                "server → client (-R)"
            } else {
                "client → server"
            }
        )
    }
    pub fn key(&self) -> String {
        format!(
            "{}flow_{}",
            self.flows,
            if self.reverse { "s2c" } else { "c2s" }
        )
    }
}

const CASES: [Case; 4] = [
    Case {
        flows: 1,
        reverse: false,
    },
    Case {
        flows: 1,
        reverse: true,
    },
    Case {
        flows: 4,
        reverse: false,
    },
    Case {
        flows: 4,
        reverse: true,
    },
];

/// One iperf3 run.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub gbps: f64,
    pub bytes: u64,
    pub retransmits: u64,
    /// Daemon CPU seconds during the run (tunnel only): server, client.
    pub cpu: Option<(f64, f64)>,
}

#[derive(Debug, Default)]
pub struct CaseResult {
    pub tunnel: Vec<Run>,
    pub raw: Vec<Run>,
}

pub struct Results {
    pub facts: Vec<(String, String)>,
    pub runs: u32,
    pub seconds: u32,
    pub rr_seconds: f64,
    pub cases: Vec<(Case, CaseResult)>,
    /// `--ipv6`: the same cases with the tunnel over IPv6 and the raw IPv6
    /// path (empty without it).
    pub cases_v6: Vec<(Case, CaseResult)>,
    /// Round-trip samples (ns): tunnel, raw.
    pub rr_tunnel: Vec<u64>,
    pub rr_raw: Vec<u64>,
    /// With the default --busy-poll 0, the tunnel's round trips again with
    /// the daemons restarted with --busy-poll N: (N, samples).
    pub rr_busy: Option<(u32, Vec<u64>)>,
    /// Round trips (ns) of a byte between two threads pinned to CPUs 0 and
    /// 1: what two wake-ups across CPUs cost here (None: not measured).
    pub wake: Option<Vec<u64>>,
    /// Counter deltas over the whole benchmark: (who, name, delta).
    pub counters: Vec<(String, String, u64)>,
    pub wall: Duration,
}

/// The --busy-poll (µs) of the second latency pass.
const SHOWN_BUSY_POLL: u32 = 50;

pub fn bench(args: &BenchArgs) -> Result<()> {
    let r = run(args);
    // Every guard has run by now (they live inside `run`).
    if topo::interrupted() {
        eprintln!("bench: interrupted; the namespaces and the processes it started are gone");
        std::process::exit(130);
    }
    r
}

fn run(args: &BenchArgs) -> Result<()> {
    deps::require_root(
        "the benchmark creates network namespaces, veth pairs, TUN devices and an XDP program",
    )?;
    for tool in ["ip", "nsenter", "iperf3", "ss"] {
        if deps::which(tool).is_none() {
            bail!("bench: `{tool}` not found: run `cargo xtask deps` first");
        }
    }
    let given = args.daemon.is_some();
    let (runs, seconds) = if args.quick {
        (2, 1)
    } else {
        (args.runs, args.seconds)
    };
    let rr_seconds = if args.quick { 0.5 } else { 1.0 };
    let root = crate::workspace_root();
    let bin = match &args.daemon {
        Some(p) => p
            .canonicalize()
            .with_context(|| format!("bench: daemon binary {}", p.display()))?,
        None => build_daemon(&root)?,
    };
    let out_dir = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };

    topo::install_signal_handlers();
    let started = Instant::now();
    let mut t = Topology::build(&bin, args.tun_mtu, args.ipv6).context("bench: building the namespaces")?;
    println!(
        "bench: namespaces {} and {} (removed at exit); tunnel over {}/{}, raw over {}/{}",
        t.names.srv, t.names.cli, t.names.up_s, t.names.up_c, t.names.raw_s, t.names.raw_c
    );
    t.start(&args.xdp_mode, args.busy_poll)
        .context("bench: starting the daemons")?;
    let _rr_server = rr::Server::start(&t.names.srv)?;

    let facts = machine_facts(&t, &root, &bin, args, given)?;
    println!("\nbench: machine");
    for (k, v) in &facts {
        println!("  {k:<24} {v}");
    }

    // The first packets create the server's entry: check the tunnel carries
    // TCP at all before timing it.
    let tun_rr = SocketAddr::from((parse_ip(topo::SRV_UPLINK), topo::RR_PORT));
    let raw_rr = SocketAddr::from((parse_ip(topo::SRV_RAW), topo::RR_PORT));
    rr::measure(&t.names.cli, tun_rr, Duration::from_millis(200))
        .context("bench: no TCP through the tunnel (request/response warm-up failed)")?;
    rr::measure(&t.names.cli, raw_rr, Duration::from_millis(200))
        .context("bench: no TCP over the raw veth")?;

    let counters0 = (
        t.status(true)?,
        t.status(false)?,
        t.kernel_drops(true)?,
        t.kernel_drops(false)?,
    );

    let total = runs as usize * CASES.len() * 2;
    println!(
        "\nbench: throughput: {} cases x {runs} runs x (tunnel, raw), {seconds} s each: about {} s",
        CASES.len(),
        total as u32 * (seconds + 2) + runs * 2
    );
    let results = throughput(&mut t, topo::SRV_RAW, runs, seconds)?;

    println!(
        "\nbench: latency: {runs} x (tunnel, raw) x {rr_seconds} s of {} B request/response",
        rr::MSG
    );
    let (rr_tunnel, mut rr_raw) = latency_pass(&mut t, tun_rr, raw_rr, runs, rr_seconds)?;

    let counters1 = (
        t.status(true)?,
        t.status(false)?,
        t.kernel_drops(true)?,
        t.kernel_drops(false)?,
    );

    // The same round trips with the daemons polling instead of sleeping:
    // what --busy-poll buys, from the same run.
    let rr_busy = if args.busy_poll == 0 {
        println!("\nbench: latency again, daemons restarted with --busy-poll {SHOWN_BUSY_POLL}");
        t.restart_daemons(&args.xdp_mode, SHOWN_BUSY_POLL, "-busy-poll", false)
            .context("bench: restarting the daemons with --busy-poll")?;
        rr::measure(&t.names.cli, tun_rr, Duration::from_millis(200))
            .context("bench: no TCP through the restarted tunnel")?;
        let (busy, raw) = latency_pass(&mut t, tun_rr, raw_rr, runs, rr_seconds)?;
        rr_raw.extend(raw);
        Some((SHOWN_BUSY_POLL, busy))
    } else {
        None
    };
    // What the latency figures are made of: the tunnel's round trip has four
    // more wake-ups than raw's, and this is what two of them cost here.
    let wake = match rr::wake_round_trips(Duration::from_secs_f64(rr_seconds)) {
        Ok(w) => w,
        Err(e) => {
            topo::check_interrupted()?;
            eprintln!("bench: the wake-up measurement failed, left out: {e:#}");
            None
        }
    };
    // The tunnel over IPv6, against the raw IPv6 path.
    let results_v6 = if args.ipv6 {
        println!("\nbench: IPv6 uplink: daemons restarted, the client reaching the server at {}", topo::SRV_UPLINK6);
        t.restart_daemons(&args.xdp_mode, args.busy_poll, "-ipv6", true)
            .context("bench: restarting the daemons for IPv6")?;
        rr::measure(&t.names.cli, tun_rr, Duration::from_millis(200)).with_context(|| {
            format!(
                "bench: no TCP through the tunnel over IPv6 (an XDP gate that holds IPv4 peers only \
                 refuses IPv6 ones: try --xdp-mode off); the server's log:\n{}",
                t.server.as_ref().map(|p| p.log_tail(10)).unwrap_or_default()
            )
        })?;
        // Version 1: the warm-up's first datagram made the server's entry.
        let status = t.status_text(true)?;
        let peer = format!("peer [{}]:{}", topo::CLI_UPLINK6, topo::DAEMON_PORT);
        if !status.contains(&peer) {
            bail!("bench: the tunnel does not go over IPv6: the server has no entry {peer}:\n{status}");
        }
        let res = throughput(&mut t, topo::SRV_RAW6, runs, seconds)?;
        let status = t.status_text(true)?;
        if status.lines().filter(|l| l.starts_with("peer ")).count() != 1 {
            bail!("bench: the IPv6 runs went over another path than {peer}:\n{status}");
        }
        res
    } else {
        Vec::new()
    };
    let mut counters = Vec::new();
    for (who, a, b) in [
        ("server daemon", &counters0.0, &counters1.0),
        ("client daemon", &counters0.1, &counters1.1),
        ("server kernel", &counters0.2, &counters1.2),
        ("client kernel", &counters0.3, &counters1.3),
    ] {
        for (k, v1) in b {
            let d = v1.saturating_sub(a.get(k).copied().unwrap_or(0));
            counters.push((who.to_string(), k.clone(), d));
        }
    }
    let mut facts = facts;
    facts.push(("load average (end)".into(), loadavg()));

    let res = Results {
        facts,
        runs,
        seconds,
        rr_seconds,
        cases: results,
        cases_v6: results_v6,
        rr_tunnel,
        rr_raw,
        rr_busy,
        wake,
        counters,
        wall: started.elapsed(),
    };
    drop(_rr_server);
    drop(t);

    println!();
    print!("{}", report::markdown(&res));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json = out_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report::json(&res))?)?;
    let svg = out_dir.join("bench.svg");
    std::fs::write(&svg, report::svg(&res))?;
    println!(
        "\nbench: wrote {} and {} ({:.0} s)",
        json.display(),
        svg.display(),
        res.wall.as_secs_f64()
    );
    Ok(())
}

/// Every case `runs` times through the tunnel (to the server's IPv4 uplink
/// address, over whatever family the client's path has) and raw (to
/// `raw_addr`), alternated.
fn throughput(t: &mut Topology, raw_addr: &str, runs: u32, seconds: u32) -> Result<Vec<(Case, CaseResult)>> {
    let mut results: Vec<(Case, CaseResult)> = CASES.iter().map(|c| (*c, CaseResult::default())).collect();
    for round in 1..=runs {
        for (case, res) in results.iter_mut() {
            let tun = iperf(t, topo::SRV_UPLINK, *case, seconds, true)?;
            let raw = iperf(t, raw_addr, *case, seconds, false)?;
            let cpu_gb = tun.cpu.map_or(f64::NAN, |(s, c)| (s + c) / (tun.bytes as f64 / 1e9));
            println!(
                "  run {round}/{runs}  {:<34} tunnel {:>7.3} Gbit/s ({cpu_gb:.1} CPU s/GB)  raw {:>7.3} Gbit/s  retransmits {}/{}",
                case.label(),
                tun.gbps,
                raw.gbps,
                tun.retransmits,
                raw.retransmits
            );
            res.tunnel.push(tun);
            res.raw.push(raw);
        }
    }
    Ok(results)
}

/// `runs` rounds of request/response, `seconds` each, through the tunnel
/// then raw; returns the round-trip samples (ns) of each path.
fn latency_pass(
    t: &mut Topology,
    tun_rr: SocketAddr,
    raw_rr: SocketAddr,
    runs: u32,
    seconds: f64,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let (mut tunnel, mut raw) = (Vec::new(), Vec::new());
    for round in 1..=runs {
        let a = rr::measure(&t.names.cli, tun_rr, Duration::from_secs_f64(seconds))?;
        let b = rr::measure(&t.names.cli, raw_rr, Duration::from_secs_f64(seconds))?;
        println!(
            "  run {round}/{runs}  tunnel median {:>6.1} µs ({} round trips)  raw median {:>6.1} µs ({})",
            report::percentile(&a, 50.0) / 1e3,
            a.len(),
            report::percentile(&b, 50.0) / 1e3,
            b.len()
        );
        tunnel.extend(a);
        raw.extend(b);
    }
    t.ensure_daemons_alive()?;
    Ok((tunnel, raw))
}

fn parse_ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// One iperf3 client run from the client namespace; for the tunnel, the
/// daemons' CPU time around it.
fn iperf(t: &mut Topology, addr: &str, case: Case, seconds: u32, tunnel: bool) -> Result<Run> {
    topo::check_interrupted()?;
    t.ensure_daemons_alive()?;
    let cpu0 = if tunnel { Some(t.daemon_cpu()?) } else { None };
    let json_path = t.work.join("iperf3-client.json");
    let cli = t.names.cli.clone();
    let mut cmd = t.netns_exec(&cli, "iperf3");
    cmd.args([
        "-c",
        addr,
        "-p",
        &topo::IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
    ])
    .args([
        "-P",
        &case.flows.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ]);
    if case.reverse {
        cmd.arg("-R");
    }
    let what = format!(
        "iperf3 {} ({})",
        case.label(),
        if tunnel { "tunnel" } else { "raw" }
    );
    let mut p = topo::Proc::spawn(&what, &mut cmd, &json_path)?;
    let st = topo::wait_child(
        &mut p.child,
        Duration::from_secs(u64::from(seconds) + 30),
        &what,
    )?;
    let cpu1 = if tunnel { Some(t.daemon_cpu()?) } else { None };
    let text = std::fs::read_to_string(&json_path).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{what}: exit {st}, output is not JSON:\n{}", p.log_tail(10)))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{what} failed: {e}");
    }
    let num = |ptr: &str| v.pointer(ptr).and_then(serde_json::Value::as_f64);
    let bytes = num("/end/sum_received/bytes").unwrap_or(0.0) as u64;
    let secs = num("/end/sum_received/seconds").unwrap_or(f64::from(seconds));
    let gbps = num("/end/sum_received/bits_per_second").unwrap_or(bytes as f64 * 8.0 / secs) / 1e9;
    if bytes == 0 {
        bail!("{what}: no bytes arrived");
    }
    let retransmits = num("/end/sum_sent/retransmits").unwrap_or(0.0) as u64;
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
        _ => None,
    };
    Ok(Run {
        gbps,
        bytes,
        retransmits,
        cpu,
    })
}

/// The eBPF object, then a release daemon (what users run).
fn build_daemon(root: &Path) -> Result<PathBuf> {
    println!("bench: building the XDP program");
    ebpf::build_ebpf().context("bench: building the eBPF object failed")?;
    println!("bench: building the daemon (release)");
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .args([
            "build",
            "--release",
            "--package",
            "udp-encap-tun",
            "--bin",
            "udp-encap-tun",
            "--locked",
        ])
        .current_dir(root);
    deps::run(&mut build).context("bench: building the daemon failed")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("udp-encap-tun");
    if !bin.is_file() {
        bail!(
            "bench: the build finished but {} does not exist",
            bin.display()
        );
    }
    Ok(bin)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine_facts(
    t: &Topology,
    root: &Path,
    bin: &Path,
    args: &BenchArgs,
    given: bool,
) -> Result<Vec<(String, String)>> {
    let (xdp_mode, tun_mtu) = (&args.xdp_mode, args.tun_mtu);
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cc = |ns: &str| {
        deps::output(
            t.netns_exec(ns, "cat")
                .arg("/proc/sys/net/ipv4/tcp_congestion_control"),
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
    };
    let version = sh(&bin.to_string_lossy(), &["--version"])
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let rev = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let mtime = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    let iperf = sh("iperf3", &["--version"])
        .map(|s| s.lines().next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let xdp = ["server.log", "client.log"]
        .iter()
        .filter_map(|f| {
            let log = std::fs::read_to_string(t.work.join(f)).ok()?;
            let line = log.lines().find(|l| l.contains("XDP gate"))?;
            // Drop the logger's `[time LEVEL target] ` prefix.
            Some(
                line.split_once("] ")
                    .map_or(line, |(_, m)| m)
                    .trim()
                    .to_string(),
            )
        })
        .next()
        .unwrap_or_else(|| format!("--xdp-mode {xdp_mode}"));
    Ok(vec![
        ("kernel".into(), read("/proc/sys/kernel/osrelease")),
        ("cpu".into(), cpu),
        ("nproc".into(), nproc.to_string()),
        ("load average (start)".into(), loadavg()),
        (
            "congestion control".into(),
            format!(
                "client ns {}, server ns {}",
                cc(&t.names.cli),
                cc(&t.names.srv)
            ),
        ),
        (
            "daemon".into(),
            format!("{version} ({}, mtime {mtime})", bin.display()),
        ),
        (
            "git rev of the tree".into(),
            format!(
                "{rev}{}{}",
                if dirty { " (uncommitted changes)" } else { "" },
                if given {
                    "; the daemon was given with --daemon, not built from it"
                } else {
                    "; the daemon was built from it"
                }
            ),
        ),
        ("xdp".into(), xdp),
        ("iperf3".into(), iperf),
        (
            "tunnel MTU / raw MTU".into(),
            format!("{tun_mtu} (TUN) / {} (veth, GSO/GRO on)", topo::VETH_MTU),
        ),
    ])
}
