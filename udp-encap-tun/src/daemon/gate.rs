//! The peer gate in front of the socket, as the core sees it
//! ([`PeerGate`]): the XDP program and its map of allowed peers, or nothing.

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::Result;

use crate::cli::{RunArgs, XdpMode};
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
    fn allow(&mut self, peer: SocketAddrV4) -> Result<(), GateFull> {
        match self {
            Gate::Off => Ok(()),
            Gate::Xdp(g) => g.allow(SocketAddr::V4(peer)).map_err(|e| {
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
            && let Err(e) = g.revoke(SocketAddr::V4(peer))
        {
            log::error!("cannot remove {peer} from the XDP map: {e}");
        }
    }
}
