//! The daemon: the thin driver between the pure [`Core`](crate::core::Core)
//! and the I/O edge ([`crate::edge`]). It checks the host ([`host`]), opens
//! the TUN, the socket and the gate, then runs one loop that moves packets
//! through the core both ways ([`datapath`]).
//!
//! One task owns the core, so the data path takes no lock: readiness of the
//! TUN or the socket wakes it, it moves a bounded batch from that side, and it
//! goes back to waiting. Timers (expiry, renewals), authentication results
//! ([`auth`]), status requests ([`status`]) and signals are branches of the
//! same `select!`.

mod auth;
mod datapath;
mod gate;
pub mod host;
mod service;
pub mod state;
mod status;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::core::endpoints::Endpoints;
use crate::core::mtu::Families;
use crate::core::ratelog::RateLimitedLog;
use crate::core::{Core, Ended};
use crate::core::store::{ConnectionStore, Pool};
use crate::counters::Counters;
use crate::edge::batch::BatchUdp;
use crate::edge::control::{self, StatusRequest};
use crate::edge::metrics::Metrics;
use crate::edge::{tun, udp};

use self::auth::{Auth, recv_some};
use self::gate::Gate;
use self::datapath::DataPath;
use self::host::{Host, inspect_host};

/// How often expiry and lease renewal are looked at.
const TICK: Duration = Duration::from_millis(100);

/// How long an authenticated session may take to prove its UDP path
/// before the server lets its address go (the client gives up after 5 s).
const BIND_LIFE: Duration = Duration::from_secs(10);

