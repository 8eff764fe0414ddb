//! End-to-end tests: real files in a scratch directory, real rustls
//! handshakes over loopback TCP, a fake daemon on the requests channel, a
//! hand-moved clock for the rate limit. No timing assertions: waits poll a
//! condition with a generous bound.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::credentials::{self, add_client, format_pin, make_server_files, revoke_client};
use super::*;
use crate::counters::{Counters, Discard};

const LEASE: Duration = Duration::from_secs(300);
const GIVEN: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

/// A scratch directory, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "uet-auth-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        TestDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct ManualClock(Mutex<Instant>);

impl ManualClock {
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().expect("clock");
        *t += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().expect("clock")
    }
}

/// How the fake daemon answers.
#[derive(Clone, Copy)]
enum Daemon {
    Grant,
    PoolFull,
}

/// What the fake daemon saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    peer: SocketAddrV4,
    id: String,
    session: crate::core::session::SessionId,
    keys: crate::core::session::KeyBytes,
    resume: Option<crate::core::session::SessionId>,
}

struct TestServer {
    addr: SocketAddrV4,
    handle: AuthServerHandle,
    task: JoinHandle<()>,
    seen: Arc<Mutex<Vec<Seen>>>,
    counters: Arc<Counters>,
    clock: Arc<ManualClock>,
}

impl TestServer {
    fn stat(&self, f: impl Fn(&AuthStats) -> &AtomicU64) -> u64 {
        f(&self.handle.stats()).load(Ordering::Relaxed)
    }
    fn failures(&self) -> u64 {
        self.counters.discards(Discard::AuthFailure)
    }
    fn seen(&self) -> Vec<(SocketAddrV4, String)> {
        self.seen.lock().expect("seen").iter().map(|s| (s.peer, s.id.clone())).collect()
    }
    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn server_cfg(dir: &Path) -> ServerAuthConfig {
    ServerAuthConfig::new(
        dir.join(credentials::SERVER_CERT),
        dir.join(credentials::SERVER_KEY),
        dir.join(credentials::CLIENTS),
        Duration::from_secs(30),
    )
}

fn start_server(cfg: ServerAuthConfig, port: u16, daemon: Daemon) -> TestServer {
    let counters = Arc::new(Counters::default());
    let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
    let srv = AuthServer::bind_with(
        std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        None,
        cfg,
        counters.clone(),
        clock.clone(),
    )
    .expect("auth server binds");
    let std::net::SocketAddr::V4(addr) = srv.local_addr().expect("local addr") else {
        panic!("IPv4 listener")
    };
    let handle = srv.handle();
    let (tx, mut rx) = mpsc::channel::<AuthRequest>(16);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let std::net::SocketAddr::V4(peer) = req.peer else { panic!("an IPv4 client") };
            seen2.lock().expect("seen").push(Seen {
                peer,
                id: req.client_id.clone(),
                session: req.session,
                keys: req.keys.clone(),
                resume: req.resume,
            });
            let _ = req.reply.send(match daemon {
                Daemon::Grant => Ok(Granted {
                    addr: GIVEN,
                    lease: LEASE,
                    bound: false,
                }),
                Daemon::PoolFull => Err(Refused::PoolFull),
            });
        }
    });
    let task = tokio::spawn(srv.run(tx));
    TestServer {
        addr,
        handle,
        task,
        seen,
        counters,
        clock,
    }
}

/// A port that was free a moment ago (the client's `--listen-port`).
fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn client_from(cred: &Path, src: Ipv4Addr, server: &TestServer) -> AuthClient {
    let cfg = ClientAuthConfig::load(cred, None, None, Duration::from_secs(30))
        .expect("credential loads");
    AuthClient::with_local(
        cfg,
        SocketAddrV4::new(src, free_port(src)),
        None,
        server.addr.port(),
    )
    .expect("client config")
}

/// The server directory with alice in it; returns alice's credential path.
fn setup(dir: &TestDir) -> PathBuf {
    make_server_files(dir.path(), &["127.0.0.1".into()], false).expect("server files");
    add_client(dir.path(), "alice", None).expect("alice added")
}

