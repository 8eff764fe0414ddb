//! Authentication and sessions as the daemon's loop sees them: the glue
//! between the TLS edge ([`crate::auth`]), the core's sessions and the
//! queue of packets waiting for them.
//!
//! Server: the TLS listener runs in its own task and asks the loop, through
//! `requests`, to admit each client that proved its credential; the loop
//! creates the session (and its gate entry) before the client hears yes.
//! Client: authentications run in their own tasks (a bounded number at
//! once, [`AuthQueue`]) and report to the loop through `done`; packets wait
//! until the session's UDP path is bound.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use tokio::sync::mpsc;

use super::gate::Gate;
use super::state;
use crate::auth;
use crate::cli::RunArgs;
use crate::core::authq::{AuthQueue, Enqueued};
use crate::core::session::{SessionId, client, server};
use crate::core::{Core, Refusal};
use crate::counters::{Counters, Discard};

/// Waits on an optional channel: never ready when there is none.
pub async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A finished client authentication: the server, when it started, the result.
pub struct AuthDone {
    server: Ipv4Addr,
    started: Instant,
    result: Result<auth::Lease, auth::AuthError>,
}

pub struct Auth {
    pub requests: Option<mpsc::Receiver<auth::AuthRequest>>,
    pub done: Option<mpsc::Receiver<AuthDone>>,
    done_tx: Option<mpsc::Sender<AuthDone>>,
    server: Option<(auth::AuthServerHandle, tokio::task::JoinHandle<()>)>,
    client: Option<Arc<auth::AuthClient>>,
    queue: AuthQueue,
    /// The client list's generation the sessions were last checked against.
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

    /// Server: a client proved its credential; a session for it, or its
    /// earlier one taken over. Returns whether the state changed.
    pub fn admit(&mut self, req: auth::AuthRequest, core: &mut Core, gate: &mut Gate, lease: Duration) -> bool {
        // The credential was checked against the list of that moment; a
        // reload since may have revoked it (its sessions already dropped).
        if let Some((h, _)) = &self.server
            && !h.is_known_client(&req.client_id)
        {
            let _ = req.reply.send(Err(auth::Refused::BadCredential));
            return false;
        }
        let a = server::Admit {
            seed: req.peer,
            client: &req.client_id,
            id: req.session,
            keys: req.keys,
            resume: req.resume,
            counter: state::counter_start(),
        };
        let answer = match core.admit(a, Instant::now(), gate) {
            Ok(adm) => Ok(auth::Granted { addr: adm.addr, lease, bound: adm.bound }),
            Err(Refusal::ClientLimit) => Err(auth::Refused::ClientLimit),
            Err(Refusal::PoolFull | Refusal::GateFull) => Err(auth::Refused::PoolFull),
            Err(Refusal::Unavailable) => Err(auth::Refused::Unavailable),
        };
        let ok = answer.is_ok();
        // The client may have gone (deadline): nothing to do then.
        let _ = req.reply.send(answer);
        ok
    }

    /// Client: packets for servers without a bound session.
    pub fn enqueue(&mut self, pkts: &mut Vec<(Ipv4Addr, Vec<u8>)>, core: &Core, counters: &Counters) {
        let now = Instant::now();
        for (server, pkt) in pkts.drain(..) {
            match self.queue.enqueue(server, &pkt, now) {
                Enqueued::StartAuth => self.spawn(server, core, None),
                Enqueued::Waiting => {}
                Enqueued::Dropped => counters.discard(Discard::AuthQueue),
                Enqueued::Busy => counters.discard(Discard::AuthBusy),
            }
        }
    }

