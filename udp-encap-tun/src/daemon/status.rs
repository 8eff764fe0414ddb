//! The text `udp-encap-tun status` prints: one fact per line (README,
//! "Reading the counters").

use std::time::Instant;

use super::auth::Auth;
use super::gate::Gate;
use super::host::Host;
use crate::cli::RunArgs;
use crate::core::Core;
use crate::edge::batch::BatchUdp;

#[allow(clippy::too_many_arguments)]
pub fn text(
    args: &RunArgs,
    host: &Host,
    core: &Core,
    gate: &Gate,
    auth: &Auth,
    udp: &BatchUdp,
    tun_offload: bool,
    started: Instant,
    now: Instant,
) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(t, "version {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(t, "mode {}", if args.is_client() { "client" } else { "server" });
    let _ = writeln!(t, "auth {}", if args.insecure_no_auth { "off" } else { "on" });
    let _ = writeln!(
        t,
        "interface {} {}/{} mtu {}",
        args.interface, host.tun_addr, host.tun_prefix, host.tun_mtu
    );
    let _ = writeln!(t, "uplink {} mtu {}", args.bind_to_interface, host.uplink_mtu);
    let _ = writeln!(t, "listen_port {}", args.listen_port);
    if let Some(p) = args.endpoint_port {
        let _ = writeln!(t, "endpoint_port {p}");
    }
    let _ = writeln!(t, "max_mss {}", core.max_mss());
    let on = |b: bool| if b { "on" } else { "off" };
    let _ = writeln!(
        t,
        "offloads tun {} udp_gso {} udp_gro {}",
        on(tun_offload),
        on(udp.gso()),
        on(udp.gro())
    );
    let _ = writeln!(t, "uptime_seconds {}", now.saturating_duration_since(started).as_secs());
    if let Some(store) = core.store() {
        let _ = writeln!(
            t,
            "pool {}/{} capacity {} entries {}",
            store.pool().network(),
            store.pool().prefix(),
            store.pool().capacity(),
            store.len()
        );
    }
    match gate {
        Gate::Off => {
            let _ = writeln!(t, "xdp off");
        }
        Gate::Xdp(g) => {
            let _ = writeln!(t, "xdp {} pins {}", g.mode(), g.pin_dir().display());
        }
    }
    for (name, v) in core.counters().snapshot() {
        let _ = writeln!(t, "counter {name} {v}");
    }
    if let Some(stats) = auth.stats() {
        for (name, v) in stats.snapshot() {
            let _ = writeln!(t, "counter {name} {v}");
        }
    }
    if let Gate::Xdp(g) = gate {
        match g.counters() {
            Ok(cs) => {
                for (name, v) in cs {
                    let _ = writeln!(t, "counter {name} {v}");
                }
            }
            Err(e) => {
                let _ = writeln!(t, "xdp_counters_error {e}");
            }
        }
    }
    if let Some(store) = core.store() {
        let sessions = core.server_sessions();
        let mut entries: Vec<_> = store.entries().collect();
        entries.sort_by_key(|e| e.addr);
        for e in entries {
            let idle = now.saturating_duration_since(e.refreshed);
            let left = e.deadline.map_or(u128::MAX, |d| d.saturating_duration_since(now).as_millis());
            // An entry whose session has not proven its UDP path yet has no
            // peer: a `pending` line, so that `peer` lines are the entries
            // datagrams can reach.
            let _ = match e.peer {
                Some(p) => write!(t, "peer {p} {} idle_ms {} expires_in_ms {left}", e.addr, idle.as_millis()),
                None => write!(t, "pending {} idle_ms {} expires_in_ms {left}", e.addr, idle.as_millis()),
            };
            let _ = match sessions.and_then(|s| s.get_by_addr(e.addr)) {
                Some(s) => writeln!(t, " client {} session {}", s.client, s.id),
                None => writeln!(t),
            };
        }
    }
    if let Some(sessions) = core.client_sessions() {
        let mut all: Vec<_> = sessions.iter().collect();
        all.sort_by_key(|s| s.server);
        for s in all {
            let _ = writeln!(
                t,
                "lease {} expires_in_ms {} path {} session {} state {} heard_ms {}",
                s.server,
                s.until.saturating_duration_since(now).as_millis(),
                s.path,
                s.id,
                if s.bound { "bound" } else { "binding" },
                now.saturating_duration_since(s.heard).as_millis(),
            );
        }
    }
    t
}
