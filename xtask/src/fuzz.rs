//! `cargo xtask fuzz [--seconds N] [--runs R] [TARGET]`: run the fuzz
//! targets of `fuzz/` (cargo-fuzz, libFuzzer) for N seconds each (or R
//! executions, whichever ends first), starting from the committed seeds in
//! `fuzz/seeds/<target>`.
//!
//! cargo-fuzz is installed from crates.io if missing; it needs the nightly
//! toolchain. New corpus entries go to `fuzz/corpus/<target>` and crashing
//! inputs to `fuzz/artifacts/<target>` (both ignored by git). The command
//! fails if any target crashes, naming the input and how to replay it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

const TOOLCHAIN: &str = "+nightly";
/// Where the daemon's build script looks for the XDP object by default
/// (relative to the workspace root).
const EBPF_OBJ: &str = "udp-encap-tun-ebpf/target/bpfel-unknown-none/release/udp-encap-tun-ebpf";
const EBPF_OBJ_ENV: &str = "UDP_ENCAP_TUN_EBPF_OBJ";

/// What one target's run reported.
struct Outcome {
    target: String,
    ok: bool,
    /// The last libFuzzer status line (`#N ... cov: C ft: F corp: ...`).
    status: Option<String>,
    execs: Option<String>,
    artifacts: Vec<PathBuf>,
}

pub fn fuzz(seconds: u64, runs: Option<u64>, target: Option<String>) -> Result<()> {
    let root = crate::workspace_root();
    let dir = root.join("fuzz");
    ensure_cargo_fuzz()?;

    let all = list_targets(&dir)?;
    let targets = match target {
        Some(t) if all.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t:?}; the targets are: {}", all.join(", ")),
        None => all,
    };

    // The library's build script embeds the XDP object. The fuzz targets never
    // load it, so when it has not been built an empty stand-in will do.
    let mut ebpf_obj = None;
    if std::env::var_os(EBPF_OBJ_ENV).is_none() && !root.join(EBPF_OBJ).exists() {
        let stand_in = dir.join("target").join("no-xdp-object.o");
        std::fs::create_dir_all(dir.join("target"))?;
        std::fs::write(&stand_in, b"")?;
        eprintln!("note: {EBPF_OBJ} not built; the fuzz build embeds an empty stand-in (the targets do not use it)");
        ebpf_obj = Some(stand_in);
    }

    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_target(&dir, t, seconds, runs, ebpf_obj.as_deref())?);
    }

    match runs {
        Some(n) => eprintln!("\n== fuzz summary ({n} executions or {seconds} s per target)"),
        None => eprintln!("\n== fuzz summary ({seconds} s per target)"),
    }
    for o in &outcomes {
        eprintln!(
            "{:<16} {:<6} execs: {:<10} last: {}",
            o.target,
            if o.ok { "ok" } else { "CRASH" },
            o.execs.as_deref().unwrap_or("?"),
            o.status.as_deref().unwrap_or("?")
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for o in &failed {
        eprintln!("\n{} failed.", o.target);
        if o.artifacts.is_empty() {
            eprintln!("  no artifact written (build failure or fuzzer error: see the output above)");
        }
        for a in &o.artifacts {
            let shown = a.strip_prefix(&root).unwrap_or(a);
            eprintln!("  crashing input: {}", shown.display());
            if let Ok(bytes) = std::fs::read(a)
                && bytes.len() <= 512
            {
                eprintln!("  hex: {}", hex(&bytes));
            }
            eprintln!("  reproduce:  (cd fuzz && cargo {TOOLCHAIN} fuzz run {} ../{})", o.target, shown.display());
            eprintln!("  minimize:   (cd fuzz && cargo {TOOLCHAIN} fuzz tmin {} ../{})", o.target, shown.display());
            eprintln!(
                "  keep it as a regression seed: cp {} fuzz/seeds/{}/ && git add fuzz/seeds/{}",
                shown.display(),
                o.target,
                o.target
            );
        }
    }
    bail!(
        "{} fuzz target(s) crashed: {}",
        failed.len(),
        failed.iter().map(|o| o.target.as_str()).collect::<Vec<_>>().join(", ")
    )
}

fn run_target(dir: &Path, target: &str, seconds: u64, runs: Option<u64>, ebpf_obj: Option<&Path>) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    let artifacts = dir.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    let started = SystemTime::now();
    eprintln!("== fuzz {target} for {seconds} s (seeds: fuzz/seeds/{target})");

    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .args([TOOLCHAIN, "fuzz", "run", target])
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1");
    if let Some(n) = runs {
        cmd.arg(format!("-runs={n}"));
    }
    if let Some(obj) = ebpf_obj {
        cmd.env(EBPF_OBJ_ENV, obj);
    }
    // libFuzzer reports on stderr: pass it through and keep what the
    // summary needs.
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo +nightly fuzz run")?;
    let mut status_line = None;
    let mut execs = None;
    let mut written = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line.context("reading the fuzzer's output")?;
            eprintln!("{line}");
            if line.starts_with('#') && line.contains("cov:") {
                status_line = Some(line.trim().to_owned());
            } else if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                execs = Some(n.trim().to_owned());
            } else if let Some((_, path)) = line.split_once("Test unit written to ") {
                written.push(PathBuf::from(path.trim()));
            }
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;

    // Artifacts from this run: the ones libFuzzer named, else any new file.
    let mut found: Vec<PathBuf> = written.into_iter().map(|p| if p.is_absolute() { p } else { dir.join(p) }).collect();
    if found.is_empty() && !status.success() {
        for e in std::fs::read_dir(&artifacts)?.flatten() {
            let newer = e.metadata().and_then(|m| m.modified()).is_ok_and(|m| m >= started);
            if newer {
                found.push(e.path());
            }
        }
    }
    Ok(Outcome { target: target.to_owned(), ok: status.success(), status: status_line, execs, artifacts: found })
}

/// Installs cargo-fuzz from crates.io if `cargo +nightly fuzz` is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args([TOOLCHAIN, "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    eprintln!("cargo-fuzz not found: installing it (cargo install cargo-fuzz --locked)");
    let ok = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?
        .success();
    if !ok {
        bail!("`cargo install cargo-fuzz --locked` failed; install it by hand (it needs the nightly toolchain: rustup toolchain install nightly)");
    }
    Ok(())
}

/// The targets `fuzz/Cargo.toml` declares, from `cargo fuzz list`.
fn list_targets(dir: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .current_dir(dir)
        .args([TOOLCHAIN, "fuzz", "list"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo +nightly fuzz list")?;
    if !out.status.success() {
        bail!("`cargo +nightly fuzz list` failed in {}", dir.display());
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
