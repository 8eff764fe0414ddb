//! `cargo xtask test` and `cargo xtask ci`.
//!
//! `test` runs, in order, and always reports each step on the last line:
//! 1. `ebpf`: the XDP object (`ebpf::build_ebpf`); the daemon's build script
//!    embeds it, so nothing else can build without it;
//! 2. `build`: `cargo test --workspace --no-run`, one debug profile for
//!    everything: the integration tests start the daemon through
//!    `CARGO_BIN_EXE_udp-encap-tun`, and a second (release) profile would
//!    double the compile time on 2 cores;
//! 3. `package`: `cargo xtask package` (the .deb the package test
//!    installs; skipped when a test filter leaves that test out);
//! 4. `tests`: every test binary that build made (unit tests, the namespace
//!    integration tests, which need root, the fuzz seed replay), one after
//!    the other as `cargo test --no-fail-fast` would run them, then the doc
//!    tests; each under a time limit (`--timeout-min`, 10 minutes): a hang
//!    is killed (its process group: the test binary and the daemons and
//!    captures it started) and reported with the binary's name and the
//!    tests that had not finished, instead of eating CI's 90 minutes;
//! 5. `clippy`: `cargo clippy -- -D warnings` on the workspace (all
//!    targets), on the fuzz crate (its own workspace, `fuzz/`; checked with
//!    the workspace's target dir, whose dependencies it shares, and without
//!    libFuzzer's C++ build, which a check does not need) and on the eBPF
//!    crate (with the toolchain route that built it, whose `core` it
//!    reuses). It is cheap (metadata-only check builds, well under a minute
//!    warm) and deterministic with the pinned toolchains; it runs after the
//!    tests so a lint never hides a test result.
//!
//! Every cargo command passes `--locked`: the committed lockfiles must be
//! complete, on a developer's machine as in CI.
//!
//! `ci` is `deps` then `test`: the README's one command for a fresh machine,
//! and what `.ci/run` calls, followed by the VM kernels (`vm::run`; `--no-vm`
//! leaves them out).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::deps::{self, fmt_duration, show};
use crate::ebpf;

/// The longest test binary takes well under a minute on an idle 2-core
/// machine (offload, auth_netns: about 35 s each); ten minutes leaves room
/// for a loaded one and still stops a hang long before CI's 90.
const DEFAULT_TIMEOUT_MIN: u64 = 10;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the clippy step.
    #[arg(long)]
    pub no_clippy: bool,
    /// Time limit of one test binary, in minutes: one that runs longer is
    /// killed and reported with the tests that had not finished.
    #[arg(long, value_name = "MINUTES", default_value_t = DEFAULT_TIMEOUT_MIN,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_min: u64,
    /// Passed to `cargo test` after `--` (a test name filter, `--nocapture`, ...).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

impl Default for TestArgs {
    fn default() -> TestArgs {
        TestArgs { no_clippy: false, timeout_min: DEFAULT_TIMEOUT_MIN, test_args: Vec::new() }
    }
}

/// `cargo xtask test`.
pub fn test(args: &TestArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut summary = Summary::default();
    run_test(args, &mut summary)?;
    finish("test", &summary, t0.elapsed())
}

#[derive(Default, clap::Args)]
pub struct CiArgs {
    /// Skip the VM kernels. By default `ci` then boots Debian's 6.1 and
    /// 6.12 kernels in qemu and runs the kernel-facing tests inside
    /// (xdp_prog, xdp_netns, harness_selftest; see docs/vm.md): the eBPF
    /// verifier, attach modes, pins and namespaces differ between kernels,
    /// the bulk transfers do not and stay on the host kernel, where they fit
    /// the time (software emulation is too slow for them).
    #[arg(long)]
    pub no_vm: bool,
}

/// `cargo xtask ci`: deps, then test, the demo, then the VM kernels (unless `--no-vm`).
pub fn ci(args: &CiArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut summary = Summary::default();
    if summary.step("deps", || deps::ensure().map(|()| String::new())) {
        run_test(&TestArgs::default(), &mut summary)?;
    } else {
        for n in STEPS {
            summary.skip(n);
        }
    }
    // The README's first command, on the release build.
    if summary.ok() {
        summary.step("demo", crate::demo::check);
    } else {
        summary.skip("demo");
    }
    if !args.no_vm {
        if summary.ok() {
            let vm_args = crate::vm::VmTestArgs {
                tests: VM_TESTS.map(String::from).to_vec(),
                skips: VM_SKIPS.map(String::from).to_vec(),
                ..Default::default()
            };
            summary.step("vm", || crate::vm::run(&vm_args));
        } else {
            summary.skip("vm");
        }
    }
    finish("ci", &summary, t0.elapsed())
}

