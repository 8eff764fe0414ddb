//! The daemon: checks the host, opens the TUN and the socket, then runs one
//! loop that moves packets through the [`Core`] both ways.
//!
//! One task owns the core, so the data path takes no lock: readiness of the
//! TUN or the socket wakes it, it moves a bounded batch from that side
//! ([`DataPath`]), and it goes back to waiting. Timers (expiry), status requests and
//! signals are branches of the same `select!`.

use std::collections::{HashMap, VecDeque};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::auth;
use crate::authq::{AuthQueue, Enqueued};
use crate::batch::{self, BatchUdp};
use crate::gro;
use crate::cli::{RunArgs, XdpMode};
use crate::control::{self, StatusRequest};
use crate::core::{Core, FromTun, FromTunSuper, GateFull, HEADROOM, PeerGate};
use crate::counters::{Counters, Discard, Traffic};
use crate::netdev;
use crate::tso;
use crate::store::{ConnectionStore, Pool};
use crate::xdp::{XdpError, XdpGate};

/// Socket buffers: a burst of full-size segments must not overflow them
/// while the loop is busy with the other direction.
const SOCKET_BUFFER: usize = 16 << 20;
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

fn path_mtu(host: &Host) -> u16 {
    let m = host.tun_mtu.min(host.uplink_mtu.saturating_sub(8));
    u16::try_from(m).unwrap_or(u16::MAX)
}

/// Opens the TUN with offloads (IFF_VNET_HDR and TUNSETOFFLOAD: the kernel
/// hands over TCP super-segments of up to 64 KB and takes coalesced ones),
/// or without them where the kernel or the device refuses.
fn open_tun(name: &str) -> Result<(tun_rs::AsyncDevice, bool)> {
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

/// Caps the TUN's super-segments at what one GSO send carries (see
/// [`batch::segments_per_send`]). Worth about a tenth of the throughput;
/// without the privilege to set it the tunnel still works, in two sends.
fn limit_super_segments(tun: &str, host: &Host) {
    let max_datagram = usize::from(path_mtu(host)).saturating_sub(20);
    let segs = batch::segments_per_send(max_datagram);
    match netdev::set_gso_max_segs(tun, segs) {
        Ok(()) => log::info!("{tun}: gso_max_segs {segs}, so that each TSO super-segment leaves in one UDP GSO send"),
        Err(e) => log::warn!(
            "cannot cap {tun}'s TSO super-segments at {segs} segments ({e}): the larger ones leave in two \
             UDP sends; run as root or set it yourself with `ip link set dev {tun} gso_max_segs {segs}`"
        ),
    }
}

fn open_udp(port: u16, uplink: &str) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("cannot create a UDP socket")?;
    s.bind_device(Some(uplink.as_bytes())).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => anyhow!(
            "not allowed to bind the socket to {uplink} ({e}): SO_BINDTODEVICE needs CAP_NET_RAW; run as root"
        ),
        _ => anyhow!("cannot bind the UDP socket to {uplink}: {e}"),
    })?;
    size_buffers(&s);
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

/// Sizes the socket buffers so that a burst of full trains does not overflow
/// them while the loop serves the other direction. The FORCE variants (root)
/// go past net.core.rmem_max/wmem_max, whose defaults (208 KB) are far too
/// small for 64 KB trains; without privilege, the plain ones do what they can.
fn size_buffers(s: &Socket) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for (force, plain, what) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        let set = |opt| {
            // SAFETY: `size` outlives the call; the length matches its type.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            log::warn!("cannot size the UDP {what} buffer: {}", io::Error::last_os_error());
        }
    }
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
    let auth_mode = auth::auth_mode_from_args(&args).map_err(|e| anyhow!("{e}"))?;
    let host = inspect_host(&args)?;
    let counters = Arc::new(Counters::default());
    let mut core = build_core(&args, &host, counters.clone())?;
    let status_listener = control::bind(&args.interface)?;
    let (tun, offload) = open_tun(&args.interface)?;
    if offload {
        limit_super_segments(&args.interface, &host);
    }
    let udp = BatchUdp::new(open_udp(args.listen_port, &args.bind_to_interface)?);
    let mut gate = open_gate(&args)?;
    let mut auth = Auth::start(auth_mode, &args, &counters)?;

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
            }
            Some(reply) = status_rx.recv() => {
                let text = status_text(&args, &host, &core, &gate, &auth, &udp, offload, started, Instant::now());
                let _ = reply.send(text);
            }
            _ = sighup.recv() => auth.reload(&mut core, &mut gate),
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
        }
    }
    auth.stop();
    status_task.abort();
    drop(gate);
    log::info!("stopped cleanly");
    Ok(())
}

