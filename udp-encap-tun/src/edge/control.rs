//! The status socket: `udp-encap-tun status --interface tun0` asks a running
//! daemon for its counters and entries.
//!
//! It is an abstract Unix socket named `udp-encap-tun/<TUN>`. Abstract names
//! belong to the network namespace, so two daemons serving `tun0` in two
//! namespaces never meet, and nothing is left on disk after a kill -9. Only
//! root or the daemon's own user may read it (checked with SO_PEERCRED).
//!
//! Abstract names have no permissions: any local user may bind one first.
//! Such a squatter does not stop the daemon. At start the daemon asks who
//! holds the name (the listener's SO_PEERCRED, or procfs for a socket that
//! does not listen): root or its own user is taken to be another daemon,
//! and it refuses to start as before; anyone else is a squatter. Then it
//! logs an error naming the squatter's uid and pid, runs without a status
//! socket, and claims the name as soon as it is free (checked every
//! [`RECLAIM`]). `status` in turn checks who answers and does not print
//! what a squatter says.
//!
//! The answer is plain text, one fact per line, `counter NAME VALUE` and
//! `peer ADDR:PORT GENERATED ...` among them (README, "Reading the counters").

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::holder::Holder;

/// A status request from a client of the socket; the daemon's loop answers
/// it with the text to send back.
pub type StatusRequest = oneshot::Sender<String>;

/// How often a daemon whose name is squatted tries to claim it.
pub const RECLAIM: Duration = Duration::from_secs(2);
/// Status connections served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;
/// What the daemon answers a user who is neither root nor its own user.
const NOT_ALLOWED: &str = "error: only root or the daemon's user may read its status\n";

fn socket_name(interface: &str) -> String {
    format!("udp-encap-tun/{interface}")
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The daemon's end of the status socket: bound, or waiting to claim a name
/// a squatter holds.
pub struct StatusSocket {
    interface: String,
    listener: Option<UnixListener>,
}

/// Binds the status socket for `interface`. Fails if another daemon (a
/// process of root or of this user) holds the name; a squatter's name is
/// claimed later (see the module comment).
pub fn bind(interface: &str) -> anyhow::Result<StatusSocket> {
    let name = socket_name(interface);
    match try_bind(&name) {
        Ok(l) => Ok(StatusSocket { interface: interface.to_string(), listener: Some(l) }),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let holder = who_holds(&name);
            match &holder {
                Some(h) if h.uid.is_some_and(|u| u == 0 || u == euid()) => Err(anyhow::anyhow!(
                    "another udp-encap-tun already serves {interface} in this network namespace \
                     ({h} holds its status socket @{name}): stop it first \
                     (`udp-encap-tun status --interface {interface}` shows it)"
                )),
                _ => {
                    let who = holder.map_or_else(|| "a process that cannot be found".to_string(), |h| h.to_string());
                    log::error!(
                        "the status socket @{name} is held by {who}, not by root or this daemon's user: \
                         a local user is squatting its name. Running without a status socket until it is \
                         free (checked every {RECLAIM:?}); end that process to get `status` back"
                    );
                    Ok(StatusSocket { interface: interface.to_string(), listener: None })
                }
            }
        }
        Err(e) => Err(anyhow::anyhow!("cannot open the status socket for {interface}: {e}")),
    }
}

fn try_bind(name: &str) -> io::Result<UnixListener> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixListener::bind_addr(&addr)
}

/// Who holds the abstract `name`: the listener's credentials if it accepts
/// a connection, else whatever procfs shows.
fn who_holds(name: &str) -> Option<Holder> {
    if let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes())
        && let Ok(s) = UnixStream::connect_addr(&addr)
        && let Some((pid, uid)) = peer_cred(&s)
    {
        let mut h = Holder::of_pid(pid);
        h.uid = Some(uid);
        return Some(h);
    }
    super::holder::abstract_unix(name).into_iter().next()
}

