//! `cargo xtask`: the project's build, test, demo and benchmark commands.
//!
//! Each command lives in its own module; this file only dispatches.

mod ci;
mod demo;
mod deps;
mod ebpf;

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
    /// Install what is missing: apt packages, rust-src/clippy, bpf-linker; check TUN and bpffs.
    Deps,
    /// Build the eBPF object and the workspace, run all tests (root), then clippy.
    Test(ci::TestArgs),
    /// What CI runs on a fresh machine: `deps`, then `test`.
    Ci,
    /// Two namespaces, a server and a client daemon, real TCP through the tunnel.
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => ebpf::build_ebpf().map(|_| ()),
        Command::Deps => deps::deps(),
        Command::Test(args) => ci::test(&args),
        Command::Ci => ci::ci(),
        Command::Demo => demo::demo(),
    }
}
