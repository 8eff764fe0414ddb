//! Host checks at start: the interfaces exist, the TUN has an IPv4 address,
//! and the MTUs fit (SPEC decisions 6 and 10). Every refusal says how to fix
//! it.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

use crate::cli::RunArgs;
use crate::edge::netdev;

/// What the daemon found out about the host at start.
pub struct Host {
    pub tun_addr: Ipv4Addr,
    pub tun_prefix: u8,
    pub tun_addrs: Vec<Ipv4Addr>,
    pub tun_mtu: u32,
    pub uplink_mtu: u32,
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
    if tun_mtu.saturating_add(8) > uplink_mtu {
        log::warn!(
            "the MTU of {tun} ({tun_mtu}) is more than the MTU of {up} ({uplink_mtu}) minus 8: \
             a full-size packet would not fit one datagram. Set `ip link set {tun} mtu {}`. \
             Until then TCP segments are clamped to fit (MSS {}).",
            uplink_mtu.saturating_sub(8),
            uplink_mtu.saturating_sub(8 + 40),
        );
    }
    Ok(Host {
        tun_addr,
        tun_prefix,
        tun_addrs: addrs.iter().map(|(a, _)| *a).collect(),
        tun_mtu,
        uplink_mtu,
    })
}

impl Host {
    /// The largest inner IPv4 packet that fits the path: min(TUN MTU,
    /// uplink MTU - 8).
    pub fn path_mtu(&self) -> u16 {
        let m = self.tun_mtu.min(self.uplink_mtu.saturating_sub(8));
        u16::try_from(m).unwrap_or(u16::MAX)
    }
}
