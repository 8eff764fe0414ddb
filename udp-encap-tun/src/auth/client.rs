//! The client's side: one TLS 1.3 connection per authentication, from local
//! port `--listen-port` (bound to the uplink) to (server, `--endpoint-port`).
//!
//! Why SO_BINDTODEVICE: the client routes the server's address into its TUN;
//! without the device binding the authentication connection itself would go
//! into the tunnel, which needs authentication first.
//!
//! Why SO_LINGER 0 (abortive close) on every authentication socket: every
//! attempt to a server uses the same 4-tuple (our listen port, server,
//! endpoint port). Whoever closes a TCP connection first keeps it in
//! TIME_WAIT for 60 s, and while the client holds that 4-tuple in TIME_WAIT
//! its next connect() to the same server fails (EADDRNOTAVAIL): a renewal
//! soon after an authentication, or a retry after a server restart, would
//! break. With linger 0 the client's close sends a RST and leaves no state
//! at all, whichever side closed first and on every path (success, error,
//! timeout). It loses nothing: the socket is closed only after the server's
//! reply has been read, or after the attempt has failed anyway. The server,
//! which writes its reply and closes first, sees the RST and drops its side
//! too. SO_REUSEADDR lets bind() take the port even while a previous socket
//! of ours on it is still being torn down.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use super::credentials::{ClientCredential, load_certs};
use super::protocol::{ALPN, Hello, ProtoError, Reply};
use super::verifier::{PinMismatch, PinnedServerCert};
use super::{AuthError, AuthStats, Lease, Refused};
use crate::core::session::wire::{EXPORTER_LABEL, EXPORTER_LEN};
use crate::core::session::{KeyBytes, SessionId};

/// How the client checks the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// SHA-256 of the server's certificate (from the credential file).
    Pin([u8; 32]),
    /// A CA certificate file (`--ca`); the server's certificate must carry
    /// `server_name` (`--server-name`), or the server's IP address if `None`.
    Ca {
        file: PathBuf,
        server_name: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ClientAuthConfig {
    pub credential: ClientCredential,
    pub trust: ServerTrust,
    /// One attempt (connect, handshake, answer) must finish within this.
    pub timeout: Duration,
}

impl ClientAuthConfig {
    /// Reads the credential file; `--ca` replaces the pin it holds.
    pub fn load(
        credential: &Path,
        ca: Option<&Path>,
        server_name: Option<String>,
        timeout: Duration,
    ) -> Result<ClientAuthConfig, AuthError> {
        let cred = ClientCredential::load(credential)?;
        let trust = match (ca, cred.server_pin) {
            (Some(file), pin) => {
                if pin.is_some() {
                    log::info!(
                        "--ca given: checking the server against `{}`, not the pin in `{}`",
                        file.display(),
                        credential.display()
                    );
                }
                ServerTrust::Ca {
                    file: file.into(),
                    server_name,
                }
            }
            (None, Some(pin)) => {
                if server_name.is_some() {
                    return Err(AuthError::Config(
                        "--server-name only applies with --ca (a pinned certificate has no name to check)".into(),
                    ));
                }
                ServerTrust::Pin(pin)
            }
            (None, None) => {
                return Err(AuthError::Config(format!(
                    "credential `{}` has no `server-pin = ...` line: add the server's pin \
                     (`udp-encap-tun credentials pin --cert server.crt` on the server) or pass --ca FILE",
                    credential.display()
                )));
            }
        };
        Ok(ClientAuthConfig {
            credential: cred,
            trust,
            timeout,
        })
    }
}

pub struct AuthClient {
    connector: TlsConnector,
    local: SocketAddrV4,
    uplink: Option<String>,
    endpoint_port: u16,
    id: String,
    secret: [u8; super::protocol::SECRET_LEN],
    server_name: Option<ServerName<'static>>,
    timeout: Duration,
    stats: Arc<AuthStats>,
}

impl std::fmt::Debug for AuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthClient")
            .field("local", &self.local)
            .field("uplink", &self.uplink)
            .field("endpoint_port", &self.endpoint_port)
            .finish_non_exhaustive()
    }
}

