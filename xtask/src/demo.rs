//! `cargo xtask demo`: the README's first command.
//!
//! Installs what is missing (`deps`), builds the XDP object and a release
//! daemon (the demo shows throughput, so it is built optimised), then
//! replaces itself with `scripts/demo.sh`, which builds the two namespaces,
//! runs the traffic and cleans up. The script is a plain shell walk-through
//! an operator can read and rerun by hand (`scripts/demo.sh target/release/udp-encap-tun`).
//! `exec` (not a child process) so that Ctrl-C reaches the script's own
//! cleanup trap and nothing is left running behind it.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::deps;
use crate::ebpf;

pub fn demo() -> Result<()> {
    deps::require_root("the demo creates network namespaces, a veth pair, TUN devices and an XDP program")?;
    println!("demo: checking dependencies (cargo xtask deps)");
    deps::ensure().context("demo: installing the dependencies failed")?;
    println!("demo: building the XDP program");
    ebpf::build_ebpf().context("demo: building the eBPF object failed")?;
    let (root, bin) = build_daemon()?;
    let script = root.join("scripts").join("demo.sh");
    let err = Command::new("bash").arg(&script).arg(&bin).current_dir(&root).exec();
    Err(err).with_context(|| format!("demo: could not run {}", script.display()))
}

/// The demo as a CI step (the eBPF object already built): the README's
/// first command must keep working, and it is the one test that runs the
/// release daemon with real TLS credentials end to end. Its output streams
/// as it comes; the script's exit status is the verdict (it ends with
/// `demo OK` or `demo FAILED: why`).
pub fn check() -> Result<String> {
    let (root, bin) = build_daemon()?;
    let script = root.join("scripts").join("demo.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&bin)
        .current_dir(&root)
        .status()
        .with_context(|| format!("could not run {}", script.display()))?;
    if !status.success() {
        bail!("scripts/demo.sh failed ({status}); its last lines above say why");
    }
    Ok(String::new())
}

/// Builds the release daemon; returns the workspace root and the binary.
fn build_daemon() -> Result<(PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    println!("demo: building the daemon (release)");
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .args(["build", "--release", "--package", "udp-encap-tun", "--bin", "udp-encap-tun"])
        .arg("--locked")
        .current_dir(&root);
    deps::run(&mut build).context("demo: building the daemon failed")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("udp-encap-tun");
    if !bin.is_file() {
        bail!("demo: the build finished but {} does not exist", bin.display());
    }
    Ok((root, bin))
}
