//! The UDP socket of the data path: bound to the uplink (SO_BINDTODEVICE)
//! and the listen port, with buffers sized for GSO/GRO trains.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Socket buffers: a burst of full-size segments must not overflow them
/// while the loop is busy with the other direction.
const SOCKET_BUFFER: usize = 16 << 20;

pub fn open(port: u16, uplink: &str) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("cannot create a UDP socket")?;
    s.bind_device(Some(uplink.as_bytes())).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => anyhow!(
            "not allowed to bind the socket to {uplink} ({e}): SO_BINDTODEVICE needs CAP_NET_RAW; run as root"
        ),
        _ => anyhow!("cannot bind the UDP socket to {uplink}: {e}"),
    })?;
    size_buffers(&s);
    ignore_path_mtu(&s);
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    s.bind(&addr.into()).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => anyhow!(
            "UDP port {port} is already in use on this host (another udp-encap-tun?): \
             stop that program or choose another --listen-port (`ss -uanp` shows who holds it)"
        ),
        Some(libc::EACCES) => anyhow!("not allowed to bind UDP port {port}: run as root"),
        _ => anyhow!("cannot bind UDP port {port}: {e}"),
    })?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s.into())?)
}

/// Makes the socket ignore learned path MTUs: IP_PMTUDISC_PROBE (and
/// IPV6_PMTUDISC_PROBE on an IPv6 socket) sets DF and sizes datagrams by
/// the device's MTU alone.
///
/// The tunnel's datagrams never need fragmentation: the MSS clamp keeps each
/// one within the uplink MTU. What a learned path MTU can do is harm: anyone
/// can forge an ICMP "fragmentation needed, MTU 552" quoting our datagrams
/// to a peer (off path: the ICMP needs no reply), and with the default
/// IP_PMTUDISC_WANT the kernel then refuses our GSO trains to that peer
/// (EMSGSIZE, EINVAL on older kernels) and fragments single datagrams,
/// whose first fragments the peer's XDP gate drops: a black hole. With
/// PROBE the forged value is still learned (`ip route get PEER` shows it)
/// but nothing of ours uses it.
fn ignore_path_mtu(s: &Socket) {
    use std::os::fd::AsRawFd;
    let (level, opt, val, what) = match s.domain() {
        Ok(d) if d == Domain::IPV6 => (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
            "IPV6_MTU_DISCOVER",
        ),
        _ => (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE, "IP_MTU_DISCOVER"),
    };
    // SAFETY: `val` outlives the call; the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        log::warn!(
            "cannot set {what} to PROBE on the UDP socket ({}): a forged ICMP \"fragmentation needed\" \
             can then make the kernel refuse or fragment datagrams to that peer",
            io::Error::last_os_error()
        );
    }
}

/// Sizes the socket buffers so that a burst of full trains does not overflow
/// them while the loop serves the other direction. The FORCE variants (root)
/// go past net.core.rmem_max/wmem_max, whose defaults (208 KB) are far too
/// small for 64 KB trains; without privilege, the plain ones do what they can.
fn size_buffers(s: &Socket) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for (force, plain, what) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        let set = |opt| {
            // SAFETY: `size` outlives the call; the length matches its type.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 && set(plain) != 0 {
            log::warn!("cannot size the UDP {what} buffer: {}", io::Error::last_os_error());
        }
    }
}