/// Waits (bounded) until `cond` holds: the server finishes its bookkeeping
/// after the client has its answer.
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn raw_connect(src: Ipv4Addr, server: SocketAddrV4) -> TcpStream {
    try_connect(src, server).await.expect("connect")
}

/// A connection the server may refuse at once: its RST can beat connect()'s
/// own completion check, which then reports ECONNRESET.
async fn try_connect(src: Ipv4Addr, server: SocketAddrV4) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddrV4::new(src, 0).into())?;
    s.connect(server.into()).await
}

/// Reads until the server closes (EOF or reset), bounded.
async fn read_until_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the server should close the connection");
}

#[tokio::test]
async fn good_credential_is_granted() {
    let dir = TestDir::new("good");
    let cred = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);
    let client = client_from(&cred, Ipv4Addr::LOCALHOST, &srv);
    let lease = client
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("granted");
    assert_eq!((lease.duration, lease.addr, lease.bound), (LEASE, GIVEN, false));
    // Both sides hold the same session keys without sending them: the
    // server's from its TLS exporter, the client's from its own.
    let req = srv.requests().first().cloned().expect("one request");
    assert_eq!(lease.session, req.session);
    assert_eq!(lease.keys, req.keys);
    assert_ne!(lease.keys.client_to_server, lease.keys.server_to_client);
    assert_eq!(req.resume, None);
    // A second authentication naming the first session gets new keys.
    let again = client
        .authenticate_at(std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, srv.addr.port())), Some(lease.session))
        .await
        .expect("granted again");
    let req2 = srv.requests().get(1).cloned().expect("a second request");
    assert_eq!(req2.resume, Some(lease.session));
    assert_ne!(again.session, lease.session);
    assert_eq!(again.keys, req2.keys);
    assert_ne!(again.keys, lease.keys);
    let seen: Vec<_> = srv.seen().into_iter().take(1).collect();
    assert_eq!(seen.len(), 1);
    let (peer, id) = seen.first().cloned().expect("one request");
    assert_eq!(id, "alice");
    assert_eq!(*peer.ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(
        peer.port(),
        client.local_addr().port(),
        "the client connects from its listen port"
    );
    wait_for("granted counted", || srv.stat(|s| &s.granted) == 2).await;
    assert_eq!(srv.failures(), 0);
    assert_eq!(client.stats().granted.load(Ordering::Relaxed), 2);
    srv.stop().await;
}

