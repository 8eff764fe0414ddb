//! The daemon: checks the host, opens the TUN and the socket, then runs one
//! loop that moves packets through the [`Core`] both ways.
//!
//! One task owns the core, so the data path takes no lock: readiness of the
//! TUN or the socket wakes it, it drains up to [`BATCH`] packets from that
//! side, and it goes back to waiting. Timers (expiry), status requests and
//! signals are branches of the same `select!`.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::{RunArgs, XdpMode};
use crate::control::{self, StatusRequest};
use crate::core::{Core, FromTun, GateFull, HEADROOM, PeerGate};
use crate::counters::{Counters, Discard, Traffic};
use crate::netdev;
use crate::store::{ConnectionStore, Pool};
use crate::xdp::{XdpError, XdpGate};

/// Packets handled per wake-up of one side before the loop looks at the
/// other side again: keeps both directions and the timers responsive.
const BATCH: usize = 64;
/// Socket buffers: a burst of full-size segments must not overflow them
/// while the loop is busy with the other direction.
const SOCKET_BUFFER: usize = 4 << 20;
/// How often expiry and lease renewal are looked at.
const TICK: Duration = Duration::from_millis(100);

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

fn path_mtu(host: &Host) -> u16 {
    let m = host.tun_mtu.min(host.uplink_mtu.saturating_sub(8));
    u16::try_from(m).unwrap_or(u16::MAX)
}

fn open_tun(name: &str) -> Result<tun_rs::AsyncDevice> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .inherit_enable_state()
        .build_async()
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(
                "not allowed to open TUN {name} ({e}): run as root, or give the binary \
                 CAP_NET_ADMIN and CAP_NET_RAW (`setcap cap_net_admin,cap_net_raw,cap_bpf,cap_sys_admin+ep BINARY`)"
            ),
            Some(libc::EINVAL) | Some(libc::EBUSY) => anyhow!(
                "{name} cannot be opened as a TUN device ({e}): it is not a TUN (a TAP, a veth, ...) \
                 or another program holds it with other flags; make one with `ip tuntap add dev {name} mode tun`"
            ),
            _ => anyhow!("cannot open TUN {name}: {e}"),
        })
}

fn open_udp(port: u16, uplink: &str) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("cannot create a UDP socket")?;
    s.bind_device(Some(uplink.as_bytes())).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => anyhow!(
            "not allowed to bind the socket to {uplink} ({e}): SO_BINDTODEVICE needs CAP_NET_RAW; run as root"
        ),
        _ => anyhow!("cannot bind the UDP socket to {uplink}: {e}"),
    })?;
    for (what, r) in [
        ("receive", s.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", s.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = r {
            log::warn!("cannot size the UDP {what} buffer: {e}");
        }
    }
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    s.bind(&addr.into()).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => anyhow!(
            "UDP port {port} is already in use on this host (another udp-encap-tun?): \
             stop that program or choose another --listen-port (`ss -uanp` shows who holds it)"
        ),
        Some(libc::EACCES) => anyhow!("not allowed to bind UDP port {port}: run as root"),
        _ => anyhow!("cannot bind UDP port {port}: {e}"),
    })?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s.into())?)
}

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
    Ok(Core::new(host.tun_addr, path_mtu(host), role, counters))
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: RunArgs) -> Result<()> {
    if !args.insecure_no_auth {
        bail!(
            "authentication is not available yet in this build: start with --insecure-no-auth \
             to run without it (version-1 behaviour: any host that can reach the port gets an entry)"
        );
    }
    let host = inspect_host(&args)?;
    let counters = Arc::new(Counters::default());
    let mut core = build_core(&args, &host, counters.clone())?;
    let status_listener = control::bind(&args.interface)?;
    let tun = open_tun(&args.interface)?;
    let udp = open_udp(args.listen_port, &args.bind_to_interface)?;
    let mut gate = open_gate(&args)?;

    let (status_tx, mut status_rx) = mpsc::channel::<StatusRequest>(8);
    let status_task = tokio::spawn(control::serve(status_listener, status_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

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
    let mut tun_buf = vec![0u8; 65536];
    let mut udp_buf = vec![0u8; HEADROOM + 65536];
    let mut expired = Vec::new();
    let mut io_log = RateLimitedLog::default();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            r = tun.readable() => {
                r.context("waiting on the TUN")?;
                let now = Instant::now();
                for _ in 0..BATCH {
                    let n = match tun.try_recv(&mut tun_buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e).context("reading from the TUN"),
                    };
                    let Some(pkt) = tun_buf.get_mut(..n) else { break };
                    match core.from_tun(pkt, now) {
                        Ok(FromTun::Send { to, payload }) => {
                            let Some(bytes) = pkt.get(payload) else { continue };
                            match send_udp(&udp, bytes, to).await {
                                Ok(()) => {
                                    counters.add(Traffic::UdpTxPackets, 1);
                                    counters.add(Traffic::UdpTxBytes, bytes.len() as u64);
                                }
                                Err(e) => {
                                    counters.discard(Discard::IoError);
                                    io_log.log(now, || format!("sending to {to}: {e}"));
                                }
                            }
                        }
                        Ok(FromTun::NeedAuth { .. }) => counters.discard(Discard::AuthQueue),
                        Err(_) => {} // counted by the core
                    }
                }
            }
            r = udp.readable() => {
                r.context("waiting on the UDP socket")?;
                let now = Instant::now();
                for _ in 0..BATCH {
                    let Some(room) = udp_buf.get_mut(HEADROOM..) else { break };
                    let (n, src) = match udp.try_recv_from(room) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // ICMP errors for earlier sends surface here (ECONNREFUSED, ...).
                            counters.discard(Discard::IoError);
                            io_log.log(now, || format!("receiving: {e}"));
                            continue;
                        }
                    };
                    let SocketAddr::V4(src) = src else { continue };
                    // A discard is counted by the core.
                    if let Ok(range) = core.from_udp(src, &mut udp_buf, n, now, &mut gate) {
                        let Some(pkt) = udp_buf.get(range) else { continue };
                        match send_tun(&tun, pkt).await {
                            Ok(()) => {
                                counters.add(Traffic::TunTxPackets, 1);
                                counters.add(Traffic::TunTxBytes, pkt.len() as u64);
                            }
                            Err(e) => {
                                counters.discard(Discard::IoError);
                                io_log.log(now, || format!("writing to the TUN: {e}"));
                            }
                        }
                    }
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                if core.next_expiry().is_some_and(|t| t <= now) {
                    expired.clear();
                    core.expire(now, &mut gate, &mut expired);
                    for e in &expired {
                        log::info!("entry expired: {} -> {}", e.peer, e.addr);
                    }
                }
            }
            Some(reply) = status_rx.recv() => {
                let text = status_text(&args, &host, &core, &gate, started, Instant::now());
                let _ = reply.send(text);
            }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
        }
    }
    status_task.abort();
    drop(gate);
    log::info!("stopped cleanly");
    Ok(())
}

