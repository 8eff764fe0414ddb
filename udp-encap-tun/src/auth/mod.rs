//! Authentication (SPEC "Version 2", decisions 1-3).
//!
//! The server listens on TCP `--listen-port` (bound to the uplink); a client
//! connects *from* its own `--listen-port` (its UDP source port too). A
//! successful authentication ends in a *session* (SPEC decision 11): an id
//! the server picks and two keys both sides take from the TLS exporter. The
//! session's UDP path is learned afterwards from the client's datagrams
//! ([`crate::core::session`]), not from the TCP connection, so NATs that map
//! TCP and UDP apart work.
//!
//! - [`protocol`]: the bytes exchanged inside TLS (one hello, one reply).
//! - [`credentials`]: the files (client list, client credential, server
//!   certificate) and the `credentials` subcommand that makes them.
//! - [`verifier`]: the client's check of the server: a pinned certificate.
//! - [`ratelimit`]: per-source limit on failed attempts (clock injected).
//! - [`listwatch`]: when a changed client list is read (only once settled).
//! - [`server`] / [`client`]: the TLS 1.3 edge, on tokio.
//!
//! The server never touches the store itself: for each valid credential it
//! sends an [`AuthRequest`] to the daemon, which creates or refreshes the
//! entry and answers [`Granted`] or [`Refused`]; the answer goes back to the
//! client and the connection is closed.

pub mod client;
pub mod credentials;
pub mod listwatch;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod verifier;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use client::{AuthClient, ClientAuthConfig, ServerTrust};
pub use credentials::{
    ClientCredential, ClientList, CredentialsAction, CredentialsArgs, run_credentials_command,
};
pub use ratelimit::RateLimitConfig;
pub use server::{AuthServer, AuthServerHandle, ServerAuthConfig};

use crate::cli::RunArgs;
use crate::core::session::{KeyBytes, SessionId};

/// Server side: the auth task asks the daemon to create or refresh the entry
/// of `peer`; the daemon answers on `reply`. A dropped `reply` sender is taken
/// as [`Refused::Unavailable`].
#[derive(Debug)]
pub struct AuthRequest {
    /// The TCP peer (the seed of the generated address; not the UDP path).
    pub peer: SocketAddr,
    /// The id from the client's credential (for logs, and so the daemon can
    /// drop the entries of a client that a reload revoked).
    pub client_id: String,
    /// The new session: its id and the keys the TLS exporter gave for it.
    pub session: SessionId,
    pub keys: KeyBytes,
    /// The session the client held before, if it names one.
    pub resume: Option<SessionId>,
    pub reply: tokio::sync::oneshot::Sender<Result<Granted, Refused>>,
}

/// The daemon accepted the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The generated address of the peer's entry.
    pub addr: Ipv4Addr,
    /// How long the entry lives from now without a new authentication or
    /// proof of the session (`--entry-timeout`).
    pub lease: Duration,
    /// The session already has its UDP path (the client's earlier session,
    /// taken over).
    pub bound: bool,
}

/// Why the server said no. The codes on the wire are in [`protocol`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Unknown client id or wrong secret (the client cannot tell which, on
    /// purpose: ids are not secret, but there is no need to confirm them).
    BadCredential,
    /// The address pool (or the XDP map) is full (SPEC decision 4).
    PoolFull,
    /// The daemon could not answer (shutting down, overloaded).
    Unavailable,
    /// The client holds `--max-entries-per-client` sessions already.
    ClientLimit,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::BadCredential => {
                "unknown client id or wrong secret: the credential was revoked or never added; \
                 make a new one on the server with `udp-encap-tun credentials client`"
            }
            Refused::PoolFull => {
                "the server's address pool is full; try again later or ask its operator to enlarge --pool"
            }
            Refused::Unavailable => "the server could not answer right now; it will be tried again",
            Refused::ClientLimit => {
                "this credential holds as many sessions as the server allows (--max-entries-per-client); \
                 stop another instance using it, or wait for its sessions to lapse"
            }
        })
    }
}

/// What the client got: the entry lives `duration` after the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub duration: Duration,
    /// The address the server gave us (for logs).
    pub addr: Ipv4Addr,
    pub session: SessionId,
    pub keys: KeyBytes,
    /// The server kept our earlier session's UDP path.
    pub bound: bool,
}

