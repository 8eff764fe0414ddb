//! Facts about network interfaces, read through sockets and netlink-backed
//! libc calls that answer for the caller's network namespace (unlike
//! `/sys/class/net`, which shows whichever namespace mounted sysfs).

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};

/// The interface's index, or `None` if no interface has that name here.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the whole call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Runs an interface ioctl (`request`) on a throwaway socket: builds the
/// `ifreq` for `name`, lets `prepare` fill the request's own field, and
/// returns the `ifreq` the kernel filled in.
fn ifreq_ioctl(
    name: &str,
    request: libc::c_ulong,
    prepare: impl FnOnce(&mut libc::ifreq),
) -> io::Result<libc::ifreq> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    prepare(&mut req);
    // SAFETY: the interface ioctls used here read ifr_name and write into
    // `req` (or into the buffer `prepare` pointed ifru_data at, which the
    // caller keeps alive across this call).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req)
}

/// The interface's MTU (SIOCGIFMTU).
pub fn mtu(name: &str) -> io::Result<u32> {
    let req = ifreq_ioctl(name, libc::SIOCGIFMTU, |_| {})?;
    // SAFETY: after a successful SIOCGIFMTU the union holds ifru_mtu.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::other("negative MTU"))
}

/// Whether the interface is administratively up (IFF_UP, SIOCGIFFLAGS).
pub fn is_up(name: &str) -> io::Result<bool> {
    let req = ifreq_ioctl(name, libc::SIOCGIFFLAGS, |_| {})?;
    // SAFETY: after a successful SIOCGIFFLAGS the union holds ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(i32::from(flags) & libc::IFF_UP != 0)
}

/// `struct ethtool_drvinfo` (linux/ethtool.h), for ETHTOOL_GDRVINFO.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// The interface's driver as ethtool names it (`veth`, `tun`, `virtio_net`, ...).
pub fn driver(name: &str) -> io::Result<String> {
    // SAFETY: plain old data; all-zero is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SIOCETHTOOL fills the DrvInfo that ifru_data points to; `info` lives
    // on this frame past the call.
    ifreq_ioctl(name, libc::SIOCETHTOOL, |req| {
        req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    })?;
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(info.driver.get(..end).unwrap_or(&[])).into_owned())
}

/// Caps how many segments the kernel puts into one TSO super-segment on the
/// interface (`ip link set dev NAME gso_max_segs SEGS`), by one
/// RTM_NEWLINK request with IFLA_GSO_MAX_SEGS over rtnetlink. Needs
/// CAP_NET_ADMIN.
pub fn set_gso_max_segs(name: &str, segs: u32) -> io::Result<()> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let index = ifindex(name).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such interface"))?;
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let req = setlink_request(index, LinkAttribute::GsoMaxSegs(segs));
    sock.send(&req, 0)?;
    let mut reply = Vec::with_capacity(4096);
    let n = sock.recv(&mut reply, 0)?;
    match netlink_ack(reply.get(..n).unwrap_or(&[])) {
        Some(0) => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(errno.saturating_neg())),
        None => Err(io::Error::other("unexpected rtnetlink reply")),
    }
}

/// Routes `dst/prefix` into the interface `name` with `src` as the
/// preferred source address, in the main table (`ip route add DST dev NAME
/// src SRC`), by one RTM_NEWROUTE request. Needs CAP_NET_ADMIN. The kernel
/// removes the route with the interface.
pub fn add_route(name: &str, dst: Ipv4Addr, prefix: u8, src: Ipv4Addr) -> io::Result<()> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let index = ifindex(name).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such interface"))?;
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(&newroute_request(index, dst, prefix, src), 0)?;
    let mut reply = Vec::with_capacity(4096);
    let n = sock.recv(&mut reply, 0)?;
    match netlink_ack(reply.get(..n).unwrap_or(&[])) {
        Some(0) => Ok(()),
        Some(errno) => Err(io::Error::from_raw_os_error(errno.saturating_neg())),
        None => Err(io::Error::other("unexpected rtnetlink reply")),
    }
}

