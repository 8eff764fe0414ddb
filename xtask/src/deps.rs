//! `cargo xtask deps`: install what building, testing and the demo need.
//!
//! Idempotent and fast when everything is present: each item is checked first
//! (`dpkg-query`, `rustup component list --installed`, `bpf-linker --version`,
//! `/proc/mounts`) and only what is missing is installed, `apt-get update`
//! included. Never reads stdin (CI runs without a TTY). Every failure says
//! what to run by hand.
//!
//! What and why:
//! - apt: [`APT_PACKAGES`] (each with its reason);
//! - rustup: `rust-src` for the active toolchain (the eBPF crate builds
//!   `core` from source, route B of TOOLCHAIN.md) and for nightly when one is
//!   installed (route A); `clippy` for the active toolchain (`cargo xtask test`);
//! - `bpf-linker` 0.13.0 built against Debian's LLVM 22 (rustc 1.95 emits
//!   LLVM 22 bitcode), linked to `libLLVM.so` dynamically: `llvm-22-dev` is
//!   all it needs (the static-link extras libpolly/libzstd/zlib are not);
//! - `cargo-deb` ([`CARGO_DEB_VERSION`]) for `cargo xtask package`;
//! - the kernel side: `/dev/net/tun` (`modprobe tun`) and bpffs on
//!   `/sys/fs/bpf` (the daemon pins its maps there).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Debian packages, with the reason each is needed.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("gcc", "C compiler and linker used by rustc and by the ring crate"),
    ("libc6-dev", "C headers and crt files for linking"),
    ("llvm-22-dev", "LLVM 22 (llvm-config, libLLVM.so) that bpf-linker is built against"),
    ("bpftool", "inspect the loaded XDP program and its pinned maps"),
    ("iproute2", "ip netns/link/route/tuntap, ss, tc netem in the tests and the demo"),
    ("util-linux", "nsenter: run the daemon in a namespace without remounting /sys"),
    ("iperf3", "TCP traffic through the tunnel (tests, demo)"),
    ("socat", "hash-checked TCP transfers in the demo"),
    ("tcpdump", "show that TCP travels as UDP on the uplink"),
    ("nftables", "NAT router namespace in the tests"),
    ("ethtool", "offload settings on veth in the tests"),
    ("kmod", "modprobe tun when /dev/net/tun is missing"),
    ("procps", "sysctl in the test namespaces (absent from minimal images)"),
    ("conntrack", "flush a NAT router's mappings in the session tests (NAT rebinding)"),
    ("dpkg-dev", "dpkg-shlibdeps: cargo-deb works out the package's dependencies"),
    ("systemd", "systemd-analyze verify on the packaged unit (the tests need not run systemd)"),
    ("prometheus", "a real Prometheus scraping --metrics-listen in the metrics test"),
    ("tayga", "a real NAT64 between an IPv6-only client and an IPv4-only server (tests/ipv6_netns.rs)"),
];

/// The bpf-linker release checked with LLVM 22 and Rust 1.95 (TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// The cargo-deb release `cargo xtask package` is checked with.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// `cargo xtask deps`.
pub fn deps() -> Result<()> {
    let t0 = Instant::now();
    ensure()?;
    println!("deps: OK in {}", fmt_duration(t0.elapsed()));
    Ok(())
}

/// Check everything and install what is missing. Used by `deps`, `ci` and
/// `demo`.
pub fn ensure() -> Result<()> {
    apt_packages()?;
    rust_components()?;
    bpf_linker()?;
    cargo_deb()?;
    kernel()?;
    Ok(())
}

