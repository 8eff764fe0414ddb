//! The XDP gate on the uplink (SPEC decision 8).
//!
//! An XDP program (udp-encap-tun-ebpf, embedded in this binary at build time)
//! sees every IPv4 UDP datagram for the listen port before the socket does.
//! It drops what cannot carry a TCP segment and, with enforcement on, what
//! comes from a (saddr, sport) that has no entry in the `UET_PEERS` hash map.
//! [`XdpGate`] loads and attaches it, keeps that map in step with the
//! `connection_store` ([`XdpGate::allow`] / [`XdpGate::revoke`]) and reads
//! its per-CPU counters.
//!
//! Maps are pinned under [`PIN_ROOT`]`/<netns inode>-<interface>-<port>/`
//! (`peers`, `config`, `counters`), so `bpftool map dump pinned ...` shows
//! the live entries (layouts: docs/xdp.md). The netns inode keeps instances
//! in different namespaces apart although they share the host's bpffs (tests
//! run the daemon with `nsenter --net`, which keeps /sys/fs/bpf visible).
//!
//! Clean stop and kill -9: the program is attached through a bpf_link (Linux
//! 5.9+), which the kernel detaches when the last fd closes, i.e. when the
//! process dies however it dies. Pins do outlive the process, so [`attach`]
//! removes whatever a previous run left at its own pin path, and `Drop`
//! removes this run's pins.
//!
//! [`attach`]: XdpGate::attach

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use udp_encap_tun_common::{
    Config, L2_ETHERNET, L2_NONE, MAP_CONFIG, MAP_COUNTERS, MAP_PEERS, PEER_ALLOWED, PROG_NAME,
    PeerKey, PeerValue, counter,
};

use crate::cli::XdpMode;

/// The object `cargo xtask build-ebpf` built, copied by build.rs.
static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp-encap-tun.bpf.o"));

/// Where the bpf filesystem is expected.
pub const BPF_FS: &str = "/sys/fs/bpf";
/// Every instance pins below this directory.
pub const PIN_ROOT: &str = "/sys/fs/bpf/udp-encap-tun";
/// `statfs.f_type` of a bpf filesystem (linux/magic.h).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// File names of the pins inside an instance's pin directory.
pub const PIN_PEERS: &str = "peers";
pub const PIN_CONFIG: &str = "config";
pub const PIN_COUNTERS: &str = "counters";

/// `BPF_NOEXIST`: insert only if the key is absent (never overwrite).
const BPF_NOEXIST: u64 = 1;

