//! `cargo xtask build-ebpf`: build the XDP program for bpfel-unknown-none.
//!
//! `core` for that target must be built from source (`-Z build-std=core`),
//! which needs an unstable flag and the library source. The three routes of
//! ../shared/TOOLCHAIN.md are tried in turn, and the one that worked is named:
//!
//! - A: nightly with `rust-src`;
//! - B: stable with its own `rust-src` and `RUSTC_BOOTSTRAP=1`;
//! - C: Debian's `rustc-web` + `rust-web-src` (`RUSTC=/usr/bin/rustc`).
//!
//! A missing `rust-src` is fetched with `rustup component add`, under a time
//! limit (a machine without network must not hang here). The object is built
//! with debug info and `--btf`, so it carries BTF; the daemon's build script
//! embeds it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const TARGET: &str = "bpfel-unknown-none";
const CRATE_DIR: &str = "udp-encap-tun-ebpf";
const BIN: &str = "udp-encap-tun-ebpf";
const COMPONENT_TIMEOUT: Duration = Duration::from_secs(120);

const RECIPES: &str = "\
none of the three ways to build the eBPF crate worked. Set one up and run `cargo xtask build-ebpf` again:

  A. nightly with rust-src:
       rustup toolchain install nightly --component rust-src
  B. stable with rust-src (built with RUSTC_BOOTSTRAP=1):
       rustup component add rust-src --toolchain stable
  C. Debian packages only (no rustup download):
       apt-get install -y rustc-web rust-web-src

All need bpf-linker built against LLVM 22 on PATH:
       apt-get install -y llvm-22-dev
       PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --no-default-features --features llvm-22

See ../shared/TOOLCHAIN.md.";

/// Which toolchain builds the crate.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    Nightly,
    StableBootstrap,
    Debian,
}

impl Route {
    fn describe(self) -> &'static str {
        match self {
            Route::Nightly => "route A (nightly + rust-src)",
            Route::StableBootstrap => "route B (stable + rust-src, RUSTC_BOOTSTRAP=1)",
            Route::Debian => "route C (Debian rustc-web, RUSTC=/usr/bin/rustc)",
        }
    }
}

pub fn build_ebpf() -> Result<PathBuf> {
    build_ebpf_route().map(|(obj, _)| obj)
}

/// [`build_ebpf`], also saying which route built it.
pub fn build_ebpf_route() -> Result<(PathBuf, Route)> {
    let root = crate::workspace_root();
    let crate_dir = root.join(CRATE_DIR);
    let path = path_with_cargo_bin();
    if find_in_path(&path, "bpf-linker").is_none() {
        bail!("bpf-linker is not on PATH (nor in ~/.cargo/bin).\n\n{RECIPES}");
    }

    let mut failures = Vec::new();
    for route in [Route::Nightly, Route::StableBootstrap, Route::Debian] {
        if let Err(why) = prepare(route) {
            eprintln!("build-ebpf: skipping {}: {why}", route.describe());
            failures.push(format!("{}: {why}", route.describe()));
            continue;
        }
        eprintln!("build-ebpf: building with {}", route.describe());
        let status = cargo_cmd(route, "build", &crate_dir, &path)
            .status()
            .with_context(|| format!("running cargo for {}", route.describe()))?;
        if status.success() {
            let obj = crate_dir
                .join("target")
                .join(TARGET)
                .join("release")
                .join(BIN);
            check_object(&obj)?;
            println!(
                "build-ebpf: built {} with {}",
                obj.display(),
                route.describe()
            );
            return Ok((obj, route));
        }
        eprintln!("build-ebpf: {} failed ({status})", route.describe());
        failures.push(format!(
            "{}: cargo build failed ({status})",
            route.describe()
        ));
    }
    bail!("{}\n\n{RECIPES}", failures.join("\n"))
}

/// Makes sure the route's compiler and library source exist; may download
/// `rust-src` (with a time limit).
fn prepare(route: Route) -> Result<()> {
    match route {
        Route::Nightly => rustup_rust_src("nightly"),
        Route::StableBootstrap => rustup_rust_src("stable"),
        Route::Debian => {
            if !Path::new("/usr/bin/rustc").exists() {
                bail!("/usr/bin/rustc is missing (apt-get install rustc-web rust-web-src)");
            }
            let sysroot = Command::new("/usr/bin/rustc")
                .args(["--print", "sysroot"])
                .output()
                .context("running /usr/bin/rustc --print sysroot")?;
            let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
            if !sysroot
                .join("lib/rustlib/src/rust/library/core")
                .exists()
            {
                bail!(
                    "the library source of /usr/bin/rustc is missing (apt-get install rust-web-src)"
                );
            }
            Ok(())
        }
    }
}