/// The peer gate in front of the socket: the XDP program, or nothing.
pub enum Gate {
    Off,
    Xdp(XdpGate),
}

/// Attaches the XDP gate. Enforcement (dropping datagrams from peers without
/// an entry) is on when authentication is: in version 1 a datagram from an
/// unknown peer is what creates its entry, so it must reach the daemon.
fn open_gate(args: &RunArgs) -> Result<Gate> {
    if args.xdp_mode == XdpMode::Off {
        log::info!("XDP gate off (--xdp-mode off): the daemon checks every datagram itself");
        return Ok(Gate::Off);
    }
    let enforce = !args.insecure_no_auth;
    match XdpGate::attach(&args.bind_to_interface, args.listen_port, args.xdp_map_size, args.xdp_mode, enforce) {
        Ok(g) => Ok(Gate::Xdp(g)),
        Err(e) if args.xdp_mode == XdpMode::Auto => {
            log::warn!(
                "XDP gate unavailable, running without it (the daemon still checks every datagram): {:#}",
                anyhow::Error::from(e)
            );
            Ok(Gate::Off)
        }
        Err(e) => Err(anyhow::Error::from(e)
            .context(format!("cannot attach the XDP gate to {}", args.bind_to_interface))),
    }
}

impl PeerGate for Gate {
    fn allow(&mut self, peer: SocketAddrV4) -> Result<(), GateFull> {
        match self {
            Gate::Off => Ok(()),
            Gate::Xdp(g) => g.allow(peer).map_err(|e| {
                if !matches!(e, XdpError::MapFull { .. }) {
                    // Refuse rather than let store and map disagree.
                    log::error!("cannot add {peer} to the XDP map, refusing it: {e}");
                }
                GateFull
            }),
        }
    }

    fn revoke(&mut self, peer: SocketAddrV4) {
        if let Gate::Xdp(g) = self
            && let Err(e) = g.revoke(peer)
        {
            log::error!("cannot remove {peer} from the XDP map: {e}");
        }
    }
}

async fn send_udp(udp: &UdpSocket, bytes: &[u8], to: SocketAddrV4) -> io::Result<()> {
    match udp.try_send_to(bytes, to.into()) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => udp.send_to(bytes, to).await.map(|_| ()),
        Err(e) => Err(e),
    }
}

async fn send_tun(tun: &tun_rs::AsyncDevice, pkt: &[u8]) -> io::Result<()> {
    match tun.try_send(pkt) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => tun.send(pkt).await.map(|_| ()),
        Err(e) => Err(e),
    }
}

/// Logs a recurring I/O problem at most once a second, with how many were
/// suppressed: a flood must not turn into a flood of log lines.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn log(&mut self, now: Instant, msg: impl FnOnce() -> String) {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        let s = std::mem::take(&mut self.suppressed);
        if s > 0 {
            log::warn!("{} ({s} similar suppressed)", msg());
        } else {
            log::warn!("{}", msg());
        }
        self.last = Some(now);
    }
}

fn status_text(args: &RunArgs, host: &Host, core: &Core, gate: &Gate, started: Instant, now: Instant) -> String {
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
        let mut entries: Vec<_> = store.entries().collect();
        entries.sort_by_key(|e| e.addr);
        for e in entries {
            let idle = now.saturating_duration_since(e.refreshed);
            let left = store.timeout().saturating_sub(idle);
            let _ = writeln!(
                t,
                "peer {} {} idle_ms {} expires_in_ms {}",
                e.peer,
                e.addr,
                idle.as_millis(),
                left.as_millis()
            );
        }
    }
    let leases: HashMap<_, _> = core.leases().into_iter().collect();
    for (server, until) in leases {
        let _ = writeln!(t, "lease {server} expires_in_ms {}", until.saturating_duration_since(now).as_millis());
    }
    t
}
