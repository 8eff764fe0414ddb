//! The UDP socket of the data path: bound to the uplink (SO_BINDTODEVICE)
//! and the listen port, with buffers sized for GSO/GRO trains, of the
//! address family its peers need (SPEC decision 12).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::core::mtu::Families;

/// Socket buffers: a burst of full-size segments must not overflow them
/// while the loop is busy with the other direction.
const SOCKET_BUFFER: usize = 16 << 20;

/// Opens the socket on `port`, bound to `uplink`, for `want`:
/// - `Both` (a server; a client with IPv4 and IPv6 servers): `[::]:PORT`
///   with IPV6_V6ONLY off, IPv4 peers arriving IPv4-mapped; on a host
///   without IPv6 (`ipv6.disable=1`) `0.0.0.0:PORT`, logged;
/// - `V6` (a client whose servers are all reached over IPv6): `[::]:PORT`,
///   IPv6 only;
/// - `V4`: `0.0.0.0:PORT`.
///
/// ([`Families`].)
///
/// Returns the socket and the families it carries.
pub fn open(port: u16, uplink: &str, want: Families) -> Result<(UdpSocket, Families)> {
    let (s, got) = match want {
        Families::V4 => (new_socket(Domain::IPV4)?, Families::V4),
        Families::V6 | Families::Both => match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
            Ok(s) => (s, want),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && want == Families::Both => {
                log::info!("this host has no IPv6 ({e}): the UDP socket serves IPv4 peers only");
                (new_socket(Domain::IPV4)?, Families::V4)
            }
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                return Err(anyhow!(
                    "this host has no IPv6 ({e}), but every server is to be reached over IPv6 \
                     (--nat64-prefix): boot without ipv6.disable=1, or drop --nat64-prefix"
                ));
            }
            Err(e) => return Err(anyhow!("cannot create an IPv6 UDP socket: {e}")),
        },
    };
    if got.v6() {
        s.set_only_v6(got == Families::V6)
            .with_context(|| format!("cannot set IPV6_V6ONLY on the UDP socket for {got:?}"))?;
    }
    s.bind_device(Some(uplink.as_bytes())).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => anyhow!(
            "not allowed to bind the socket to {uplink} ({e}): SO_BINDTODEVICE needs CAP_NET_RAW; run as root"
        ),
        _ => anyhow!("cannot bind the UDP socket to {uplink}: {e}"),
    })?;
    size_buffers(&s);
    ignore_path_mtu(&s, got);
    let addr = if got.v6() {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    };
    s.bind(&addr.into()).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => anyhow!(
            "UDP port {port} is already in use on this host (another udp-encap-tun?): \
             stop that program or choose another --listen-port (`ss -uanp` shows who holds it)"
        ),
        Some(libc::EACCES) => anyhow!("not allowed to bind UDP port {port}: run as root"),
        _ => anyhow!("cannot bind UDP port {port} ({addr}): {e}"),
    })?;
    s.set_nonblocking(true)?;
    Ok((UdpSocket::from_std(s.into())?, got))
}

fn new_socket(domain: Domain) -> Result<Socket> {
    Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).context("cannot create a UDP socket")
}

/// Makes the socket ignore learned path MTUs: IP_PMTUDISC_PROBE for IPv4
/// (on a dual-stack socket too, where it governs the IPv4-mapped traffic)
/// and IPV6_PMTUDISC_PROBE for IPv6 set DF (IPv6 never fragments in the
/// path) and size datagrams by the device's MTU alone.
///
/// The tunnel's datagrams never need fragmentation: the MSS clamp keeps each
/// one within the uplink MTU. What a learned path MTU can do is harm: anyone
/// can forge an ICMP "fragmentation needed, MTU 552" (ICMPv6 "packet too
/// big, MTU 1280") quoting our datagrams to a peer (off path: the ICMP
/// needs no reply), and with the default PMTUDISC_WANT the kernel then
/// refuses our GSO trains to that peer (EMSGSIZE, EINVAL on older kernels)
/// and fragments single datagrams, whose first fragments the peer's XDP
/// gate drops: a black hole. With PROBE the forged value is still learned
/// (`ip route get PEER` shows it) but nothing of ours uses it.
fn ignore_path_mtu(s: &Socket, families: Families) {
    let mut opts = Vec::with_capacity(2);
    if families.v4() {
        opts.push((libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE, "IP_MTU_DISCOVER"));
    }
    if families.v6() {
        opts.push((libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE, "IPV6_MTU_DISCOVER"));
    }
    for (level, opt, val, what) in opts {
        if let Err(e) = set_int(s, level, opt, val) {
            log::warn!(
                "cannot set {what} to PROBE on the UDP socket ({e}): a forged ICMP \"fragmentation needed\" \
                 can then make the kernel refuse or fragment datagrams to that peer"
            );
        }
    }
}

fn set_int(s: &Socket, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
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
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sizes the socket buffers so that a burst of full trains does not overflow
/// them while the loop serves the other direction. The FORCE variants (root)
/// go past net.core.rmem_max/wmem_max, whose defaults (208 KB) are far too
/// small for 64 KB trains; without privilege, the plain ones do what they can.
fn size_buffers(s: &Socket) {
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for (force, plain, what) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        if let Err(e) = set_int(s, libc::SOL_SOCKET, force, size).or_else(|_| set_int(s, libc::SOL_SOCKET, plain, size)) {
            log::warn!("cannot size the UDP {what} buffer: {e}");
        }
    }
}

/// The PMTU discovery modes the socket has, for the tests: (IPv4, IPv6),
/// `None` where the socket carries no such family.
#[cfg(test)]
fn pmtudisc(s: &Socket) -> (Option<libc::c_int>, Option<libc::c_int>) {
    use std::os::fd::AsRawFd;
    let get = |level, opt| {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` outlive the call and match the option's type.
        let r = unsafe { libc::getsockopt(s.as_raw_fd(), level, opt, (&raw mut v).cast(), &raw mut len) };
        (r == 0).then_some(v)
    };
    (get(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER), get(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Both families of a dual-stack socket ignore path MTUs: IPv4-mapped
    /// traffic follows IP_MTU_DISCOVER, IPv6 IPV6_MTU_DISCOVER.
    #[test]
    fn probe_is_set_for_every_family_the_socket_carries() {
        let Ok(s) = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) else {
            eprintln!("no IPv6 on this host: skipped");
            return;
        };
        let before = pmtudisc(&s);
        assert_ne!(before.0, Some(libc::IP_PMTUDISC_PROBE));
        assert_ne!(before.1, Some(libc::IPV6_PMTUDISC_PROBE));
        ignore_path_mtu(&s, Families::Both);
        assert_eq!(pmtudisc(&s), (Some(libc::IP_PMTUDISC_PROBE), Some(libc::IPV6_PMTUDISC_PROBE)));
        let v4 = new_socket(Domain::IPV4).unwrap();
        ignore_path_mtu(&v4, Families::V4);
        assert_eq!(pmtudisc(&v4).0, Some(libc::IP_PMTUDISC_PROBE));
    }
}
