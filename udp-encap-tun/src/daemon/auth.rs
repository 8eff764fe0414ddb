//! Authentication as the daemon's loop sees it: the glue between the TLS
//! edge ([`crate::auth`]) and the core's entries and leases.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use tokio::sync::mpsc;

use super::gate::Gate;
use crate::auth;
use crate::cli::RunArgs;
use crate::core::Core;
use crate::core::authq::{AuthQueue, Enqueued};
use crate::counters::{Counters, Discard};

/// Waits on an optional channel: never ready when there is none.
pub async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

pub type AuthDone = (Ipv4Addr, Instant, Result<auth::Lease, auth::AuthError>);

/// Authentication as the daemon's loop sees it.
///
/// Server: the TLS listener runs in its own task and asks the loop, through
/// `requests`, to admit each client that proved its credential; the loop
/// creates the entry (and the XDP map entry) before the client hears yes.
/// Client: authentications run in their own tasks, one per server at a time,
/// and report to the loop through `done`; packets wait in [`AuthQueue`].
pub struct Auth {
    pub requests: Option<mpsc::Receiver<auth::AuthRequest>>,
    pub done: Option<mpsc::Receiver<AuthDone>>,
    done_tx: Option<mpsc::Sender<AuthDone>>,
    server: Option<(auth::AuthServerHandle, tokio::task::JoinHandle<()>)>,
    client: Option<Arc<auth::AuthClient>>,
    /// Server: which client id each entry belongs to (revocation).
    pub owners: HashMap<SocketAddrV4, String>,
    queue: AuthQueue,
    /// The client list's generation the entries were last checked against.
    list_generation: u64,
}

impl Auth {
    pub fn start(mode: auth::AuthMode, args: &RunArgs, counters: &Arc<Counters>) -> Result<Auth> {
        let mut a = Auth {
            requests: None,
            done: None,
            done_tx: None,
            server: None,
            client: None,
            owners: HashMap::new(),
            queue: AuthQueue::default(),
            list_generation: 0,
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
                client.check_source_port().map_err(|e| anyhow!("{e}"))?;
                let (tx, rx) = mpsc::channel(64);
                a.client = Some(Arc::new(client));
                a.done = Some(rx);
                a.done_tx = Some(tx);
            }
        }
        Ok(a)
    }

    /// Server: a client proved its credential; create or refresh its entry.
    pub fn admit(&mut self, req: auth::AuthRequest, core: &mut Core, gate: &mut Gate, counters: &Counters, lease: Duration) {
        // The credential was checked against the list of that moment; a
        // reload since may have revoked it (its entries already dropped).
        if let Some((h, _)) = &self.server
            && !h.is_known_client(&req.client_id)
        {
            let _ = req.reply.send(Err(auth::Refused::BadCredential));
            return;
        }
        let answer = match core.admit(req.peer, Instant::now(), gate) {
            Ok(addr) => {
                // A valid credential can reconnect at will: bounded.
                crate::bounded_log!(log::Level::Info, 10, Instant::now(), "client {} authenticated from {} -> {addr}", req.client_id, req.peer);
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
    pub fn enqueue(&mut self, pkts: &mut Vec<(Ipv4Addr, Vec<u8>)>, counters: &Counters) {
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
    pub fn finished(&mut self, done: AuthDone, core: &mut Core, gate: &mut Gate, counters: &Counters) -> VecDeque<Vec<u8>> {
        let (server, started, result) = done;
        match result {
            Ok(lease) => {
                // The server's entry lives `duration` from when it answered,
                // which is after `started`: counting from `started` ends our
                // lease a little before the server's.
                match core.grant_lease(server, lease.duration, started, gate) {
                    Ok(()) => {
                        crate::bounded_log!(log::Level::Info, 10, Instant::now(), "authenticated with {server}: lease {:?}, our address there {}", lease.duration, lease.addr);
                        self.queue.succeeded(server)
                    }
                    Err(_) => {
                        crate::bounded_log!(log::Level::Warn, 1, Instant::now(), "authenticated with {server} but the XDP map is full (raise --xdp-map-size)");
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
                // A server (or anything routed into the TUN) can make these
                // fail at will, for many destinations at once: bounded.
                crate::bounded_log!(log::Level::Warn, 5, Instant::now(), "authentication with {server} failed ({n} waiting packets dropped): {e}");
                VecDeque::new()
            }
        }
    }

    /// Timers: client renewals; server reload of a changed client list.
    pub fn tick(&mut self, now: Instant, core: &mut Core, gate: &mut Gate) {
        if self.client.is_some() {
            for server in core.leases_to_renew(now) {
                if self.queue.start_renewal(server, now) {
                    crate::bounded_log!(log::Level::Debug, 5, now, "renewing the lease with {server}");
                    self.spawn(server);
                }
            }
            self.queue.prune(now);
        }
        let changed = self.server.as_ref().is_some_and(|(h, _)| {
            // A stat (and an inotify read) every tick: a settled new list is
            // read within SETTLE + one tick (listwatch.rs).
            match h.reload_if_changed(now) {
                Ok(Some(n)) => log::info!("client list changed: {n} clients"),
                Ok(None) => {}
                Err(e) => log::error!("client list unreadable, keeping the old one: {e}"),
            }
            // Whoever reloaded it, a new list is checked against the entries.
            h.generation() != self.list_generation
        });
        if changed {
            self.drop_revoked(core, gate);
        }
    }

    /// SIGHUP: re-read the client list now.
    pub fn reload(&mut self, core: &mut Core, gate: &mut Gate) {
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
        self.list_generation = h.generation();
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

    pub fn forget(&mut self, peer: SocketAddrV4) {
        self.owners.remove(&peer);
    }

    pub fn stats(&self) -> Option<Arc<auth::AuthStats>> {
        match (&self.server, &self.client) {
            (Some((h, _)), _) => Some(h.stats()),
            (_, Some(c)) => Some(c.stats()),
            _ => None,
        }
    }

    pub fn stop(&mut self) {
        if let Some((_, task)) = &self.server {
            task.abort();
        }
    }
}