impl AuthClient {
    /// Authenticates from `0.0.0.0:listen_port`, bound to `uplink`, to the
    /// server's `endpoint_port`.
    pub fn new(
        cfg: ClientAuthConfig,
        listen_port: u16,
        uplink: &str,
        endpoint_port: u16,
    ) -> Result<AuthClient, AuthError> {
        Self::with_local(
            cfg,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, listen_port),
            Some(uplink),
            endpoint_port,
        )
    }

    /// [`AuthClient::new`] with the local address and the device binding
    /// (`None`: none, for tests on loopback) chosen by the caller.
    pub fn with_local(
        cfg: ClientAuthConfig,
        local: SocketAddrV4,
        uplink: Option<&str>,
        endpoint_port: u16,
    ) -> Result<AuthClient, AuthError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let (mut tls, server_name) = match &cfg.trust {
            ServerTrust::Pin(pin) => (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedServerCert::new(
                        *pin, &provider,
                    )))
                    .with_no_client_auth(),
                None,
            ),
            ServerTrust::Ca { file, server_name } => {
                let mut roots = RootCertStore::empty();
                for c in load_certs(file)? {
                    roots.add(c).map_err(|e| AuthError::BadFile {
                        what: "CA certificate",
                        path: file.clone(),
                        msg: format!("not usable as a trust anchor: {e}"),
                    })?;
                }
                let name = server_name
                    .as_ref()
                    .map(|n| {
                        ServerName::try_from(n.clone()).map_err(|_| {
                            AuthError::Config(format!(
                                "--server-name `{n}` is not a DNS name or IP address"
                            ))
                        })
                    })
                    .transpose()?;
                (
                    builder.with_root_certificates(roots).with_no_client_auth(),
                    name,
                )
            }
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = rustls::client::Resumption::disabled();
        // Checked once here, so that a bad id fails at start-up.
        Hello {
            id: cfg.credential.id.clone(),
            secret: cfg.credential.secret,
            resume: None,
        }
        .encode()
        .map_err(|e| AuthError::Config(format!("credential of `{}`: {e}", cfg.credential.id)))?;
        Ok(AuthClient {
            connector: TlsConnector::from(Arc::new(tls)),
            local,
            uplink: uplink.map(str::to_string),
            endpoint_port,
            id: cfg.credential.id.clone(),
            secret: cfg.credential.secret,
            server_name,
            timeout: cfg.timeout,
            stats: Arc::new(AuthStats::default()),
        })
    }

    /// The local address authentication connects from.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Client-side outcomes (granted, refused, errors), for `status`.
    pub fn stats(&self) -> Arc<AuthStats> {
        self.stats.clone()
    }

    /// A socket from our `--listen-port` in the family of `dest`.
    fn socket(&self, dest: SocketAddr) -> Result<TcpSocket, AuthError> {
        let port = self.local.port();
        let local = match dest {
            SocketAddr::V4(_) => SocketAddr::V4(self.local),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        };
        let err = |what: String, hint: &str| {
            let hint = if hint.is_empty() {
                String::new()
            } else {
                format!("; {hint}")
            };
            move |source| AuthError::Socket { what, source, hint }
        };
        let s = match dest {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(err("create the authentication socket".into(), ""))?;
        s.set_reuseaddr(true)
            .map_err(err("set SO_REUSEADDR".into(), ""))?;
        // See the module comment: no TIME_WAIT on the client, ever.
        SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .map_err(err("set SO_LINGER".into(), ""))?;
        if let Some(dev) = &self.uplink {
            s.bind_device(Some(dev.as_bytes())).map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EPERM) => "run as root or with CAP_NET_RAW",
                    Some(libc::ENODEV) => {
                        "no such interface: check --bind-to-interface (`ip link`)"
                    }
                    _ => "",
                };
                err(
                    format!("bind the authentication socket to interface `{dev}`"),
                    hint,
                )(e)
            })?;
        }
        s.bind(local).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => port_in_use_hint(port, false),
                _ => String::new(),
            };
            err(format!("bind the authentication socket to TCP port {port}"), &hint)(e)
        })?;
        Ok(s)
    }

    /// At start: can authentications bind their source port? A local
    /// program listening on TCP `--listen-port` (any user can open one
    /// above 1024) would make every one of them fail; better to say so now,
    /// naming it, than to fail each attempt later.
    pub fn check_source_port(&self) -> Result<(), AuthError> {
        let port = self.local.port();
        if port == 0 {
            return Ok(());
        }
        match self.socket(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.endpoint_port))) {
            Ok(_) => Ok(()),
            Err(AuthError::Socket { source, .. }) if source.raw_os_error() == Some(libc::EADDRINUSE) => {
                Err(AuthError::Socket {
                    what: format!(
                        "use TCP port {port} as the source port of authentication (the client's --listen-port)"
                    ),
                    source,
                    hint: format!("; {}", port_in_use_hint(port, true)),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// One authentication to `server` (the packet's daddr). On success the
    /// server's entry for us lives `Lease::duration` from about now: renew
    /// before it runs out, counting from when this call *started*.
    ///
    /// Keep at most one call per server in flight: two would share the same
    /// 4-tuple and the second would fail to connect.
    pub async fn authenticate(&self, server: Ipv4Addr) -> Result<Lease, AuthError> {
        self.authenticate_at(SocketAddr::from((server, self.endpoint_port)), None).await
    }

    /// One authentication at `dest` (the server's address on the path the
    /// datagrams take: IPv4, or IPv6 with `--endpoint-v6`/`--nat64-prefix`),
    /// naming the session `resume` we held before.
    pub async fn authenticate_at(&self, dest: SocketAddr, resume: Option<SessionId>) -> Result<Lease, AuthError> {
        let result = match tokio::time::timeout(self.timeout, self.exchange(dest, resume)).await {
            Ok(r) => r,
            Err(_) => Err(AuthError::Timeout {
                server: dest,
                after: self.timeout,
            }),
        };
        let s = &self.stats;
        AuthStats::bump(match &result {
            Ok((Reply::Granted { .. }, _)) => &s.granted,
            Ok((Reply::Refused(Refused::BadCredential), _)) => &s.bad_credential,
            Ok((Reply::Refused(_), _)) => &s.refused,
            Ok(_) | Err(AuthError::Protocol { .. }) => &s.garbage,
            Err(AuthError::Timeout { .. }) => &s.timeout,
            // A bind that fails (the source port taken by a local
            // listener) is a connection that could not be made.
            Err(AuthError::Connect { .. } | AuthError::Socket { .. }) => &s.connect_error,
            Err(AuthError::ClosedByServer { .. }) => &s.closed_early,
            Err(_) => &s.tls_error,
        });
        match result? {
            (Reply::Granted { lease, addr, session, bound }, Some(keys)) => Ok(Lease {
                duration: lease,
                addr,
                session,
                keys,
                bound,
            }),
            (Reply::Granted { .. }, None) => Err(AuthError::Config(format!(
                "{dest} granted a session but the TLS exporter gave no keys for it"
            ))),
            (reply, _) => Self::refusal(dest, reply),
        }
    }

    fn refusal(dest: SocketAddr, reply: Reply) -> Result<Lease, AuthError> {
        match reply {
            Reply::Granted { .. } => Err(AuthError::Config(format!("{dest}: a grant without keys"))),
            Reply::Refused(reason) => Err(AuthError::Refused {
                server: dest,
                reason,
            }),
            Reply::UnsupportedVersion => Err(AuthError::Protocol {
                server: dest,
                source: ProtoError::Version(super::protocol::VERSION),
            }),
            Reply::Malformed => Err(AuthError::Config(format!(
                "{dest} says our hello is malformed; the credential's id may be invalid"
            ))),
        }
    }

    /// The exchange, and on a grant the session's keys from the exporter.
    async fn exchange(&self, dest: SocketAddr, resume: Option<SessionId>) -> Result<(Reply, Option<KeyBytes>), AuthError> {
        let stream = self
            .socket(dest)?
            .connect(dest)
            .await
            .map_err(|source| AuthError::Connect {
                server: dest,
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let name = self
            .server_name
            .clone()
            .unwrap_or(ServerName::IpAddress(dest.ip().into()));
        let tls_err = |source: std::io::Error| {
            if let Some(m) = pin_mismatch(&source) {
                return AuthError::PinMismatch {
                    server: dest,
                    expected: m.expected.clone(),
                    got: m.got.clone(),
                };
            }
            match source.kind() {
                // The server refuses rate-limited sources and overflow
                // connections by closing before the handshake.
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    if source.get_ref().is_none_or(|i| !i.is::<rustls::Error>()) =>
                {
                    AuthError::ClosedByServer { server: dest }
                }
                _ => AuthError::Tls {
                    server: dest,
                    source,
                },
            }
        };
        let mut tls = self
            .connector
            .connect(name, stream)
            .await
            .map_err(tls_err)?;
        let hello = Hello { id: self.id.clone(), secret: self.secret, resume }
            .encode()
            .map_err(|e| AuthError::Config(format!("credential of `{}`: {e}", self.id)))?;
        tls.write_all(&hello).await.map_err(tls_err)?;
        tls.flush().await.map_err(tls_err)?;
        let reply = Reply::read(&mut tls).await.map_err(|e| match e {
            ProtoError::Truncated { got: 0, .. } => AuthError::ClosedByServer { server: dest },
            source => AuthError::Protocol {
                server: dest,
                source,
            },
        })?;
        let keys = match &reply {
            Reply::Granted { session, .. } => {
                tls.get_ref()
                    .1
                    .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, Some(&session.0))
                    .ok()
                    .map(|out| KeyBytes::from_exporter(&out))
            }
            _ => None,
        };
        // Dropping `tls` closes the socket: with linger 0, a RST.
        Ok((reply, keys))
    }
}

/// What to tell a user whose authentication source port is taken: who
/// holds it (the pids too when `find_pids`: a procfs scan, done at start,
/// not for every failed attempt) and what to do.
fn port_in_use_hint(port: u16, find_pids: bool) -> String {
    let holders = crate::edge::holder::tcp_port(port, find_pids);
    let who = if holders.is_empty() {
        format!("another socket holds it (`ss -tanp 'sport = :{port}'` shows which)")
    } else {
        let list: Vec<String> = holders.iter().map(ToString::to_string).collect();
        format!("it is held by {}", list.join(", "))
    };
    format!(
        "{who}; a client authenticates from its --listen-port, so every authentication fails \
         while that socket exists: stop that program, or give this client another --listen-port \
         (its UDP port too; the server learns it from the authentication)"
    )
}

/// The pin check's own error, if that is what ended the handshake.
fn pin_mismatch(e: &std::io::Error) -> Option<&PinMismatch> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<PinMismatch>()
        }
        _ => None,
    }
}
