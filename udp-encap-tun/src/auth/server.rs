//! The server's authentication listener: TCP `--listen-port` on the uplink,
//! TLS 1.3, one hello, one reply, close.
//!
//! Defences, in the order a connection meets them:
//! 1. per-source rate limit on *failed* attempts, checked at `accept`, before
//!    any TLS work (a refused source gets a RST);
//! 2. a bound on connections per source and in total (slowloris: one address
//!    cannot take all the slots);
//! 3. one deadline for the TLS handshake plus the hello;
//! 4. bounded reads (the hello is at most 98 bytes).
//!
//! Every failure bumps its [`AuthStats`] reason and `Discard::AuthFailure`,
//! and takes a token from the source's rate-limit bucket.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::Level;

use rustls::ServerConfig;
use rustls::server::Acceptor;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use super::credentials::{ClientList, Verdict, load_certs, load_key};
use super::listwatch::{FileStamp, ListWatch};
use super::protocol::{ALPN, Hello, ProtoError, Reply};
use super::ratelimit::{RateLimitConfig, RateLimiter};
use super::{AuthError, AuthRequest, AuthStats, Clock, Granted, Refused, SystemClock};
use crate::core::session::wire::{EXPORTER_LABEL, EXPORTER_LEN};
use crate::core::session::{KeyBytes, SessionId};
use crate::bounded_log;
use crate::counters::{Counters, Discard};

#[derive(Debug, Clone)]
pub struct ServerAuthConfig {
    /// PEM certificate chain (end-entity first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The client list (see [`super::credentials`]).
    pub clients: PathBuf,
    /// A connection must finish the TLS handshake and send its hello within
    /// this, or it is closed (`--auth-timeout`).
    pub timeout: Duration,
    /// Authentication connections open at once, in total.
    pub max_connections: usize,
    /// ... and from one source address.
    pub max_per_source: usize,
    pub rate_limit: RateLimitConfig,
}

impl ServerAuthConfig {
    pub fn new(
        cert: PathBuf,
        key: PathBuf,
        clients: PathBuf,
        timeout: Duration,
    ) -> ServerAuthConfig {
        ServerAuthConfig {
            cert,
            key,
            clients,
            timeout,
            max_connections: 64,
            max_per_source: 8,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

#[derive(Debug)]
struct ClientsState {
    list: Arc<ClientList>,
    /// Bumped by every install, whoever reloaded: the daemon compares it to
    /// decide whether to look for revoked clients (a reload whose result
    /// only one caller saw once hid a revocation from the daemon).
    generation: u64,
    /// Which version on disk to read, and when (listwatch.rs).
    watch: ListWatch,
}

struct Shared {
    acceptor: TlsAcceptor,
    clients_path: PathBuf,
    clients: Mutex<ClientsState>,
    limiter: Mutex<RateLimiter>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    permits: Arc<Semaphore>,
    stats: Arc<AuthStats>,
    counters: Arc<Counters>,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    max_per_source: usize,
}

/// A poisoned lock only means another task panicked while holding it; the
/// data (counters, buckets) is still usable, and refusing to serve would be
/// worse.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bound listener. [`AuthServer::run`] consumes it; take a
/// [`AuthServer::handle`] first to reload and read stats while it runs.
pub struct AuthServer {
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
}

/// Reload the client list and read the stats of a running [`AuthServer`].
#[derive(Clone)]
pub struct AuthServerHandle {
    shared: Arc<Shared>,
}

fn socket_err(what: String, hint: &str) -> impl FnOnce(io::Error) -> AuthError + '_ {
    move |source| AuthError::Socket {
        what,
        source,
        hint: if hint.is_empty() {
            String::new()
        } else {
            format!("; {hint}")
        },
    }
}

impl AuthServer {
    /// Listens on `[::]:listen_port` (IPv4 and IPv6 clients alike; IPv4
    /// alone where the host has no IPv6), bound to `uplink`
    /// (SO_BINDTODEVICE). Synchronous so a port in use, a missing interface,
    /// an unreadable certificate or client list stop the daemon at start-up.
    pub fn bind(
        listen_port: u16,
        uplink: &str,
        cfg: ServerAuthConfig,
        counters: Arc<Counters>,
    ) -> Result<AuthServer, AuthError> {
        Self::bind_with(
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, listen_port)),
            Some(uplink),
            cfg,
            counters,
            Arc::new(SystemClock),
        )
    }

