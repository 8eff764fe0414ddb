//! A gate for unit tests: remembers what it lets in, refuses past a
//! capacity, like the XDP map.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::session::SessionId;
use super::{GateFull, PeerGate};

#[derive(Debug, Default)]
pub struct FakeGate {
    pub allowed: HashSet<SocketAddr>,
    pub sessions: HashSet<SessionId>,
    pub capacity: usize,
}

impl FakeGate {
    pub fn new(capacity: usize) -> FakeGate {
        FakeGate { capacity, ..Default::default() }
    }
}

impl PeerGate for FakeGate {
    fn allow(&mut self, peer: SocketAddr) -> Result<(), GateFull> {
        if self.allowed.len() >= self.capacity && !self.allowed.contains(&peer) {
            return Err(GateFull);
        }
        self.allowed.insert(peer);
        Ok(())
    }
    fn revoke(&mut self, peer: SocketAddr) {
        self.allowed.remove(&peer);
    }
    fn allow_session(&mut self, id: SessionId) -> Result<(), GateFull> {
        if self.sessions.len() >= self.capacity && !self.sessions.contains(&id) {
            return Err(GateFull);
        }
        self.sessions.insert(id);
        Ok(())
    }
    fn revoke_session(&mut self, id: SessionId) {
        self.sessions.remove(&id);
    }
}