/// The peer gate in front of the socket: the XDP program, or nothing.
pub enum Gate {
    Off,
    Xdp(Box<XdpGate>),
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
        Ok(g) => Ok(Gate::Xdp(Box::new(g))),
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

/// Reads the TUN gives per wake-up before the loop looks elsewhere.
const TUN_READS_PER_WAKE: usize = 8;
/// The most packets one TUN read can split into (64 KB / small MSS) and the
/// most datagrams gathered before one coalescing write to the TUN.
const PACKETS: usize = tun_rs::IDEAL_BATCH_SIZE;
/// GRO trains received per wake-up before the loop looks elsewhere.
const UDP_RECVS_PER_WAKE: usize = 8;
/// The most segments in one run written to the TUN.
const MAX_RUN: usize = gro::MAX_RUN;
const MAX_PACKET: usize = 65536;

/// The buffers of the data path, allocated once. Both directions work in
/// batches: a TUN read yields up to [`PACKETS`] segments (the kernel's TSO
/// super-segment, split), which leave in GSO trains; the datagrams of a GRO
/// receive are rewritten where they lie and each run of one flow goes to the
/// TUN as one super-segment (gro.rs).
struct DataPath {
    counters: Arc<Counters>,
    offload: bool,
    /// One TUN read: virtio-net header and the unsplit packet.
    tun_read: Vec<u8>,
    /// Whole packets cut out of a super-segment that waits for
    /// authentication (rare: allocated on first use).
    tx: Vec<Vec<u8>>,
    tx_sizes: Vec<usize>,
    /// Wire-form TCP headers of the segments of one super-segment (tso.rs).
    hdrs: Vec<u8>,
    /// One UDP receive (a GRO train).
    udp_read: Vec<u8>,
    /// Without offloads: rebuilt packets waiting for the TUN ([IPv4][segment]).
    rx: Vec<Vec<u8>>,
    /// With offloads: the accepted datagrams of one GRO train, and the
    /// headers written in front of a run.
    accepted: Vec<std::ops::Range<usize>>,
    headers: [u8; gro::RUN_HEADER_LEN],
    io_log: RateLimitedLog,
    /// Client: packets for servers without a lease, handed to [`Auth`].
    need_auth: Vec<(Ipv4Addr, Vec<u8>)>,
}

impl DataPath {
    fn new(counters: Arc<Counters>, offload: bool) -> DataPath {
        DataPath {
            counters,
            offload,
            tun_read: vec![0; tun_rs::VIRTIO_NET_HDR_LEN + MAX_PACKET],
            tx: Vec::new(),
            tx_sizes: vec![0; PACKETS],
            hdrs: vec![0; tso::MAX_SEGMENTS * tso::MAX_TCP_HEADER],
            udp_read: vec![0; MAX_PACKET],
            rx: (0..PACKETS).map(|_| Vec::with_capacity(HEADROOM + 2048)).collect(),
            accepted: Vec::with_capacity(PACKETS),
            headers: [0; gro::RUN_HEADER_LEN],
            io_log: RateLimitedLog::default(),
            need_auth: Vec::new(),
        }
    }