fn rustup_rust_src(toolchain: &str) -> Result<()> {
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !sysroot.status.success() {
        bail!("no {toolchain} toolchain (rustup toolchain install {toolchain})");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    // What -Z build-std reads; its absence is the error cargo would give.
    if sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        return Ok(());
    }
    eprintln!(
        "build-ebpf: {toolchain} has no rust-src; trying `rustup component add rust-src --toolchain {toolchain}` ({}s limit)",
        COMPONENT_TIMEOUT.as_secs()
    );
    let mut child = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", toolchain])
        .spawn()
        .context("running rustup component add")?;
    let deadline = Instant::now() + COMPONENT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for rustup")? {
            if status.success() {
                return Ok(());
            }
            bail!("rustup component add rust-src --toolchain {toolchain} failed ({status})");
        }
        if Instant::now() >= deadline {
            // Ends only the child this function started, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            bail!("rustup component add rust-src --toolchain {toolchain} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cargo clippy -- -D warnings` on the eBPF crate, with the toolchain that
/// built it: the check reuses that build's `core` (seconds, where another
/// toolchain would build `core` again: minutes on 2 cores).
pub fn clippy_ebpf(route: Route) -> Result<()> {
    let root = crate::workspace_root();
    let crate_dir = root.join(CRATE_DIR);
    let path = path_with_cargo_bin();
    let mut cmd = cargo_cmd(route, "clippy", &crate_dir, &path);
    cmd.args(["--", "-D", "warnings"]);
    println!("+ (in {CRATE_DIR}, {}) cargo clippy ... -D warnings", route.describe());
    let status = cmd
        .status()
        .with_context(|| format!("running cargo clippy for {}", route.describe()))?;
    if !status.success() {
        let hint = match route {
            Route::Nightly => "`rustup component add clippy --toolchain nightly` if clippy is missing",
            Route::StableBootstrap => "`rustup component add clippy --toolchain stable` if clippy is missing",
            Route::Debian => "Debian's rustc-web has no clippy: install rustup's stable with rust-src and clippy",
        };
        bail!("clippy on the eBPF crate failed ({status}; {hint}): see its messages above");
    }
    Ok(())
}

fn cargo_cmd(route: Route, sub: &str, crate_dir: &Path, path: &OsString) -> Command {
    // `rustup run` rather than `cargo +toolchain`: the `cargo` first on PATH
    // may be a toolchain's own binary, which does not know `+`.
    let mut cmd = match route {
        Route::Nightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo"]);
            c
        }
        Route::StableBootstrap => {
            let mut c = Command::new("rustup");
            c.args(["run", "stable", "cargo"])
                .env("RUSTC_BOOTSTRAP", "1");
            c
        }
        Route::Debian => {
            let mut c = Command::new("cargo");
            c.env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
            c
        }
    };
    cmd.current_dir(crate_dir)
        .args([
            sub,
            // The crate's own Cargo.lock must be complete.
            "--locked",
            "-Z",
            "build-std=core",
            "--target",
            TARGET,
            "--release",
        ])
        .env("PATH", path)
        // Debug info is what bpf-linker turns into BTF; with --target given,
        // these flags reach only the eBPF crates, not build scripts.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        );
    // What the outer `cargo xtask` (or a user's shell) set must not leak into
    // a build for another target with another toolchain.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    if !matches!(route, Route::Debian) {
        cmd.env_remove("RUSTC");
    }
    if !matches!(route, Route::Debian | Route::StableBootstrap) {
        cmd.env_remove("RUSTC_BOOTSTRAP");
    }
    cmd
}

/// The object must exist and carry BTF: aya 0.14 relies on it for the maps'
/// key/value types in `bpftool` output and newer kernels' checks.
fn check_object(obj: &Path) -> Result<()> {
    let bytes = std::fs::read(obj).with_context(|| format!("reading {}", obj.display()))?;
    if !bytes.starts_with(b"\x7fELF") {
        bail!("{} is not an ELF object", obj.display());
    }
    if !bytes.windows(5).any(|w| w == b".BTF\0") {
        bail!(
            "{} has no .BTF section: is bpf-linker new enough to take --btf?",
            obj.display()
        );
    }
    Ok(())
}

/// PATH with ~/.cargo/bin (or $CARGO_HOME/bin) appended, where
/// `cargo install bpf-linker` puts the linker.
fn path_with_cargo_bin() -> OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(bin) = cargo_home.map(|h| h.join("bin"))
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn find_in_path(path: &OsString, exe: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(exe))
        .find(|p| p.is_file())
}