/// RTM_NEWROUTE for a link-scope unicast route (what `ip route add DST dev
/// IF src SRC` sends, NLM_F_EXCL: an existing route is an error, not
/// replaced).
fn newroute_request(index: u32, dst: Ipv4Addr, prefix: u8, src: Ipv4Addr) -> Vec<u8> {
    use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
    use netlink_packet_route::AddressFamily;
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    };
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.destination_prefix_length = prefix;
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Link;
    route.header.kind = RouteType::Unicast;
    route.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(dst)),
        RouteAttribute::Oif(index),
        RouteAttribute::PrefSource(RouteAddress::Inet(src)),
    ];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::NewRoute(route)));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// An rtnetlink RTM_NEWLINK request that sets one attribute of the
/// interface `index`: what `ip link set` sends (without NLM_F_CREATE the
/// kernel changes the existing link, the path checked on Linux 6.1).
fn setlink_request(index: u32, attr: LinkAttribute) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes = vec![attr];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::NewLink(link)));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// The error field of an rtnetlink acknowledgement (NLMSG_ERROR: 0 for
/// success, a negative errno otherwise), or `None` if `reply` is not one.
fn netlink_ack(reply: &[u8]) -> Option<i32> {
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply).ok()?.payload {
        NetlinkPayload::Error(e) => Some(e.raw_code()),
        _ => None,
    }
}

/// The interface's IPv4 addresses with their prefix lengths, in the order
/// the kernel lists them (the primary address first).
pub fn ipv4_addrs(name: &str) -> io::Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if ifa.interface_name != name {
            continue;
        }
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let prefix = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .map_or(32, |m| m.ip().to_bits().count_ones() as u8);
        out.push((addr.ip(), prefix));
    }
    Ok(out)
}

/// The inode of this process's network namespace: tells two instances in
/// different namespaces apart (control socket names, BPF pin paths).
pub fn netns_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_known() {
        assert_eq!(ifindex("lo"), Some(1));
        assert!(ifindex("no-such-if-x").is_none());
        assert!(ifindex("bad\0name").is_none());
        assert_eq!(mtu("lo").expect("lo has an MTU"), 65536);
        assert!(mtu("no-such-if-x").is_err());
        assert!(mtu("a-name-far-too-long-for-ifreq").is_err());
        let lo = ipv4_addrs("lo").expect("getifaddrs");
        assert!(lo.contains(&(Ipv4Addr::LOCALHOST, 8)), "{lo:?}");
        assert!(netns_inode().expect("netns") > 0);
        assert!(driver("no-such-if-x").is_err());
        assert!(is_up("lo").is_ok());
        assert!(is_up("no-such-if-x").is_err());
        assert!(set_gso_max_segs("no-such-if-x", 40).is_err());
    }

    #[test]
    fn setlink_request_layout() {
        // What `ip link set dev X gso_max_segs 47` sends (strace): nlmsghdr,
        // ifinfomsg for index 7, one IFLA_GSO_MAX_SEGS attribute.
        let m = setlink_request(7, LinkAttribute::GsoMaxSegs(47));
        let u32_at = |i: usize| u32::from_ne_bytes(m[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_ne_bytes(m[i..i + 2].try_into().unwrap());
        assert_eq!(m.len(), 40);
        assert_eq!(u32_at(0), 40);
        assert_eq!(u16_at(4), libc::RTM_NEWLINK);
        assert_eq!(u16_at(6), (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16);
        assert_eq!(u32_at(20), 7); // ifi_index
        assert_eq!((u16_at(32), u16_at(34), u32_at(36)), (8, libc::IFLA_GSO_MAX_SEGS, 47));
    }

    #[test]
    fn netlink_ack_parsing() {
        // An NLMSG_ERROR of 36 bytes: header, error code, the request's header.
        let mut ack = [0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        assert_eq!(netlink_ack(&ack), Some(0));
        ack[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(netlink_ack(&ack), Some(-libc::EPERM));
        assert_eq!(netlink_ack(&ack[..10]), None);
        assert_eq!(netlink_ack(&[]), None);
        ack[4..6].copy_from_slice(&16u16.to_ne_bytes());
        assert_eq!(netlink_ack(&ack), None);
    }
}
