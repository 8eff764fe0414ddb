//! `cargo xtask vm-test`: the integration tests under other kernels.
//!
//! The integration test binaries of `udp-encap-tun` are built on the host and
//! run, as they are, inside a Debian cloud kernel booted by virtme-ng (qemu
//! over a read-only view of this machine's filesystem, VM-TESTING.md). One
//! run per kernel, all kernels at once (their lines prefixed `[6.1]`, ...);
//! the daemon they start is the release build (`UDP_ENCAP_TUN_TEST_BIN`).
//! Each reports PASS/FAIL with the test counts, and keeps the guest's output
//! in `target/vm-test/<kernel>/`:
//!
//! - `stdout.txt`, `stderr.txt`: what the guest printed (setup, the kernel
//!   feature probe, the test binaries' output);
//! - `status`: one `NAME EXIT-CODE SECONDS` line per test binary, written by
//!   the guest, so a lost vng exit code cannot turn a failure into a pass;
//! - `cargo-tmp/`: the tests' artifacts (daemon logs, pcaps). The tests put
//!   them in `CARGO_TARGET_TMPDIR`, a path baked in at compile time and
//!   read-only in the guest, so the guest bind-mounts this directory there;
//! - `daemon-notes.txt`: the distinct warnings and XDP decisions the daemons
//!   logged: what a kernel without an optional feature made them do;
//! - `dmesg.txt`: the guest kernel's log.
//!
//! What is installed, and where (all idempotent, see [`ensure_vm_tools`] and
//! [`ensure_kernel`]), under the tools directory ([`tools_dir`]:
//! `~/.cache/udp-encap-tun` by default): apt packages ([`APT_PACKAGES`]); a
//! venv with virtme-ng 1.42 in `vm/venv`; virtiofsd 1.14.0 (the Debian cloud
//! kernels have no 9p) in `vm/bin`; the kernels, unpacked from the Debian
//! image package with `dpkg -x`, in `kernels/<version>/`.
//!
//! Software emulation (`--disable-kvm`) is the default: the `/dev/kvm` of
//! these machines cannot boot the kernels. `--kvm` switches it on where it
//! works.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::deps::{self, fmt_duration, show};

/// Debian packages the VM runs need, with the reason each is needed.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu, which virtme-ng drives"),
    ("busybox-static", "the guest's initramfs tools"),
    ("kmod", "modprobe/depmod for the unpacked kernel's modules"),
    ("udev", "without it vng loses the guest's output and exit code"),
    ("file", "virtme-ng identifies the kernel image with it"),
    ("iproute2", "ip netns/link in the guest setup and the tests"),
    ("bpftool", "inspection of the XDP program in the tests"),
    ("libseccomp-dev", "building virtiofsd"),
    ("libcap-ng-dev", "building virtiofsd"),
    ("pkg-config", "building virtiofsd"),
    ("python3-venv", "the venv that holds virtme-ng"),
];

const VIRTME_NG_VERSION: &str = "1.42";
const VIRTIOFSD_VERSION: &str = "1.14.0";
/// Kernel series booted when none is named: the oldest supported and the
/// newest Debian 12 ships.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];

/// The programs a VM run needs, installed.
pub struct Tools {
    /// virtme-ng's `vng`.
    pub vng: PathBuf,
    /// PATH for `vng`: the venv's `bin` (virtme-run) and virtiofsd's first.
    pub path: OsString,
}

/// A Debian kernel unpacked under `<tools>/kernels/<version>/` ([`tools_dir`]).
pub struct Kernel {
    /// What the user asked for: `6.1`.
    pub series: String,
    /// `uname -r` of the kernel: `6.1.0-56-cloud-amd64`.
    pub version: String,
    /// The unpacked package's root (`boot/`, `lib/modules/`).
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
}

