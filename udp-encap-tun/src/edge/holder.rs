//! Who holds a socket name or a port: for error messages that tell a user
//! which process is in the way (a local user squatting the status socket's
//! name, a program listening on the client's `--listen-port`).
//!
//! Read from procfs the way `ss -p` does it: `/proc/net/unix` and
//! `/proc/net/tcp{,6}` give a socket's inode (and for TCP its owner's uid),
//! and the `/proc/PID/fd` links named `socket:[INODE]` give the processes.
//! The tables are those of the reading thread's network namespace. Seeing
//! other users' descriptors needs root (or CAP_SYS_PTRACE); without it the
//! pid is simply left out. The parsers are pure and tested over fixtures.

use std::fmt;
use std::fs;

/// A process (or at least a uid) holding a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    /// `/proc/PID/comm`: the program's name.
    pub comm: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.uid {
            Some(u) => write!(f, "uid {u}")?,
            None => f.write_str("an unknown user")?,
        }
        match (self.pid, &self.comm) {
            (Some(p), Some(c)) => write!(f, " (pid {p}, `{c}`)"),
            (Some(p), None) => write!(f, " (pid {p})"),
            _ => Ok(()),
        }
    }
}

impl Holder {
    /// What procfs says about `pid` (its real uid, its name).
    pub fn of_pid(pid: i32) -> Holder {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        Holder {
            uid: parse_status_uid(&status),
            pid: Some(pid),
            comm: fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim().to_string()),
        }
    }
}

/// The processes holding the abstract Unix socket `@name`.
pub fn abstract_unix(name: &str) -> Vec<Holder> {
    let text = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let inodes = parse_unix(&text, name);
    processes_with(&inodes)
        .into_iter()
        .map(|(_, pid)| Holder::of_pid(pid))
        .collect()
}

/// The TCP sockets (listening or connected, IPv4 or IPv6) on local `port`,
/// with their owner's uid and, when `find_pids`, their processes.
pub fn tcp_port(port: u16, find_pids: bool) -> Vec<Holder> {
    let mut socks = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        socks.extend(parse_tcp(&text, port));
    }
    let mut out: Vec<Holder> = Vec::new();
    let pids = if find_pids {
        processes_with(&socks.iter().map(|s| s.inode).collect::<Vec<_>>())
    } else {
        Vec::new()
    };
    for s in &socks {
        let mut found = false;
        for (_, pid) in pids.iter().filter(|(i, _)| *i == s.inode) {
            found = true;
            let mut h = Holder::of_pid(*pid);
            h.uid = Some(s.uid);
            out.push(h);
        }
        if !found {
            out.push(Holder { uid: Some(s.uid), pid: None, comm: None });
        }
    }
    out.dedup();
    out
}

/// One line of `/proc/net/tcp{,6}` on the port asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSock {
    pub inode: u64,
    pub uid: u32,
    /// The kernel's state number (0x0A: listening).
    pub state: u8,
}

/// Sockets of `/proc/net/unix` text bound to the abstract `name`.
pub fn parse_unix(text: &str, name: &str) -> Vec<u64> {
    let want = format!("@{name}");
    text.lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode Path
            let mut w = l.split_whitespace();
            let inode = w.nth(6)?.parse().ok()?;
            (w.next()? == want).then_some(inode)
        })
        .collect()
}

/// Sockets of `/proc/net/tcp` (or tcp6) text whose local port is `port`.
pub fn parse_tcp(text: &str, port: u16) -> Vec<TcpSock> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let w: Vec<&str> = l.split_whitespace().collect();
            let local = w.get(1)?;
            let (_, p) = local.rsplit_once(':')?;
            if u16::from_str_radix(p, 16).ok()? != port {
                return None;
            }
            Some(TcpSock {
                state: u8::from_str_radix(w.get(3)?, 16).ok()?,
                uid: w.get(7)?.parse().ok()?,
                inode: w.get(9)?.parse().ok()?,
            })
        })
        .filter(|s| s.inode != 0)
        .collect()
}

/// The real uid on the `Uid:` line of `/proc/PID/status`.
pub fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// `(inode, pid)` for every process holding one of `inodes`.
fn processes_with(inodes: &[u64]) -> Vec<(u64, i32)> {
    let mut out = Vec::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(procs) = fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if inodes.contains(&inode) && !out.contains(&(inode, pid)) {
                out.push((inode, pid));
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unix_table_finds_the_abstract_name_only() {
        let text = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4242 @udp-encap-tun/tun0
0000000000000000: 00000002 00000000 00010000 0001 01 4243 @udp-encap-tun/tun01
0000000000000000: 00000003 00000000 00000000 0001 03 4244
0000000000000000: 00000002 00000000 00010000 0001 01 4245 /run/udp-encap-tun/tun0
garbage line
";
        assert_eq!(parse_unix(text, "udp-encap-tun/tun0"), vec![4242]);
        assert!(parse_unix(text, "udp-encap-tun/tun9").is_empty());
        assert!(parse_unix("", "x").is_empty());
    }

    #[test]
    fn tcp_tables_give_port_state_uid_and_inode() {
        let v4 = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:A410 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 91234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   2: 0200C0C0:A410 0100C0C0:3039 06 00000000:00000000 03:00000fa0 00000000     0        0 0 3 0000000000000000
";
        // 0xA410 = 42000; the TIME_WAIT line has no inode and is skipped.
        assert_eq!(
            parse_tcp(v4, 42000),
            vec![TcpSock { inode: 91234, uid: 65534, state: 0x0A }]
        );
        let v6 = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:A410 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5555 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_tcp(v6, 42000), vec![TcpSock { inode: 5555, uid: 1000, state: 0x0A }]);
        assert!(parse_tcp(v6, 42001).is_empty());
    }

    #[test]
    fn status_uid_is_the_real_one() {
        let s = "Name:\tsocat\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\n";
        assert_eq!(parse_status_uid(s), Some(65534));
        assert_eq!(parse_status_uid("Name: x\n"), None);
    }

    #[test]
    fn a_holder_reads_as_a_user_would_want_it() {
        let h = Holder { uid: Some(65534), pid: Some(77), comm: Some("socat".into()) };
        assert_eq!(h.to_string(), "uid 65534 (pid 77, `socat`)");
        assert_eq!(Holder { uid: None, pid: None, comm: None }.to_string(), "an unknown user");
        // Our own process, found through procfs.
        let me = Holder::of_pid(i32::try_from(std::process::id()).unwrap());
        // SAFETY: getuid has no preconditions.
        assert_eq!(me.uid, Some(unsafe { libc::getuid() }));
        assert!(me.comm.is_some());
    }
}
