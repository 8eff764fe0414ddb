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
mod status;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::core::Core;
use crate::core::store::{ConnectionStore, Pool};
use crate::counters::Counters;
use crate::edge::batch::BatchUdp;
use crate::edge::control::{self, StatusRequest};
use crate::edge::metrics::Metrics;
use crate::edge::{tun, udp};

use self::auth::{Auth, recv_some};
use self::datapath::DataPath;
use self::host::{Host, inspect_host};

/// How often expiry and lease renewal are looked at.
const TICK: Duration = Duration::from_millis(100);

fn build_core(args: &RunArgs, host: &Host, counters: Arc<Counters>) -> Result<Core> {
    let auth = !args.insecure_no_auth;
    let role = match args.endpoint_port {
        Some(port) => Core::client(port, auth),
        None => {
            let (net, prefix) = match args.pool {
                Some(c) => (c.addr, c.prefix),
                None => (host.tun_addr, host.tun_prefix),
            };
            let pool = Pool::new(net, prefix, &host.tun_addrs).map_err(|e| anyhow!("{e}"))?;
            log::info!("address pool {net}/{prefix}: {} addresses for peers", pool.capacity());
            let key = RandomState::new().hash_one(0x5eed_u64);
            Core::server(ConnectionStore::new(pool, args.entry_timeout, key), auth)
        }
    };
    Ok(Core::new(host.tun_addr, host.path_mtu(), role, counters))
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    let auth_mode = crate::auth::auth_mode_from_args(&args).map_err(|e| anyhow!("{e}"))?;
    let created_tun = service::make_tun(&args)?;
    let host = inspect_host(&args)?;
    let counters = Arc::new(Counters::default());
    let mut core = build_core(&args, &host, counters.clone())?;
    let status_listener = control::bind(&args.interface)?;
    let (tun, offload) = match created_tun {
        Some(t) => t,
        None => tun::open(&args.interface)?,
    };
    if offload {
        tun::limit_super_segments(&args.interface, host.path_mtu());
    }
    let udp = BatchUdp::new(udp::open(args.listen_port, &args.bind_to_interface)?);
    let mut gate = gate::open(&args)?;
    let mut auth = Auth::start(auth_mode, &args, &counters)?;
    let metrics = args.metrics_listen.map(Metrics::start).transpose()?;

    let (status_tx, mut status_rx) = mpsc::channel::<StatusRequest>(8);
    let status_task = tokio::spawn(control::serve(status_listener, status_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    log::info!(
        "{} on {} ({}/{}, MTU {}), UDP port {} on {} (MTU {}), MSS clamp {}, entry timeout {:?}",
        if args.is_client() { "client" } else { "server" },
        args.interface,
        host.tun_addr,
        host.tun_prefix,
        host.tun_mtu,
        args.listen_port,
        args.bind_to_interface,
        host.uplink_mtu,
        core.max_mss(),
        args.entry_timeout,
    );

    let started = Instant::now();
    let mut path = DataPath::new(counters.clone(), offload);
    let mut expired = Vec::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

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
                    auth.enqueue(&mut path.need_auth, &counters);
                }
            }
            r = udp.readable() => {
                r.context("waiting on the UDP socket")?;
                if path.udp_to_tun(&udp, &tun, &mut core, &mut gate).await > 0 {
                    poll_until = Instant::now() + busy_poll;
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
                auth.admit(req, &mut core, &mut gate, &counters, args.entry_timeout);
            }
            Some(done) = recv_some(&mut auth.done) => {
                let flush = auth.finished(done, &mut core, &mut gate, &counters);
                path.send_queued(flush, &udp, &mut core).await;
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                if core.next_expiry().is_some_and(|t| t <= now) {
                    expired.clear();
                    core.expire(now, &mut gate, &mut expired);
                    for e in &expired {
                        auth.forget(e.peer);
                        log::info!("entry expired: {} -> {}", e.peer, e.addr);
                    }
                }
                auth.tick(now, &mut core, &mut gate);
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
                auth.reload(&mut core, &mut gate);
                service::ready(&args);
            }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
        }
    }
    service::notify(&[sd_notify::NotifyState::Stopping]);
    auth.stop();
    status_task.abort();
    drop(metrics);
    drop(gate);
    log::info!("stopped cleanly");
    Ok(())
}