    /// TUN to UDP: read, translate, send. A TSO super-segment leaves in GSO
    /// trains of wire headers and payload slices straight from the read
    /// buffer (tso.rs); any other packet leaves as one datagram. Returns how
    /// many reads it made.
    async fn tun_to_udp(&mut self, tun: &tun_rs::AsyncDevice, udp: &BatchUdp, core: &mut Core) -> Result<usize> {
        let DataPath { counters, offload, tun_read, tx, tx_sizes, hdrs, io_log, need_auth, .. } = self;
        let out = &mut Out { counters, io_log, need_auth };
        for reads in 0..TUN_READS_PER_WAKE {
            let n = match tun.try_recv(tun_read) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(reads),
                Err(e) => return Err(e).context("reading from the TUN"),
            };
            out.counters.add(Traffic::TunReads, 1);
            let now = Instant::now();
            let start = if *offload { tso::VNET_HDR_LEN } else { 0 };
            let (vnet, rest) = tun_read.split_at_mut(start.min(n));
            let Some(pkt) = rest.get_mut(..n.saturating_sub(start)) else {
                out.counters.discard(Discard::Malformed);
                continue;
            };
            let kind = match offload {
                true => tso::VnetHdr::parse(vnet).map_or(tso::Read::Other, |h| h.read_kind()),
                false => tso::Read::Single { partial_csum: None },
            };
            match kind {
                tso::Read::TcpV4 { gso_size } => match core.from_tun_super(pkt, gso_size, hdrs, now) {
                    Ok(FromTunSuper::Send { to, count, thl, payload }) => {
                        let data = pkt.get(payload).unwrap_or(&[]);
                        let parts = hdrs.chunks_exact(thl.max(1)).zip(data.chunks(gso_size)).take(count);
                        // Trains within the kernel's limits (one, once the
                        // TUN's gso_max_segs is capped).
                        let per_send = (batch::MAX_GSO_BYTES / (thl + gso_size)).clamp(1, batch::MAX_GSO_SEGMENTS);
                        out.send_pairs(udp, to, parts, per_send, now).await;
                    }
                    Ok(FromTunSuper::NeedAuth { .. }) => out.queue_split(vnet, pkt, tx, tx_sizes, now),
                    Err(_) => {} // counted by the core
                },
                tso::Read::Single { partial_csum } => {
                    if let Some((cs, co)) = partial_csum
                        && tso::complete_checksum(pkt, cs, co).is_none()
                    {
                        out.counters.discard(Discard::Malformed);
                        continue;
                    }
                    match core.from_tun(pkt, now) {
                        Ok(FromTun::Send { to, payload }) => {
                            let seg = pkt.get(payload).unwrap_or(&[]);
                            let r = udp.send(to, &[IoSlice::new(seg)], 1).await;
                            out.sent(r, to, 1, seg.len(), now);
                        }
                        Ok(FromTun::NeedAuth { server }) => out.need_auth.push((server, pkt.to_vec())),
                        Err(_) => {} // counted by the core
                    }
                }
                // A GSO type the tunnel does not carry (IPv6 TCP, UDP), or a
                // header that makes no sense: counted by what the packet is,
                // never sent.
                tso::Read::Other => {
                    let reason = crate::wire::parse_ipv4_tcp(pkt).err().unwrap_or(Discard::Malformed);
                    out.counters.discard(reason);
                }
            }
        }
        Ok(TUN_READS_PER_WAKE)
    }

    /// Client: packets that waited for authentication, now that it is done.
    async fn send_queued(&mut self, queued: VecDeque<Vec<u8>>, udp: &BatchUdp, core: &mut Core) {
        let now = Instant::now();
        for mut pkt in queued {
            match core.from_tun(&mut pkt, now) {
                Ok(FromTun::Send { to, payload }) => {
                    let seg = pkt.get(payload).unwrap_or(&[]);
                    let r = udp.send(to, &[IoSlice::new(seg)], 1).await;
                    let DataPath { counters, io_log, need_auth, .. } = self;
                    Out { counters, io_log, need_auth }.sent(r, to, 1, seg.len(), now);
                }
                // The lease was refused by the gate (map full): counted there.
                Ok(FromTun::NeedAuth { .. }) => self.counters.discard(Discard::AuthQueue),
                Err(_) => {}
            }
        }
    }

