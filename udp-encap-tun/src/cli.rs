//! Command line. The four options of the original design keep their exact
//! names and mandatory rules; the rest fill the gaps the design left
//! (README, "Options").

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const ABOUT: &str = "Carries TCP over UDP through a TUN device.

Every TCP segment the kernel routes into the TUN device travels to the peer as
the payload of one UDP datagram (the IPv4 header is dropped and rebuilt on the
other side: 8 bytes of overhead). Peers authenticate over TLS first; an XDP
program on the uplink then drops datagrams from peers without an entry before
they reach the socket. With --insecure-no-auth (version 1) a datagram from a
new peer is what creates its entry, so the XDP program lets it through and
drops only datagrams that cannot carry a TCP segment.

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
        /// Print the report as JSON (field names in the README, kept
        /// stable) instead of one fact per line.
        #[arg(long)]
        json: bool,
    },
    /// Make the server certificate and client credentials (see docs/auth.md).
    Credentials(crate::auth::CredentialsArgs),
}

const SERVICE: &str = "Running as a service";

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The TUN device: one with an IPv4 address (e.g. made with `ip tuntap
    /// add dev tun0 mode tun`), or the one the daemon creates with
    /// --tun-address.
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

    // ---- running as a service (SPEC decision 13; README, "Running it as a
    // service"): the config file, the metrics endpoint, a TUN the daemon
    // makes itself so that a unit needs no `ip` commands before it.
    /// Read options from this TOML file: each key is a long option's name
    /// without the dashes (`listen-port = 12345`, `insecure-no-auth = true`,
    /// a repeatable option takes an array). Options on the command line win.
    #[arg(long, help_heading = SERVICE, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Serve the counters in the Prometheus text format at
    /// http://ADDR:PORT/metrics (e.g. 127.0.0.1:9477). A separate thread
    /// answers from a snapshot the daemon takes every second, so scrapers
    /// never wait on or slow down the data path.
    #[arg(long, help_heading = SERVICE, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Create the TUN device (--interface) with this address and prefix
    /// (e.g. 198.18.0.1/24), bring it up, and remove it when the daemon
    /// exits. Without it the TUN must exist already (`ip tuntap add`).
    #[arg(long, help_heading = SERVICE, value_name = "ADDR/PREFIX", value_parser = parse_cidr)]
    pub tun_address: Option<Cidr>,

    /// With --tun-address: the MTU of the TUN it creates (default: the
    /// uplink's MTU minus 8, the most a datagram carries; minus 28 for a
    /// client with --nat64-prefix, whose datagrams all cross IPv6).
    #[arg(long, help_heading = SERVICE, value_name = "BYTES", requires = "tun_address", value_parser = clap::value_parser!(u16).range(576..))]
    pub tun_mtu: Option<u16>,

    /// With --tun-address: route this prefix into the TUN once it is up
    /// (`ip route add CIDR dev TUN src ADDR`; a client routes its servers
    /// this way). Repeatable. The routes go with the TUN.
    #[arg(long, help_heading = SERVICE, value_name = "CIDR", requires = "tun_address", value_parser = parse_cidr)]
    pub route: Vec<Cidr>,

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

    /// Client: send a keepalive to each server after this long without
    /// hearing from it (it keeps NAT mappings open while connections idle,
    /// notices a NAT that rebound, and refreshes the lease without a new TLS
    /// handshake); `0` turns keepalives off (leases are then renewed by
    /// authentication while traffic flows, and lapse when idle).
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_duration_or_zero)]
    pub keepalive: Duration,

    /// Where the sessions are kept across restarts (one file per instance,
    /// named like the XDP pins: network namespace, uplink, port; mode 0600).
    /// A restarted server resumes its sessions with the same generated
    /// addresses; a restarted client resumes its sessions at once.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/udp-encap-tun")]
    pub state_dir: PathBuf,

    /// Server: the most sessions (entries) one credential may hold at once,
    /// enough for one per uplink of a multi-WAN client. A new one past it is
    /// refused (counted under discard_client_limit).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_entries_per_client: u32,

    /// Client: reach the server SERVER4 (the IPv4 address routed into the
    /// TUN) at the IPv6 address SERVER6 instead (an IPv6-only uplink to a
    /// dual-stack server). Repeatable.
    #[arg(long, value_name = "SERVER4=SERVER6", value_parser = parse_endpoint_v6)]
    pub endpoint_v6: Vec<(Ipv4Addr, Ipv6Addr)>,

    /// Client: reach every other server through this NAT64 prefix (RFC
    /// 6052, a /96: the server's IPv4 address in its last 32 bits), e.g. a
    /// carrier's `64:ff9b::/96`.
    #[arg(long, value_name = "PREFIX/96", value_parser = parse_nat64_prefix)]
    pub nat64_prefix: Option<Ipv6Addr>,
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