#[tokio::test]
async fn wrong_secret_and_unknown_id_are_refused() {
    let dir = TestDir::new("wrong");
    let cred_path = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);
    let good = ClientCredential::load(&cred_path).expect("loads");

    let mut wrong = good.clone();
    wrong.secret[0] ^= 1;
    let p = dir.path().join("wrong.credential");
    credentials::write_file(&p, wrong.to_text().as_bytes(), 0o600, false).expect("write");
    let err = client_from(&p, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await;
    assert!(
        matches!(
            err,
            Err(AuthError::Refused {
                reason: Refused::BadCredential,
                ..
            })
        ),
        "{err:?}"
    );

    let mallory = ClientCredential {
        id: "mallory".into(),
        secret: credentials::random_secret().expect("random"),
        server_pin: good.server_pin,
    };
    let p = dir.path().join("mallory.credential");
    credentials::write_file(&p, mallory.to_text().as_bytes(), 0o600, false).expect("write");
    let err = client_from(&p, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await;
    let msg = format!("{}", err.as_ref().expect_err("refused"));
    assert!(msg.contains("unknown client id or wrong secret"), "{msg}");

    assert_eq!(srv.stat(|s| &s.bad_credential), 2);
    assert_eq!(srv.failures(), 2);
    assert!(
        srv.seen().is_empty(),
        "the daemon never hears of bad credentials"
    );
    srv.stop().await;
}

/// What the daemon's tick does every 100 ms, until `id` is (`known`) or is
/// not in the list.
async fn wait_list(srv: &TestServer, id: &str, known: bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while srv.handle.is_known_client(id) != known {
        srv.handle.reload_if_changed(Instant::now()).expect("list loads");
        assert!(Instant::now() < end, "`{id}` not picked up within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn revoked_client_cannot_renew_and_new_clients_need_no_restart() {
    let dir = TestDir::new("revoke");
    let alice = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);
    let client = client_from(&alice, Ipv4Addr::LOCALHOST, &srv);
    client
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("granted before revocation");

    // Added while the server runs: picked up without a SIGHUP by the
    // periodic check the daemon's tick makes, once the new file has settled.
    let bob = add_client(dir.path(), "bob", None).expect("bob added");
    wait_list(&srv, "bob", true).await;
    client_from(&bob, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("bob granted without a reload");

    assert!(revoke_client(dir.path(), "alice").expect("revoke"));
    assert_eq!(srv.handle.reload().expect("reload"), 1);
    assert!(!srv.handle.is_known_client("alice"));
    assert!(srv.handle.is_known_client("bob"));
    let err = client.authenticate(Ipv4Addr::LOCALHOST).await;
    assert!(
        matches!(
            err,
            Err(AuthError::Refused {
                reason: Refused::BadCredential,
                ..
            })
        ),
        "{err:?}"
    );

    // A broken list keeps the previous one in force.
    std::fs::write(dir.path().join(credentials::CLIENTS), "bob not-a-hash\n").expect("write");
    assert!(srv.handle.reload().is_err());
    client_from(&bob, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("bob still granted with the old list");
    srv.stop().await;
}

#[tokio::test]
async fn client_refuses_a_server_with_another_certificate() {
    let dir = TestDir::new("pin");
    let cred_path = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);
    let mut cred = ClientCredential::load(&cred_path).expect("loads");
    cred.server_pin = Some([0xab; 32]);
    let p = dir.path().join("wrongpin.credential");
    credentials::write_file(&p, cred.to_text().as_bytes(), 0o600, false).expect("write");
    let err = client_from(&p, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect_err("the pin does not match");
    let msg = format!("{err}");
    assert!(matches!(err, AuthError::PinMismatch { .. }), "{err:?}");
    assert!(
        msg.contains(&format_pin(&[0xab; 32])),
        "names the expected pin: {msg}"
    );
    // The secret never left the client: the server saw a TLS failure only.
    wait_for("server counts the TLS error", || {
        srv.stat(|s| &s.tls_error) == 1
    })
    .await;
    assert_eq!(srv.stat(|s| &s.bad_credential), 0);
    assert_eq!(srv.failures(), 1);
    assert!(srv.seen().is_empty());
    srv.stop().await;
}

#[tokio::test]
async fn garbage_is_counted_and_the_server_keeps_serving() {
    let dir = TestDir::new("garbage");
    let cred = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);

    let mut s = raw_connect(Ipv4Addr::LOCALHOST, srv.addr).await;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    read_until_closed(&mut s).await;

    // A TLS record header announcing a record far beyond the limit.
    let mut s = raw_connect(Ipv4Addr::LOCALHOST, srv.addr).await;
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
        .await
        .expect("write");
    read_until_closed(&mut s).await;

    // Connect and leave: a port scanner.
    drop(raw_connect(Ipv4Addr::LOCALHOST, srv.addr).await);

    wait_for("garbage counted", || srv.stat(|s| &s.garbage) == 2).await;
    wait_for("early close counted", || srv.stat(|s| &s.closed_early) == 1).await;
    assert_eq!(srv.failures(), 3);
    client_from(&cred, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("a good client still gets through");
    srv.stop().await;
}

/// A TLS 1.3 client that checks the server's pin like ours but offers
/// `alpn` (none when empty), then sends a valid hello.
async fn hello_with_alpn(
    dir: &TestDir,
    cred: &Path,
    srv: &TestServer,
    alpn: &[&[u8]],
) -> Result<protocol::Reply, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pin = credentials::pin_of_cert_file(&dir.path().join(credentials::SERVER_CERT)).expect("pin");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier::PinnedServerCert::new(pin, &provider)))
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = raw_connect(Ipv4Addr::LOCALHOST, srv.addr).await;
    let name = rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let c = ClientCredential::load(cred).expect("credential");
    let hello = protocol::Hello { id: c.id, secret: c.secret, resume: None }.encode().expect("hello");
    s.write_all(&hello).await.map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    protocol::Reply::read(&mut s).await.map_err(|e| format!("reply: {e}"))
}

/// The server requires the ALPN it documents: a TLS client that offers
/// none (or another) fails at the handshake, before any hello, counted as
/// a TLS error; the daemon never hears of it. One that offers it among
/// others gets through.
#[tokio::test]
async fn a_client_without_our_alpn_fails_at_the_handshake() {
    use protocol::Reply;
    let dir = TestDir::new("alpn");
    let cred = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);

    let r = hello_with_alpn(&dir, &cred, &srv, &[]).await;
    let err = r.expect_err("a client without ALPN was answered");
    assert!(err.starts_with("handshake:"), "it failed after the handshake: {err}");
    assert!(err.contains("NoApplicationProtocol"), "{err}");
    wait_for("the refusal counted", || srv.stat(|s| &s.tls_error) == 1).await;

    let err = hello_with_alpn(&dir, &cred, &srv, &[b"h2", b"http/1.1"]).await.expect_err("answered");
    assert!(err.starts_with("handshake:") && err.contains("NoApplicationProtocol"), "{err}");
    wait_for("the refusal counted", || srv.stat(|s| &s.tls_error) == 2).await;
    assert_eq!(srv.failures(), 2);
    assert!(srv.seen().is_empty(), "the daemon heard of a client without ALPN");
    assert_eq!(srv.stat(|s| &s.granted), 0);

    let r = hello_with_alpn(&dir, &cred, &srv, &[b"h2", protocol::ALPN]).await;
    assert!(matches!(r, Ok(Reply::Granted { .. })), "{r:?}");
    srv.stop().await;
}