#[derive(clap::Args, Clone)]
pub struct VmTestArgs {
    /// Kernel series to boot, repeatable or comma separated (Debian cloud kernels).
    #[arg(long = "kernel", value_delimiter = ',', default_values_t = DEFAULT_KERNELS.iter().map(|s| s.to_string()))]
    pub kernels: Vec<String>,
    /// Only tests whose name contains NAME (passed to each test binary); repeatable.
    #[arg(long = "filter", value_name = "NAME")]
    pub filters: Vec<String>,
    /// Leave out tests whose name contains NAME (libtest's `--skip`); repeatable.
    #[arg(long = "skip", value_name = "NAME")]
    pub skips: Vec<String>,
    /// Only this integration test binary (`tunnel`, `xdp_prog`, ...); repeatable.
    #[arg(long = "test", value_name = "BINARY")]
    pub tests: Vec<String>,
    /// Use KVM instead of software emulation (it cannot boot these kernels on the CI machines).
    #[arg(long)]
    pub kvm: bool,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Guest memory (qemu syntax).
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// `--test-threads` for the test binaries (default: the guest's CPUs).
    #[arg(long)]
    pub test_threads: Option<u32>,
    /// Give up on a kernel after this many minutes.
    #[arg(long, default_value_t = 20)]
    pub timeout_min: u64,
}

impl Default for VmTestArgs {
    fn default() -> Self {
        VmTestArgs {
            kernels: DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect(),
            filters: Vec::new(),
            skips: Vec::new(),
            tests: Vec::new(),
            kvm: false,
            cpus: 2,
            memory: "2G".into(),
            test_threads: None,
            timeout_min: 20,
        }
    }
}

/// `cargo xtask vm-test`.
pub fn vm_test(args: &VmTestArgs) -> Result<()> {
    let t0 = Instant::now();
    let result = run(args);
    match &result {
        Ok(note) => println!("\nvm-test: OK in {}: {note}", fmt_duration(t0.elapsed())),
        Err(e) => println!("\nvm-test: FAILED in {}: {e:#}", fmt_duration(t0.elapsed())),
    }
    if result.is_err() {
        // The line above says it all; exit non-zero without a second report.
        std::process::exit(1);
    }
    Ok(())
}

/// Install the tools, build the test binaries, boot each kernel of `args` and
/// run them. Ok with a one-line note ("6.1 PASS 12 passed ..., 6.12 ...")
/// when every kernel passed; Err naming the kernels that did not. For
/// `cargo xtask ci`: `summary.step("vm", || vm::run(&VmTestArgs::default()))`.
pub fn run(args: &VmTestArgs) -> Result<String> {
    deps::require_root("the guest runs the namespace tests as the calling user")?;
    let tools = ensure_vm_tools()?;
    let kernels = args
        .kernels
        .iter()
        .map(|s| ensure_kernel(s))
        .collect::<Result<Vec<_>>>()?;
    let binaries = build_test_binaries(&args.tests)?;
    let daemon = build_release_daemon()?;
    // The kernels boot side by side. Under emulation the guests are mostly
    // CPU-bound, but each also waits (lease lapses, expiry, restarts), and
    // the other uses that time: xdp_prog, xdp_netns and harness_selftest
    // took 9m55s side by side against 12 minutes one after the other on a
    // loaded 2-core host. Each guest's lines carry its own prefix.
    let runs: Vec<Result<KernelRun>> = std::thread::scope(|scope| {
        let handles: Vec<_> = kernels
            .iter()
            .map(|k| {
                let (tools, binaries, daemon) = (&tools, &binaries, &daemon);
                scope.spawn(move || boot_and_test(tools, k, binaries, daemon, args))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a VM run panicked"))))
            .collect()
    });
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    for (k, r) in kernels.iter().zip(runs) {
        let r = r.with_context(|| format!("running the tests under {}", k.series))?;
        println!("\n{}\n", r.line());
        if !r.passed() {
            failed.push(k.series.clone());
        }
        lines.push(r.short());
    }
    if !failed.is_empty() {
        bail!("{} (failed on {})", lines.join("; "), failed.join(", "));
    }
    Ok(lines.join("; "))
}

// ---- tools ----

/// Where the VM tools and kernels live: `UDP_ENCAP_TUN_TOOLS` if set, else
/// `~/.cache/udp-encap-tun` (outside the clone, so a fresh clone on the same
/// machine does not build virtiofsd again: some 3 minutes on 2 cores), else
/// the workspace's gitignored `.tools/`.
fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UDP_ENCAP_TUN_TOOLS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/udp-encap-tun"),
        None => crate::workspace_root().join(".tools"),
    }
}

