//! `cargo xtask package`: the Debian package
//! `target/debian/udp-encap-tun_<version>-1_amd64.deb`.
//!
//! 1. the XDP object (`ebpf::build_ebpf`), which the daemon embeds;
//! 2. the release daemon (`cargo build --release`), the one cargo-deb strips
//!    and packages;
//! 3. the man page udp-encap-tun(8) and the bash/zsh/fish completions,
//!    generated from the clap definition by the `gen-docs` example
//!    (clap_mangen, clap_complete) into `target/generated`, the page gzipped
//!    (`gzip -9n`, reproducible);
//! 4. `cargo deb --no-build`, which reads `[package.metadata.deb]` in
//!    `udp-encap-tun/Cargo.toml`: the binary in /usr/sbin, the unit
//!    `udp-encap-tun@.service`, the conffile /etc/udp-encap-tun/example.toml,
//!    the docs, the maintainer scripts in `dist/debian/`.
//!
//! cargo-deb is installed by `cargo xtask deps`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::deps;
use crate::ebpf;

/// `cargo xtask package`.
pub fn package() -> Result<()> {
    let deb = build()?;
    println!("package: {}", deb.display());
    Ok(())
}

/// The package's path for the workspace's version.
pub fn deb_path(root: &Path) -> PathBuf {
    root.join("target")
        .join("debian")
        .join(format!("udp-encap-tun_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")))
}

/// Builds the package; returns its path.
pub fn build() -> Result<PathBuf> {
    let root = crate::workspace_root();
    if deps::which("cargo-deb").is_none() {
        bail!("cargo-deb is not installed: run `cargo xtask deps` (or `cargo install --locked cargo-deb --version {}`)", deps::CARGO_DEB_VERSION);
    }
    ebpf::build_ebpf().context("building the XDP object")?;
    let locked = std::env::var_os("CI").is_some();
    let cargo = || {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.current_dir(&root);
        c
    };
    let mut build = cargo();
    build.args(["build", "--release", "-p", "udp-encap-tun", "--bin", "udp-encap-tun"]);
    if locked {
        build.arg("--locked");
    }
    deps::run(&mut build).context("building the release daemon")?;

    let generated = root.join("target").join("generated");
    let mut docs = cargo();
    // Debug: the test build has compiled the example already; its output
    // does not depend on the profile.
    docs.args(["run", "--quiet", "-p", "udp-encap-tun", "--example", "gen-docs"]);
    if locked {
        docs.arg("--locked");
    }
    docs.arg("--").arg(&generated);
    deps::run(&mut docs).context("generating the man page and the completions")?;
    let page = generated.join("udp-encap-tun.8");
    // -f: replace the last run's .gz; -n: no name or time inside, so the
    // same page gives the same bytes.
    deps::run(Command::new("gzip").args(["-9nf"]).arg(&page)).context("compressing the man page")?;

    let deb = deb_path(&root);
    let _ = std::fs::remove_file(&deb);
    let mut pack = cargo();
    pack.args(["deb", "--no-build", "--strip", "-p", "udp-encap-tun", "--output"]).arg(&deb);
    deps::run(&mut pack).context("cargo deb failed (see its message above)")?;
    if !deb.is_file() {
        bail!("cargo deb reported success but {} is not there", deb.display());
    }
    Ok(deb)
}