    /// UDP to TUN. With TUN offloads each GRO train is rewritten where it
    /// lies and its runs of one flow go out as one super-segment each
    /// (gro.rs): one `writev`, no copy. Without them, one write per packet.
    /// Returns how many receives it made.
    async fn udp_to_tun(&mut self, udp: &BatchUdp, tun: &tun_rs::AsyncDevice, core: &mut Core, gate: &mut Gate) -> usize {
        if !self.offload {
            return self.udp_to_tun_plain(udp, tun, core, gate).await;
        }
        let now = Instant::now();
        for recvs in 0..UDP_RECVS_PER_WAKE {
            let r = match udp.try_recv(&mut self.udp_read) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return recvs,
                Err(e) => {
                    // ICMP errors for earlier sends surface here (ECONNREFUSED, ...).
                    self.counters.discard(Discard::IoError);
                    self.io_log.log(now, || format!("receiving: {e}"));
                    continue;
                }
            };
            self.counters.add(Traffic::UdpRecvCalls, 1);
            let Some(train) = self.udp_read.get_mut(..r.len) else { continue };
            // 1. Check and rewrite each datagram in place.
            self.accepted.clear();
            let Some(src) = core.accept_train(r.src, train, r.stride, now, gate, &mut self.accepted) else {
                continue;
            };
            // 2. Find where the runs end (a train holds at most MAX_RUN
            //    datagrams; more would be cut into chunks), then write them:
            //    the writes need the train mutably, the search only to read.
            for chunk in self.accepted.chunks(MAX_RUN) {
                let (ends, runs) = gro::run_ends(train, chunk);
                let mut start = 0;
                for &end in ends.get(..runs).unwrap_or(&[]) {
                    let run = chunk.get(start..end).unwrap_or(&[]);
                    let count = end - start;
                    start = end;
                    if let Err(e) = write_run(tun, train, run, src, core, &mut self.headers).await {
                        self.counters.discard_n(Discard::IoError, count as u64);
                        self.io_log.log(now, || format!("writing to the TUN: {e}"));
                        continue;
                    }
                    let bytes: usize = run.iter().map(|r| r.len()).sum();
                    self.counters.add(Traffic::TunWrites, 1);
                    self.counters.add(Traffic::TunTxPackets, count as u64);
                    self.counters.add(Traffic::TunTxBytes, (bytes + count * HEADROOM) as u64);
                }
            }
        }
        UDP_RECVS_PER_WAKE
    }

    /// UDP to TUN without offloads: receive trains until the batch is full
    /// or the socket is empty, rebuild each datagram, one write each.
    async fn udp_to_tun_plain(&mut self, udp: &BatchUdp, tun: &tun_rs::AsyncDevice, core: &mut Core, gate: &mut Gate) -> usize {
        let mut recvs = 0;
        let mut ready = 0;
        let now = Instant::now();
        // Room for one more full GRO train (64 datagrams) in the batch.
        while ready + batch::MAX_GSO_SEGMENTS <= PACKETS {
            let r = match udp.try_recv(&mut self.udp_read) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.counters.discard(Discard::IoError);
                    self.io_log.log(now, || format!("receiving: {e}"));
                    continue;
                }
            };
            self.counters.add(Traffic::UdpRecvCalls, 1);
            recvs += 1;
            let train = self.udp_read.get(..r.len).unwrap_or(&[]);
            for dgram in train.chunks(r.stride) {
                let Some(out) = self.rx.get_mut(ready) else { break };
                out.clear();
                out.resize(HEADROOM, 0);
                out.extend_from_slice(dgram);
                // A discard is counted by the core.
                if let Ok(range) = core.from_udp(r.src, out, dgram.len(), now, gate) {
                    out.truncate(range.end);
                    ready += 1;
                }
            }
        }
        for pkt in self.rx.iter().take(ready) {
            match tun.send(pkt).await {
                Ok(_) => {
                    self.counters.add(Traffic::TunWrites, 1);
                    self.counters.add(Traffic::TunTxPackets, 1);
                    self.counters.add(Traffic::TunTxBytes, pkt.len() as u64);
                }
                Err(e) => {
                    self.counters.discard(Discard::IoError);
                    self.io_log.log(now, || format!("writing to the TUN: {e}"));
                }
            }
        }
        recvs
    }
}

/// The parts of [`DataPath`] that sending and queueing update, borrowed
/// apart from its buffers.
struct Out<'a> {
    counters: &'a Counters,
    io_log: &'a mut RateLimitedLog,
    need_auth: &'a mut Vec<(Ipv4Addr, Vec<u8>)>,
}

