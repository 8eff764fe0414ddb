//! The TUN device: opened with offloads where the kernel allows them, and its
//! TSO super-segments capped to one UDP GSO send.

use anyhow::{Result, anyhow};

use super::batch;
use super::netdev;

/// Opens the TUN with offloads (IFF_VNET_HDR and TUNSETOFFLOAD: the kernel
/// hands over TCP super-segments of up to 64 KB and takes coalesced ones),
/// or without them where the kernel or the device refuses.
pub fn open(name: &str) -> Result<(tun_rs::AsyncDevice, bool)> {
    let builder = || tun_rs::DeviceBuilder::new().name(name).inherit_enable_state();
    let offload_error = match builder().offload(true).build_async() {
        Ok(dev) => {
            log::info!(
                "TUN offloads on {name}: TSO/checksum {}, USO {}",
                if dev.tcp_gso() { "on" } else { "off" },
                if dev.udp_gso() { "on" } else { "off" }
            );
            return Ok((dev, true));
        }
        Err(e) => e,
    };
    let dev = builder().build_async().map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(
            "not allowed to open TUN {name} ({e}): run as root, or give the binary \
             CAP_NET_ADMIN and CAP_NET_RAW (`setcap cap_net_admin,cap_net_raw,cap_bpf,cap_sys_admin+ep BINARY`)"
        ),
        Some(libc::EINVAL) | Some(libc::EBUSY) => anyhow!(
            "{name} cannot be opened as a TUN device ({e}): it is not a TUN (a TAP, a veth, ...), \
             it was made with `multi_queue`, or another program holds it with other flags; \
             make one with `ip tuntap add dev {name} mode tun`"
        ),
        _ => anyhow!("cannot open TUN {name}: {e}"),
    })?;
    // The plain open worked, so it was the offloads that were refused.
    log::warn!("TUN offloads unavailable on {name} ({offload_error}): one packet per read and write");
    Ok((dev, false))
}

/// Creates the TUN `name` (`--tun-address`) with `addr/prefix` and `mtu`,
/// up, with offloads where the kernel allows them. It is not persistent: it
/// goes away with the daemon's file descriptor, a kill -9 included, so
/// nothing is left to block the next start.
pub fn create(name: &str, addr: std::net::Ipv4Addr, prefix: u8, mtu: u16) -> Result<(tun_rs::AsyncDevice, bool)> {
    if netdev::ifindex(name).is_some() {
        return Err(anyhow!(
            "--tun-address asks to create {name}, but an interface {name} exists already: drop \
             --tun-address (and tun-address from the config file) to use it as it is, or remove it \
             (`ip link del {name}`)"
        ));
    }
    let builder = || tun_rs::DeviceBuilder::new().name(name).ipv4(addr, prefix, None).mtu(mtu).enable(true);
    let offload_error = match builder().offload(true).build_async() {
        Ok(dev) => {
            log::info!(
                "created TUN {name} {addr}/{prefix} MTU {mtu}; offloads: TSO/checksum {}, USO {}",
                if dev.tcp_gso() { "on" } else { "off" },
                if dev.udp_gso() { "on" } else { "off" }
            );
            return Ok((dev, true));
        }
        Err(e) => e,
    };
    // The half-made device goes with the failed builder's fd.
    let dev = builder().build_async().map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            anyhow!("not allowed to create TUN {name} ({e}): it takes CAP_NET_ADMIN; run as root or under the systemd unit")
        }
        _ => anyhow!("cannot create TUN {name} with {addr}/{prefix}, MTU {mtu}: {e}"),
    })?;
    log::warn!("TUN offloads unavailable on {name} ({offload_error}): one packet per read and write");
    Ok((dev, false))
}

/// Caps the TUN's super-segments at what one GSO send carries (see
/// [`batch::segments_per_send`]). Worth about a tenth of the throughput;
/// without the privilege to set it the tunnel still works, in two sends.
/// `path_mtu`: the largest inner IPv4 packet the path carries.
pub fn limit_super_segments(tun: &str, path_mtu: u16) {
    let max_datagram = usize::from(path_mtu).saturating_sub(20);
    let segs = batch::segments_per_send(max_datagram);
    match netdev::set_gso_max_segs(tun, segs) {
        Ok(()) => log::info!("{tun}: gso_max_segs {segs}, so that each TSO super-segment leaves in one UDP GSO send"),
        Err(e) => log::warn!(
            "cannot cap {tun}'s TSO super-segments at {segs} segments ({e}): the larger ones leave in two \
             UDP sends; run as root or set it yourself with `ip link set dev {tun} gso_max_segs {segs}`"
        ),
    }
}
