//! The daemon's state as a [`Report`] (`crate::report`), for the status
//! socket (JSON, rendered as text by `udp-encap-tun status`) and for the
//! metrics snapshot.

use std::time::Instant;

use super::auth::Auth;
use super::gate::Gate;
use super::host::Host;
use crate::cli::RunArgs;
use crate::core::Core;
use crate::core::mtu::Families;
use crate::edge::batch::BatchUdp;
use crate::report::{self, Report};

/// What the report is for: `status` lists every peer; the metrics snapshot,
/// taken every second, only counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    WithPeers,
    CountsOnly,
}

#[allow(clippy::too_many_arguments)]
pub fn report(
    args: &RunArgs,
    host: &Host,
    core: &Core,
    gate: &Gate,
    auth: &Auth,
    udp: &BatchUdp,
    tun_offload: bool,
    started: Instant,
    now: Instant,
    detail: Detail,
) -> Report {
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut counters = report::Counters::default();
    for (name, v) in core.counters().snapshot() {
        counters.push(name, v);
    }
    if let Some(stats) = auth.stats() {
        for (name, v) in stats.snapshot() {
            counters.push(name, v);
        }
    }
    let mut xdp_counters_error = None;
    if let Gate::Xdp(g) = gate {
        match g.counters() {
            Ok(cs) => cs.into_iter().for_each(|(name, v)| counters.push(name, v)),
            Err(e) => xdp_counters_error = Some(e.to_string()),
        }
    }
    let mut peers = Vec::new();
    if let (Some(store), Detail::WithPeers) = (core.store(), detail) {
        let sessions = core.server_sessions();
        let mut entries: Vec<_> = store.entries().collect();
        entries.sort_by_key(|e| e.addr);
        for e in entries {
            let session = sessions.and_then(|s| s.get_by_addr(e.addr));
            peers.push(report::Peer {
                peer: e.peer,
                address: e.addr,
                idle_ms: ms(now.saturating_duration_since(e.refreshed)),
                expires_in_ms: e.deadline.map_or(u64::MAX, |d| ms(d.saturating_duration_since(now))),
                client: session.map(|s| s.client.clone()),
                session: session.map(|s| s.id.to_string()),
            });
        }
    }
    let mut leases: Vec<_> = core
        .client_sessions()
        .into_iter()
        .flat_map(|c| c.iter())
        .map(|s| report::Lease {
            server: s.server,
            expires_in_ms: ms(s.until.saturating_duration_since(now)),
            path: s.path,
            session: s.id.to_string(),
            state: if s.bound { "bound" } else { "binding" }.to_string(),
            heard_ms: ms(now.saturating_duration_since(s.heard)),
        })
        .collect();
    leases.sort_by_key(|l| l.server);
    Report {
        version: env!("CARGO_PKG_VERSION").to_string(),
        mode: if args.is_client() { "client" } else { "server" }.to_string(),
        auth: !args.insecure_no_auth,
        interface: report::Interface {
            name: args.interface.clone(),
            address: host.tun_addr,
            prefix: host.tun_prefix,
            mtu: host.tun_mtu,
        },
        uplink: report::Uplink { name: args.bind_to_interface.clone(), mtu: host.uplink_mtu },
        listen_port: args.listen_port,
        endpoint_port: args.endpoint_port,
        max_mss: core.max_mss().v4,
        max_mss_ipv6: host.families.v6().then_some(core.max_mss().v6),
        families: Some(
            match host.families {
                Families::V4 => "ipv4",
                Families::V6 => "ipv6",
                Families::Both => "ipv4+ipv6",
            }
            .to_string(),
        ),
        offloads: report::Offloads { tun: tun_offload, udp_gso: udp.gso(), udp_gro: udp.gro() },
        uptime_seconds: now.saturating_duration_since(started).as_secs(),
        pool: core.store().map(|s| report::PoolInfo {
            network: s.pool().network(),
            prefix: s.pool().prefix(),
            capacity: s.pool().capacity() as u64,
            entries: s.len() as u64,
        }),
        xdp: match gate {
            Gate::Off => None,
            Gate::Xdp(g) => Some(report::XdpInfo { mode: g.mode().to_string(), pins: g.pin_dir().display().to_string() }),
        },
        counters,
        xdp_counters_error,
        peers,
        leases,
    }
}