impl Out<'_> {
    /// Counts the outcome of a send of `count` datagrams, `bytes` in all.
    fn sent(&mut self, r: io::Result<usize>, to: SocketAddrV4, count: usize, bytes: usize, now: Instant) {
        match r {
            Ok(calls) => {
                self.counters.add(Traffic::UdpSendCalls, calls as u64);
                self.counters.add(Traffic::UdpTxPackets, count as u64);
                self.counters.add(Traffic::UdpTxBytes, bytes as u64);
            }
            Err(e) => {
                self.counters.discard_n(Discard::IoError, count as u64);
                self.io_log.log(now, || format!("sending to {to}: {e}"));
            }
        }
    }

    /// Sends datagrams made of (wire TCP header, payload) pairs to `to`, in
    /// GSO trains of at most `per_send`, each pair gathered by two iovecs.
    async fn send_pairs<'p>(
        &mut self,
        udp: &BatchUdp,
        to: SocketAddrV4,
        mut parts: impl Iterator<Item = (&'p [u8], &'p [u8])>,
        per_send: usize,
        now: Instant,
    ) {
        loop {
            let mut iov = [IoSlice::new(&[]); 2 * batch::MAX_GSO_SEGMENTS];
            let (mut k, mut bytes) = (0, 0);
            for ((h, d), slots) in parts.by_ref().take(per_send).zip(iov.chunks_exact_mut(2)) {
                if let [a, b] = slots {
                    *a = IoSlice::new(h);
                    *b = IoSlice::new(d);
                }
                bytes += h.len() + d.len();
                k += 1;
            }
            if k == 0 {
                return;
            }
            let r = udp.send(to, iov.get(..2 * k).unwrap_or(&[]), 2).await;
            self.sent(r, to, k, bytes, now);
        }
    }

    /// A super-segment for a server without a lease yet (client with
    /// authentication): cut into whole packets as the kernel would have sent
    /// them (tun-rs's split: rare, so its copies do not matter), each queued
    /// for after the handshake.
    fn queue_split(&mut self, vnet: &[u8], pkt: &mut [u8], tx: &mut Vec<Vec<u8>>, sizes: &mut [usize], now: Instant) {
        if tx.is_empty() {
            *tx = (0..sizes.len()).map(|_| vec![0; MAX_PACKET]).collect();
        }
        let split = tun_rs::VirtioNetHdr::decode(vnet).and_then(|h| tun_rs::gso_split(pkt, h, tx, sizes, 0, false));
        match split {
            Ok(k) => {
                for (buf, size) in tx.iter().zip(sizes.iter()).take(k) {
                    match buf.get(..*size).map(|p| (p, crate::wire::parse_ipv4_tcp(p))) {
                        Some((p, Ok(t))) => self.need_auth.push((t.dst, p.to_vec())),
                        Some((_, Err(reason))) => self.counters.discard(reason),
                        None => self.counters.discard(Discard::Malformed),
                    }
                }
            }
            Err(e) => {
                self.counters.discard(Discard::Malformed);
                self.io_log.log(now, || format!("a TSO super-segment tun-rs could not split: {e}"));
            }
        }
    }
}

/// Writes one run (gro.rs) of the accepted segments `run` of `train` to the
/// TUN: the rebuilt headers, the first segment whole, the others' payloads.
async fn write_run(
    tun: &tun_rs::AsyncDevice,
    train: &mut [u8],
    run: &[std::ops::Range<usize>],
    src: Ipv4Addr,
    core: &mut Core,
    headers: &mut [u8; gro::RUN_HEADER_LEN],
) -> io::Result<()> {
    let bad = || io::Error::other("a run that does not fit its buffer");
    let (Some(first), Some(last)) = (run.first(), run.last()) else { return Ok(()) };
    let thl = train.get(first.clone()).and_then(crate::wire::tcp_header_len).ok_or_else(bad)?;
    let (head, tail) = train.split_at_mut(first.end.min(last.end));
    let first_seg = head.get_mut(first.clone()).ok_or_else(bad)?;
    let mut rest: [&[u8]; MAX_RUN] = [&[]; MAX_RUN];
    for (slot, r) in rest.iter_mut().zip(run.iter().skip(1)) {
        let shifted = r.start.checked_sub(first.end).ok_or_else(bad)?..r.end.checked_sub(first.end).ok_or_else(bad)?;
        *slot = tail.get(shifted).ok_or_else(bad)?;
    }
    let rest = rest.get(..run.len() - 1).ok_or_else(bad)?;
    let id = core.next_ip_id();
    gro::prepare_run(headers, first_seg, rest, src, core.tun_addr(), id).ok_or_else(bad)?;
    let mut iov = [IoSlice::new(&[]); MAX_RUN + 1];
    let mut n = 0;
    for (slot, part) in iov.iter_mut().zip(
        [headers.as_slice(), &*first_seg]
            .into_iter()
            .chain(rest.iter().map(|s| s.get(thl..).unwrap_or(&[]))),
    ) {
        *slot = IoSlice::new(part);
        n += 1;
    }
    tun.send_vectored(iov.get(..n).unwrap_or(&[])).await.map(|_| ())
}