/// Install what VM runs need and is missing: [`APT_PACKAGES`], virtme-ng in
/// a venv, virtiofsd. Fast when all is present (dpkg-query and two
/// `--version` calls). For `cargo xtask deps`.
pub fn ensure_vm_tools() -> Result<Tools> {
    apt_packages()?;
    let vm = tools_dir().join("vm");
    let venv = vm.join("venv");
    let vng = venv.join("bin/vng");
    let have_vng = deps::output(Command::new(&vng).arg("--version"))
        .is_ok_and(|v| v.split_whitespace().any(|w| w == VIRTME_NG_VERSION));
    if have_vng {
        println!("vm: virtme-ng {VIRTME_NG_VERSION} present");
    } else {
        println!("vm: installing virtme-ng {VIRTME_NG_VERSION} into {}", venv.display());
        deps::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("creating the venv failed: is python3-venv installed?")?;
        deps::run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check"])
                .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
        )
        .context("pip could not install virtme-ng: check access to pypi.org")?;
    }
    let virtiofsd = vm.join("bin/virtiofsd");
    if deps::output(Command::new(&virtiofsd).arg("--version")).is_ok() {
        println!("vm: virtiofsd present");
    } else {
        println!("vm: building virtiofsd {VIRTIOFSD_VERSION} (about 2-3 minutes on 2 cores)");
        let mut install = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        install
            .args(["install", "--locked", "virtiofsd", "--version", VIRTIOFSD_VERSION, "--root"])
            .arg(&vm)
            // Outside the workspace, so its .cargo/config.toml does not apply.
            .current_dir(std::env::temp_dir());
        for var in ["CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC", "RUSTC_WRAPPER", "CARGO_BUILD_TARGET"] {
            install.env_remove(var);
        }
        deps::run(&mut install).context(
            "building virtiofsd failed (see above); it needs libseccomp-dev, libcap-ng-dev, pkg-config and access to crates.io",
        )?;
    }
    let mut dirs = vec![venv.join("bin"), vm.join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    let path = std::env::join_paths(dirs).context("a PATH entry contains ':'")?;
    Ok(Tools { vng, path })
}

fn apt_packages() -> Result<()> {
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(n, _)| *n).collect();
    let missing = deps::not_installed(names)?;
    if missing.is_empty() {
        println!("vm: apt: all {} packages present", APT_PACKAGES.len());
        return Ok(());
    }
    for (name, why) in APT_PACKAGES.iter().filter(|(n, _)| missing.contains(n)) {
        println!("vm: apt: missing {name} ({why})");
    }
    let by_hand = format!("apt-get install -y --no-install-recommends {}", missing.join(" "));
    deps::require_root(&format!("installing apt packages ({by_hand})"))?;
    apt_get(&["update"]).context("apt-get update failed")?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    apt_get(&args).with_context(|| format!("apt-get install failed; fix it, then run: {by_hand}"))?;
    Ok(())
}