/// The test binaries CI runs under the VM kernels: what differs between
/// kernels is the eBPF verifier, XDP and TC attach (netlink or TCX), generic
/// XDP's view of VLAN tags, `bpf_fib_lookup`, pins on bpffs per namespace.
/// `xdp_prog` covers the program and its attach on crafted frames,
/// `xdp_netns` the gate under the real daemon.
const VM_TESTS: [&str; 2] = ["xdp_prog", "xdp_netns"];
/// `xdp_netns` tests left to the host kernel, each with the `xdp_prog` test
/// that checks the same thing under every kernel (or why no kernel changes
/// it): the map mirroring the store through expiry (the daemon's
/// bookkeeping); two instances apart by namespace
/// (`pins_are_per_namespace_and_go_away_on_drop`); forwarded datagrams
/// passing (`forwarded_traffic_passes_untouched`, the same FIB helper on
/// the guest's routes); the TC classifier under the daemon
/// (`tc_classifier_gives_the_same_verdicts`, `restart_after_kill_9_tc`,
/// `auto_falls_back_to_tc_when_xdp_is_taken`: the same attach, TCX or
/// netlink). Under software emulation each costs some 100 s of a 2-CPU
/// guest, and the VM step had grown to 14 minutes of a 25-minute CI. What
/// stays needs the kernel's own path for real datagrams: enforcement, a
/// kill -9 with the pins left behind, priority-tagged frames (which the
/// kernel, not the program, hands to the parent untagged). The harness's
/// own checks (`harness_selftest`) stay on the host.
const VM_SKIPS: [&str; 4] = [
    "map_holds_exactly_the_live_peers_and_none_after_expiry",
    "same_uplink_name_and_port_in_two_namespaces_stay_apart",
    "forwarded_datagrams_reach_the_lan_host",
    "tc_classifier_gate_enforces_like_xdp",
];

const STEPS: [&str; 5] = ["ebpf", "build", "package", "tests", "clippy"];

enum Outcome {
    Ok(String),
    Failed(String),
    Skipped,
}

struct Step {
    name: &'static str,
    time: Duration,
    outcome: Outcome,
}

#[derive(Default)]
struct Summary {
    steps: Vec<Step>,
}

impl Summary {
    fn ok(&self) -> bool {
        self.steps.iter().all(|s| !matches!(s.outcome, Outcome::Failed(_)))
    }

    /// Run one step, print a banner and its result, record it.
    fn step(&mut self, name: &'static str, f: impl FnOnce() -> Result<String>) -> bool {
        println!("\n==== {name}");
        let t = Instant::now();
        let outcome = match f() {
            Ok(note) => Outcome::Ok(note),
            Err(e) => {
                eprintln!("\n{name} FAILED: {e:#}");
                Outcome::Failed(format!("{e:#}"))
            }
        };
        let ok = matches!(outcome, Outcome::Ok(_));
        self.steps.push(Step { name, time: t.elapsed(), outcome });
        ok
    }

    fn skip(&mut self, name: &'static str) {
        self.steps.push(Step { name, time: Duration::ZERO, outcome: Outcome::Skipped });
    }
}

fn finish(cmd: &str, summary: &Summary, total: Duration) -> Result<()> {
    let parts: Vec<String> = summary
        .steps
        .iter()
        .map(|s| match &s.outcome {
            Outcome::Ok(n) if n.is_empty() => format!("{} ok {}", s.name, fmt_duration(s.time)),
            Outcome::Ok(n) => format!("{} ok {} ({n})", s.name, fmt_duration(s.time)),
            Outcome::Failed(_) => format!("{} FAILED {}", s.name, fmt_duration(s.time)),
            Outcome::Skipped => format!("{} skipped", s.name),
        })
        .collect();
    let failed: Vec<&Step> = summary.steps.iter().filter(|s| matches!(s.outcome, Outcome::Failed(_))).collect();
    if !failed.is_empty() {
        println!();
        for s in &failed {
            if let Outcome::Failed(why) = &s.outcome {
                println!("{cmd}: {} failed: {why}", s.name);
            }
        }
    }
    let verdict = if summary.ok() { "OK" } else { "FAILED" };
    println!("\n{cmd}: {verdict} in {}: {}", fmt_duration(total), parts.join(", "));
    if summary.ok() {
        Ok(())
    } else {
        // The summary line above says it all; exit non-zero without a second report.
        std::process::exit(1);
    }
}