/// Waits on an optional channel: never ready when there is none.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

type AuthDone = (Ipv4Addr, Instant, Result<auth::Lease, auth::AuthError>);

/// Authentication as the daemon's loop sees it.
///
/// Server: the TLS listener runs in its own task and asks the loop, through
/// `requests`, to admit each client that proved its credential; the loop
/// creates the entry (and the XDP map entry) before the client hears yes.
/// Client: authentications run in their own tasks, one per server at a time,
/// and report to the loop through `done`; packets wait in [`AuthQueue`].
struct Auth {
    requests: Option<mpsc::Receiver<auth::AuthRequest>>,
    done: Option<mpsc::Receiver<AuthDone>>,
    done_tx: Option<mpsc::Sender<AuthDone>>,
    server: Option<(auth::AuthServerHandle, tokio::task::JoinHandle<()>)>,
    client: Option<Arc<auth::AuthClient>>,
    /// Server: which client id each entry belongs to (revocation).
    owners: HashMap<SocketAddrV4, String>,
    queue: AuthQueue,
    last_reload_check: Option<Instant>,
}

impl Auth {
    fn start(mode: auth::AuthMode, args: &RunArgs, counters: &Arc<Counters>) -> Result<Auth> {
        let mut a = Auth {
            requests: None,
            done: None,
            done_tx: None,
            server: None,
            client: None,
            owners: HashMap::new(),
            queue: AuthQueue::default(),
            last_reload_check: None,
        };
        match mode {
            auth::AuthMode::Insecure => {
                log::warn!(
                    "authentication is off (--insecure-no-auth): any host that can reach UDP port {} {}",
                    args.listen_port,
                    if args.is_client() { "can inject segments" } else { "gets an entry" }
                );
            }
            auth::AuthMode::Server(cfg) => {
                let srv = auth::AuthServer::bind(args.listen_port, &args.bind_to_interface, cfg, counters.clone())
                    .map_err(|e| anyhow!("{e}"))?;
                let handle = srv.handle();
                let (tx, rx) = mpsc::channel(64);
                let task = tokio::spawn(srv.run(tx));
                log::info!("authentication on TCP port {} ({})", args.listen_port, args.bind_to_interface);
                a.requests = Some(rx);
                a.server = Some((handle, task));
            }
            auth::AuthMode::Client(cfg) => {
                let port = args.endpoint_port.unwrap_or(args.listen_port);
                let client = auth::AuthClient::new(cfg, args.listen_port, &args.bind_to_interface, port)
                    .map_err(|e| anyhow!("{e}"))?;
                let (tx, rx) = mpsc::channel(64);
                a.client = Some(Arc::new(client));
                a.done = Some(rx);
                a.done_tx = Some(tx);
            }
        }
        Ok(a)
    }

    /// Server: a client proved its credential; create or refresh its entry.
    fn admit(&mut self, req: auth::AuthRequest, core: &mut Core, gate: &mut Gate, counters: &Counters, lease: Duration) {
        let answer = match core.admit(req.peer, Instant::now(), gate) {
            Ok(addr) => {
                log::info!("client {} authenticated from {} -> {addr}", req.client_id, req.peer);
                self.owners.insert(req.peer, req.client_id);
                Ok(auth::Granted { addr, lease })
            }
            Err(_) => {
                counters.discard(Discard::PoolFull);
                Err(auth::Refused::PoolFull)
            }
        };
        // The client may have gone (deadline): nothing to do then.
        let _ = req.reply.send(answer);
    }

