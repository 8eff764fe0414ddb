//! The `udp-encap-tun` binary: parse the command line, run. See README.md.

use clap::Parser;
use udp_encap_tun::cli;

fn main() {
    let cli = cli::Cli::parse();
    println!("{cli:?}");
}