fn run_test(args: &TestArgs, s: &mut Summary) -> Result<()> {
    deps::require_root(
        "the test suite builds network namespaces, veth pairs, TUN devices and XDP programs",
    )?;
    let root = crate::workspace_root();

    let mut route = None;
    let ebpf = || {
        let (obj, r) = ebpf::build_ebpf_route()?;
        println!("eBPF object: {}", obj.display());
        route = Some(r);
        Ok(String::new())
    };
    if !s.step("ebpf", ebpf) {
        for n in STEPS.iter().skip(1) {
            s.skip(n);
        }
        return Ok(());
    }
    let mut bins = Vec::new();
    let built = s.step("build", || {
        bins = build_tests(&root)?;
        Ok(format!("{} test binaries", bins.len()))
    });
    // The package test (tests/package.rs) installs target/debian/*.deb: build
    // it first, unless a filter leaves that test out (a release build is
    // minutes that `cargo xtask test -- FILTER` should not pay).
    if built && needs_package(&args.test_args) {
        s.step("package", || crate::package::build().map(|p| p.display().to_string()));
    } else {
        s.skip("package");
    }
    if built {
        let limit = Duration::from_secs(args.timeout_min.saturating_mul(60));
        s.step("tests", || run_tests(&root, &bins, &args.test_args, limit));
    } else {
        s.skip("tests");
    }
    if args.no_clippy || !built {
        s.skip("clippy");
    } else {
        s.step("clippy", || {
            let mut c = cargo(&root, "clippy");
            c.args(["--workspace", "--all-targets", "--", "-D", "warnings"]);
            deps::run(&mut c)?;
            // The fuzz crate is a workspace of its own (it needs nightly
            // and sanitizer flags to fuzz, not to be checked). The shared
            // target dir gives it the workspace's checked dependencies;
            // without its default feature libfuzzer-sys skips compiling
            // libFuzzer's C++, which only the fuzzing binaries link.
            let mut c = cargo(&root, "clippy");
            c.args(["--manifest-path", "fuzz/Cargo.toml", "--all-targets", "--no-default-features"])
                .arg("--target-dir")
                .arg(target_dir(&root))
                .args(["--", "-D", "warnings"]);
            deps::run(&mut c)?;
            if let Some(r) = route {
                ebpf::clippy_ebpf(r)?;
            }
            Ok("workspace, fuzz, ebpf".to_string())
        });
    }
    Ok(())
}

/// Every cargo command of the suite: `--locked`, so the committed
/// Cargo.lock must be complete (in CI and on a developer's machine alike).
fn cargo(root: &Path, sub: &str) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.arg(sub).arg("--locked").current_dir(root);
    c
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

/// One test executable that `cargo test --no-run` built.
struct TestBin {
    /// What cargo calls it: `tests/offload.rs (udp-encap-tun)`.
    name: String,
    path: PathBuf,
    /// Its package's directory: cargo runs tests from there.
    dir: PathBuf,
    package: String,
}