/// ARPHRD_* link types (linux/if_arp.h) the program knows how to parse.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_NONE: u16 = 0xfffe;

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "the XDP peer map is full ({capacity} entries): peer {peer} refused; raise --xdp-map-size"
    )]
    MapFull { peer: SocketAddrV4, capacity: u32 },
    #[error("--xdp-mode off: there is no gate to attach (the caller should not have asked)")]
    ModeOff,
    #[error(
        "interface `{name}` does not exist in this network namespace: check --bind-to-interface"
    )]
    NoInterface { name: String },
    #[error(
        "interface `{name}` has link type {arphrd}, which the XDP gate cannot parse \
         (it knows Ethernet and raw IP); run with --xdp-mode off"
    )]
    UnsupportedLink { name: String, arphrd: u16 },
    #[error("cannot inspect interface `{name}`")]
    Interface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a bpf filesystem and mounting one failed; mount it with \
         `mount -t bpf bpf /sys/fs/bpf` (needs root / CAP_SYS_ADMIN) or run with --xdp-mode off"
    )]
    BpfFs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read this process's network namespace ({path})")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "loading the XDP program failed: run as root (or with CAP_BPF and CAP_NET_ADMIN) on a \
         kernel with BPF and BTF, or run with --xdp-mode off"
    )]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the XDP program failed to load into the kernel (verifier log in the cause)")]
    Program(#[source] Box<ProgramError>),
    #[error("the embedded XDP object lacks {what}: rebuild it with `cargo xtask build-ebpf`")]
    Object { what: &'static str },
    #[error(
        "attaching the XDP program to `{interface}` in {mode} mode failed{hint}; \
         another XDP program may be attached (`ip -d link show dev {interface}`, \
         `bpftool net show dev {interface}`): try --xdp-mode generic or --xdp-mode off"
    )]
    Attach {
        interface: String,
        mode: &'static str,
        hint: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot pin the XDP map at {path}: is {BPF_FS} a writable bpf filesystem?")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("cannot manage the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("XDP map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("running the XDP program on a test frame failed")]
    TestRun(#[source] Box<ProgramError>),
}

/// The loaded and attached gate. Dropping it detaches the program and removes
/// the pins.
pub struct XdpGate {
    // Field order matters for Drop: the maps' fds close before `ebpf`'s.
    peers: HashMap<MapData, PeerKey, PeerValue>,
    config_map: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    config: Config,
    mode: &'static str,
    interface: String,
    pin_dir: PathBuf,
    capacity: u32,
    /// Entries this gate inserted and has not removed (the map's occupancy).
    entries: u64,
    /// New peers refused because the map was full.
    map_full: u64,
}

impl std::fmt::Debug for XdpGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpGate")
            .field("interface", &self.interface)
            .field("mode", &self.mode)
            .field("pin_dir", &self.pin_dir)
            .field("config", &self.config)
            .field("capacity", &self.capacity)
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl XdpGate {
    /// Load, pin maps, attach. mode: `Auto` (native where the driver supports
    /// it, generic otherwise), `Native` or `Generic`; never `Off` (the caller
    /// skips the gate). Logs which mode attached.
    pub fn attach(
        uplink: &str,
        listen_port: u16,
        map_size: u32,
        mode: XdpMode,
        enforce: bool,
    ) -> Result<XdpGate, XdpError> {
        if mode == XdpMode::Off {
            return Err(XdpError::ModeOff);
        }
        let ifindex = if_index(uplink)?;
        let arphrd = link_type(uplink)?;
        let l2_len = l2_len_for(arphrd).ok_or_else(|| XdpError::UnsupportedLink {
            name: uplink.to_string(),
            arphrd,
        })?;
        let pin_dir = pin_dir_for(netns_inode()?, uplink, listen_port);
        ensure_bpffs()?;
        raise_memlock();

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_PEERS, map_size)
            .load(OBJECT)
            .map_err(|e| XdpError::Load(Box::new(e)))?;
        // Configured before it is attached: the program never runs with a
        // half-written config (a zeroed one passes everything anyway).
        let config = config_for(listen_port, enforce, l2_len);
        {
            let map = ebpf
                .map_mut(MAP_CONFIG)
                .ok_or(XdpError::Object { what: MAP_CONFIG })?;
            let mut config_map: Array<&mut MapData, Config> =
                Array::try_from(map).map_err(|source| XdpError::Map {
                    map: MAP_CONFIG,
                    op: "open",
                    source: Box::new(source),
                })?;
            config_map
                .set(0, config, 0)
                .map_err(|source| XdpError::Map {
                    map: MAP_CONFIG,
                    op: "write",
                    source: Box::new(source),
                })?;
        }

        let program: &mut Xdp = ebpf
            .program_mut(PROG_NAME)
            .ok_or(XdpError::Object {
                what: "the udp_encap_tun program",
            })?
            .try_into()
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        program.load().map_err(|e| XdpError::Program(Box::new(e)))?;
        let (link, mode_name) = attach_program(program, uplink, ifindex, mode)?;

        // Attached, so no other live gate owns this interface (the kernel
        // allows one XDP program per interface): whatever sits at our pin
        // path is left over from a run that died (kill -9). If pinning fails
        // below, `ebpf` drops and detaches the program again.
        remove_pins(&pin_dir);
        create_pin_dir(&pin_dir)?;
        let pinned = (|| {
            let peers: HashMap<MapData, PeerKey, PeerValue> =
                take_pinned(&mut ebpf, MAP_PEERS, &pin_dir.join(PIN_PEERS))?;
            let config_map: Array<MapData, Config> =
                take_pinned(&mut ebpf, MAP_CONFIG, &pin_dir.join(PIN_CONFIG))?;
            let counters: PerCpuArray<MapData, u64> =
                take_pinned(&mut ebpf, MAP_COUNTERS, &pin_dir.join(PIN_COUNTERS))?;
            Ok((peers, config_map, counters))
        })();
        let (peers, config_map, counters) = match pinned {
            Ok(maps) => maps,
            Err(e) => {
                remove_pins(&pin_dir);
                return Err(e);
            }
        };
        let gate = XdpGate {
            peers,
            config_map,
            counters,
            ebpf,
            link: Some(link),
            config,
            mode: mode_name,
            interface: uplink.to_string(),
            pin_dir,
            capacity: map_size,
            entries: 0,
            map_full: 0,
        };
        log::info!(
            "XDP gate attached to {uplink} in {mode_name} mode (port {listen_port}, enforcement {}, \
             map size {map_size}, pins in {})",
            if enforce { "on" } else { "off" },
            gate.pin_dir.display()
        );
        Ok(gate)
    }

    /// `"native"` or `"generic"`: how the program is attached.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// This instance's pin directory, `PIN_ROOT/<netns inode>-<iface>-<port>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Lets datagrams from `peer` through. Idempotent. A full map refuses a
    /// new peer with [`XdpError::MapFull`] (counted, logged at most once a
    /// second); no entry is ever evicted to make room.
    pub fn allow(&mut self, peer: SocketAddrV4) -> Result<(), XdpError> {
        let key = peer_key(peer);
        let value = PeerValue {
            flags: PEER_ALLOWED,
        };
        match self.peers.insert(key, value, BPF_NOEXIST) {
            Ok(()) => {
                self.entries = self.entries.saturating_add(1);
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            // The kernel's answer for a full hash map (prealloc or not).
            Err(e) if errno(&e) == Some(libc::E2BIG) => {
                self.map_full = self.map_full.saturating_add(1);
                // Spoofed sources can ask for a new entry per datagram
                // (version 1): bounded, like every line a remote can trigger.
                crate::bounded_log!(
                    log::Level::Warn,
                    1,
                    std::time::Instant::now(),
                    "XDP peer map full ({} entries): refusing {peer}; raise --xdp-map-size",
                    self.capacity
                );
                Err(XdpError::MapFull {
                    peer,
                    capacity: self.capacity,
                })
            }
            Err(source) => Err(XdpError::Map {
                map: MAP_PEERS,
                op: "insert",
                source: Box::new(source),
            }),
        }
    }

    /// Stops letting datagrams from `peer` through. Absent is fine.
    pub fn revoke(&mut self, peer: SocketAddrV4) -> Result<(), XdpError> {
        match self.peers.remove(&peer_key(peer)) {
            Ok(()) => {
                self.entries = self.entries.saturating_sub(1);
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(XdpError::Map {
                map: MAP_PEERS,
                op: "delete",
                source: Box::new(source),
            }),
        }
    }

    /// Whether `peer` has an entry in the map (the kernel's view).
    pub fn contains(&self, peer: SocketAddrV4) -> Result<bool, XdpError> {
        match self.peers.get(&peer_key(peer), 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(source) => Err(XdpError::Map {
                map: MAP_PEERS,
                op: "lookup",
                source: Box::new(source),
            }),
        }
    }

    /// Every peer in the map (walks the whole map: for status and tests, not
    /// for the data path).
    pub fn peers(&self) -> Result<Vec<SocketAddrV4>, XdpError> {
        self.peers
            .keys()
            .map(|k| {
                k.map(|k| key_peer(&k)).map_err(|source| XdpError::Map {
                    map: MAP_PEERS,
                    op: "iterate",
                    source: Box::new(source),
                })
            })
            .collect()
    }

    /// Turns enforcement (drop unknown peers) on or off at run time.
    pub fn set_enforce(&mut self, on: bool) -> Result<(), XdpError> {
        let mut config = self.config;
        config.enforce = u8::from(on);
        self.config_map
            .set(0, config, 0)
            .map_err(|source| XdpError::Map {
                map: MAP_CONFIG,
                op: "write",
                source: Box::new(source),
            })?;
        self.config = config;
        Ok(())
    }

    /// The program's counters summed over CPUs, then `xdp_map_entries` (the
    /// map's occupancy) and `xdp_map_full` (peers refused for lack of room).
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, XdpError> {
        let mut out = Vec::with_capacity(counter::NAMES.len() + 2);
        for (index, name) in (0u32..).zip(counter::NAMES) {
            let per_cpu = self
                .counters
                .get(&index, 0)
                .map_err(|source| XdpError::Map {
                    map: MAP_COUNTERS,
                    op: "read",
                    source: Box::new(source),
                })?;
            out.push((name, per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v))));
        }
        out.push(("xdp_map_entries", self.entries));
        out.push(("xdp_map_full", self.map_full));
        Ok(out)
    }

    /// Runs the attached program once on `frame` (BPF_PROG_TEST_RUN) and
    /// returns its XDP action (`XDP_DROP` = 1, `XDP_PASS` = 2). Counters
    /// count the run like a real packet. For tests and diagnostics.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, XdpError> {
        let program: &Xdp = self
            .ebpf
            .program(PROG_NAME)
            .ok_or(XdpError::Object {
                what: "the udp_encap_tun program",
            })?
            .try_into()
            .map_err(|e| XdpError::Program(Box::new(e)))?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        program
            .test_run(opts)
            .map(|r| r.return_value)
            .map_err(|e| XdpError::TestRun(Box::new(e)))
    }
}