/// Where "now" comes from: the real clock in the daemon, a hand-moved one in
/// tests (rate limits).
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    fn now(&self) -> Instant;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Authentication outcomes, finer than `Discard::AuthFailure` (which is also
/// bumped for every failure). Read by `status`.
#[derive(Debug, Default)]
pub struct AuthStats {
    pub granted: AtomicU64,
    pub bad_credential: AtomicU64,
    pub tls_error: AtomicU64,
    pub timeout: AtomicU64,
    pub rate_limited: AtomicU64,
    pub too_many_connections: AtomicU64,
    pub garbage: AtomicU64,
    /// The peer closed the connection before finishing (port scanners).
    pub closed_early: AtomicU64,
    /// The daemon refused a valid credential (pool full, unavailable). Not an
    /// authentication failure: the daemon counts `pool_full` itself.
    pub refused: AtomicU64,
    /// Client side: the TCP connection to the server failed.
    pub connect_error: AtomicU64,
}

impl AuthStats {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `name value` pairs in a fixed order, the way `status` prints them.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("auth_granted", g(&self.granted)),
            ("auth_bad_credential", g(&self.bad_credential)),
            ("auth_tls_error", g(&self.tls_error)),
            ("auth_timeout", g(&self.timeout)),
            ("auth_rate_limited", g(&self.rate_limited)),
            ("auth_too_many_connections", g(&self.too_many_connections)),
            ("auth_garbage", g(&self.garbage)),
            ("auth_closed_early", g(&self.closed_early)),
            ("auth_refused", g(&self.refused)),
            ("auth_connect_error", g(&self.connect_error)),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {what} `{path}`: {source}; check the path and its permissions")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} `{path}` line {line}: {msg}")]
    Parse {
        what: &'static str,
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{what} `{path}`: {msg}")]
    BadFile {
        what: &'static str,
        path: PathBuf,
        msg: String,
    },
    /// Options that do not fit together; the message says which to give.
    #[error("{0}")]
    Config(String),
    #[error("`{path}` already exists; {hint}")]
    Exists { path: PathBuf, hint: &'static str },
    #[error("cannot {what}: {source}{hint}")]
    Socket {
        what: String,
        #[source]
        source: std::io::Error,
        /// Empty, or `; ` and what to do about it.
        hint: String,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("making the certificate failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "cannot connect to {server} for authentication: {source} (is the server running and reachable through the uplink?)"
    )]
    Connect {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{server} closed the authentication connection before answering: it refuses this address \
         for a while after failed attempts, or has too many connections; see the server's log"
    )]
    ClosedByServer { server: SocketAddr },
    #[error(
        "{server} is not the server the credential names: its certificate is {got}, the \
         credential pins {expected}; check the server address, or the server's certificate was \
         remade (put its new pin in the credential), or someone is in between"
    )]
    PinMismatch {
        server: SocketAddr,
        expected: String,
        got: String,
    },
    #[error("TLS with {server} failed: {source}")]
    Tls {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{server} did not finish authentication within {after:?}")]
    Timeout {
        server: SocketAddr,
        after: Duration,
    },
    #[error("{server} refused authentication: {reason}")]
    Refused {
        server: SocketAddr,
        reason: Refused,
    },
    #[error("{server} sent an invalid answer: {source}")]
    Protocol {
        server: SocketAddr,
        #[source]
        source: protocol::ProtoError,
    },
}

/// Authentication as the command line asks for it.
#[derive(Debug)]
pub enum AuthMode {
    /// `--insecure-no-auth`: version-1 behaviour.
    Insecure,
    Server(ServerAuthConfig),
    Client(ClientAuthConfig),
}

fn missing(opts: &[(&'static str, bool)]) -> Vec<&'static str> {
    opts.iter()
        .filter(|(_, present)| !present)
        .map(|(n, _)| *n)
        .collect()
}

fn present(opts: &[(&'static str, bool)]) -> Vec<&'static str> {
    opts.iter()
        .filter(|(_, present)| *present)
        .map(|(n, _)| *n)
        .collect()
}

/// Checks the authentication options against the mode and loads what can be
/// loaded now (the client's credential), so mistakes surface at start-up.
/// The server's certificate and key are loaded by [`AuthServer::bind`].
pub fn auth_mode_from_args(run: &RunArgs) -> Result<AuthMode, AuthError> {
    let server_opts = [
        ("--cert", run.cert.is_some()),
        ("--key", run.key.is_some()),
        ("--clients", run.clients.is_some()),
    ];
    let client_opts = [
        ("--credential", run.credential.is_some()),
        ("--ca", run.ca.is_some()),
        ("--server-name", run.server_name.is_some()),
    ];
    if run.insecure_no_auth {
        let given: Vec<_> = present(&server_opts)
            .into_iter()
            .chain(present(&client_opts))
            .collect();
        if !given.is_empty() {
            return Err(AuthError::Config(format!(
                "--insecure-no-auth turns authentication off, but {} was given too; drop one or the other",
                given.join(", ")
            )));
        }
        return Ok(AuthMode::Insecure);
    }
    if run.is_client() {
        let wrong = present(&server_opts);
        if !wrong.is_empty() {
            return Err(AuthError::Config(format!(
                "{} belong to server mode, but --endpoint-port makes this a client; a client needs --credential FILE",
                wrong.join(", ")
            )));
        }
        let Some(credential) = &run.credential else {
            return Err(AuthError::Config(
                "client mode needs --credential FILE (made on the server with \
                 `udp-encap-tun credentials client --name NAME`), or --insecure-no-auth \
                 on a closed network where every host is trusted"
                    .into(),
            ));
        };
        let cfg = ClientAuthConfig::load(
            credential,
            run.ca.as_deref(),
            run.server_name.clone(),
            run.auth_timeout,
        )?;
        Ok(AuthMode::Client(cfg))
    } else {
        let wrong = present(&client_opts);
        if !wrong.is_empty() {
            return Err(AuthError::Config(format!(
                "{} belong to client mode, but without --endpoint-port this is a server; \
                 a server needs --cert, --key and --clients",
                wrong.join(", ")
            )));
        }
        let miss = missing(&server_opts);
        match (&run.cert, &run.key, &run.clients) {
            (Some(cert), Some(key), Some(clients)) => Ok(AuthMode::Server(ServerAuthConfig::new(
                cert.clone(),
                key.clone(),
                clients.clone(),
                run.auth_timeout,
            ))),
            _ => Err(AuthError::Config(format!(
                "server mode needs --cert, --key and --clients (missing: {}); make them with \
                 `udp-encap-tun credentials server --dir DIR`, or run with --insecure-no-auth \
                 on a closed network where every host is trusted",
                miss.join(", ")
            ))),
        }
    }
}

/// Warns when a file holding a secret can be read by others.
fn warn_if_readable_by_others(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode();
        if mode & 0o077 != 0 {
            log::warn!(
                "{what} `{}` is readable by group or others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests;