fn apt_get(args: &[&str]) -> Result<()> {
    deps::run(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300", "-q"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

// ---- kernels ----

/// The unpacked Debian cloud kernel of `series` ("6.1", "6.12"): the image
/// package the meta package `linux-image-<series>-cloud-amd64` (or, for
/// bookworm's default 6.1, `linux-image-cloud-amd64`) depends on, fetched
/// with `apt-get download` and unpacked with `dpkg -x` when missing. Offline,
/// an already unpacked kernel of the series is used.
pub fn ensure_kernel(series: &str) -> Result<Kernel> {
    let dir = tools_dir().join("kernels");
    let package = match image_package(series) {
        Some(p) => Some(p),
        None => {
            if let Some(k) = unpacked_kernel(&dir, series) {
                println!("vm: apt knows no {series} kernel package; using the unpacked {}", k.version);
                return Ok(k);
            }
            // A fresh machine whose package lists were never fetched.
            apt_get(&["update"]).context("apt-get update failed")?;
            image_package(series)
        }
    };
    let Some(package) = package else {
        bail!(
            "no Debian kernel package for {series}: neither linux-image-{series}-cloud-amd64 nor \
             linux-image-cloud-amd64 depends on a linux-image-{series}.* package \
             (see `apt-cache depends linux-image-cloud-amd64`)"
        );
    };
    let name = package.trim_start_matches("linux-image-").to_string();
    let root = dir.join(&name);
    if let Some(k) = kernel_in(&root, series) {
        println!("vm: kernel {series}: {} present", k.version);
        return Ok(k);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("vm: kernel {series}: fetching {package}");
    // Leftovers of an interrupted run.
    for e in fs::read_dir(&dir)?.flatten() {
        if e.file_name().to_string_lossy().ends_with(".deb") {
            let _ = fs::remove_file(e.path());
        }
    }
    deps::run(Command::new("apt-get").args(["download", "-q", &package]).current_dir(&dir))
        .with_context(|| format!("apt-get download {package} failed: check access to deb.debian.org"))?;
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb in {}", dir.display()))?;
    let partial = dir.join(format!("{name}.partial"));
    let _ = fs::remove_dir_all(&partial);
    deps::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &root).with_context(|| format!("renaming {} to {}", partial.display(), root.display()))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    kernel_in(&root, series).with_context(|| format!("{package} unpacked into {} has no boot/vmlinuz-*", root.display()))
}

/// `linux-image-6.1.0-56-cloud-amd64` for "6.1", from the meta packages'
/// dependencies; None if apt knows none.
fn image_package(series: &str) -> Option<String> {
    let want = format!("linux-image-{series}.");
    [format!("linux-image-{series}-cloud-amd64"), "linux-image-cloud-amd64".to_string()]
        .iter()
        .filter_map(|meta| deps::output(Command::new("apt-cache").args(["depends", meta])).ok())
        .flat_map(|out| {
            out.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
                .collect::<Vec<_>>()
        })
        .find(|dep| dep.starts_with(&want) && dep.ends_with("-cloud-amd64"))
}

fn kernel_in(root: &Path, series: &str) -> Option<Kernel> {
    let vmlinuz = fs::read_dir(root.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))?;
    let version = vmlinuz.file_name()?.to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    root.join("lib/modules").join(&version).is_dir().then(|| Kernel {
        series: series.to_string(),
        version,
        root: root.to_path_buf(),
        vmlinuz,
    })
}

fn unpacked_kernel(dir: &Path, series: &str) -> Option<Kernel> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{series}.")) && !n.ends_with(".partial"))
        .collect();
    names.sort();
    names.iter().rev().find_map(|n| kernel_in(&dir.join(n), series))
}

// ---- test binaries ----

struct TestBinary {
    /// `tunnel`, `xdp_prog`.
    name: String,
    path: PathBuf,
}