#[tokio::test]
async fn silent_connection_is_closed_at_the_deadline() {
    let dir = TestDir::new("silent");
    setup(&dir);
    let mut cfg = server_cfg(dir.path());
    cfg.timeout = Duration::from_millis(200);
    let srv = start_server(cfg, 0, Daemon::Grant);
    let mut s = raw_connect(Ipv4Addr::LOCALHOST, srv.addr).await;
    read_until_closed(&mut s).await;
    wait_for("timeout counted", || srv.stat(|s| &s.timeout) == 1).await;
    assert_eq!(srv.failures(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn concurrent_connections_are_bounded_per_source_and_in_total() {
    let dir = TestDir::new("bound");
    let cred = setup(&dir);
    let mut cfg = server_cfg(dir.path());
    cfg.max_connections = 3;
    cfg.max_per_source = 2;
    let srv = start_server(cfg, 0, Daemon::Grant);

    // One address opens 4 silent connections: 2 are held, 2 refused.
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut silent = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = try_connect(attacker, srv.addr).await {
            silent.push(s);
        }
    }
    wait_for("per-source refusals", || {
        srv.stat(|s| &s.too_many_connections) == 2
    })
    .await;
    client_from(&cred, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("a good client gets through while one address hogs its share");

    // Fill the total from other addresses: the next one is refused at once.
    silent.push(raw_connect(Ipv4Addr::new(127, 0, 0, 3), srv.addr).await);
    if let Ok(mut over) = try_connect(Ipv4Addr::new(127, 0, 0, 4), srv.addr).await {
        read_until_closed(&mut over).await;
    }
    wait_for("total bound refusal", || {
        srv.stat(|s| &s.too_many_connections) == 3
    })
    .await;
    let err = client_from(&cred, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await;
    assert!(
        matches!(err, Err(AuthError::ClosedByServer { .. })),
        "{err:?}"
    );

    // The slots come back when the silent connections go.
    drop(silent);
    wait_for("silent connections gone", || {
        srv.stat(|s| &s.closed_early) == 3
    })
    .await;
    client_from(&cred, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("granted once slots are free");
    srv.stop().await;
}

#[tokio::test]
async fn failed_attempts_are_rate_limited_per_source() {
    let dir = TestDir::new("ratelimit");
    let cred_path = setup(&dir);
    let mut cfg = server_cfg(dir.path());
    cfg.rate_limit = RateLimitConfig {
        burst: 2,
        refill: Duration::from_secs(60),
        max_sources: 16,
    };
    let srv = start_server(cfg, 0, Daemon::Grant);
    let mut wrong = ClientCredential::load(&cred_path).expect("loads");
    wrong.secret[31] ^= 0x80;
    let wrong_path = dir.path().join("wrong.credential");
    credentials::write_file(&wrong_path, wrong.to_text().as_bytes(), 0o600, false).expect("write");

    let guesser = Ipv4Addr::new(127, 0, 0, 5);
    for _ in 0..2 {
        let err = client_from(&wrong_path, guesser, &srv)
            .authenticate(Ipv4Addr::LOCALHOST)
            .await;
        assert!(matches!(err, Err(AuthError::Refused { .. })), "{err:?}");
    }
    // Burst used up: even the right credential is refused from that address.
    let good_from_guesser = client_from(&cred_path, guesser, &srv);
    let err = good_from_guesser.authenticate(Ipv4Addr::LOCALHOST).await;
    assert!(
        matches!(err, Err(AuthError::ClosedByServer { .. })),
        "{err:?}"
    );
    assert_eq!(srv.stat(|s| &s.rate_limited), 1);
    assert_eq!(srv.failures(), 3);
    // Other addresses are not affected.
    client_from(&cred_path, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("another address is granted");
    // One refill period later the address may try again.
    srv.clock.advance(Duration::from_secs(60));
    good_from_guesser
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("granted after the refill");
    srv.stop().await;
}

/// Sockets in TIME_WAIT (state 06 in /proc/net/tcp) with `port` at either end.
fn time_wait_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state)) = (f.get(1), f.get(2), f.get(3)) else {
                return false;
            };
            *state == "06" && (port_of(local) == Some(port) || port_of(remote) == Some(port))
        })
        .count()
}

#[tokio::test]
async fn reauthentication_from_the_same_port_and_after_a_server_restart() {
    let dir = TestDir::new("reauth");
    let cred = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);
    let port = srv.addr.port();
    let client = client_from(&cred, Ipv4Addr::LOCALHOST, &srv);
    for i in 0..3 {
        client
            .authenticate(Ipv4Addr::LOCALHOST)
            .await
            .unwrap_or_else(|e| panic!("attempt {i} from the same 4-tuple: {e}"));
    }
    let peers: Vec<_> = srv.seen().into_iter().map(|(p, _)| p).collect();
    assert_eq!(peers.len(), 3);
    assert!(peers.iter().all(|p| p.port() == client.local_addr().port()));
    assert_eq!(
        time_wait_on(client.local_addr().port()),
        0,
        "no TIME_WAIT on the client's 4-tuple, on either side"
    );

    srv.stop().await;
    let srv = start_server(server_cfg(dir.path()), port, Daemon::Grant);
    client
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("granted by the restarted server on the same port");
    srv.stop().await;
}