    /// Client: packets for servers without a lease.
    fn enqueue(&mut self, pkts: &mut Vec<(Ipv4Addr, Vec<u8>)>, counters: &Counters) {
        let now = Instant::now();
        for (server, pkt) in pkts.drain(..) {
            match self.queue.enqueue(server, &pkt, now) {
                Enqueued::StartAuth => self.spawn(server),
                Enqueued::Waiting => {}
                Enqueued::Dropped => counters.discard(Discard::AuthQueue),
            }
        }
    }

    fn spawn(&self, server: Ipv4Addr) {
        let (Some(client), Some(tx)) = (self.client.clone(), self.done_tx.clone()) else { return };
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client.authenticate(server).await;
            let _ = tx.send((server, started, r)).await;
        });
    }

    /// Client: an authentication ended; the packets to send now.
    fn finished(&mut self, done: AuthDone, core: &mut Core, gate: &mut Gate, counters: &Counters) -> VecDeque<Vec<u8>> {
        let (server, started, result) = done;
        match result {
            Ok(lease) => {
                // The server's entry lives `duration` from when it answered,
                // which is after `started`: counting from `started` ends our
                // lease a little before the server's.
                match core.grant_lease(server, lease.duration, started, gate) {
                    Ok(()) => {
                        log::info!("authenticated with {server}: lease {:?}, our address there {}", lease.duration, lease.addr);
                        self.queue.succeeded(server)
                    }
                    Err(_) => {
                        log::warn!("authenticated with {server} but the XDP map is full (raise --xdp-map-size)");
                        let n = self.queue.failed(server, Instant::now());
                        counters.discard_n(Discard::AuthQueue, n as u64);
                        VecDeque::new()
                    }
                }
            }
            Err(e) => {
                counters.discard(Discard::AuthFailure);
                let n = self.queue.failed(server, Instant::now());
                counters.discard_n(Discard::AuthQueue, n as u64);
                log::warn!("authentication with {server} failed ({n} waiting packets dropped): {e}");
                VecDeque::new()
            }
        }
    }

    /// Timers: client renewals; server reload of a changed client list.
    fn tick(&mut self, now: Instant, core: &mut Core, gate: &mut Gate) {
        if self.client.is_some() {
            for server in core.leases_to_renew(now) {
                if self.queue.start_renewal(server, now) {
                    log::debug!("renewing the lease with {server}");
                    self.spawn(server);
                }
            }
            self.queue.prune(now);
        }
        if self.server.is_some() && self.last_reload_check.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            self.last_reload_check = Some(now);
            if let Some((h, _)) = &self.server {
                match h.reload_if_changed() {
                    Ok(Some(n)) => {
                        log::info!("client list changed: {n} clients");
                        self.drop_revoked(core, gate);
                    }
                    Ok(None) => {}
                    Err(e) => log::error!("client list unreadable, keeping the old one: {e}"),
                }
            }
        }
    }

    /// SIGHUP: re-read the client list now.
    fn reload(&mut self, core: &mut Core, gate: &mut Gate) {
        let Some((h, _)) = &self.server else {
            log::info!("SIGHUP: nothing to reload in this mode");
            return;
        };
        match h.reload() {
            Ok(n) => {
                log::info!("SIGHUP: client list reloaded, {n} clients");
                self.drop_revoked(core, gate);
            }
            Err(e) => log::error!("SIGHUP: client list unreadable, keeping the old one: {e}"),
        }
    }

    /// Removes at once the entries of clients no longer in the list.
    fn drop_revoked(&mut self, core: &mut Core, gate: &mut Gate) {
        let Some((h, _)) = &self.server else { return };
        let revoked: Vec<_> = self
            .owners
            .iter()
            .filter(|(_, id)| !h.is_known_client(id))
            .map(|(p, id)| (*p, id.clone()))
            .collect();
        for (peer, id) in revoked {
            self.owners.remove(&peer);
            if let Some(e) = core.remove_peer(peer, gate) {
                log::info!("client {id} revoked: entry {peer} -> {} removed", e.addr);
            }
        }
    }

    fn forget(&mut self, peer: SocketAddrV4) {
        self.owners.remove(&peer);
    }

    fn stats(&self) -> Option<Arc<auth::AuthStats>> {
        match (&self.server, &self.client) {
            (Some((h, _)), _) => Some(h.stats()),
            (_, Some(c)) => Some(c.stats()),
            _ => None,
        }
    }

    fn stop(&mut self) {
        if let Some((_, task)) = &self.server {
            task.abort();
        }
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

#[allow(clippy::too_many_arguments)]
fn status_text(
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
        let mut entries: Vec<_> = store.entries().collect();
        entries.sort_by_key(|e| e.addr);
        for e in entries {
            let idle = now.saturating_duration_since(e.refreshed);
            let left = store.timeout().saturating_sub(idle);
            let _ = write!(
                t,
                "peer {} {} idle_ms {} expires_in_ms {}",
                e.peer,
                e.addr,
                idle.as_millis(),
                left.as_millis()
            );
            let _ = match auth.owners.get(&e.peer) {
                Some(id) => writeln!(t, " client {id}"),
                None => writeln!(t),
            };
        }
    }
    let leases: HashMap<_, _> = core.leases().into_iter().collect();
    for (server, until) in leases {
        let _ = writeln!(t, "lease {server} expires_in_ms {}", until.saturating_duration_since(now).as_millis());
    }
    t
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A super-segment for a server without a lease is queued as the whole
    /// packets the kernel would have sent, each with a valid checksum.
    #[test]
    fn a_super_segment_waiting_for_auth_is_queued_as_whole_packets() {
        let (src, dst) = (Ipv4Addr::new(198, 19, 0, 2), Ipv4Addr::new(192, 0, 2, 1));
        let gso = 1000usize;
        let mut pkt = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
        pkt.extend_from_slice(&src.octets());
        pkt.extend_from_slice(&dst.octets());
        pkt.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        pkt.extend((0..2 * gso + 10).map(|i| i as u8));
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        let c = crate::wire::checksum(&pkt[..20]);
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
        // the kernel's partial checksum: the pseudo-header sum (length 0 for TSO)
        let pseudo = crate::wire::fold(crate::wire::sum_words(&pkt[12..20], 6));
        pkt[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let mut vnet = [0u8; tso::VNET_HDR_LEN];
        vnet[0] = 1; // NEEDS_CSUM
        vnet[1] = 1; // GSO_TCPV4
        vnet[2..4].copy_from_slice(&40u16.to_ne_bytes());
        vnet[4..6].copy_from_slice(&(gso as u16).to_ne_bytes());
        vnet[6..8].copy_from_slice(&20u16.to_ne_bytes());
        vnet[8..10].copy_from_slice(&16u16.to_ne_bytes());

        let counters = Counters::default();
        let (mut log, mut queue) = (RateLimitedLog::default(), Vec::new());
        let mut out = Out { counters: &counters, io_log: &mut log, need_auth: &mut queue };
        let (mut tx, mut sizes) = (Vec::new(), vec![0; 8]);
        out.queue_split(&vnet, &mut pkt, &mut tx, &mut sizes, Instant::now());
        assert_eq!(queue.len(), 3);
        for (i, (server, p)) in queue.iter().enumerate() {
            assert_eq!(*server, dst);
            let t = crate::wire::parse_ipv4_tcp(p).unwrap();
            assert_eq!(p.len(), 40 + if i < 2 { gso } else { 10 });
            let mut seg = p[20..].to_vec();
            let c = u16::from_be_bytes([seg[16], seg[17]]);
            seg[16..18].copy_from_slice(&[0, 0]);
            assert_eq!(c, crate::wire::tcp_checksum(t.src, t.dst, &seg), "packet {i}");
        }

        // a header tun-rs refuses: counted, nothing queued
        queue.clear();
        vnet[4..6].copy_from_slice(&0u16.to_ne_bytes());
        let mut out = Out { counters: &counters, io_log: &mut log, need_auth: &mut queue };
        out.queue_split(&vnet, &mut pkt, &mut tx, &mut sizes, Instant::now());
        assert!(queue.is_empty());
        assert_eq!(counters.discards(Discard::Malformed), 1);
    }
}