/// Build the eBPF object and the integration tests of `udp-encap-tun`; their
/// executables (only those named in `only`, when it is not empty).
fn build_test_binaries(only: &[String]) -> Result<Vec<TestBinary>> {
    // The daemon's build script embeds the XDP object.
    crate::ebpf::build_ebpf()?;
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // --workspace, as `cargo xtask test` builds them: the same features, so
    // after that step (in `ci`) nothing is compiled again.
    c.args(["test", "--workspace", "--no-run", "--message-format=json-render-diagnostics"])
        .arg("--locked")
        .current_dir(crate::workspace_root());
    println!("+ {}", show(&c));
    let out = c
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", show(&c)))?;
    if !out.status.success() {
        bail!("building the test binaries failed ({}): see cargo's messages above", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(r#""reason":"compiler-artifact""#) || !line.contains(r#""kind":["test"]"#) {
            continue;
        }
        let (Some(exe), Some(name)) = (json_str(line, "executable"), json_str(line, "name")) else {
            continue;
        };
        if only.is_empty() || only.contains(&name) {
            bins.push(TestBinary { name, path: exe.into() });
        }
    }
    if bins.is_empty() {
        bail!("no integration test binaries of udp-encap-tun matched {only:?}");
    }
    println!(
        "vm: test binaries: {}",
        bins.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(bins)
}

/// The release daemon (`cargo build --release`, as `package` and `demo`
/// build it, so in `ci` nothing is compiled here): the tests run it in the
/// guest through `UDP_ENCAP_TUN_TEST_BIN`. Under software emulation the
/// debug build takes seconds to load and relocate the XDP program at each
/// start, and the tests start dozens of daemons.
fn build_release_daemon() -> Result<PathBuf> {
    let root = crate::workspace_root();
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args(["build", "--release", "--locked", "-p", "udp-encap-tun", "--bin", "udp-encap-tun"])
        .current_dir(&root);
    deps::run(&mut c).context("building the release daemon for the guest failed")?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/udp-encap-tun"))
}

/// The first string value of `"key":"..."` in one line of cargo's JSON.
/// (Paths and target names carry no escapes; a value with one is refused.)
fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = line.get(start..)?;
    let value = rest.get(..rest.find('"')?)?;
    (!value.contains('\\')).then(|| value.to_string())
}

// ---- one guest run ----

struct KernelRun {
    series: String,
    version: String,
    out_dir: PathBuf,
    time: Duration,
    /// Why it failed, if it did.
    failure: Option<String>,
    passed: u64,
    failed: u64,
    ignored: u64,
    failures: Vec<String>,
    /// `tunnel 3m10s`, per binary.
    times: Vec<String>,
    notes: usize,
}

impl KernelRun {
    fn passed(&self) -> bool {
        self.failure.is_none()
    }

    fn counts(&self) -> String {
        format!("{} passed, {} failed, {} ignored", self.passed, self.failed, self.ignored)
    }

    /// The per-kernel report.
    fn line(&self) -> String {
        let verdict = match &self.failure {
            None => "PASS".to_string(),
            Some(why) => format!("FAIL ({why})"),
        };
        let mut s = format!(
            "vm-test {} ({}): {verdict} in {}: {}",
            self.series,
            self.version,
            fmt_duration(self.time),
            self.counts(),
        );
        if !self.times.is_empty() {
            s.push_str(&format!(" [{}]", self.times.join(", ")));
        }
        s.push_str(&format!(
            "\n  guest output: {}/ (what the tests call target/tmp/ is its cargo-tmp/)",
            self.out_dir.display()
        ));
        if !self.failures.is_empty() {
            s.push_str(&format!("\n  failed: {}", self.failures.join(", ")));
        }
        if self.notes > 0 {
            s.push_str(&format!(
                "\n  daemon warnings/XDP decisions: {} distinct, in {}/daemon-notes.txt",
                self.notes,
                self.out_dir.display()
            ));
        }
        s
    }

    fn short(&self) -> String {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        format!("{} {verdict} {} in {}", self.series, self.counts(), fmt_duration(self.time))
    }
}

fn boot_and_test(tools: &Tools, k: &Kernel, bins: &[TestBinary], daemon: &Path, args: &VmTestArgs) -> Result<KernelRun> {
    let out_dir = crate::workspace_root().join("target/vm-test").join(&k.series);
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir).with_context(|| format!("clearing {}", out_dir.display()))?;
    }
    let cargo_tmp = out_dir.join("cargo-tmp");
    fs::create_dir_all(out_dir.join("tmp"))?;
    fs::create_dir_all(&cargo_tmp)?;
    // CARGO_TARGET_TMPDIR of the binaries: <target>/tmp, from
    // <target>/debug/deps/NAME-HASH.
    let target_tmp = bins
        .first()
        .and_then(|b| b.path.ancestors().nth(3))
        .map(|t| t.join("tmp"))
        .context("test binary path is not <target>/<profile>/deps/NAME")?;
    fs::create_dir_all(&target_tmp)?;
    let threads = args.test_threads.unwrap_or(args.cpus.max(1));
    let script = guest_script(&out_dir, &target_tmp, bins, daemon, threads, &args.filters, &args.skips);
    fs::write(out_dir.join("guest.sh"), script)?;
    fs::write(out_dir.join("probe.py"), PROBE_PY)?;

    let mut c = Command::new("timeout");
    // timeout puts vng (and its qemu) in a process group of its own and
    // signals the whole group.
    c.args(["-k", "20", &format!("{}", args.timeout_min * 60)])
        .arg(&tools.vng)
        .arg("--run")
        .arg(&k.vmlinuz)
        .arg("--rodir")
        .arg(format!("/boot={}", k.root.join("boot").display()))
        .arg("--rwdir")
        .arg(&out_dir)
        .args(["--cpus", &args.cpus.to_string(), "--memory", &args.memory])
        .args(if args.kvm { &[][..] } else { &["--disable-kvm"][..] })
        .arg("--exec")
        .arg(format!("sh {}", out_dir.join("guest.sh").display()))
        .env("PATH", &tools.path)
        .current_dir(crate::workspace_root());
    println!("\n==== vm-test {} ({}), output in {}/", k.series, k.version, out_dir.display());
    println!("+ {}", show(&c));
    let t0 = Instant::now();
    let stderr = fs::File::create(out_dir.join("stderr.txt"))?;
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("could not start `{}`", show(&c)))?;
    let mut log = fs::File::create(out_dir.join("stdout.txt"))?;
    let mut run = KernelRun {
        series: k.series.clone(),
        version: k.version.clone(),
        out_dir: out_dir.clone(),
        time: Duration::ZERO,
        failure: None,
        passed: 0,
        failed: 0,
        ignored: 0,
        failures: Vec::new(),
        times: Vec::new(),
        notes: 0,
    };
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading the guest's output")?;
            writeln!(log, "{line}")?;
            println!("[{}] {line}", k.series);
            if let Some(rest) = line.strip_prefix("test result: ") {
                run.passed += count(rest, "passed");
                run.failed += count(rest, "failed");
                run.ignored += count(rest, "ignored");
            } else if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
                run.failures.push(name.to_string());
            }
        }
    }
    let status = child.wait().context("waiting for vng")?;
    run.time = t0.elapsed();

    // The guest's own record of each binary's exit code.
    let record = fs::read_to_string(out_dir.join("status")).unwrap_or_default();
    let mut bad = Vec::new();
    for l in record.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [name, code, secs] = f[..] {
            let secs: u64 = secs.parse().unwrap_or(0);
            run.times.push(format!("{name} {}", fmt_duration(Duration::from_secs(secs))));
            if code != "0" {
                bad.push(format!("{name} exit {code}"));
            }
        }
    }
    run.failure = if status.code() == Some(124) || status.code() == Some(137) {
        Some(format!("timed out after {} min", args.timeout_min))
    } else if record.lines().count() < bins.len() {
        Some(format!(
            "the guest did not run every test binary (vng {status}); see {}/stderr.txt",
            out_dir.display()
        ))
    } else if !bad.is_empty() {
        Some(bad.join(", "))
    } else if !status.success() {
        Some(format!("vng {status}; see {}/stderr.txt", out_dir.display()))
    } else {
        None
    };
    run.notes = daemon_notes(&cargo_tmp, &out_dir.join("daemon-notes.txt"))?;
    Ok(run)
}

