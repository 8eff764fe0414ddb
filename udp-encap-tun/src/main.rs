//! udp-encap-tun: TCP over UDP through a TUN device. See README.md.

mod cli;
mod counters;
mod xdp;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    println!("{cli:?}");
}
