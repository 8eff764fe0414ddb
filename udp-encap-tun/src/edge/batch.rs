//! Batched UDP I/O: many datagrams per system call.
//!
//! Per-packet cost is what limits a user-space tunnel, so the data path moves
//! trains of datagrams. Sending uses UDP GSO (`UDP_SEGMENT`): one `sendmsg`
//! carries up to [`MAX_GSO_SEGMENTS`] equal-sized datagrams (the last may be
//! shorter) gathered straight from the buffers they were built in (one iovec
//! each, no copy into a staging buffer); the kernel, or the NIC, cuts them
//! apart. Receiving uses UDP GRO: the kernel hands over a train of datagrams
//! from one source in one buffer, with the segment size in a control message.
//!
//! Both are optional kernel features (GSO since 4.18, GRO since 5.0), and
//! before Linux 6.11 a device that can't checksum refuses a GSO train with
//! EIO (newer kernels checksum in software instead). The socket then falls
//! back for good to one datagram per call, and says so once in the log (the
//! approach quinn-udp takes).
//!
//! A train the kernel refuses for its size (EMSGSIZE on recent kernels,
//! EINVAL on older ones: its segments exceed what the socket takes for the
//! path MTU) is a fact about one destination, not about GSO: that train
//! goes one datagram per call, counted (`udp_gso_refused`), and GSO stays
//! on for every other send. The socket ignores learned path MTUs
//! (udp.rs, IP_PMTUDISC_PROBE), so a forged ICMP "fragmentation needed"
//! cannot cause this; a lowered uplink MTU can.
//!
//! Why not quinn-udp itself: its `Transmit` carries one contiguous buffer
//! per send, while the send side here gathers a TCP header from a small
//! arena and the payload from the TUN read buffer for each datagram
//! (tso.rs); one buffer would mean copying every payload once more, the
//! copy tso.rs exists to avoid. nix's `sendmsg`/`recvmsg` with the
//! `UdpGsoSegments`/`UdpGroSegments` control messages do the job without
//! unsafe code of our own.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt, sockopt,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::counters::{Counters, Traffic};

/// The kernel's cap on segments per GSO send (UDP_MAX_SEGMENTS, 64 before
/// Linux 6.1's raise to 128: the lower value works everywhere).
pub const MAX_GSO_SEGMENTS: usize = 64;
// One GRO train is one run of gro.rs: the two bounds are the same kernel limit.
const _: () = assert!(MAX_GSO_SEGMENTS == crate::core::gro::MAX_RUN);
/// A GSO train must fit one IPv4 packet's length field (an IPv6 payload
/// length allows 20 bytes more: this fits both).
pub const MAX_GSO_BYTES: usize = 65_000;

pub struct BatchUdp {
    sock: UdpSocket,
    /// Cleared for good when the device cannot send GSO trains at all.
    gso: std::cell::Cell<bool>,
    gro: bool,
    /// An IPv6 socket (dual-stack): IPv4 peers are sent to as IPv4-mapped.
    v6: bool,
    counters: std::sync::Arc<Counters>,
}

/// One receive: `len` bytes from `src`, datagrams of `stride` bytes each
/// (the last may be shorter). Without GRO, stride == len.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub src: SocketAddr,
    pub stride: usize,
}