    /// [`AuthServer::bind`] with the address, the device binding (`None`:
    /// none, for tests on loopback) and the clock chosen by the caller.
    pub fn bind_with(
        addr: SocketAddr,
        uplink: Option<&str>,
        cfg: ServerAuthConfig,
        counters: Arc<Counters>,
        clock: Arc<dyn Clock>,
    ) -> Result<AuthServer, AuthError> {
        let acceptor = TlsAcceptor::from(Arc::new(tls_config(&cfg)?));
        let list = ClientList::load(&cfg.clients)?;
        let watch = ListWatch::new(&cfg.clients, FileStamp::of(&cfg.clients).ok());
        if list.is_empty() {
            log::warn!(
                "client list `{}` has no clients yet: add one with `udp-encap-tun credentials client --name NAME`",
                cfg.clients.display()
            );
        } else {
            log::info!(
                "client list `{}`: {} clients",
                cfg.clients.display(),
                list.len()
            );
        }
        let listener = listen(addr, uplink)?;
        let shared = Arc::new(Shared {
            acceptor,
            clients_path: cfg.clients.clone(),
            clients: Mutex::new(ClientsState {
                list: Arc::new(list),
                generation: 0,
                watch,
            }),
            limiter: Mutex::new(RateLimiter::new(cfg.rate_limit)),
            per_source: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            stats: Arc::new(AuthStats::default()),
            counters,
            clock,
            timeout: cfg.timeout,
            max_per_source: cfg.max_per_source.max(1),
        });
        Ok(AuthServer { listener, shared })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn handle(&self) -> AuthServerHandle {
        AuthServerHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn stats(&self) -> Arc<AuthStats> {
        self.shared.stats.clone()
    }

    pub fn reload(&self) -> Result<usize, AuthError> {
        self.handle().reload()
    }

    /// The accept loop: one task per connection. Never returns on its own
    /// (abort the task to stop it; the listening socket closes with it).
    pub async fn run(self, requests: mpsc::Sender<AuthRequest>) {
        let listener = match TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!(
                    "authentication listener cannot join the runtime: {e}; no client can authenticate"
                );
                return std::future::pending().await;
            }
        };
        let shared = self.shared;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                    bounded_log!(Level::Warn, 1, Instant::now(), "accepting an authentication connection failed: {e}; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // An IPv4 client of the dual-stack socket arrives IPv4-mapped.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            if !lock(&shared.limiter).allowed(peer.ip(), shared.clock.now()) {
                bounded_log!(
                    Level::Debug,
                    5,
                    Instant::now(),
                    "authentication from {peer} refused: rate limited after failed attempts"
                );
                refuse_now(&shared, &stream, &shared.stats.rate_limited);
                continue;
            }
            let Some(slot) = SourceSlot::acquire(&shared, peer.ip()) else {
                bounded_log!(
                    Level::Debug,
                    5,
                    Instant::now(),
                    "authentication from {peer} refused: too many connections from that address"
                );
                refuse_now(&shared, &stream, &shared.stats.too_many_connections);
                continue;
            };
            let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
                bounded_log!(
                    Level::Debug,
                    5,
                    Instant::now(),
                    "authentication from {peer} refused: too many authentication connections"
                );
                refuse_now(&shared, &stream, &shared.stats.too_many_connections);
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(
                shared.clone(),
                stream,
                peer,
                requests.clone(),
                permit,
                slot,
            ));
        }
    }
}

impl AuthServerHandle {
    pub fn stats(&self) -> Arc<AuthStats> {
        self.shared.stats.clone()
    }

    /// Re-reads the client list (SIGHUP). On error the old list stays in
    /// force. Returns the number of clients.
    pub fn reload(&self) -> Result<usize, AuthError> {
        self.shared.reload()
    }

    /// Re-reads the client list if a changed version has settled
    /// (listwatch.rs); `Ok(None)` if there is none or it lists the same
    /// clients. The daemon calls it every tick; nothing else reloads.
    pub fn reload_if_changed(&self, now: std::time::Instant) -> Result<Option<usize>, AuthError> {
        self.shared.reload_if_changed(now)
    }

    /// Changes with every list installed (tick, SIGHUP, or a test's
    /// reload): when it moved, look for entries of clients that are gone.
    pub fn generation(&self) -> u64 {
        lock(&self.shared.clients).generation
    }

