//! What running under a service manager adds to the daemon's start and
//! stop (SPEC decision 13; README, "Running it as a service"): the TUN made
//! from the config (`--tun-address`, `--route`), readiness and stopping told
//! to systemd (`Type=notify`), and the metrics snapshot's cadence.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::cli::RunArgs;
use crate::edge::{netdev, tun};

/// How often the loop hands the metrics endpoint a new snapshot.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// With `--tun-address`: creates the TUN, addressed and up, and adds the
/// `--route`s into it. `None` when the TUN is to be opened as it exists.
pub fn make_tun(args: &RunArgs) -> Result<Option<(tun_rs::AsyncDevice, bool)>> {
    let Some(cidr) = args.tun_address else { return Ok(None) };
    let up = &args.bind_to_interface;
    let mtu = match args.tun_mtu {
        Some(m) => m,
        None => {
            let uplink = netdev::mtu(up).map_err(|e| {
                anyhow!("uplink interface {up} (--bind-to-interface): {e}; `ip link` lists the interfaces")
            })?;
            // What a datagram carries: uplink - 8 over IPv4; over IPv6, for
            // a client whose servers are all reached that way, 20 less.
            let v6_only = args.endpoint_port.is_some() && args.nat64_prefix.is_some();
            let mtu = crate::core::mtu::PathMtu::new(u32::MAX, uplink);
            if v6_only { mtu.v6 } else { mtu.v4 }
        }
    };
    let dev = tun::create(&args.interface, cidr.addr, cidr.prefix, mtu)?;
    for r in &args.route {
        let network = Ipv4Addr::from_bits(r.addr.to_bits() & mask(r.prefix));
        netdev::add_route(&args.interface, network, r.prefix, cidr.addr).with_context(|| {
            format!(
                "cannot route {network}/{} into {} (--route): a route to the same prefix may exist \
                 already (`ip route show {network}/{}`)",
                r.prefix, args.interface, r.prefix
            )
        })?;
        log::info!("route {network}/{} dev {} src {}", r.prefix, args.interface, cidr.addr);
    }
    Ok(Some(dev))
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

/// Tells systemd (when it started us with `Type=notify`) what the daemon is
/// doing. Without `$NOTIFY_SOCKET` this does nothing.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify the service manager ({e})");
    }
}

/// `READY=1`: the TUN, the socket, the gate and the listeners are up.
pub fn ready(args: &RunArgs) {
    let status = format!(
        "{} on {} via {}, UDP port {}",
        if args.is_client() { "client" } else { "server" },
        args.interface,
        args.bind_to_interface,
        args.listen_port
    );
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
}

/// `RELOADING=1` with the time, as systemd asks, before a SIGHUP reload.
pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
    }
}

/// When the next metrics snapshot is due.
#[derive(Debug, Default)]
pub struct Cadence {
    last: Option<Instant>,
}

impl Cadence {
    pub fn due(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < SNAPSHOT_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
    }

    #[test]
    fn cadence_is_once_a_second() {
        let t = Instant::now();
        let mut c = Cadence::default();
        assert!(c.due(t));
        assert!(!c.due(t + Duration::from_millis(999)));
        assert!(c.due(t + Duration::from_millis(1000)));
    }
}