impl BatchUdp {
    /// Turns on GRO and checks for GSO; logs what the kernel offers.
    /// `counters` gets `udp_gso_refused`.
    pub fn new(sock: UdpSocket, counters: std::sync::Arc<Counters>) -> BatchUdp {
        let gro = match setsockopt(&sock, sockopt::UdpGroSegment, &true) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("UDP GRO unavailable ({e}): receiving one datagram per call");
                false
            }
        };
        // Setting a segment size on the socket is how to ask the kernel
        // whether it knows UDP_SEGMENT; sends set it per message instead.
        let gso = match setsockopt(&sock, sockopt::UdpGsoSegment, &1400)
            .and_then(|()| setsockopt(&sock, sockopt::UdpGsoSegment, &0))
        {
            Ok(()) => true,
            Err(e) => {
                log::warn!("UDP GSO unavailable ({e}): sending one datagram per call");
                false
            }
        };
        log::info!(
            "UDP offloads: GSO {}, GRO {}",
            if gso { "on" } else { "off" },
            if gro { "on" } else { "off" }
        );
        let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
        BatchUdp { sock, gso: std::cell::Cell::new(gso), gro, v6, counters }
    }

    pub fn gso(&self) -> bool {
        self.gso.get()
    }

    pub fn gro(&self) -> bool {
        self.gro
    }

    pub async fn readable(&self) -> io::Result<()> {
        self.sock.readable().await
    }

    /// One `recvmsg` into `buf`, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let fd = self.sock.as_raw_fd();
        self.sock.try_io(Interest::READABLE, || {
            let mut iov = [io::IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(i32);
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                .map_err(io::Error::from)?;
            let len = msg.bytes;
            let mut stride = len;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::UdpGroSegments(s) = c {
                        stride = usize::try_from(s).unwrap_or(len);
                    }
                }
            }
            let src = msg
                .address
                .as_ref()
                .and_then(socket_addr)
                .ok_or_else(|| io::Error::other("datagram without a source address"))?;
            Ok(Received { len, src, stride: stride.clamp(1, len.max(1)) })
        })
    }

    /// Sends `segs` to `to`: each run of `per` slices one datagram (a header
    /// and a payload, say), all datagrams but the last of equal length (the
    /// caller groups them so; at most [`MAX_GSO_SEGMENTS`] and
    /// [`MAX_GSO_BYTES`] in all). Returns how many system calls it took;
    /// waits when the socket buffer is full.
    pub async fn send(&self, to: SocketAddr, segs: &[IoSlice<'_>], per: usize) -> io::Result<usize> {
        let addr = self.sockaddr(to);
        let per = per.max(1);
        if self.gso.get() && segs.len() > per {
            let seg_len = segs.iter().take(per).map(|s| s.len()).sum();
            match self.send_msg(&addr, segs, Some(seg_len)).await {
                Ok(()) => return Ok(1),
                // EIO: the device can't checksum GSO trains (before 6.11).
                // A property of the device: fall back for good.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    log::warn!("UDP GSO refused by the kernel ({e}): sending one datagram per call from now on");
                    self.gso.set(false);
                }
                // EMSGSIZE (EINVAL before Linux 6.x): the segments do not
                // fit the MTU the socket uses for this destination. Only
                // this train goes one by one; GSO stays on for all others.
                // (A kernel without UDP_SEGMENT failed the probe in `new`.)
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE) | Some(libc::EINVAL)) => {
                    self.counters.add(Traffic::UdpGsoRefused, 1);
                    crate::bounded_log!(
                        log::Level::Warn,
                        1,
                        std::time::Instant::now(),
                        "UDP GSO send to {to} refused for its size ({e}): sending its {} datagrams of {seg_len} bytes \
                         one by one (is the uplink MTU below the TUN MTU + 28, + 48 over IPv6?)",
                        segs.len().div_ceil(per)
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let mut calls = 0;
        for dgram in segs.chunks(per) {
            self.send_msg(&addr, dgram, None).await?;
            calls += 1;
        }
        Ok(calls)
    }

    /// The kernel's form of `to` for this socket.
    fn sockaddr(&self, to: SocketAddr) -> SockaddrStorage {
        match to {
            SocketAddr::V4(v4) if self.v6 => {
                SockaddrStorage::from(SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()))
            }
            _ => SockaddrStorage::from(to),
        }
    }

    async fn send_msg(&self, addr: &SockaddrStorage, iov: &[IoSlice<'_>], gso: Option<usize>) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let seg = gso.and_then(|g| u16::try_from(g).ok()).unwrap_or(0);
        loop {
            self.sock.writable().await?;
            let r = self.sock.try_io(Interest::WRITABLE, || {
                let gso_cmsg = [ControlMessage::UdpGsoSegments(&seg)];
                let cmsgs: &[ControlMessage] = if gso.is_some() { &gso_cmsg } else { &[] };
                sendmsg(fd, iov, cmsgs, MsgFlags::empty(), Some(addr))
                    .map(|_| ())
                    .map_err(io::Error::from)
            });
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

/// A received source address as the rest of the daemon sees it: an IPv4
/// peer of a dual-stack socket arrives IPv4-mapped (`::ffff:a.b.c.d`) and
/// is given back as IPv4, so one peer has one key whatever the socket.
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    let v6 = a.as_sockaddr_in6()?;
    Some(SocketAddr::new(IpAddr::V6(v6.ip()).to_canonical(), v6.port()))
}

/// How many datagrams of at most `max_datagram` bytes fit one GSO send: the
/// cap to put on the TUN's TSO super-segments (`gso_max_segs`) so that each
/// one leaves in a single send. Left at the kernel's 64 KB, a super-segment
/// of 1368-byte segments holds 48 and needs a second send (and a second
/// receive and TUN write at the far end) for the last one.
pub fn segments_per_send(max_datagram: usize) -> u32 {
    let n = MAX_GSO_BYTES / max_datagram.max(1);
    u32::try_from(n.clamp(1, MAX_GSO_SEGMENTS)).unwrap_or(1)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn segments_per_send_fits_one_ipv4_packet() {
        // TUN MTU 1400: 1380-byte segments, 47 of them in 64 860 bytes.
        assert_eq!(segments_per_send(1380), 47);
        assert_eq!(segments_per_send(1480), 43);
        assert!(segments_per_send(1380) as usize * 1380 <= MAX_GSO_BYTES);
        assert_eq!(segments_per_send(100), MAX_GSO_SEGMENTS as u32);
        assert_eq!(segments_per_send(0), MAX_GSO_SEGMENTS as u32);
        assert_eq!(segments_per_send(70_000), 1);
    }
}