#[tokio::test]
async fn daemon_refusal_reaches_the_client() {
    let dir = TestDir::new("poolfull");
    let cred = setup(&dir);
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::PoolFull);
    let err = client_from(&cred, Ipv4Addr::LOCALHOST, &srv)
        .authenticate(Ipv4Addr::LOCALHOST)
        .await;
    assert!(
        matches!(
            err,
            Err(AuthError::Refused {
                reason: Refused::PoolFull,
                ..
            })
        ),
        "{err:?}"
    );
    wait_for("refusal counted", || srv.stat(|s| &s.refused) == 1).await;
    assert_eq!(
        srv.failures(),
        0,
        "not an authentication failure: the daemon counts pool_full"
    );
    srv.stop().await;
}

#[tokio::test]
async fn client_can_trust_a_ca_instead_of_a_pin() {
    let dir = TestDir::new("ca");
    let cred_path = setup(&dir);
    // A CA and a server certificate it signs, replacing the self-signed one.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = rcgen::KeyPair::generate().expect("key");
    let srv_params =
        rcgen::CertificateParams::new(vec!["auth.example".to_string()]).expect("params");
    let srv_cert = srv_params
        .signed_by(&srv_key, &issuer)
        .expect("server cert");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write");
    std::fs::write(dir.path().join(credentials::SERVER_CERT), srv_cert.pem()).expect("write");
    std::fs::write(
        dir.path().join(credentials::SERVER_KEY),
        srv_key.serialize_pem(),
    )
    .expect("write");
    let srv = start_server(server_cfg(dir.path()), 0, Daemon::Grant);

    let connect = |name: &str| {
        let cfg = ClientAuthConfig::load(
            &cred_path,
            Some(&ca_file),
            Some(name.into()),
            Duration::from_secs(30),
        )
        .expect("loads");
        AuthClient::with_local(
            cfg,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, free_port(Ipv4Addr::LOCALHOST)),
            None,
            srv.addr.port(),
        )
        .expect("client")
    };
    connect("auth.example")
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("CA-verified");
    let err = connect("other.example")
        .authenticate(Ipv4Addr::LOCALHOST)
        .await;
    assert!(matches!(err, Err(AuthError::Tls { .. })), "{err:?}");
    srv.stop().await;
}

