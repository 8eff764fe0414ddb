//! Host checks at start: the interfaces exist, the TUN has an IPv4 address,
//! and the MTUs fit (SPEC decisions 6 and 10). Every refusal says how to fix
//! it.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

use crate::cli::RunArgs;
use crate::core::mtu::{self, Families, PathMtu};
use crate::edge::netdev;

/// What the daemon found out about the host at start.
pub struct Host {
    pub tun_addr: Ipv4Addr,
    pub tun_prefix: u8,
    pub tun_addrs: Vec<Ipv4Addr>,
    pub tun_mtu: u32,
    pub uplink_mtu: u32,
    /// What the UDP socket carries, once it is open.
    pub families: Families,
}

/// Checks the interfaces and says how to fix what is wrong.
pub fn inspect_host(args: &RunArgs) -> Result<Host> {
    let tun = &args.interface;
    let up = &args.bind_to_interface;
    if netdev::ifindex(tun).is_none() {
        bail!(
            "interface {tun} does not exist: create it with `ip tuntap add dev {tun} mode tun`, \
             give it an address (`ip addr add 198.18.0.1/24 dev {tun}`) and bring it up \
             (`ip link set {tun} up`)"
        );
    }
    if netdev::ifindex(up).is_none() {
        bail!("uplink interface {up} (--bind-to-interface) does not exist here: `ip link` lists the interfaces");
    }
    let addrs = netdev::ipv4_addrs(tun).context("cannot list interface addresses")?;
    let Some(&(tun_addr, tun_prefix)) = addrs.first() else {
        bail!(
            "TUN {tun} has no IPv4 address: the rebuilt packets need one as destination; \
             add one, e.g. `ip addr add 198.18.0.1/24 dev {tun}`"
        );
    };
    for (dev, what) in [(tun, "nothing is routed into it"), (up, "no datagram leaves or arrives")] {
        if matches!(netdev::is_up(dev), Ok(false)) {
            log::warn!("{dev} is down, so {what} until it is up: `ip link set {dev} up`");
        }
    }
    let tun_mtu = netdev::mtu(tun).with_context(|| format!("cannot read the MTU of {tun}"))?;
    let uplink_mtu = netdev::mtu(up).with_context(|| format!("cannot read the MTU of {up}"))?;
    Ok(Host {
        tun_addr,
        tun_prefix,
        tun_addrs: addrs.iter().map(|(a, _)| *a).collect(),
        tun_mtu,
        uplink_mtu,
        families: Families::V4,
    })
}

impl Host {
    /// The largest inner IPv4 packet that fits a path over IPv4 (min(TUN
    /// MTU, uplink MTU - 8)) and over IPv6 (uplink MTU - 28).
    pub fn path_mtu(&self) -> PathMtu {
        PathMtu::new(self.tun_mtu, self.uplink_mtu)
    }

    /// Says at start when the TUN MTU is more than a path of the families
    /// in use carries (SPEC decisions 6 and 12): TCP is clamped to fit, but
    /// anything else full-size would not fit one datagram.
    pub fn check_mtu(&self, args: &RunArgs, families: Families) {
        let (tun, up) = (&args.interface, &args.bind_to_interface);
        let (tun_mtu, uplink_mtu) = (self.tun_mtu, self.uplink_mtu);
        let mss = self.path_mtu().max_mss();
        // The TUN MTU a path carries whole: the uplink's less the outer
        // headers, plus the inner IPv4 header that does not cross.
        let fix = |outer: u32| uplink_mtu.saturating_sub(outer - 20);
        let (v4_fits, v6_fits) = (tun_mtu <= fix(mtu::OUTER_V4), tun_mtu <= fix(mtu::OUTER_V6));
        if families.v4() && !v4_fits {
            log::warn!(
                "the MTU of {tun} ({tun_mtu}) is more than the MTU of {up} ({uplink_mtu}) minus 8: \
                 a full-size packet would not fit one datagram. Set `ip link set {tun} mtu {}`. \
                 Until then TCP segments are clamped to fit (MSS {}).",
                fix(mtu::OUTER_V4),
                mss.v4,
            );
        }
        if families.v6() && !v6_fits {
            if args.is_client() {
                // Its paths are ours to size: the TUN should fit them.
                log::warn!(
                    "the MTU of {tun} ({tun_mtu}) is more than the MTU of {up} ({uplink_mtu}) minus 28, \
                     what a datagram over IPv6 carries (its header is 20 bytes longer): segments to \
                     servers over IPv6 are clamped to MSS {}. `ip link set {tun} mtu {}` avoids it.",
                    mss.v6,
                    fix(mtu::OUTER_V6),
                );
            } else {
                // A server's TUN serves IPv4 peers too: expected, not a fault.
                log::info!(
                    "IPv6 peers: their segments are clamped to MSS {} (IPv4 peers {}), as a datagram \
                     over IPv6 carries 20 bytes less",
                    mss.v6,
                    mss.v4,
                );
            }
        }
    }
}