impl Drop for XdpGate {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            let detached = self
                .ebpf
                .program_mut(PROG_NAME)
                .and_then(|p| <&mut Xdp>::try_from(p).ok())
                .map(|p| p.detach(link));
            match detached {
                Some(Ok(())) => log::info!("XDP gate detached from {}", self.interface),
                // The link fd closes with `ebpf` anyway, which detaches too.
                Some(Err(e)) => log::warn!("detaching the XDP gate from {}: {e}", self.interface),
                None => {}
            }
        }
        remove_pins(&self.pin_dir);
        // The shared root goes when the last instance leaves; busy is fine.
        let _ = fs::remove_dir(PIN_ROOT);
    }
}

/// Creates `dir` and its parents. Retried: another instance that stops at
/// this moment removes the shared root when it looks empty, which can fall
/// between our creating the root and creating `dir` in it.
fn create_pin_dir(dir: &Path) -> Result<(), XdpError> {
    let mut attempt = 0;
    loop {
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 => attempt += 1,
            Err(source) => {
                return Err(XdpError::PinDir {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Removes the pins of one instance directory and the directory itself;
/// logs what it cannot remove. Only the names this module pins are touched.
fn remove_pins(dir: &Path) {
    for name in [PIN_PEERS, PIN_CONFIG, PIN_COUNTERS] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove pin {}: {e}", path.display()),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove pin directory {}: {e}", dir.display()),
    }
}

fn attach_program(
    program: &mut Xdp,
    uplink: &str,
    ifindex: u32,
    mode: XdpMode,
) -> Result<(XdpLinkId, &'static str), XdpError> {
    use aya::programs::XdpMode as Kernel;
    let err = |mode: &'static str, hint: String, source| XdpError::Attach {
        interface: uplink.to_string(),
        mode,
        hint,
        source: Box::new(source),
    };
    match mode {
        XdpMode::Native => program
            .attach_to_if_index(ifindex, Kernel::Driver)
            .map(|l| (l, "native"))
            .map_err(|e| {
                err(
                    "native",
                    " (does the driver support native XDP? --xdp-mode generic works everywhere)"
                        .into(),
                    e,
                )
            }),
        XdpMode::Generic => program
            .attach_to_if_index(ifindex, Kernel::Skb)
            .map(|l| (l, "generic"))
            .map_err(|e| err("generic", String::new(), e)),
        // Native XDP on a veth makes the kernel take GSO away from its peer
        // (veth_fix_features), so every UDP GSO train crosses as single
        // datagrams and the receiving GRO has nothing to merge: measured,
        // 0.7 Gbit/s native against 3.8 generic. Generic XDP runs once per
        // train, whose datagrams share one (saddr, sport): the same verdict.
        XdpMode::Auto if crate::edge::netdev::driver(uplink).is_ok_and(|d| d == "veth") => {
            log::info!(
                "{uplink} is a veth: generic XDP, because native XDP on a veth disables \
                 GSO on its peer and costs the tunnel its batching (--xdp-mode native forces it)"
            );
            attach_program(program, uplink, ifindex, XdpMode::Generic)
        }
        XdpMode::Auto => match program.attach_to_if_index(ifindex, Kernel::Driver) {
            Ok(l) => Ok((l, "native")),
            Err(native) => {
                log::info!("native XDP not available on {uplink} ({native}); trying generic mode");
                program
                    .attach_to_if_index(ifindex, Kernel::Skb)
                    .map(|l| (l, "generic"))
                    .map_err(|e| {
                        err(
                            "generic",
                            format!(" (native mode failed first: {native})"),
                            e,
                        )
                    })
            }
        },
        XdpMode::Off => Err(XdpError::ModeOff),
    }
}

/// Takes map `name` out of `ebpf`, pins it at `path` and types it.
fn take_pinned<M>(ebpf: &mut Ebpf, name: &'static str, path: &Path) -> Result<M, XdpError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(XdpError::Object { what: name })?;
    map.pin(path).map_err(|source| XdpError::Pin {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    M::try_from(map).map_err(|source| XdpError::Map {
        map: name,
        op: "open",
        source: Box::new(source),
    })
}

/// The errno behind a map syscall failure, if that is what it is.
fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

// ---------------------------------------------------------------- pure helpers

/// The map key of `peer`: address and port as on the wire.
pub fn peer_key(peer: SocketAddrV4) -> PeerKey {
    PeerKey::new(peer.ip().octets(), peer.port().to_be_bytes())
}

/// The peer a map key stands for (the padding is ignored).
pub fn key_peer(key: &PeerKey) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(key.addr), u16::from_be_bytes(key.port))
}

/// The config record for the program.
pub fn config_for(listen_port: u16, enforce: bool, l2_len: u8) -> Config {
    Config {
        listen_port: listen_port.to_be_bytes(),
        enforce: u8::from(enforce),
        l2_len,
    }
}

/// Bytes in front of the IPv4 header for an ARPHRD_* link type, or `None`
/// when the program cannot parse that link.
pub fn l2_len_for(arphrd: u16) -> Option<u8> {
    match arphrd {
        // Loopback frames carry a (zeroed) Ethernet header too.
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(L2_ETHERNET),
        // tun, and wwan modems in raw-ip mode.
        ARPHRD_NONE | ARPHRD_RAWIP => Some(L2_NONE),
        _ => None,
    }
}

/// `PIN_ROOT/<netns inode>-<interface>-<port>`: unique per namespace,
/// interface and port, so two instances never share a pin.
pub fn pin_dir_for(netns_inode: u64, interface: &str, port: u16) -> PathBuf {
    Path::new(PIN_ROOT).join(format!("{netns_inode}-{interface}-{port}"))
}

// ---------------------------------------------------------------- system

/// The inode of the calling thread's network namespace. `thread-self`, not
/// `self`: a thread may have entered another namespace (setns) than the
/// process's first thread.
fn netns_inode() -> Result<u64, XdpError> {
    let path = Path::new("/proc/thread-self/ns/net");
    let path = if path.exists() {
        path
    } else {
        Path::new("/proc/self/ns/net")
    };
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| XdpError::Netns {
            path: path.to_path_buf(),
            source,
        })
}

fn if_index(name: &str) -> Result<u32, XdpError> {
    let c = CString::new(name).map_err(|_| XdpError::NoInterface {
        name: name.to_string(),
    })?;
    // SAFETY: a valid NUL-terminated string; no other preconditions.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(XdpError::NoInterface {
            name: name.to_string(),
        });
    }
    Ok(index)
}