#[test]
fn file_formats_round_trip() {
    let p = Path::new("test");
    let cred = ClientCredential {
        id: "alice.laptop-2".into(),
        secret: [0x5a; 32],
        server_pin: Some([0x01; 32]),
    };
    let text = cred.to_text();
    assert!(text.contains(&format!("secret = {}", "5a".repeat(32))));
    assert!(text.contains(&format!("server-pin = sha256:{}", "01".repeat(32))));
    assert_eq!(ClientCredential::parse(&text, p).expect("parses"), cred);
    assert!(
        !format!("{cred:?}").contains("5a5a"),
        "Debug hides the secret"
    );
    let no_pin = ClientCredential {
        server_pin: None,
        ..cred.clone()
    };
    assert_eq!(
        ClientCredential::parse(&no_pin.to_text(), p).expect("parses"),
        no_pin
    );

    for (bad, why) in [
        ("id = a\n", "no secret"),
        ("secret = 00\nid = a\n", "short secret"),
        ("id = a\nid = b\n", "twice"),
        ("colour = blue\n", "unknown key"),
        ("id a\n", "no ="),
    ] {
        assert!(ClientCredential::parse(bad, p).is_err(), "{why}");
    }

    let hash = format!("sha256:{}", "AB".repeat(32));
    let list_text = format!("# comment\n\nalice {hash}  # her laptop\n  bob\t{hash}\n");
    let list = ClientList::parse(&list_text, p).expect("parses");
    assert_eq!(list.len(), 2);
    assert!(list.contains("alice") && list.contains("bob"));

    let secret = [9u8; 32];
    let line = ClientList::line("carol", &secret);
    let list = ClientList::parse(&line, p).expect("parses");
    assert_eq!(list.check("carol", &secret), credentials::Verdict::Valid);
    assert_eq!(
        list.check("carol", &[8; 32]),
        credentials::Verdict::WrongSecret
    );
    assert_eq!(list.check("dave", &secret), credentials::Verdict::UnknownId);

    for (bad, line_no) in [
        (format!("alice {hash}\nalice {hash}\n"), 2),
        ("alice\n".to_string(), 1),
        (format!("ok {hash}\nbad/id {hash}\n"), 2),
        ("x sha256:zz\n".to_string(), 1),
        (format!("x {hash} extra\n"), 1),
    ] {
        match ClientList::parse(&bad, p) {
            Err(AuthError::Parse { line, .. }) => assert_eq!(line, line_no, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(
        credentials::parse_pin(&format_pin(&[0xc3; 32])),
        Some([0xc3; 32])
    );
    assert_eq!(credentials::unhex32(&"g".repeat(64)), None);
}

#[tokio::test]
async fn credentials_subcommand_makes_working_files_with_private_modes() {
    let dir = TestDir::new("subcommand");
    let d = dir.path().join("etc");
    let run = |args: &[&str]| {
        let mut argv = vec!["udp-encap-tun", "credentials"];
        argv.extend_from_slice(args);
        match crate::cli::Cli::try_parse_from(argv)
            .expect("parses")
            .command
        {
            Some(crate::cli::Command::Credentials(a)) => run_credentials_command(&a),
            other => panic!("{other:?}"),
        }
    };
    let ds = d.to_str().expect("utf-8 path");
    run(&["server", "--dir", ds, "--san", "127.0.0.1"]).expect("server files");
    assert!(
        run(&["server", "--dir", ds]).is_err(),
        "refuses to replace the certificate"
    );
    run(&["client", "--dir", ds, "--name", "carol"]).expect("client added");
    assert!(
        run(&["client", "--dir", ds, "--name", "carol"]).is_err(),
        "no duplicates"
    );
    assert!(
        run(&["client", "--dir", ds, "--name", "bad/name"]).is_err(),
        "invalid name"
    );

    let mode = |f: &str| {
        std::fs::metadata(d.join(f))
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(credentials::SERVER_KEY), 0o600);
    assert_eq!(mode(credentials::CLIENTS), 0o600);
    assert_eq!(mode("carol.credential"), 0o600);
    assert_eq!(mode(credentials::SERVER_CERT), 0o644);
    assert_eq!(mode("."), 0o700);
    let list = std::fs::read_to_string(d.join(credentials::CLIENTS)).expect("list");
    let cred = ClientCredential::load(&d.join("carol.credential")).expect("credential");
    assert!(
        !list.contains(&credentials::hex(&cred.secret)),
        "only a hash on the server"
    );
    assert_eq!(
        cred.server_pin,
        Some(credentials::pin_of_cert_file(&d.join(credentials::SERVER_CERT)).expect("pin"))
    );

    let srv = start_server(server_cfg(&d), 0, Daemon::Grant);
    let client = client_from(&d.join("carol.credential"), Ipv4Addr::LOCALHOST, &srv);
    client
        .authenticate(Ipv4Addr::LOCALHOST)
        .await
        .expect("the server accepts the client it made");
    run(&["revoke", "--dir", ds, "--name", "carol"]).expect("revoked");
    assert!(
        run(&["revoke", "--dir", ds, "--name", "carol"]).is_err(),
        "already gone"
    );
    wait_list(&srv, "carol", false).await;
    let err = client.authenticate(Ipv4Addr::LOCALHOST).await;
    assert!(
        matches!(err, Err(AuthError::Refused { .. })),
        "revoked without a SIGHUP: {err:?}"
    );
    srv.stop().await;
}

#[test]
fn command_line_auth_options_are_checked() {
    let dir = TestDir::new("cli");
    let cred = setup(&dir);
    let cred_s = cred.to_str().expect("utf-8");
    let base = [
        "udp-encap-tun",
        "--interface",
        "tun0",
        "--listen-port",
        "1",
        "--bind-to-interface",
        "eth0",
    ];
    let mode = |extra: &[&str]| {
        let mut argv = base.to_vec();
        argv.extend_from_slice(extra);
        let cli = crate::cli::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        auth_mode_from_args(&cli.run.expect("run args")).map_err(|e| e.to_string())
    };
    assert!(matches!(
        mode(&["--insecure-no-auth"]),
        Ok(AuthMode::Insecure)
    ));
    assert!(
        mode(&["--insecure-no-auth", "--credential", cred_s]).is_err(),
        "conflict"
    );
    let e = mode(&[]).expect_err("server needs files");
    assert!(e.contains("credentials server"), "{e}");
    assert!(matches!(
        mode(&["--cert", "c", "--key", "k", "--clients", "l"]),
        Ok(AuthMode::Server(_))
    ));
    assert!(
        mode(&["--cert", "c"])
            .expect_err("incomplete")
            .contains("--key, --clients")
    );
    assert!(
        mode(&["--credential", cred_s])
            .expect_err("server with client option")
            .contains("client mode")
    );
    let e = mode(&["--endpoint-port", "2"]).expect_err("client needs a credential");
    assert!(e.contains("--credential"), "{e}");
    assert!(matches!(
        mode(&["--endpoint-port", "2", "--credential", cred_s]),
        Ok(AuthMode::Client(_))
    ));
    assert!(
        mode(&[
            "--endpoint-port",
            "2",
            "--credential",
            cred_s,
            "--cert",
            "c"
        ])
        .is_err()
    );
    assert!(mode(&["--endpoint-port", "2", "--credential", "/nonexistent/x"]).is_err());
    assert!(
        mode(&[
            "--endpoint-port",
            "2",
            "--credential",
            cred_s,
            "--server-name",
            "x"
        ])
        .is_err(),
        "needs --ca"
    );
}

/// The daemon spawns these on a multi-threaded runtime.
#[allow(dead_code)]
fn futures_are_send(client: &AuthClient, server: AuthServer, tx: mpsc::Sender<AuthRequest>) {
    fn send<T: Send>(_: &T) {}
    send(&client.authenticate(Ipv4Addr::LOCALHOST));
    send(&server.run(tx));
    send(client);
}
