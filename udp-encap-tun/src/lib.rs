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
//! The folders are the layers (the way quinn-proto and boringtun split it):
//! - [`core`]: pure. Packet views and checksums, the `connection_store`, the
//!   translation of one packet into one action. No sockets, no clock: `now`
//!   is an argument.
//! - [`edge`]: I/O. The TUN device, the UDP socket and its GSO/GRO batches,
//!   the XDP gate, interface facts, the status socket.
//! - [`auth`]: TLS 1.3 authentication and credentials: a pure message codec
//!   and rate limiter under a tokio edge.
//! - [`daemon`]: the thin driver that runs the core between the edges.
//!
//! [`cli`] and [`counters`] are shared by all of them; [`config`] reads
//! `--config FILE` into the command line, [`report`] is the status model
//! (text, JSON, Prometheus).

pub mod auth;
pub mod cli;
pub mod config;
pub mod core;
pub mod counters;
pub mod daemon;
pub mod edge;
pub mod report;
