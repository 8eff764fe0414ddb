//! Command line. The four options of the original design keep their exact
//! names and mandatory rules; the rest fill the gaps the design left
//! (README, "Options").

use std::net::Ipv4Addr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const ABOUT: &str = "Carries TCP over UDP through a TUN device.

Every TCP segment the kernel routes into the TUN device travels to the peer as
the payload of one UDP datagram (the IPv4 header is dropped and rebuilt on the
other side: 8 bytes of overhead). An XDP program on the uplink drops datagrams
from peers without an entry before they reach the socket.

Two modes:
  server  (no --endpoint-port): every authenticated peer (address, UDP port)
          gets an IPv4 address of its own from the pool; traffic the kernel
          routes to that address goes back to the peer.
  client  (--endpoint-port PORT): TCP the kernel routes into the TUN goes to
          the destination address's PORT; replies come back out of the TUN
          from that address.";

#[derive(Debug, Parser)]
#[command(
    name = "udp-encap-tun",
    version,
    about = "Carries TCP over UDP through a TUN device",
    long_about = ABOUT,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Option<RunArgs>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the counters and the live entries of a running daemon.
    Status {
        /// The TUN device the daemon serves (it names the daemon).
        #[arg(long)]
        interface: String,
    },
    /// Make the server certificate and client credentials (see docs/auth.md).
    Credentials(crate::auth::CredentialsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The TUN device (persistent, with an IPv4 address, e.g. made with
    /// `ip tuntap add dev tun0 mode tun`).
    #[arg(long, value_name = "TUN")]
    pub interface: String,

    /// The UDP port to listen on. Server: also the TCP port of
    /// authentication. Client: also the TCP source port of authentication.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub listen_port: u16,

    /// The uplink (e.g. eth0, wwan1): the UDP socket is bound to it
    /// (SO_BINDTODEVICE) and the XDP program attaches to it.
    #[arg(long, value_name = "IFACE")]
    pub bind_to_interface: String,

    /// Client mode: the server's UDP (and authentication TCP) port. Without
    /// it the program runs as a server.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub endpoint_port: Option<u16>,

    /// Version-1 behaviour: no authentication; any datagram creates an entry
    /// (server) and any source is accepted (client). Only for a closed
    /// network where every host that can reach the port is trusted.
    #[arg(long)]
    pub insecure_no_auth: bool,

    /// How long an entry lives without being refreshed: seconds, or with a
    /// unit (`300`, `2s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "300", value_parser = parse_duration)]
    pub entry_timeout: Duration,

    /// Server: the addresses given to peers. Default: the TUN's own subnet
    /// minus its network, broadcast and own addresses.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub pool: Option<Cidr>,

    /// How the packet gate attaches to the uplink: `auto` tries the
    /// driver's native XDP mode, then generic (skb) XDP, then a TC
    /// classifier (clsact ingress) where XDP cannot attach, and takes generic
    /// XDP on a veth (native XDP there costs the peer its GSO); `native`,
    /// `generic` and `tc` force one; `off` runs without the gate (the daemon
    /// still checks every datagram itself).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,

    /// After traffic, keep polling the TUN and the socket for this many
    /// microseconds before sleeping (yielding the CPU to anything else that
    /// is runnable). Cuts the wake-up latency a small request/response pays
    /// at each daemon, at the price of a busy CPU while packets keep coming
    /// within the window. 0 (the default) sleeps at once.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub busy_poll: u32,

    /// Capacity of the XDP map of allowed peers. A new peer that finds it
    /// full is refused (counted under pool_full); a live one is never evicted.
    #[arg(long, value_name = "N", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    pub xdp_map_size: u32,

    /// Server: the TLS certificate (PEM) clients authenticate against
    /// (made by `udp-encap-tun credentials server`).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_auth")]
    pub cert: Option<std::path::PathBuf>,

    /// Server: the certificate's private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_auth")]
    pub key: Option<std::path::PathBuf>,

    /// Server: the client list (`ID sha256:HASH` lines). Re-read when it
    /// changes and on SIGHUP.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_auth")]
    pub clients: Option<std::path::PathBuf>,

    /// Client: the credential file (id, secret, server pin) made on the
    /// server by `udp-encap-tun credentials client --name NAME`.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_auth")]
    pub credential: Option<std::path::PathBuf>,

    /// Client: check the server against this CA certificate (PEM) instead of
    /// the pin in the credential.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_no_auth")]
    pub ca: Option<std::path::PathBuf>,

    /// Client with --ca: the name the server's certificate must carry
    /// (default: the server's IP address).
    #[arg(long, value_name = "NAME", requires = "ca", conflicts_with = "insecure_no_auth")]
    pub server_name: Option<String>,

    /// How long one authentication may take (TLS handshake and answer); the
    /// server closes connections that take longer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub auth_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native XDP, else generic XDP (generic on a veth), else the TC classifier.
    Auto,
    /// XDP run by the driver; fails where the driver has none.
    Native,
    /// XDP run by the kernel's receive path; works on every device.
    Generic,
    /// The same gate as a TC classifier at clsact ingress (for links where
    /// XDP cannot attach, e.g. an interface another XDP program holds).
    Tc,
    /// No gate: the daemon checks every datagram itself.
    Off,
}

impl RunArgs {
    pub fn is_client(&self) -> bool {
        self.endpoint_port.is_some()
    }
}

/// An IPv4 prefix such as `198.18.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a CIDR: write it as ADDRESS/PREFIX, e.g. 198.18.0.0/24"))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("`{p}` is not a prefix length (0-32)"))?;
    Ok(Cidr { addr, prefix })
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration: write seconds (300) or a number with ms, s or m"))?;
    let ms = n
        .checked_mul(scale_ms)
        .ok_or_else(|| format!("`{s}` is too long"))?;
    if ms == 0 {
        return Err("a duration of zero would expire entries at once".into());
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("198.18.0.0/24"),
            Ok(Cidr { addr: Ipv4Addr::new(198, 18, 0, 0), prefix: 24 })
        );
        assert!(parse_cidr("198.18.0.0").is_err());
        assert!(parse_cidr("198.18.0.0/33").is_err());
        assert!(parse_cidr("x/24").is_err());
    }

    #[test]
    fn seed_command_line_parses() {
        let cli = Cli::try_parse_from([
            "udp-encap-tun", "--interface", "tun0", "--listen-port", "12345",
            "--bind-to-interface", "eth0", "--endpoint-port", "12345",
        ])
        .expect("the seed's own example parses");
        let run = cli.run.expect("run args");
        assert!(run.is_client());
        assert_eq!(run.entry_timeout, Duration::from_secs(300));
    }

    #[test]
    fn mandatory_options_are_mandatory() {
        for missing in ["--interface", "--listen-port", "--bind-to-interface"] {
            let mut args = vec!["udp-encap-tun"];
            for (k, v) in [("--interface", "tun0"), ("--listen-port", "1"), ("--bind-to-interface", "eth0")] {
                if k != missing {
                    args.extend([k, v]);
                }
            }
            assert!(Cli::try_parse_from(&args).is_err(), "{missing} should be required");
        }
    }

    #[test]
    fn status_needs_no_run_options() {
        let cli = Cli::try_parse_from(["udp-encap-tun", "status", "--interface", "tun0"])
            .expect("status parses");
        assert!(matches!(cli.command, Some(Command::Status { .. })));
    }
}
