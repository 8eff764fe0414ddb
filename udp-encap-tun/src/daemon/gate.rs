//! The peer gate in front of the socket, as the core sees it
//! ([`PeerGate`]): the XDP program and its map of allowed peers, or nothing.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Result;

use crate::cli::{RunArgs, XdpMode};
use crate::core::session::SessionId;
use crate::core::{GateFull, PeerGate};
use crate::edge::xdp::{XdpError, XdpGate};

/// The peer gate in front of the socket: the XDP program (or its TC
/// classifier twin), or nothing.
pub enum Gate {
    Off,
    Xdp(Box<XdpGate>),
}

/// Attaches the XDP gate. Enforcement (dropping datagrams from peers without
/// an entry) is on when authentication is: in version 1 a datagram from an
/// unknown peer is what creates its entry, so it must reach the daemon.
pub fn open(args: &RunArgs) -> Result<Gate> {
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
    fn allow(&mut self, peer: SocketAddr) -> Result<(), GateFull> {
        match self {
            Gate::Off => Ok(()),
            Gate::Xdp(g) => g.allow(peer).map_err(|e| {
                if !matches!(e, XdpError::MapFull { .. }) {
                    // Refuse rather than let store and map disagree.
                    crate::bounded_log!(log::Level::Error, 1, Instant::now(), "cannot add {peer} to the XDP map, refusing it: {e}");
                }
                GateFull
            }),
        }
    }

    fn revoke(&mut self, peer: SocketAddr) {
        if let Gate::Xdp(g) = self
            && let Err(e) = g.revoke(peer)
        {
            crate::bounded_log!(log::Level::Error, 1, Instant::now(), "cannot remove {peer} from the XDP map: {e}");
        }
    }

    fn allow_session(&mut self, id: SessionId) -> Result<(), GateFull> {
        match self {
            Gate::Off => Ok(()),
            Gate::Xdp(g) => g.allow_session(id.0).map_err(|e| {
                crate::bounded_log!(log::Level::Error, 1, Instant::now(), "cannot add session {id} to the XDP map, refusing it: {e}");
                GateFull
            }),
        }
    }

    fn revoke_session(&mut self, id: SessionId) {
        if let Gate::Xdp(g) = self
            && let Err(e) = g.revoke_session(id.0)
        {
            crate::bounded_log!(log::Level::Error, 1, Instant::now(), "cannot remove session {id} from the XDP map: {e}");
        }
    }
}