/// Keeps the packages' services from starting while they install: tayga's
/// would make a `nat64` device with the private address and the NAT44 of
/// its default /etc/tayga.conf on this host, prometheus's would listen on
/// port 9090; the tests run their own copies inside namespaces. A `policy-rc.d` answering 101
/// ("action forbidden") for the length of the install, as Debian's
/// invoke-rc.d and deb-systemd-invoke honour it; removed on drop. Where one
/// exists already (containers have one), it is left alone.
struct NoServiceStarts(Option<&'static Path>);

impl NoServiceStarts {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn new() -> Result<NoServiceStarts> {
        let p = Path::new(Self::PATH);
        if p.exists() {
            return Ok(NoServiceStarts(None));
        }
        std::fs::write(p, "#!/bin/sh\n# cargo xtask deps: no service starts during its install\nexit 101\n")
            .with_context(|| format!("cannot write {}", p.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        println!("deps: apt: services are not started during the install ({} for its length)", p.display());
        Ok(NoServiceStarts(Some(p)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(p) = self.0
            && let Err(e) = std::fs::remove_file(p)
        {
            eprintln!("deps: cannot remove {} ({e}): remove it by hand, or services will not start on installs", p.display());
        }
    }
}

fn apt_packages() -> Result<()> {
    if which("dpkg-query").is_none() || which("apt-get").is_none() {
        bail!(
            "dpkg-query/apt-get not found: `cargo xtask deps` installs with apt (Debian 12). \
             On another system install the equivalents of: {}",
            package_names().join(" ")
        );
    }
    let missing = missing_packages()?;
    if missing.is_empty() {
        println!("deps: apt: all {} packages present", APT_PACKAGES.len());
        return Ok(());
    }
    for (name, why) in APT_PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        println!("deps: apt: missing {name} ({why})");
    }
    let by_hand = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!("installing apt packages needs root: run `sudo cargo xtask deps`, or by hand: {by_hand}");
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        // Wait for a dpkg lock held by unattended-upgrades on a fresh machine
        // instead of failing at once.
        c.args(["-o", "DPkg::Lock::Timeout=300", "-q"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("NEEDRESTART_MODE", "a");
        c
    };
    run(&mut apt(&["update"])).with_context(|| {
        format!("apt-get update failed: check access to the Debian mirrors (deb.debian.org) in /etc/apt/sources.list*, then run: {by_hand}")
    })?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    let _no_services = NoServiceStarts::new()?;
    run(&mut install).with_context(|| format!("apt-get install failed (see apt's message above); fix it, then run: {by_hand}"))?;
    let still = missing_packages()?;
    if !still.is_empty() {
        bail!("apt-get reported success but these are still not installed: {}", still.join(" "));
    }
    println!("deps: apt: installed {}", missing.join(" "));
    Ok(())
}

fn package_names() -> Vec<&'static str> {
    APT_PACKAGES.iter().map(|(n, _)| *n).collect()
}

/// The packages of [`APT_PACKAGES`] that dpkg does not report as installed.
fn missing_packages() -> Result<Vec<&'static str>> {
    not_installed(package_names())
}

/// The packages of `names` that dpkg does not have installed ("ii"; a
/// multi-arch name like `libc6-dev:amd64` counts for `libc6-dev`).
pub fn not_installed(names: Vec<&str>) -> Result<Vec<&str>> {
    // Unknown packages are reported on stderr and left out of stdout, so the
    // exit status is not an error here.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\\n"])
        .args(&names)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            // "ii" = wanted install, installed; anything else (rc, iU...) is not usable.
            (f.next()? == "ii").then_some(name.split(':').next().unwrap_or(name))
        })
        .collect();
    Ok(names.into_iter().filter(|n| !installed.contains(n)).collect())
}

fn rust_components() -> Result<()> {
    if which("rustup").is_none() {
        println!(
            "deps: rustup not found: skipping rust-src and clippy \
             (the eBPF build then needs Debian's rustc-web + rust-web-src, route C of TOOLCHAIN.md)"
        );
        return Ok(());
    }
    let active = output(Command::new("rustup").args(["show", "active-toolchain"]))
        .context("`rustup show active-toolchain` failed: install a toolchain with `rustup default stable`")?;
    let active = active.split_whitespace().next().unwrap_or("stable").to_string();
    component(&active, "rust-src", true)?;
    component(&active, "clippy", true)?;
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    for tc in toolchains.lines().filter_map(|l| l.split_whitespace().next()) {
        if tc.starts_with("nightly") && tc != active {
            // Route A. Optional: a failure here leaves route B.
            component(tc, "rust-src", false)?;
        }
    }
    Ok(())
}

fn component(toolchain: &str, name: &str, required: bool) -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", toolchain]))?;
    // Listed as `rust-src`, or with the host triple: `clippy-x86_64-unknown-linux-gnu`.
    let present = installed
        .lines()
        .any(|l| l == name || l.strip_prefix(name).is_some_and(|rest| rest.starts_with('-')));
    if present {
        println!("deps: rustup: {name} ({toolchain}) present");
        return Ok(());
    }
    let mut add = Command::new("timeout");
    add.args(["300", "rustup", "component", "add", name, "--toolchain", toolchain]);
    match run(&mut add) {
        Ok(()) => {
            println!("deps: rustup: {name} ({toolchain}) installed");
            Ok(())
        }
        Err(e) if required => Err(e).with_context(|| {
            format!("could not add {name} to {toolchain}: check access to static.rust-lang.org, then run: rustup component add {name} --toolchain {toolchain}")
        }),
        Err(e) => {
            println!("deps: rustup: warning: could not add {name} to {toolchain} ({e:#}); the eBPF build will use another route");
            Ok(())
        }
    }
}