    fn spawn(&self, server: Ipv4Addr, core: &Core, resume: Option<SessionId>) {
        let (Some(client), Some(tx), Some(dest)) = (self.client.clone(), self.done_tx.clone(), core.path_for(server)) else {
            return;
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client.authenticate_at(dest, resume).await;
            let _ = tx.send(AuthDone { server, started, result }).await;
        });
    }

    /// Client: an authentication ended; the packets to send now (those that
    /// waited, if the server kept our path; otherwise they go once the
    /// path is proven, see [`Auth::bound`]). Returns whether the state
    /// changed.
    pub fn finished(&mut self, done: AuthDone, core: &mut Core, gate: &mut Gate, counters: &Counters) -> (VecDeque<Vec<u8>>, bool) {
        let AuthDone { server, started, result } = done;
        let flush = match result {
            Ok(lease) => {
                let Some(path) = core.path_for(server) else { return (VecDeque::new(), false) };
                let g = client::Grant {
                    server,
                    path,
                    lease: lease.duration,
                    id: lease.session,
                    keys: lease.keys,
                    bound: lease.bound,
                    counter: state::counter_start(),
                    // The server's entry lives `duration` from when it
                    // answered, which is after `started`: counting from
                    // `started` ends our lease a little before the server's.
                    started,
                };
                match core.grant(g, Instant::now(), gate) {
                    Ok(()) => {
                        crate::bounded_log!(
                            log::Level::Info,
                            10,
                            Instant::now(),
                            "authenticated with {server} at {path}: session {}, lease {:?}, our address there {}{}",
                            lease.session,
                            lease.duration,
                            lease.addr,
                            if lease.bound { ", the earlier session resumed" } else { "; proving our UDP path" }
                        );
                        if lease.bound { self.queue.succeeded(server) } else { VecDeque::new() }
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
                core.reauth_failed(server);
                // A server (or anything routed into the TUN) can make these
                // fail at will, for many destinations at once: bounded.
                crate::bounded_log!(log::Level::Warn, 5, Instant::now(), "authentication with {server} failed ({n} waiting packets dropped): {e}");
                VecDeque::new()
            }
        };
        self.start_waiting(core);
        (flush, true)
    }

    /// Client: the session with `server` is bound; the packets that waited.
    pub fn bound(&mut self, server: Ipv4Addr, core: &Core) -> VecDeque<Vec<u8>> {
        crate::bounded_log!(log::Level::Info, 10, Instant::now(), "session with {server}: UDP path proven");
        let flush = self.queue.succeeded(server);
        self.start_waiting(core);
        flush
    }

    /// Starts the authentications that waited for a free slot.
    fn start_waiting(&mut self, core: &Core) {
        for s in self.queue.start_waiting() {
            self.spawn(s, core, None);
        }
    }

    /// Client: what the session timers asked for, except the datagrams to
    /// send (returned for the caller to send).
    pub fn client_actions(
        &mut self,
        actions: &mut Vec<client::Action>,
        core: &mut Core,
        gate: &mut Gate,
        counters: &Counters,
        now: Instant,
    ) -> Vec<(std::net::SocketAddr, [u8; crate::core::session::wire::LEN])> {
        let mut sends = Vec::new();
        for a in actions.drain(..) {
            match a {
                client::Action::Send { to, bytes } => sends.push((to, bytes)),
                client::Action::Reauth { server, resume } => {
                    if self.queue.start_renewal(server, now) {
                        crate::bounded_log!(
                            log::Level::Info,
                            5,
                            now,
                            "authenticating with {server} again (session {resume}: {})",
                            why_reauth(core, server)
                        );
                        self.spawn(server, core, Some(resume));
                    } else {
                        core.reauth_failed(server);
                    }
                }
                client::Action::GaveUp { server } => {
                    core.forget_server(server, gate);
                    let n = self.queue.failed(server, now);
                    counters.discard_n(Discard::AuthQueue, n as u64);
                    crate::bounded_log!(
                        log::Level::Warn,
                        5,
                        now,
                        "session with {server}: no answer to our path proof within {:?} ({n} waiting packets dropped); \
                         is UDP port {} reachable on the server, and does a firewall let its answers back?",
                        client::BIND_GIVE_UP,
                        core.path_for(server).map_or(0, |p| p.port())
                    );
                    self.start_waiting(core);
                }
            }
        }
        self.queue.prune(now);
        sends
    }

    /// Server: reloads a changed client list (every tick: a stat, and a
    /// settled new version is read within a second, see listwatch.rs).
    /// Returns whether sessions were removed.
    pub fn tick(&mut self, now: Instant, core: &mut Core, gate: &mut Gate) -> bool {
        let changed = self.server.as_ref().is_some_and(|(h, _)| {
            match h.reload_if_changed(now) {
                Ok(Some(n)) => log::info!("client list changed: {n} clients"),
                Ok(None) => {}
                Err(e) => log::error!("client list unreadable, keeping the old one: {e}"),
            }
            // Whoever reloaded it (this tick, or a hello in between), a new
            // list is checked against the sessions.
            h.generation() != self.list_generation
        });
        changed && self.drop_revoked(core, gate)
    }

    /// SIGHUP: re-read the client list now.
    pub fn reload(&mut self, core: &mut Core, gate: &mut Gate) -> bool {
        let Some((h, _)) = &self.server else {
            log::info!("SIGHUP: nothing to reload in this mode");
            return false;
        };
        match h.reload() {
            Ok(n) => log::info!("SIGHUP: client list reloaded, {n} clients"),
            Err(e) => log::error!("SIGHUP: client list unreadable, keeping the old one: {e}"),
        }
        self.drop_revoked(core, gate)
    }

    /// Removes at once the sessions of clients no longer in the list.
    fn drop_revoked(&mut self, core: &mut Core, gate: &mut Gate) -> bool {
        let Some((h, _)) = &self.server else { return false };
        self.list_generation = h.generation();
        let list = h.clients();
        let removed = core.remove_clients(|id| !list.contains(id), gate);
        for (e, id) in &removed {
            match e.peer {
                Some(p) => log::info!("client {id} revoked: entry {p} -> {} removed", e.addr),
                None => log::info!("client {id} revoked: session for {} removed", e.addr),
            }
        }
        !removed.is_empty()
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

/// Why the session timers want a new authentication (for the log).
fn why_reauth(core: &Core, server: Ipv4Addr) -> &'static str {
    match core.client_sessions().and_then(|s| s.get(server)) {
        Some(s) if s.unanswered >= client::UNANSWERED => "the server stopped answering",
        _ => "renewing the lease",
    }
}