    /// Is `id` in the current client list? After a reload, the daemon can drop
    /// the entries of clients that are no longer known.
    pub fn is_known_client(&self, id: &str) -> bool {
        lock(&self.shared.clients).list.contains(id)
    }

    /// The client list in force now (one lock for many lookups).
    pub fn clients(&self) -> Arc<ClientList> {
        lock(&self.shared.clients).list.clone()
    }
}

fn tls_config(cfg: &ServerAuthConfig) -> Result<ServerConfig, AuthError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| AuthError::BadFile {
            what: "certificate and key",
            path: cfg.key.clone(),
            msg: format!("{e} (does the key belong to `{}`?)", cfg.cert.display()),
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // One exchange per connection: no resumption tickets, no session cache.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(tls)
}

fn listen(addr: SocketAddr, uplink: Option<&str>) -> Result<std::net::TcpListener, AuthError> {
    let port = addr.port();
    // `[::]` serves both families; a host without IPv6 gets `0.0.0.0`.
    let (sock, addr) = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
            (Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)), v4)
        }
        other => (other, addr),
    };
    let sock = sock.map_err(socket_err("create the authentication socket".into(), ""))?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).map_err(socket_err("accept IPv4 on the IPv6 authentication socket".into(), ""))?;
    }
    // Restart while connections of the previous run sit in TIME_WAIT.
    sock.set_reuse_address(true).map_err(socket_err(
        "set SO_REUSEADDR on the authentication socket".into(),
        "",
    ))?;
    if let Some(dev) = uplink {
        sock.bind_device(Some(dev.as_bytes())).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) => "run as root or with CAP_NET_RAW",
                Some(libc::ENODEV) => "no such interface: check --bind-to-interface (`ip link`)",
                _ => "",
            };
            socket_err(
                format!("bind the authentication socket to interface `{dev}`"),
                hint,
            )(e)
        })?;
    }
    sock.bind(&addr.into()).map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                "another program (another udp-encap-tun?) listens on it: `ss -ltnp`"
            }
            Some(libc::EACCES) => "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            _ => "",
        };
        socket_err(
            format!("listen for authentication on TCP port {port}"),
            hint,
        )(e)
    })?;
    sock.listen(128).map_err(socket_err(
        format!("listen for authentication on TCP port {port}"),
        "",
    ))?;
    sock.set_nonblocking(true).map_err(socket_err(
        "make the authentication socket non-blocking".into(),
        "",
    ))?;
    Ok(sock.into())
}

/// Closes a connection before any TLS work, with a RST (SO_LINGER 0) so
/// refused connections leave no TIME_WAIT behind on the server.
fn refuse_now(shared: &Shared, stream: &TcpStream, stat: &std::sync::atomic::AtomicU64) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
    AuthStats::bump(stat);
    shared.counters.discard(Discard::AuthFailure);
}

/// One of `max_per_source` slots of a source address, released on drop.
struct SourceSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl SourceSlot {
    fn acquire(shared: &Arc<Shared>, ip: IpAddr) -> Option<SourceSlot> {
        let mut m = lock(&shared.per_source);
        let n = m.entry(ip).or_insert(0);
        if *n >= shared.max_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.shared.per_source);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Why an attempt failed (each has its own counter).
#[derive(Debug)]
enum Failure {
    BadCredential { id: String, unknown: bool },
    Tls(String),
    Garbage(String),
    Timeout,
    ClosedEarly,
}

impl Shared {
    fn fail(&self, peer: SocketAddr, f: Failure) {
        let s = &self.stats;
        let now = Instant::now();
        match &f {
            // Each reason has its own bound (a few lines a second), so a
            // flood of garbage from many addresses cannot hide a real
            // client's wrong secret.
            Failure::BadCredential { id, unknown: true } => {
                AuthStats::bump(&s.bad_credential);
                bounded_log!(
                    Level::Info,
                    5,
                    now,
                    "authentication from {peer} failed: unknown client id `{id}` (revoked, or never added)"
                );
            }
            Failure::BadCredential { id, unknown: false } => {
                AuthStats::bump(&s.bad_credential);
                bounded_log!(Level::Info, 5, now, "authentication from {peer} failed: wrong secret for client `{id}`");
            }
            Failure::Tls(e) => {
                AuthStats::bump(&s.tls_error);
                bounded_log!(Level::Info, 5, now, "authentication from {peer} failed: TLS error: {e}");
            }
            Failure::Garbage(e) => {
                AuthStats::bump(&s.garbage);
                bounded_log!(Level::Info, 5, now, "authentication from {peer} failed: not our protocol: {e}");
            }
            Failure::Timeout => {
                AuthStats::bump(&s.timeout);
                bounded_log!(
                    Level::Info,
                    5,
                    now,
                    "authentication from {peer} failed: not finished within {:?}",
                    self.timeout
                );
            }
            Failure::ClosedEarly => {
                AuthStats::bump(&s.closed_early);
                bounded_log!(Level::Debug, 5, now, "authentication from {peer}: closed by the peer before finishing");
            }
        }
        self.counters.discard(Discard::AuthFailure);
        lock(&self.limiter).failure(peer.ip(), self.clock.now());
    }

