//! The status socket: `udp-encap-tun status --interface tun0` asks a running
//! daemon for its counters and entries.
//!
//! It is an abstract Unix socket named `udp-encap-tun/<TUN>`. Abstract names
//! belong to the network namespace, so two daemons serving `tun0` in two
//! namespaces never meet, and nothing is left on disk after a kill -9. Only
//! root or the daemon's own user may read it (checked with SO_PEERCRED).
//!
//! The answer is plain text, one fact per line, `counter NAME VALUE` and
//! `peer ADDR:PORT GENERATED ...` among them (README, "Reading the counters").

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// A status request from a client of the socket; the daemon's loop answers
/// it with the text to send back.
pub type StatusRequest = oneshot::Sender<String>;

fn socket_name(interface: &str) -> String {
    format!("udp-encap-tun/{interface}")
}

/// Binds the status socket for `interface`.
pub fn bind(interface: &str) -> anyhow::Result<UnixListener> {
    let addr = SocketAddr::from_abstract_name(socket_name(interface).as_bytes())?;
    UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "another udp-encap-tun already serves {interface} in this network namespace: \
                 stop it first (`udp-encap-tun status --interface {interface}` shows it)"
            )
        } else {
            anyhow::anyhow!("cannot open the status socket for {interface}: {e}")
        }
    })
}

/// Accepts status connections and forwards each to the daemon's loop.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<StatusRequest>) {
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
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let allowed = stream.peer_cred().map(|c| c.uid() == 0 || c.uid() == me).unwrap_or(false);
        let requests = requests.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
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
                "error: only root or the daemon's user may read its status\n".to_string()
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(text.as_bytes())).await;
        });
    }
}

/// Client side: reads the status of the daemon serving `interface`.
pub fn query(interface: &str) -> anyhow::Result<String> {
    let addr = SocketAddr::from_abstract_name(socket_name(interface).as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow::anyhow!(
            "no udp-encap-tun serves {interface} in this network namespace ({e}); \
             is it running, and are you in its namespace (`ip netns exec NS ...`)?"
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.flush()?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