/// The number before `label` in a `test result:` line
/// ("ok. 12 passed; 0 failed; 1 ignored; ...").
fn count(line: &str, label: &str) -> u64 {
    line.split([';', '.'])
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Collect the distinct warning and XDP lines of the daemon logs under
/// `dir` (timestamps and numbers stripped so repeats fold) into `dest`;
/// how many there are.
fn daemon_notes(dir: &Path, dest: &Path) -> Result<usize> {
    let mut logs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                logs.push(p);
            }
        }
    }
    let mut notes: Vec<String> = Vec::new();
    for p in logs {
        let text = fs::read_to_string(&p).unwrap_or_default();
        for l in text.lines() {
            let interesting = l.contains("WARN")
                || l.contains("XDP")
                || l.contains("offload")
                || l.contains("GSO")
                || l.contains("GRO");
            if !interesting {
                continue;
            }
            // Drop a leading `[timestamp LEVEL target]`-style prefix up to the level.
            let body = ["WARN", "INFO", "ERROR", "DEBUG"]
                .iter()
                .find_map(|lvl| l.find(lvl).and_then(|i| l.get(i..)))
                .unwrap_or(l);
            let folded: String = body.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
            if !notes.contains(&folded) {
                notes.push(folded);
            }
        }
    }
    if !notes.is_empty() {
        fs::write(dest, notes.join("\n") + "\n")?;
    }
    Ok(notes.len())
}