    /// SIGHUP: read the list now, settled or not (the operator says it is
    /// ready).
    fn reload(&self) -> Result<usize, AuthError> {
        lock(&self.clients).watch.read_now();
        let list = ClientList::load(&self.clients_path)?;
        Ok(self.install(list))
    }

    /// Reads the list if a new version has settled (listwatch.rs); `Ok(None)`
    /// if there is none or it holds the same clients. A version that fails
    /// to load is reported once and the previous list stays in force.
    fn reload_if_changed(&self, now: std::time::Instant) -> Result<Option<usize>, AuthError> {
        let Some(due) = lock(&self.clients).watch.poll(now) else {
            return Ok(None);
        };
        lock(&self.clients).watch.was_read(due);
        if due.stalled_writer {
            log::warn!(
                "client list `{}` has been open for writing without a change for {:?}: reading it as it stands",
                self.clients_path.display(),
                super::listwatch::WRITER_STALL
            );
        }
        let list = ClientList::load(&self.clients_path)?;
        if *lock(&self.clients).list == list {
            return Ok(None);
        }
        Ok(Some(self.install(list)))
    }

    fn install(&self, list: ClientList) -> usize {
        let n = list.len();
        let mut st = lock(&self.clients);
        let mut removed: Vec<&str> = st.list.ids().filter(|id| !list.contains(id)).collect();
        removed.sort_unstable();
        let added = list.ids().filter(|id| !st.list.contains(id)).count();
        log::info!(
            "client list `{}` reloaded: {n} clients, {added} added, {} removed{}{}",
            self.clients_path.display(),
            removed.len(),
            if removed.is_empty() { "" } else { ": " },
            removed.join(", ")
        );
        st.list = Arc::new(list);
        st.generation = st.generation.wrapping_add(1);
        n
    }

    /// Checks a credential against the list in force. It does not reload:
    /// only the daemon's tick does (every 100 ms), so every reload is seen
    /// by the code that drops revoked clients' entries.
    fn check(&self, hello: &Hello) -> Verdict {
        let list = lock(&self.clients).list.clone();
        list.check(&hello.id, &hello.secret)
    }
}

/// A plaintext TLS alert record (RFC 8446 6, 6.2): fatal
/// `no_application_protocol` (120), what RFC 7301 3.2 has a server send
/// when it cannot agree on a protocol.
const NO_APPLICATION_PROTOCOL_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 120];

fn offers_alpn(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut offered| offered.any(|p| p == ALPN))
}

/// Sorts a handshake error into garbage (not TLS at all), the peer going
/// away, or a TLS failure proper (bad alert, wrong version, our certificate
/// refused by the client, ...).
fn classify_handshake(e: &io::Error) -> Failure {
    if let Some(te) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match te {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => {
                Failure::Garbage(te.to_string())
            }
            _ => Failure::Tls(te.to_string()),
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => Failure::ClosedEarly,
        _ => Failure::Tls(e.to_string()),
    }
}