/// `cargo test --workspace --no-run`; returns the test executables in
/// cargo's order.
fn build_tests(root: &Path) -> Result<Vec<TestBin>> {
    let mut c = cargo(root, "test");
    c.args(["--workspace", "--no-run", "--message-format=json-render-diagnostics"]);
    println!("+ {}", show(&c));
    let out = c
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", show(&c)))?;
    if !out.status.success() {
        bail!("`{}` failed ({}): see cargo's messages above", show(&c), out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_test = v.pointer("/profile/test").and_then(serde_json::Value::as_bool) == Some(true);
        let (Some(exe), Some(manifest), Some(src)) = (
            v.get("executable").and_then(serde_json::Value::as_str),
            v.get("manifest_path").and_then(serde_json::Value::as_str),
            v.pointer("/target/src_path").and_then(serde_json::Value::as_str),
        ) else {
            continue;
        };
        if v.get("reason").and_then(serde_json::Value::as_str) != Some("compiler-artifact") || !is_test {
            continue;
        }
        let dir = Path::new(manifest).parent().map(Path::to_path_buf).unwrap_or_else(|| root.to_path_buf());
        let package = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let kind = v.pointer("/target/kind/0").and_then(serde_json::Value::as_str).unwrap_or("");
        let rel = Path::new(src).strip_prefix(&dir).unwrap_or(Path::new(src)).display().to_string();
        let name = if kind == "test" { format!("{rel} ({package})") } else { format!("unittests {rel} ({package})") };
        bins.push(TestBin { name, path: exe.into(), dir, package });
    }
    if bins.is_empty() {
        bail!("`{}` built no test executables", show(&c));
    }
    // cargo test's order: by package, unit tests before integration tests.
    bins.sort_by(|a, b| (&a.package, !a.name.starts_with("unittests"), &a.name).cmp(&(&b.package, !b.name.starts_with("unittests"), &b.name)));
    Ok(bins)
}

/// How one test binary ended.
#[derive(Default)]
struct BinOutcome {
    passed: u64,
    failed: u64,
    ignored: u64,
    failures: Vec<String>,
    /// Killed at the time limit: the tests that had not finished.
    timed_out: Option<Vec<String>>,
    success: bool,
}

/// Runs every test binary, then the doc tests, each under `limit`; returns
/// "N passed, M ignored" or fails naming the failed (or hung) tests.
fn run_tests(root: &Path, bins: &[TestBin], extra: &[String], limit: Duration) -> Result<String> {
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut problems = Vec::new();
    let mut record = |what: &str, o: BinOutcome| {
        passed += o.passed;
        failed += o.failed;
        ignored += o.ignored;
        if let Some(left) = &o.timed_out {
            problems.push(format!(
                "{what} killed after {} (time limit, --timeout-min); unfinished: {}",
                fmt_duration(limit),
                if left.is_empty() { "?".to_string() } else { left.join(", ") }
            ));
        } else if !o.failures.is_empty() {
            problems.push(format!("{what}: {}", o.failures.join(", ")));
        } else if !o.success {
            problems.push(format!("{what} failed without a test failing (a crash? see above)"));
        }
    };
    for b in bins {
        println!("\n     Running {} ({})", b.name, b.path.display());
        let mut c = Command::new(&b.path);
        c.args(extra)
            .current_dir(&b.dir)
            .env("CARGO_MANIFEST_DIR", &b.dir)
            .env("CARGO_PKG_NAME", &b.package);
        let expected = list_tests(&b.path, &b.dir, extra);
        let o = run_limited(&mut c, expected, limit)?;
        record(&b.name, o);
    }
    println!("\n   Doc-tests (workspace)");
    let mut c = cargo(root, "test");
    c.args(["--workspace", "--doc"]);
    if !extra.is_empty() {
        c.arg("--").args(extra);
    }
    println!("+ {}", show(&c));
    let o = run_limited(&mut c, None, limit)?;
    record("doc tests", o);
    let counts = format!("{passed} passed, {failed} failed, {ignored} ignored");
    if !problems.is_empty() {
        bail!("{counts}; {}", problems.join("; "));
    }
    Ok(counts)
}

/// The tests a binary will run with these arguments (`--list`), or None
/// if it cannot say.
fn list_tests(exe: &Path, dir: &Path, extra: &[String]) -> Option<BTreeSet<String>> {
    // Only the filters and the --ignored choice shape the list.
    let keep: Vec<&String> = extra
        .iter()
        .filter(|a| !a.starts_with("--") || matches!(a.as_str(), "--ignored" | "--include-ignored" | "--exact"))
        .collect();
    let out = Command::new(exe)
        .args(keep)
        .args(["--list", "--format", "terse"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_string)
            .collect()
    })
}