/// The script the guest runs: the kernel setup the tests expect of a host,
/// a feature probe, then each test binary, its exit code recorded in `status`.
fn guest_script(
    out: &Path,
    target_tmp: &Path,
    bins: &[TestBinary],
    daemon: &Path,
    threads: u32,
    filters: &[String],
    skips: &[String],
) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mut s = format!(
        r#"#!/bin/sh
# Written by `cargo xtask vm-test`; runs inside the guest.
OUT={out}
echo "vm-test: guest kernel $(uname -r), $(nproc) CPUs"
modprobe tun || echo "vm-test: modprobe tun failed"
grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf || echo "vm-test: cannot mount bpffs"
# ip netns bind-mounts namespaces under /run/netns: it must be writable.
mkdir -p /run/netns 2>/dev/null || {{ mount -t tmpfs tmpfs /run && mkdir -p /run/netns; }}
mount -t tmpfs tmpfs /run/netns
ip link set lo up
# The tests write their artifacts to CARGO_TARGET_TMPDIR (read-only here).
mount --bind "$OUT/cargo-tmp" {target_tmp} || echo "vm-test: cannot bind $OUT/cargo-tmp on {target_tmp}"
export TMPDIR="$OUT/tmp"
export UDP_ENCAP_TUN_TEST_BIN={daemon}
command -v python3 >/dev/null && python3 "$OUT/probe.py"
rc=0
"#,
        out = q(out),
        target_tmp = q(target_tmp),
        daemon = q(daemon),
    );
    let filter: String = filters
        .iter()
        .map(|f| format!(" {}", shell_quote(f)))
        .chain(skips.iter().map(|f| format!(" --skip {}", shell_quote(f))))
        .collect();
    for b in bins {
        s.push_str(&format!(
            r#"echo "==== {name}"
t=$(date +%s)
{path} --test-threads={threads}{filter}
r=$?
echo "{name} $r $(( $(date +%s) - t ))" >> "$OUT/status"
[ $r -eq 0 ] || rc=1
"#,
            name = b.name,
            path = q(&b.path),
        ));
    }
    s.push_str("dmesg > \"$OUT/dmesg.txt\" 2>&1\nexit $rc\n");
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Run in the guest before the tests: which optional kernel features this
/// kernel has, as the daemon would find them (docs/vm.md explains each).
const PROBE_PY: &str = r#"
import errno, fcntl, os, socket, struct

def say(what, ok, why=""):
    print(f"vm-test: feature {what}: {'yes' if ok else 'no'}{' (' + why + ')' if why else ''}")

say("BTF (/sys/kernel/btf/vmlinux)", os.path.exists("/sys/kernel/btf/vmlinux"))

# TUN: IFF_VNET_HDR and the offloads TUNSETOFFLOAD accepts, one at a time.
TUNSETIFF, TUNSETOFFLOAD = 0x400454ca, 0x400454d0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
try:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"vmprobe0", IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
    say("TUN IFF_VNET_HDR", True)
    for name, flags in [("CSUM", 0x01), ("CSUM|TSO4|TSO6", 0x07), ("CSUM|USO4|USO6 (6.2+)", 0x61)]:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            say("TUNSETOFFLOAD " + name, True)
        except OSError as e:
            say("TUNSETOFFLOAD " + name, False, errno.errorcode.get(e.errno, str(e.errno)))
    os.close(fd)
except OSError as e:
    say("TUN IFF_VNET_HDR", False, str(e))

# UDP GSO (UDP_SEGMENT, 4.18) and GRO (UDP_GRO, 5.0).
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for name, opt, val in [("UDP_SEGMENT (GSO)", 103, 1400), ("UDP_GRO", 104, 1)]:
    try:
        s.setsockopt(socket.IPPROTO_UDP, opt, val)
        say(name, True)
    except OSError as e:
        say(name, False, errno.errorcode.get(e.errno, str(e.errno)))
s.close()
"#;

#[cfg(test)]
mod tests {
    use super::{count, json_str};

    #[test]
    fn counts_from_a_test_result_line() {
        let l = "ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count(l, "passed"), 12);
        assert_eq!(count(l, "failed"), 0);
        assert_eq!(count(l, "ignored"), 1);
        let l = "FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(count(l, "passed"), 3);
        assert_eq!(count(l, "failed"), 2);
    }

    #[test]
    fn strings_from_cargo_json() {
        let l = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"tunnel"},"executable":"/w/target/debug/deps/tunnel-ab"}"#;
        assert_eq!(json_str(l, "name").as_deref(), Some("tunnel"));
        assert_eq!(json_str(l, "executable").as_deref(), Some("/w/target/debug/deps/tunnel-ab"));
        assert_eq!(json_str(l, "missing"), None);
        assert_eq!(json_str(r#"{"name":"a\"b"}"#, "name"), None);
    }
}