/// `SERVER4=SERVER6`, e.g. `192.0.2.1=2001:db8::1`.
pub fn parse_endpoint_v6(s: &str) -> Result<(Ipv4Addr, Ipv6Addr), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not SERVER4=SERVER6, e.g. 192.0.2.1=2001:db8::1"))?;
    let v4 = a.trim().parse().map_err(|_| format!("`{a}` is not an IPv4 address"))?;
    let v6 = b.trim().trim_start_matches('[').trim_end_matches(']');
    let v6 = v6.parse().map_err(|_| format!("`{b}` is not an IPv6 address"))?;
    Ok((v4, v6))
}

/// A NAT64 prefix `PREFIX/96` (RFC 6052 section 2.2: only /96 is taken, the
/// form every NAT64 uses for a whole IPv4 address in the last 32 bits).
pub fn parse_nat64_prefix(s: &str) -> Result<Ipv6Addr, String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a prefix: write it as PREFIX/96, e.g. 64:ff9b::/96"))?;
    if p != "96" {
        return Err(format!("`/{p}`: only /96 NAT64 prefixes are supported (the IPv4 address in the last 32 bits)"));
    }
    let a: Ipv6Addr = a.parse().map_err(|_| format!("`{a}` is not an IPv6 address"))?;
    let [.., s6, s7] = a.segments();
    if s6 != 0 || s7 != 0 {
        return Err(format!("`{s}` has bits set past /96"));
    }
    Ok(a)
}

/// A duration as [`parse_duration`], or `0` for "off".
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(['m', 's']).trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
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
#[allow(clippy::unwrap_used)]
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
    fn ipv6_endpoints_and_keepalive() {
        let v4: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(parse_endpoint_v6("192.0.2.1=2001:db8::1"), Ok((v4, v6)));
        assert_eq!(parse_endpoint_v6("192.0.2.1=[2001:db8::1]"), Ok((v4, v6)));
        assert!(parse_endpoint_v6("192.0.2.1").is_err());
        assert!(parse_endpoint_v6("2001:db8::1=192.0.2.1").is_err());
        assert_eq!(parse_nat64_prefix("64:ff9b::/96"), Ok("64:ff9b::".parse().unwrap()));
        assert!(parse_nat64_prefix("64:ff9b::/64").is_err());
        assert!(parse_nat64_prefix("64:ff9b::1:2/96").is_err());
        assert!(parse_nat64_prefix("64:ff9b::").is_err());
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("4s"), Ok(Duration::from_secs(4)));
        let run = Cli::try_parse_from(["udp-encap-tun", "--interface", "t", "--listen-port", "1", "--bind-to-interface", "e"])
            .unwrap()
            .run
            .unwrap();
        assert_eq!(run.keepalive, Duration::from_secs(25));
        assert_eq!(run.max_entries_per_client, 8);
        assert_eq!(run.state_dir, PathBuf::from("/var/lib/udp-encap-tun"));
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