/// The ARPHRD_* type of an interface, asked from the kernel through a socket
/// of the current namespace (SIOCGIFHWADDR). /sys/class/net would show the
/// namespace sysfs was mounted in, not ours, under `nsenter --net`.
fn link_type(name: &str) -> Result<u16, XdpError> {
    let io_err = |source| XdpError::Interface {
        name: name.to_string(),
        source,
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return Err(XdpError::NoInterface {
            name: name.to_string(),
        });
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads ifr_name and writes ifr_hwaddr inside the
    // ifreq we pass; fd stays open for the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut ifr,
        )
    };
    if r < 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Makes sure /sys/fs/bpf is a bpf filesystem, mounting one if it is not.
fn ensure_bpffs() -> Result<(), XdpError> {
    let err = |source| XdpError::BpfFs {
        path: PathBuf::from(BPF_FS),
        source,
    };
    if is_bpffs(Path::new(BPF_FS)) {
        return Ok(());
    }
    fs::create_dir_all(BPF_FS).map_err(err)?;
    let c = |s: &str| CString::new(s).map_err(|_| err(io::ErrorKind::InvalidInput.into()));
    let (src, target, fstype, data) = (c("bpf")?, c(BPF_FS)?, c("bpf")?, c("mode=0700")?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    log::info!("mounted a bpf filesystem at {BPF_FS}");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path string and a valid out pointer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as u64;
    r == 0 && magic == BPF_FS_MAGIC
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best
/// effort: newer kernels ignore it, and a failure shows up at load).
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if r != 0 {
        log::debug!("cannot lift RLIMIT_MEMLOCK: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_wire_order_with_zero_padding() {
        let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 12345);
        let key = peer_key(peer);
        assert_eq!(key.addr, [198, 18, 0, 1]);
        assert_eq!(key.port, [0x30, 0x39]);
        assert_eq!(key.pad, [0, 0]);
        // The bytes as `bpftool map dump` prints them.
        // SAFETY: PeerKey is repr(C), 8 bytes, no implicit padding.
        let raw: [u8; 8] = unsafe { std::mem::transmute(key) };
        assert_eq!(raw, [0xc6, 0x12, 0x00, 0x01, 0x30, 0x39, 0x00, 0x00]);
        assert_eq!(key_peer(&key), peer);
    }

    #[test]
    fn config_port_is_network_order() {
        let c = config_for(12345, true, L2_ETHERNET);
        // SAFETY: Config is repr(C), 4 bytes, no implicit padding.
        let raw: [u8; 4] = unsafe { std::mem::transmute(c) };
        assert_eq!(raw, [0x30, 0x39, 1, 14]);
        assert_eq!(config_for(1, false, L2_NONE).enforce, 0);
    }

    #[test]
    fn link_types() {
        assert_eq!(l2_len_for(ARPHRD_ETHER), Some(14));
        assert_eq!(l2_len_for(ARPHRD_LOOPBACK), Some(14));
        assert_eq!(l2_len_for(ARPHRD_NONE), Some(0));
        assert_eq!(l2_len_for(ARPHRD_RAWIP), Some(0));
        assert_eq!(l2_len_for(768), None); // ARPHRD_TUNNEL (ipip)
    }

    #[test]
    fn pin_dirs_differ_by_namespace_interface_and_port() {
        let a = pin_dir_for(4026531840, "eth0", 12345);
        assert_eq!(
            a,
            Path::new("/sys/fs/bpf/udp-encap-tun/4026531840-eth0-12345")
        );
        assert_ne!(a, pin_dir_for(4026531841, "eth0", 12345));
        assert_ne!(a, pin_dir_for(4026531840, "eth1", 12345));
        assert_ne!(a, pin_dir_for(4026531840, "eth0", 12346));
    }

    #[test]
    fn counter_names_are_unique_and_prefixed() {
        let names = counter::NAMES;
        for (i, a) in names.iter().enumerate() {
            assert!(a.starts_with("xdp_"), "{a}");
            assert!(!names.iter().skip(i + 1).any(|b| b == a), "{a} twice");
        }
    }
}