/// Runs `c` in a process group of its own, its stdout forwarded line by
/// line and read for libtest's results; kills the group at `limit`.
fn run_limited(c: &mut Command, expected: Option<BTreeSet<String>>, limit: Duration) -> Result<BinOutcome> {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("could not start `{}`", show(c)))?;
    let out = child.stdout.take().context("test binary's stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut o = BinOutcome::default();
    let mut finished = BTreeSet::new();
    // (passed, ignored) from the per-test lines, for a binary killed before
    // its `test result:` line.
    let mut seen = (0u64, 0u64);
    let mut exited: Option<Instant> = None;
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                println!("{line}");
                if let Some(rest) = line.strip_prefix("test result: ") {
                    o.passed += count(rest, " passed");
                    o.failed += count(rest, " failed");
                    o.ignored += count(rest, " ignored");
                } else if let Some((name, verdict)) = line.strip_prefix("test ").and_then(|r| r.split_once(" ... ")) {
                    finished.insert(name.to_string());
                    match verdict.split_whitespace().next() {
                        Some("FAILED") => o.failures.push(name.to_string()),
                        Some("ok") => seen.0 += 1,
                        Some("ignored" | "ignored,") => seen.1 += 1,
                        _ => {}
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break child.wait().context("waiting for a test binary")?;
            }
        }
        // The binary may have exited while something it started still holds
        // the pipe: wait a little for its last lines, not forever.
        if let Some(st) = child.try_wait().context("waiting for a test binary")? {
            match exited {
                Some(t) if t.elapsed() > Duration::from_secs(2) => break st,
                Some(_) => {}
                None => exited = Some(Instant::now()),
            }
            continue;
        }
        if Instant::now() >= deadline {
            let pgid = i32::try_from(child.id()).unwrap_or(0);
            if pgid > 0 {
                // SAFETY: kill(2) on the process group this function created
                // for its own child (process_group(0) above), by its id.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let left: Vec<String> = expected
                .as_ref()
                .map(|all| all.difference(&finished).cloned().collect())
                .unwrap_or_default();
            eprintln!(
                "\ntime limit: `{}` still running after {}, killed (its process group); \
                 tests not finished: {}; a killed test cannot run its guards (namespaces, pins)",
                show(c),
                fmt_duration(limit),
                if left.is_empty() { "?".to_string() } else { left.join(", ") }
            );
            let pid = format!("{pgid:x}");
            let left_ns: Vec<String> = Command::new("ip")
                .args(["netns", "list"])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| {
                    n.starts_with("uet-")
                        && n.rsplit('-').next().and_then(|id| id.strip_prefix(pid.as_str())).is_some_and(|k| {
                            !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())
                        })
                })
                .map(str::to_string)
                .collect();
            if !left_ns.is_empty() {
                eprintln!("namespaces it probably left (remove with `ip netns del NAME`): {}", left_ns.join(" "));
            }
            o.passed += seen.0;
            o.ignored += seen.1;
            o.failed += left.len() as u64;
            o.timed_out = Some(left);
            break child.wait().context("waiting for a killed test binary")?;
        }
    };
    drop(reader);
    o.success = status.success() && o.timed_out.is_none();
    if !o.success && o.failures.is_empty() && o.timed_out.is_none() {
        eprintln!("`{}` exited with {status}", show(c));
    }
    Ok(o)
}

/// Whether the tests that `cargo test -- ARGS` selects include the package
/// test: no name filter, or one that matches its name.
fn needs_package(test_args: &[String]) -> bool {
    const TEST: &str = "package_installs_runs_a_tunnel_and_removes_cleanly";
    let filters: Vec<&String> = test_args.iter().filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().any(|f| TEST.contains(f.as_str()))
}

/// The number before `label` in a `test result:` line
/// ("ok. 12 passed; 0 failed; 1 ignored; ...").
fn count(line: &str, label: &str) -> u64 {
    line.split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label.trim_start()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{count, needs_package};

    #[test]
    fn package_only_when_its_test_runs() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(needs_package(&v(&[])));
        assert!(needs_package(&v(&["--nocapture"])));
        assert!(needs_package(&v(&["package"])));
        assert!(!needs_package(&v(&["xdp_gate"])));
        // cargo matches substrings: `tunnel` selects it too.
        assert!(needs_package(&v(&["tunnel"])));
    }

    #[test]
    fn counts_from_a_test_result_line() {
        let l = "ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count(l, " passed"), 12);
        assert_eq!(count(l, " failed"), 0);
        assert_eq!(count(l, " ignored"), 1);
        let l = "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(count(l, " passed"), 3);
        assert_eq!(count(l, " failed"), 2);
    }
}