fn build_core(args: &RunArgs, host: &Host, counters: Arc<Counters>) -> Result<Core> {
    let auth = !args.insecure_no_auth;
    let role = match args.endpoint_port {
        Some(port) => {
            let endpoints = Endpoints::new(port, &args.endpoint_v6, args.nat64_prefix);
            Core::client(endpoints, auth, args.keepalive)
        }
        None => {
            let (net, prefix) = match args.pool {
                Some(c) => (c.addr, c.prefix),
                None => (host.tun_addr, host.tun_prefix),
            };
            let pool = Pool::new(net, prefix, &host.tun_addrs).map_err(|e| anyhow!("{e}"))?;
            log::info!("address pool {net}/{prefix}: {} addresses for peers", pool.capacity());
            let key = RandomState::new().hash_one(0x5eed_u64);
            let store = ConnectionStore::new(pool, args.entry_timeout, key);
            Core::server(store, auth, args.max_entries_per_client as usize, BIND_LIFE)
        }
    };
    Ok(Core::new(host.tun_addr, host.path_mtu(), role, counters))
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    let auth_mode = crate::auth::auth_mode_from_args(&args).map_err(|e| anyhow!("{e}"))?;
    let created_tun = service::make_tun(&args)?;
    let mut host = inspect_host(&args)?;
    let counters = Arc::new(Counters::default());
    let mut core = build_core(&args, &host, counters.clone())?;
    let status_listener = control::bind(&args.interface)?;
    let (tun, offload) = match created_tun {
        Some(t) => t,
        None => tun::open(&args.interface)?,
    };
    // A server serves both families where the host has IPv6; a client opens
    // what its servers' paths need.
    let want = match args.endpoint_port {
        Some(port) => Endpoints::new(port, &args.endpoint_v6, args.nat64_prefix).families(),
        None => Families::Both,
    };
    let (sock, families) = udp::open(args.listen_port, &args.bind_to_interface, want)?;
    host.families = families;
    host.check_mtu(&args, families);
    if offload {
        tun::limit_super_segments(&args.interface, host.path_mtu().largest(families));
    }
    let udp = BatchUdp::new(sock, counters.clone());
    let mut gate = gate::open(&args)?;
    // The saved sessions go into the core and the gate before the loop
    // reads its first datagram.
    let mut saver = Saver::new(&args, !args.insecure_no_auth)?;
    saver.restore(&mut core, &mut gate);
    let mut auth = Auth::start(auth_mode, &args, &counters)?;
    let metrics = args.metrics_listen.map(Metrics::start).transpose()?;

    let (status_tx, mut status_rx) = mpsc::channel::<StatusRequest>(8);
    let status_task = tokio::spawn(control::serve(status_listener, status_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    log::info!(
        "{} on {} ({}/{}, MTU {}), UDP port {} on {} (MTU {}, {}), MSS clamp {} (IPv4) {} (IPv6), entry timeout {:?}{}",
        if args.is_client() { "client" } else { "server" },
        args.interface,
        host.tun_addr,
        host.tun_prefix,
        host.tun_mtu,
        args.listen_port,
        args.bind_to_interface,
        host.uplink_mtu,
        match families {
            Families::V4 => "IPv4",
            Families::V6 => "IPv6",
            Families::Both => "IPv4 and IPv6",
        },
        core.max_mss().v4,
        core.max_mss().v6,
        args.entry_timeout,
        if args.is_client() { format!(", keepalive {:?}", args.keepalive) } else { String::new() },
    );

    let started = Instant::now();
    let mut path = DataPath::new(counters.clone(), offload);
    let mut ended = Vec::new();
    let mut actions = Vec::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut control_log = RateLimitedLog::default();

    let busy_poll = Duration::from_micros(u64::from(args.busy_poll));
    let mut poll_until = started;

    let mut snapshots = service::Cadence::default();
    let report = |core: &Core, gate: &gate::Gate, auth: &Auth, detail| {
        status::report(&args, &host, core, gate, auth, &udp, offload, started, Instant::now(), detail)
    };
    if let Some(m) = &metrics {
        snapshots.due(Instant::now());
        m.publish(report(&core, &gate, &auth, status::Detail::CountsOnly));
    }
    service::ready(&args);

    loop {
        let polling = !busy_poll.is_zero() && Instant::now() < poll_until;
        tokio::select! {
            r = tun.readable() => {
                r.context("waiting on the TUN")?;
                if path.tun_to_udp(&tun, &udp, &mut core).await? > 0 {
                    poll_until = Instant::now() + busy_poll;
                }
                if !path.need_auth.is_empty() {
                    auth.enqueue(&mut path.need_auth, &core, &counters);
                }
            }
            r = udp.readable() => {
                r.context("waiting on the UDP socket")?;
                if path.udp_to_tun(&udp, &tun, &mut core, &mut gate).await > 0 {
                    poll_until = Instant::now() + busy_poll;
                }
                if !path.controls.is_empty() {
                    let controls = std::mem::take(&mut path.controls);
                    for (src, bytes) in &controls {
                        let Some(done) = control(&mut core, &mut gate, *src, bytes, &mut control_log) else { continue };
                        saver.dirty |= done.changed;
                        if let Some((to, reply)) = done.reply {
                            path.send_control(&udp, to, &reply).await;
                        }
                        if let Some(server) = done.bound {
                            let flush = auth.bound(server, &core);
                            path.send_queued(flush, &udp, &mut core).await;
                        }
                    }
                    path.controls = controls;
                    path.controls.clear();
                }
            }
            // Busy polling: instead of sleeping in epoll, let whatever else
            // is runnable on this CPU go first (sched_yield), then have the
            // runtime look at epoll without waiting (a deferred wake-up
            // makes it poll its driver with a zero timeout).
            () = std::future::ready(()), if polling => {
                std::thread::yield_now();
                tokio::task::yield_now().await;
            }
            Some(req) = recv_some(&mut auth.requests) => {
                saver.dirty |= auth.admit(req, &mut core, &mut gate, args.entry_timeout);
            }
            Some(done) = recv_some(&mut auth.done) => {
                let (flush, changed) = auth.finished(done, &mut core, &mut gate, &counters);
                saver.dirty |= changed;
                path.send_queued(flush, &udp, &mut core).await;
                // The new session's proof of its path goes now, not at the
                // next tick: the first packets wait for its answer.
                let now = Instant::now();
                core.client_due(now, &mut actions);
                for (to, bytes) in auth.client_actions(&mut actions, &mut core, &mut gate, &counters, now) {
                    path.send_control(&udp, to, &bytes).await;
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                if core.next_expiry().is_some_and(|t| t <= now) {
                    ended.clear();
                    core.expire(now, &mut gate, &mut ended);
                    saver.dirty |= !ended.is_empty();
                    for e in &ended {
                        log_ended(e, now);
                    }
                }
                saver.dirty |= auth.tick(now, &mut core, &mut gate);
                core.client_due(now, &mut actions);
                for (to, bytes) in auth.client_actions(&mut actions, &mut core, &mut gate, &counters, now) {
                    path.send_control(&udp, to, &bytes).await;
                }
                saver.save_if_dirty(&core);
                if let Some(m) = &metrics
                    && snapshots.due(now)
                {
                    m.publish(report(&core, &gate, &auth, status::Detail::CountsOnly));
                }
            }
            Some(reply) = status_rx.recv() => {
                let _ = reply.send(report(&core, &gate, &auth, status::Detail::WithPeers).to_json());
            }
            _ = sighup.recv() => {
                service::reloading();
                saver.dirty |= auth.reload(&mut core, &mut gate);
                service::ready(&args);
            }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
        }
    }
    service::notify(&[sd_notify::NotifyState::Stopping]);
    auth.stop();
    status_task.abort();
    // What a restart needs to resume the sessions, as of now.
    saver.dirty = true;
    saver.save_if_dirty(&core);
    drop(metrics);
    drop(gate);
    log::info!("stopped cleanly");
    Ok(())
}

/// A control datagram through the core; a refusal logged (rate limited: a
/// remote sender can make them) and `None`.
fn control(
    core: &mut Core,
    gate: &mut Gate,
    src: std::net::SocketAddr,
    bytes: &[u8],
    log: &mut RateLimitedLog,
) -> Option<crate::core::ControlDone> {
    use crate::core::session::server::Event;
    let now = Instant::now();
    match core.control(src, bytes, now, gate, nonce()) {
        Ok(done) => {
            match done.event {
                Some(Event::Bound { addr, path }) => log::info!("session for {addr}: UDP path {path} proven"),
                Some(Event::Moved { addr, from, to, robbed }) => {
                    log::info!("session for {addr} moved from {from} to {to} (its path proven there)");
                    if let Some(r) = robbed {
                        log::info!("session for {r} lost {to} to {addr}, which proved it; it waits for its own proof");
                    }
                }
                Some(Event::Abandoned { addr, path }) => {
                    log.log(now, || {
                        format!(
                            "session for {addr}: a proof from {path} came while its current path was heard from; \
                             not moved (a copy of its datagrams?)"
                        )
                    });
                }
                Some(Event::GateFull { addr, path }) => {
                    log.log(now, || {
                        format!("session for {addr}: cannot let {path} into the XDP map (full; raise --xdp-map-size)")
                    });
                }
                Some(Event::Challenged { .. } | Event::Answered | Event::ChallengePending) | None => {}
            }
            Some(done)
        }
        Err(why) => {
            log.log(now, || format!("control datagram from {src} refused: {}", why.as_str()));
            None
        }
    }
}

/// Version 1: spoofed sources make entries that all lapse together, so the
/// lines are bounded.
fn log_ended(e: &Ended, now: Instant) {
    match e {
        Ended::Entry { entry, client } => {
            let who = client.as_deref().map(|c| format!(" (client {c})")).unwrap_or_default();
            match entry.peer {
                Some(p) => {
                    crate::bounded_log!(log::Level::Info, 10, now, "entry expired: {p} -> {}{who}", entry.addr);
                }
                None => {
                    crate::bounded_log!(
                        log::Level::Info,
                        10,
                        now,
                        "session for {} expired before it proved a UDP path{who}",
                        entry.addr
                    );
                }
            }
        }
        Ended::Lease { server } => log::info!("lease with {server} ran out"),
    }
}

/// Fresh random bits for a challenge.
fn nonce() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Never seen; a challenge with a predictable nonce is still bound to
        // the session's key, so the wall clock's bits will do.
        return state::counter_start().rotate_left(17);
    }
    u64::from_ne_bytes(b)
}

/// Keeps this instance's state file in step with its sessions: marked
/// dirty when something a restart needs changes, written at the next tick.
struct Saver {
    path: Option<std::path::PathBuf>,
    server: bool,
    pub dirty: bool,
    failed: bool,
}

impl Saver {
    /// No state without authentication (version 1 has no sessions).
    fn new(args: &RunArgs, auth: bool) -> Result<Saver> {
        let path = if auth {
            let inode = crate::edge::netdev::netns_inode().context("cannot read this process's network namespace")?;
            Some(state::path_for(&args.state_dir, inode, &args.bind_to_interface, args.listen_port))
        } else {
            None
        };
        Ok(Saver { path, server: !args.is_client(), dirty: false, failed: false })
    }

    /// Puts the saved sessions back into the core and the gate.
    fn restore(&mut self, core: &mut Core, gate: &mut Gate) {
        let Some(path) = &self.path else { return };
        let role = if self.server { "server" } else { "client" };
        let file = match state::load(path, role) {
            state::Loaded::Missing => {
                log::info!("no saved sessions at {}: starting clean", path.display());
                return;
            }
            state::Loaded::Unusable(why) => {
                log::warn!("saved sessions at {} not used, starting clean: {why}", path.display());
                return;
            }
            state::Loaded::File(f) => f,
        };
        let clock = state::Clock::now();
        let counter = state::counter_start();
        let (mut taken, mut refused) = (0, 0);
        let dropped = if self.server {
            let (sessions, dropped) = file.server_sessions(clock);
            for s in sessions {
                let (id, addr) = (s.id, s.addr);
                match core.restore_server(s, counter, clock.now, gate) {
                    Ok(()) => taken += 1,
                    Err(e) => {
                        refused += 1;
                        log::warn!("saved session {id} for {addr} not resumed: {e}");
                    }
                }
            }
            core.restore_quarantine(file.quarantine.iter().copied());
            dropped
        } else {
            let (leases, dropped) = file.client_leases(clock);
            for l in leases {
                if core.restore_client(l, counter, clock.now, gate) {
                    taken += 1;
                } else {
                    refused += 1;
                }
            }
            dropped
        };
        log::info!(
            "resumed {taken} saved session(s) from {}{}",
            path.display(),
            if dropped + refused > 0 { format!(" ({} expired or unusable, left out)", dropped + refused) } else { String::new() }
        );
        self.dirty = dropped + refused > 0;
    }

    fn save_if_dirty(&mut self, core: &Core) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let Some(path) = &self.path else { return };
        let clock = state::Clock::now();
        let file = match (core.server_sessions(), core.client_sessions(), core.store()) {
            (Some(s), _, Some(store)) => state::File::server(&s.saved(store), store.quarantine().collect(), clock),
            (_, Some(c), _) => state::File::client(&c.saved(), clock),
            _ => return,
        };
        match state::save(path, &file) {
            Ok(()) => {
                if self.failed {
                    log::info!("sessions saved to {} again", path.display());
                }
                self.failed = false;
            }
            Err(e) => {
                if !self.failed {
                    log::warn!(
                        "cannot save the sessions to {} ({e}): a restart will not resume them; \
                         check that --state-dir is writable by this daemon",
                        path.display()
                    );
                }
                self.failed = true;
                // Try again at the next change.
            }
        }
    }
}