fn bpf_linker() -> Result<()> {
    if let Ok(v) = output(Command::new("bpf-linker").arg("--version")) {
        println!("deps: {}: present", v.trim());
        return Ok(());
    }
    let cargo_bin = cargo_home().join("bin");
    if cargo_bin.join("bpf-linker").is_file() {
        // Installed, but ~/.cargo/bin is not on PATH (minimal CI environment).
        prepend_path(&cargo_bin);
        let v = output(Command::new("bpf-linker").arg("--version"))
            .with_context(|| format!("{}/bpf-linker exists but does not run", cargo_bin.display()))?;
        println!("deps: {}: present in {} (added to PATH)", v.trim(), cargo_bin.display());
        return Ok(());
    }
    let llvm_config = Path::new(LLVM_BIN).join("llvm-config");
    if !llvm_config.is_file() {
        bail!("{} not found: install llvm-22-dev first (apt-get install -y llvm-22-dev)", llvm_config.display());
    }
    let by_hand = format!(
        "PATH={LLVM_BIN}:$PATH cargo install --locked bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
    );
    println!("deps: bpf-linker: building {BPF_LINKER_VERSION} against LLVM 22 (about 2-4 minutes on 2 cores)");
    let mut path = OsString::from(LLVM_BIN);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let mut install = Command::new("cargo");
    install
        .args(["install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        // llvm-config 22 must come before Debian's default llvm-config 14.
        .env("PATH", path)
        // Outside the workspace, so its .cargo/config.toml does not apply.
        .current_dir(std::env::temp_dir());
    // Settings of the outer `cargo run` that must not leak into the install.
    for var in ["CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC", "RUSTC_WRAPPER", "CARGO_BUILD_TARGET"] {
        install.env_remove(var);
    }
    run(&mut install).with_context(|| format!("building bpf-linker failed (see cargo's message above); run by hand: {by_hand}"))?;
    if which("bpf-linker").is_none() {
        prepend_path(&cargo_bin);
    }
    let v = output(Command::new("bpf-linker").arg("--version")).with_context(|| {
        format!("bpf-linker was installed but does not run from PATH: add {} to PATH", cargo_bin.display())
    })?;
    println!("deps: {}: installed", v.trim());
    Ok(())
}

/// cargo-deb for `cargo xtask package` (and the package test).
fn cargo_deb() -> Result<()> {
    let cargo_bin = cargo_home().join("bin");
    if which("cargo-deb").is_none() && cargo_bin.join("cargo-deb").is_file() {
        prepend_path(&cargo_bin);
    }
    if let Ok(v) = output(Command::new("cargo-deb").arg("--version")) {
        println!("deps: {}: present", v.trim());
        return Ok(());
    }
    let by_hand = format!("cargo install --locked cargo-deb --version {CARGO_DEB_VERSION}");
    println!("deps: cargo-deb: building {CARGO_DEB_VERSION} (about 2 minutes on 2 cores)");
    let mut install = Command::new("cargo");
    install
        .args(["install", "--locked", "cargo-deb", "--version", CARGO_DEB_VERSION])
        .current_dir(std::env::temp_dir());
    for var in ["CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC", "RUSTC_WRAPPER", "CARGO_BUILD_TARGET"] {
        install.env_remove(var);
    }
    run(&mut install).with_context(|| format!("building cargo-deb failed (see cargo's message above); run by hand: {by_hand}"))?;
    if which("cargo-deb").is_none() {
        prepend_path(&cargo_bin);
    }
    let v = output(Command::new("cargo-deb").arg("--version"))
        .with_context(|| format!("cargo-deb was installed but does not run from PATH: add {} to PATH", cargo_bin.display()))?;
    println!("deps: {}: installed", v.trim());
    Ok(())
}

fn kernel() -> Result<()> {
    if !Path::new("/dev/net/tun").exists() {
        let loaded = is_root() && run(Command::new("modprobe").arg("tun")).is_ok();
        if !loaded || !Path::new("/dev/net/tun").exists() {
            bail!("/dev/net/tun is missing: load the TUN driver with `modprobe tun` (as root)");
        }
        println!("deps: kernel: loaded the tun module");
    }
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let bpffs = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        (f.nth(1), f.next()) == (Some("/sys/fs/bpf"), Some("bpf"))
    });
    if !bpffs {
        let mounted = is_root()
            && run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).is_ok();
        if !mounted {
            bail!("no bpf filesystem on /sys/fs/bpf (the daemon pins its maps there): run `mount -t bpf bpf /sys/fs/bpf` as root");
        }
        println!("deps: kernel: mounted bpffs on /sys/fs/bpf");
    }
    println!("deps: kernel: /dev/net/tun and bpffs present");
    Ok(())
}

// ---- helpers shared by the other commands ----

/// Run a command with stdin closed and output inherited, echoing it first;
/// fail with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("+ {}", show(cmd));
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Run a command quietly and return its stdout; fail on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line as a user would type it.
/// (The program by its file name: `cargo`, not the toolchain's full path.)
pub fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective\tsaved\tfs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Fail with a message that says why root is needed.
pub fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("{why}: run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

pub fn which(exe: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Put `dir` first on this process's PATH, for the commands started later
/// (the eBPF build runs rustc, which runs bpf-linker).
fn prepend_path(dir: &Path) {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    if let Ok(joined) = std::env::join_paths(dirs) {
        // SAFETY: xtask is single-threaded; no other thread reads the
        // environment while it changes.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

pub fn fmt_duration(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}
