//! udp-encap-tun: TCP over UDP through a TUN device.
//!
//! The model: a TCP segment that the kernel routes into the TUN device leaves
//! as the payload of one UDP datagram (its IPv4 header dropped), and a
//! datagram that arrives on the listen port becomes a TCP segment under a
//! rebuilt IPv4 header, written into the TUN. In server mode each peer
//! (saddr, sport) owns one generated IPv4 address from a pool, kept in the
//! `connection_store`; traffic the kernel routes to that address goes back to
//! the peer.
//!
//! Layering (the way quinn-proto and boringtun split it):
//! - [`wire`]: zero-copy views over packet bytes, checksums. No I/O.
//! - [`store`]: the `connection_store` and its address pool; `now` is an
//!   argument, never read from a clock.
//! - [`core`]: turns one packet into one action (send this datagram, write
//!   this segment, discard for this reason). No I/O, no clock.
//! - the edge: [`tun`], [`udp`], [`daemon`], [`control`], [`xdp`]: sockets,
//!   the TUN device, the eBPF program, the status socket.

pub mod auth;
pub mod authq;
pub mod batch;
pub mod cli;
pub mod core;
pub mod counters;
pub mod store;
pub mod wire;
pub mod xdp;
pub mod control;
pub mod daemon;
pub mod gro;
pub mod netdev;
pub mod tso;