/// SO_PEERCRED: the pid and uid of the process at the other end (for a
/// connected client, the listener's as of its listen()).
fn peer_cred(s: &UnixStream) -> Option<(i32, u32)> {
    let c = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some((c.pid(), c.uid()))
}

/// Accepts status connections and forwards each to the daemon's loop.
/// Without a listener (a squatted name), claims the name first.
pub async fn serve(sock: StatusSocket, requests: mpsc::Sender<StatusRequest>) {
    let name = socket_name(&sock.interface);
    let listener = match sock.listener {
        Some(l) => l,
        None => loop {
            tokio::time::sleep(RECLAIM).await;
            if let Ok(l) = try_bind(&name) {
                log::warn!("status socket @{name} is free again and now served by this daemon");
                break l;
            }
        },
    };
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("status socket disabled: {e}");
        return;
    }
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("status socket disabled: {e}");
            return;
        }
    };
    let me = euid();
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        // A bound on connections served at once: a local user cannot make
        // the daemon hold descriptors without limit.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: the connection stays in the backlog
                // and the listener stays readable; retrying at once would
                // spin. Back off, as the authentication listener does.
                crate::bounded_log!(
                    log::Level::Warn,
                    1,
                    Instant::now(),
                    "accepting a status connection failed: {e}; retrying in 100 ms"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = stream.peer_cred().map(|c| c.uid() == 0 || c.uid() == me).unwrap_or(false);
        let requests = requests.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _slot = slot;
            let text = if allowed {
                let (tx, rx) = oneshot::channel();
                if requests.send(tx).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(t) => t,
                    Err(_) => return,
                }
            } else {
                NOT_ALLOWED.to_string()
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(text.as_bytes())).await;
        });
    }
}

/// How long `status` waits for the daemon's answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Client side: reads the status of the daemon serving `interface`. Refuses
/// to print what a process that is not the daemon answers (a squatter), and
/// turns the daemon's refusal into an error (a non-zero exit).
pub fn query(interface: &str) -> anyhow::Result<String> {
    let name = socket_name(interface);
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow::anyhow!(
            "no udp-encap-tun serves {interface} in this network namespace ({e}); \
             is it running, and are you in its namespace (`ip netns exec NS ...`)?"
        )
    })?;
    if let Some((pid, uid)) = peer_cred(&s)
        && !trusted(pid, uid)
    {
        let mut h = Holder::of_pid(pid);
        h.uid = Some(uid);
        anyhow::bail!(
            "the status socket @{name} is held by {h}, which is neither root, nor you, nor a \
             udp-encap-tun process: a local user may be squatting its name (the daemon logs it and \
             claims the name once that process is gone); not showing what it says"
        );
    }
    // The daemon answers from its data-path loop; a loaded or emulated host
    // can take seconds, so the bound is generous and its expiry is named.
    s.set_read_timeout(Some(QUERY_TIMEOUT))?;
    s.flush()?;
    let mut out = String::new();
    if let Err(e) = s.read_to_string(&mut out) {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            anyhow::bail!(
                "the daemon serving {interface} did not answer within {}s: it is stopped or \
                 overloaded (check its log, and `top` for its CPU use)",
                QUERY_TIMEOUT.as_secs()
            );
        }
        return Err(anyhow::anyhow!("reading the status of {interface}: {e}"));
    }
    if let Some(why) = out.strip_prefix("error: ") {
        anyhow::bail!("the daemon serving {interface} refused: {}", why.trim_end());
    }
    Ok(out)
}

/// A listener `status` believes: root's, the caller's own, or a process of
/// this very program (a daemon running as a user of its own).
fn trusted(pid: i32, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 || uid == euid() {
        return true;
    }
    let same = |a: std::fs::Metadata, b: std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    match (std::fs::metadata(format!("/proc/{pid}/exe")), std::fs::metadata("/proc/self/exe")) {
        (Ok(a), Ok(b)) => same(a, b),
        _ => false,
    }
}
