//! `cargo xtask`: the project's build, test, demo and benchmark commands.
//!
//! Each command lives in its own module; this file only dispatches.

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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf => ebpf::build_ebpf().map(|_| ()),
    }
}