async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    requests: mpsc::Sender<AuthRequest>,
    _permit: OwnedSemaphorePermit,
    _slot: SourceSlot,
) {
    let deadline = shared.timeout;
    // Phase 1, under the deadline: TLS handshake and the hello.
    let phase1 = tokio::time::timeout(deadline, async {
        // The ClientHello first: a client that does not offer our ALPN is
        // not one of ours (a scanner, a stray TLS client, a build that
        // predates it) and is refused before the server says anything.
        // rustls alone would go on without ALPN when none is offered.
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream)
            .await
            .map_err(|e| Err(classify_handshake(&e)))?;
        if !offers_alpn(&start.client_hello()) {
            let mut io = start.io;
            let _ = io.write_all(&NO_APPLICATION_PROTOCOL_ALERT).await;
            return Err(Err(Failure::Tls(format!(
                "the client did not offer ALPN `{}` (not a udp-encap-tun client, or one that predates it)",
                String::from_utf8_lossy(ALPN)
            ))));
        }
        let mut tls = start
            .into_stream(shared.acceptor.config().clone())
            .await
            .map_err(|e| Err(classify_handshake(&e)))?;
        match Hello::read(&mut tls).await {
            Ok(h) => Ok((tls, h)),
            Err(ProtoError::Truncated { .. }) => Err(Err(Failure::ClosedEarly)),
            Err(ProtoError::Io(e)) => Err(Err(Failure::Tls(e))),
            // The peer passed TLS but speaks another version or sends junk:
            // tell it why before closing.
            Err(e @ ProtoError::Version(_)) => Err(Ok((tls, Reply::UnsupportedVersion, e))),
            Err(e) => Err(Ok((tls, Reply::Malformed, e))),
        }
    })
    .await;
    let (mut tls, hello) = match phase1 {
        Err(_) => return shared.fail(peer, Failure::Timeout),
        Ok(Err(Err(f))) => return shared.fail(peer, f),
        Ok(Err(Ok((mut tls, reply, e)))) => {
            shared.fail(peer, Failure::Garbage(e.to_string()));
            let _ = tokio::time::timeout(deadline, send_reply(&mut tls, &reply)).await;
            return;
        }
        Ok(Ok(x)) => x,
    };

    // Phase 2: the credential, then the daemon.
    let reply = match shared.check(&hello) {
        Verdict::Valid => match new_session(&tls) {
            Some((session, keys)) => ask_daemon(&shared, &requests, peer, &hello, session, keys).await,
            None => Reply::Refused(Refused::Unavailable),
        },
        v => {
            shared.fail(
                peer,
                Failure::BadCredential {
                    id: hello.id.clone(),
                    unknown: v == Verdict::UnknownId,
                },
            );
            Reply::Refused(Refused::BadCredential)
        }
    };

    // Phase 3: answer and close (close_notify, then FIN). The client resets
    // the connection once it has the answer, so neither side keeps TIME_WAIT.
    let _ = tokio::time::timeout(deadline, send_reply(&mut tls, &reply)).await;
}

/// A session id (random, never zero) and its keys from the TLS exporter,
/// with the id as context: the client derives the same keys once it reads
/// the id in the reply. `None` only if the system's random source fails.
fn new_session(tls: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<(SessionId, KeyBytes)> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut id = SessionId([0; 8]);
    while id.is_zero() {
        rng.fill(&mut id.0).ok()?;
    }
    let out = tls.get_ref().1.export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, Some(&id.0)).ok()?;
    Some((id, KeyBytes::from_exporter(&out)))
}

async fn ask_daemon(
    shared: &Shared,
    requests: &mpsc::Sender<AuthRequest>,
    peer: SocketAddr,
    hello: &Hello,
    session: SessionId,
    keys: KeyBytes,
) -> Reply {
    let id = hello.id.as_str();
    let (tx, rx) = oneshot::channel();
    let req = AuthRequest {
        peer,
        client_id: id.to_string(),
        session,
        keys,
        resume: hello.resume,
        reply: tx,
    };
    let answer = tokio::time::timeout(shared.timeout, async {
        requests.send(req).await.map_err(|_| Refused::Unavailable)?;
        rx.await.map_err(|_| Refused::Unavailable)?
    })
    .await
    .unwrap_or(Err(Refused::Unavailable));
    match answer {
        Ok(Granted { addr, lease, bound }) => {
            AuthStats::bump(&shared.stats.granted);
            // A client holding a valid credential can reconnect at will.
            bounded_log!(
                Level::Info,
                10,
                Instant::now(),
                "client `{id}` at {peer} authenticated: session {session}, address {addr}, lease {lease:?}{}",
                if bound { ", its earlier session resumed" } else { "" }
            );
            Reply::Granted { lease, addr, session, bound }
        }
        Err(r) => {
            AuthStats::bump(&shared.stats.refused);
            bounded_log!(Level::Warn, 5, Instant::now(), "client `{id}` at {peer} authenticated but refused: {r}");
            Reply::Refused(r)
        }
    }
}

async fn send_reply<S: tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    reply: &Reply,
) -> io::Result<()> {
    tls.write_all(&reply.encode()).await?;
    tls.flush().await?;
    tls.shutdown().await
}
