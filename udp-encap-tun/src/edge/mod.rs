//! The I/O edge: the TUN device, the UDP socket and its batches, the XDP
//! gate, interface facts, the status socket and the metrics endpoint. Everything here talks to
//! the kernel; nothing here decides what happens to a packet (that is
//! [`crate::core`]).

pub mod batch;
pub mod control;
pub mod holder;
pub mod metrics;
pub mod netdev;
pub mod tun;
pub mod udp;
pub mod xdp;
