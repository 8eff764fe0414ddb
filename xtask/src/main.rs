//! `cargo xtask`: the project's build, test, demo and benchmark commands.
//!
//! Each command lives in its own module; this file only dispatches.

mod bench;
mod ci;
mod demo;
mod deps;
mod ebpf;
mod fuzz;
mod package;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the XDP program (udp-encap-tun-ebpf) for bpfel-unknown-none.
    BuildEbpf,
    /// Run the fuzz targets (fuzz/, cargo-fuzz on nightly) from the committed seeds; fails on a crash.
    Fuzz {
        /// Seconds per target (the most a target runs).
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Stop a target after this many executions (libFuzzer's -runs),
        /// whichever of this and --seconds comes first.
        #[arg(long)]
        runs: Option<u64>,
        /// One target (default: all of them).
        target: Option<String>,
    },
    /// Install what is missing: apt packages, rust-src/clippy, bpf-linker; check TUN and bpffs.
    Deps,
    /// Build the eBPF object and the workspace, run all tests (root), then clippy.
    Test(ci::TestArgs),
    /// What CI runs on a fresh machine: `deps`, `test`, then the tests under kernels 6.1 and 6.12 in qemu.
    Ci(ci::CiArgs),
    /// Two namespaces, a server and a client daemon, real TCP through the tunnel.
    Demo,
    /// The Debian package target/debian/udp-encap-tun_<version>-1_amd64.deb (cargo-deb).
    Package,
    /// Tunnel vs raw veth: throughput (1 and 4 flows, both directions), daemon CPU per GB, request/response latency.
    Bench(bench::BenchArgs),
    /// Boot Debian kernels (6.1, 6.12) in qemu and run the integration tests inside.
    VmTest(vm::VmTestArgs),
}

/// The repository root: xtask lives in `<root>/xtask`.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => ebpf::build_ebpf().map(|_| ()),
        Command::Fuzz { seconds, runs, target } => fuzz::fuzz(seconds, runs, target),
        Command::Deps => deps::deps(),
        Command::Test(args) => ci::test(&args),
        Command::Ci(args) => ci::ci(&args),
        Command::Demo => demo::demo(),
        Command::Package => package::package(),
        Command::Bench(args) => bench::bench(&args),
        Command::VmTest(args) => vm::vm_test(&args),
    }
}
