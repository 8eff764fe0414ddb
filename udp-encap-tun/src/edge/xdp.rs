//! The packet gate on the uplink (SPEC decision 8): an XDP program, or the
//! same program logic as a TC classifier where XDP cannot attach.
//!
//! The eBPF object (udp-encap-tun-ebpf, embedded in this binary at build
//! time) sees every UDP datagram (IPv4 or IPv6, untagged or priority-tagged)
//! for the listen port before the socket does. For those addressed to this
//! host (forwarded traffic passes untouched) it drops what cannot carry a TCP
//! segment or a control datagram and, with enforcement on, what comes from a
//! (saddr, sport) that has no entry in the `UET_PEERS` hash map (a control
//! datagram also passes when its session id is in `UET_SESSIONS`).
//! [`XdpGate`] loads and attaches it, keeps those maps in step with the
//! `connection_store` ([`XdpGate::allow`] / [`XdpGate::revoke`],
//! [`XdpGate::allow_session`] / [`XdpGate::revoke_session`]) and reads its
//! per-CPU counters.
//!
//! Maps are pinned under [`PIN_ROOT`]`/<netns inode>-<interface>-<port>/`
//! (`peers`, `sessions`, `config`, `counters`), so `bpftool map dump pinned
//! ...` shows the live entries (layouts: docs/xdp.md). The netns inode keeps
//! instances in different namespaces apart although they share the host's
//! bpffs (tests run the daemon with `nsenter --net`, which keeps /sys/fs/bpf
//! visible).
//!
//! Clean stop and kill -9: XDP attaches through a bpf_link (Linux 5.9+) and
//! TC through a TCX link (6.6+), which the kernel detaches when the last fd
//! closes, i.e. when the process dies however it dies. Before 6.6 a TC
//! classifier attaches through netlink and outlives a killed process; it
//! sits at a priority and handle derived from the port, so the next start
//! replaces it, and its config map is still pinned, so [`attach`] first
//! disarms it (a zeroed config passes everything) before it removes whatever
//! a previous run left at its own pin path. `Drop` removes this run's pins.
//!
//! [`attach`]: XdpGate::attach

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
    tc::SchedClassifierLinkId,
};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use udp_encap_tun_common::{
    Config, L2_ETHERNET, L2_NONE, MAP_CONFIG, MAP_COUNTERS, MAP_PEERS, MAP_SESSIONS, PEER_ALLOWED,
    PROG_NAME, PeerKey, PeerValue, SessionKey, SessionValue, TC_PROG_NAME, V4_MAPPED_PREFIX,
    counter,
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
pub const PIN_SESSIONS: &str = "sessions";
pub const PIN_CONFIG: &str = "config";
pub const PIN_COUNTERS: &str = "counters";
const PINS: [&str; 4] = [PIN_PEERS, PIN_SESSIONS, PIN_CONFIG, PIN_COUNTERS];

/// Priority of the TC classifier when it attaches through netlink (kernels
/// before 6.6, without TCX); its handle is the listen port, so a classifier
/// a killed run left behind is the one the next start replaces.
pub const TC_PRIORITY: u16 = 0xc0de;

/// `BPF_NOEXIST`: insert only if the key is absent (never overwrite).
const BPF_NOEXIST: u64 = 1;

/// ARPHRD_* link types (linux/if_arp.h) the program knows how to parse.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_NONE: u16 = 0xfffe;

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "the XDP peer map is full ({capacity} entries): peer {peer} refused; raise --xdp-map-size"
    )]
    MapFull { peer: SocketAddr, capacity: u32 },
    #[error(
        "the XDP session map is full ({capacity} entries): a new session refused; raise --xdp-map-size"
    )]
    SessionMapFull { capacity: u32 },
    #[error("--xdp-mode off: there is no gate to attach (the caller should not have asked)")]
    ModeOff,
    #[error(
        "interface `{name}` does not exist in this network namespace: check --bind-to-interface"
    )]
    NoInterface { name: String },
    #[error(
        "interface `{name}` has link type {arphrd}, which the XDP gate cannot parse \
         (it knows Ethernet, raw IP and PPP); run with --xdp-mode off"
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
    #[error("the {what} program failed to load into the kernel (verifier log in the cause)")]
    Program {
        what: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
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
    #[error(
        "attaching the TC classifier to `{interface}` (clsact ingress) failed: \
         `tc filter show dev {interface} ingress` shows what is there; try --xdp-mode off"
    )]
    TcAttach {
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "cannot add the clsact qdisc to `{interface}` for the TC classifier; try --xdp-mode off"
    )]
    Clsact {
        interface: String,
        #[source]
        source: Box<TcError>,
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
    #[error("running the gate program on a test frame failed")]
    TestRun(#[source] Box<ProgramError>),
}

/// How the program sits on the uplink.
enum Attachment {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// The loaded and attached gate. Dropping it detaches the program and removes
/// the pins.
pub struct XdpGate {
    // Field order matters for Drop: the maps' fds close before `ebpf`'s.
    peers: HashMap<MapData, PeerKey, PeerValue>,
    sessions: HashMap<MapData, SessionKey, SessionValue>,
    config_map: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    ebpf: Ebpf,
    link: Option<Attachment>,
    config: Config,
    mode: &'static str,
    interface: String,
    ifindex: u32,
    pin_dir: PathBuf,
    capacity: u32,
    /// Entries this gate inserted and has not removed (the map's occupancy).
    entries: u64,
    /// New peers (or sessions) refused because their map was full.
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
    /// Load, pin maps, attach. mode: `Auto` (native XDP where the driver
    /// supports it, generic XDP otherwise, a TC classifier where XDP cannot
    /// attach at all), `Native`, `Generic` or `Tc`; never `Off` (the caller
    /// skips the gate). Logs which one attached.
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
            .map_max_entries(MAP_SESSIONS, map_size)
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

        let (link, mode_name) = attach_program(&mut ebpf, uplink, ifindex, listen_port, mode)?;
        // A gate a killed run left behind (a netlink TC classifier outlives
        // its process before Linux 6.6) still reads the config pinned at our
        // path: zero it, so that gate passes everything from now on. Only
        // now: had another live gate held this interface and port, ours
        // could not have attached.
        disarm_stale(&pin_dir);

        // Attached, so no other live gate owns this interface and port (the
        // UDP port is bound before the gate, and the kernel allows one XDP
        // program per interface): whatever sits at our pin path is left over
        // from a run that died (kill -9). If pinning fails below, `ebpf`
        // drops and detaches the program again.
        remove_pins(&pin_dir);
        create_pin_dir(&pin_dir)?;
        let pinned = (|| {
            let peers: HashMap<MapData, PeerKey, PeerValue> =
                take_pinned(&mut ebpf, MAP_PEERS, &pin_dir.join(PIN_PEERS))?;
            let sessions: HashMap<MapData, SessionKey, SessionValue> =
                take_pinned(&mut ebpf, MAP_SESSIONS, &pin_dir.join(PIN_SESSIONS))?;
            let config_map: Array<MapData, Config> =
                take_pinned(&mut ebpf, MAP_CONFIG, &pin_dir.join(PIN_CONFIG))?;
            let counters: PerCpuArray<MapData, u64> =
                take_pinned(&mut ebpf, MAP_COUNTERS, &pin_dir.join(PIN_COUNTERS))?;
            Ok((peers, sessions, config_map, counters))
        })();
        let (peers, sessions, config_map, counters) = match pinned {
            Ok(maps) => maps,
            Err(e) => {
                remove_pins(&pin_dir);
                return Err(e);
            }
        };
        let gate = XdpGate {
            peers,
            sessions,
            config_map,
            counters,
            ebpf,
            link: Some(link),
            config,
            mode: mode_name,
            interface: uplink.to_string(),
            ifindex,
            pin_dir,
            capacity: map_size,
            entries: 0,
            map_full: 0,
        };
        let how = if mode_name == "tc" {
            "as a TC classifier (clsact ingress)".to_string()
        } else {
            format!("in {mode_name} mode")
        };
        log::info!(
            "XDP gate attached to {uplink} {how} (port {listen_port}, enforcement {}, map size \
             {map_size}, pins in {})",
            if enforce { "on" } else { "off" },
            gate.pin_dir.display()
        );
        Ok(gate)
    }

    /// `"native"` or `"generic"` (XDP), or `"tc"` (the TC classifier): how
    /// the gate is attached.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// The kernel's id of the attached program (`bpftool prog show id N`).
    pub fn program_id(&self) -> Option<u32> {
        let name = if self.mode == "tc" {
            TC_PROG_NAME
        } else {
            PROG_NAME
        };
        self.ebpf.program(name)?.info().ok().map(|i| i.id())
    }

    /// This instance's pin directory, `PIN_ROOT/<netns inode>-<iface>-<port>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Lets datagrams from `peer` through. Idempotent. A full map refuses a
    /// new peer with [`XdpError::MapFull`] (counted, logged at most once a
    /// second); no entry is ever evicted to make room.
    pub fn allow(&mut self, peer: SocketAddr) -> Result<(), XdpError> {
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
                    peer: canonical(peer),
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
    pub fn revoke(&mut self, peer: SocketAddr) -> Result<(), XdpError> {
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
    pub fn contains(&self, peer: SocketAddr) -> Result<bool, XdpError> {
        lookup(&self.peers, &peer_key(peer), MAP_PEERS)
    }

    /// Every peer in the map (walks the whole map: for status and tests, not
    /// for the data path). IPv4 peers come back as `SocketAddr::V4`.
    pub fn peers(&self) -> Result<Vec<SocketAddr>, XdpError> {
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

    /// Lets control datagrams naming session `id` (its 8 wire bytes) through
    /// from any source: a client whose address or port changed proves its
    /// session with them. Idempotent; a full map refuses a new id
    /// ([`XdpError::SessionMapFull`], counted under `xdp_map_full`).
    pub fn allow_session(&mut self, id: [u8; 8]) -> Result<(), XdpError> {
        let value = SessionValue {
            flags: PEER_ALLOWED,
        };
        match self.sessions.insert(SessionKey { id }, value, BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) if errno(&e) == Some(libc::E2BIG) => {
                self.map_full = self.map_full.saturating_add(1);
                Err(XdpError::SessionMapFull {
                    capacity: self.capacity,
                })
            }
            Err(source) => Err(XdpError::Map {
                map: MAP_SESSIONS,
                op: "insert",
                source: Box::new(source),
            }),
        }
    }

    /// Stops letting control datagrams of session `id` through from unknown
    /// sources. Absent is fine.
    pub fn revoke_session(&mut self, id: [u8; 8]) -> Result<(), XdpError> {
        match self.sessions.remove(&SessionKey { id }) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(XdpError::Map {
                map: MAP_SESSIONS,
                op: "delete",
                source: Box::new(source),
            }),
        }
    }

    /// Whether session `id` is in the session map (the kernel's view).
    pub fn contains_session(&self, id: [u8; 8]) -> Result<bool, XdpError> {
        lookup(&self.sessions, &SessionKey { id }, MAP_SESSIONS)
    }

    /// Every session id in the map (walks the whole map).
    pub fn sessions(&self) -> Result<Vec<[u8; 8]>, XdpError> {
        self.sessions
            .keys()
            .map(|k| {
                k.map(|k| k.id).map_err(|source| XdpError::Map {
                    map: MAP_SESSIONS,
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

    /// Runs the attached program once on `frame` (BPF_PROG_TEST_RUN), as if
    /// it had arrived on the uplink (its ifindex in the context: the FIB
    /// lookup sees the uplink's routes and forwarding setting), and returns
    /// its verdict as an XDP action (`XDP_DROP` = 1, `XDP_PASS` = 2; the TC
    /// classifier's are mapped onto these). Counters count the run like a
    /// real packet. For tests and diagnostics.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, XdpError> {
        self.test_run_repeat(frame, 1).map(|(v, _)| v)
    }

    /// [`XdpGate::test_run`] `repeat` times; also returns the kernel's
    /// average time per run (a measurement of the program's own cost).
    pub fn test_run_repeat(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, std::time::Duration), XdpError> {
        let run_err = |e| XdpError::TestRun(Box::new(e));
        if self.mode == "tc" {
            let program: &SchedClassifier = self
                .ebpf
                .program(TC_PROG_NAME)
                .ok_or(XdpError::Object {
                    what: "the udp_encap_tc program",
                })?
                .try_into()
                .map_err(run_err)?;
            let ctx = skb_test_ctx(self.ifindex, frame.len());
            let opts = TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::new()
            };
            let r = program.test_run(opts).map_err(run_err)?;
            // TC_ACT_SHOT (2) drops; TC_ACT_UNSPEC (-1) and anything else
            // lets the packet go on.
            let verdict = if r.return_value == 2 {
                XDP_DROP
            } else {
                XDP_PASS
            };
            return Ok((verdict, r.duration));
        }
        let program: &Xdp = self
            .ebpf
            .program(PROG_NAME)
            .ok_or(XdpError::Object {
                what: "the udp_encap_tun program",
            })?
            .try_into()
            .map_err(run_err)?;
        let ctx = xdp_test_ctx(frame.len(), self.ifindex);
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::new()
        };
        let r = program.test_run(opts).map_err(run_err)?;
        Ok((r.return_value, r.duration))
    }
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// `struct xdp_md` for BPF_PROG_TEST_RUN: data 0, data_end `len`,
/// data_meta 0, ingress_ifindex, rx_queue_index 0, egress_ifindex 0.
fn xdp_test_ctx(len: usize, ifindex: u32) -> Vec<u8> {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    [0, len, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// The start of `struct __sk_buff` for BPF_PROG_TEST_RUN, up to and with
/// `wire_len` (offset 160): `ifindex` (offset 40) names the device the skb
/// comes in on, `wire_len` its length on the wire (some kernels refuse one
/// shorter than the data). The kernel zeroes the rest.
fn skb_test_ctx(ifindex: u32, len: usize) -> Vec<u8> {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let mut ctx = vec![0u8; 164];
    if let Some(w) = ctx.get_mut(40..44) {
        w.copy_from_slice(&ifindex.to_ne_bytes());
    }
    if let Some(w) = ctx.get_mut(160..164) {
        w.copy_from_slice(&len.to_ne_bytes());
    }
    ctx
}

fn lookup<K: aya::Pod>(
    map: &HashMap<MapData, K, PeerValue>,
    key: &K,
    name: &'static str,
) -> Result<bool, XdpError> {
    match map.get(key, 0) {
        Ok(_) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
        Err(source) => Err(XdpError::Map {
            map: name,
            op: "lookup",
            source: Box::new(source),
        }),
    }
}

impl Drop for XdpGate {
    fn drop(&mut self) {
        let detached = match self.link.take() {
            Some(Attachment::Xdp(link)) => self
                .ebpf
                .program_mut(PROG_NAME)
                .and_then(|p| <&mut Xdp>::try_from(p).ok())
                .map(|p| p.detach(link).map_err(|e| e.to_string())),
            Some(Attachment::Tc(link)) => self
                .ebpf
                .program_mut(TC_PROG_NAME)
                .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
                .map(|p| p.detach(link).map_err(|e| e.to_string())),
            None => None,
        };
        match detached {
            Some(Ok(())) => log::info!("XDP gate detached from {}", self.interface),
            // The link fd closes with `ebpf` anyway, which detaches too.
            Some(Err(e)) => log::warn!("detaching the XDP gate from {}: {e}", self.interface),
            None => {}
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
    for name in PINS {
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

/// Zeroes the config a previous run pinned at `dir`, if there is one: a
/// program of that run still attached (a netlink TC classifier after kill
/// -9, before Linux 6.6) then passes everything instead of enforcing a map
/// nobody keeps in step any more.
fn disarm_stale(dir: &Path) {
    let path = dir.join(PIN_CONFIG);
    if !path.exists() {
        return;
    }
    let disarmed = MapData::from_pin(&path)
        .and_then(|m| Array::<MapData, Config>::try_from(Map::Array(m)))
        .and_then(|mut a| a.set(0, Config::default(), 0));
    match disarmed {
        Ok(()) => log::info!(
            "found the pins of a run that did not stop cleanly in {}: disarmed its gate, replacing them",
            dir.display()
        ),
        Err(e) => log::warn!(
            "cannot disarm the stale gate config {}: {e}",
            path.display()
        ),
    }
}

/// Loads the program `mode` asks for and attaches it. Auto: native XDP
/// (generic on a veth, see below), then generic XDP, then the TC classifier.
fn attach_program(
    ebpf: &mut Ebpf,
    uplink: &str,
    ifindex: u32,
    port: u16,
    mode: XdpMode,
) -> Result<(Attachment, &'static str), XdpError> {
    use aya::programs::XdpMode as Kernel;
    let err = |mode: &'static str, hint: String, source| XdpError::Attach {
        interface: uplink.to_string(),
        mode,
        hint,
        source: Box::new(source),
    };
    let xdp =
        |ebpf: &mut Ebpf, kernel: Kernel| -> Result<Result<XdpLinkId, ProgramError>, XdpError> {
            let program = xdp_program(ebpf)?;
            Ok(program.attach_to_if_index(ifindex, kernel))
        };
    match mode {
        XdpMode::Native => xdp(ebpf, Kernel::Driver)?
            .map(|l| (Attachment::Xdp(l), "native"))
            .map_err(|e| {
                err(
                    "native",
                    " (does the driver support native XDP? --xdp-mode generic works everywhere)"
                        .into(),
                    e,
                )
            }),
        XdpMode::Generic => xdp(ebpf, Kernel::Skb)?
            .map(|l| (Attachment::Xdp(l), "generic"))
            .map_err(|e| err("generic", String::new(), e)),
        XdpMode::Tc => attach_tc(ebpf, uplink, port).map(|l| (Attachment::Tc(l), "tc")),
        // Native XDP on a veth makes the kernel take GSO away from its peer
        // (veth_fix_features), so every UDP GSO train crosses as single
        // datagrams and the receiving GRO has nothing to merge: measured,
        // 0.7 Gbit/s native against 3.8 generic. Generic XDP runs once per
        // train, whose datagrams share one (saddr, sport): the same verdict.
        XdpMode::Auto => {
            let veth = crate::edge::netdev::driver(uplink).is_ok_and(|d| d == "veth");
            let native = if veth {
                log::info!(
                    "{uplink} is a veth: generic XDP, because native XDP on a veth disables \
                     GSO on its peer and costs the tunnel its batching (--xdp-mode native forces it)"
                );
                None
            } else {
                match xdp(ebpf, Kernel::Driver)? {
                    Ok(l) => return Ok((Attachment::Xdp(l), "native")),
                    Err(e) => {
                        log::info!(
                            "native XDP not available on {uplink} ({e}); trying generic mode"
                        );
                        Some(e)
                    }
                }
            };
            let generic = match xdp(ebpf, Kernel::Skb)? {
                Ok(l) => return Ok((Attachment::Xdp(l), "generic")),
                Err(e) => e,
            };
            // XDP refused (another XDP program holds the interface, or the
            // link takes none): the same gate as a TC classifier.
            log::info!(
                "XDP cannot attach to {uplink} ({generic}{}); trying the TC classifier",
                native.map(|n| format!("; native: {n}")).unwrap_or_default()
            );
            attach_tc(ebpf, uplink, port).map(|l| (Attachment::Tc(l), "tc"))
        }
        XdpMode::Off => Err(XdpError::ModeOff),
    }
}

/// The XDP program, loaded (verified) on first use.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let program_err = |e| XdpError::Program {
        what: "XDP",
        source: Box::new(e),
    };
    let program: &mut Xdp = ebpf
        .program_mut(PROG_NAME)
        .ok_or(XdpError::Object {
            what: "the udp_encap_tun program",
        })?
        .try_into()
        .map_err(program_err)?;
    if program.fd().is_err() {
        program.load().map_err(program_err)?;
    }
    Ok(program)
}

/// Loads the TC classifier and attaches it at clsact ingress: through TCX
/// (a link, gone with the process) from Linux 6.6, through netlink before,
/// at [`TC_PRIORITY`] with the port as its handle, replacing a classifier a
/// killed run of this instance left there.
fn attach_tc(ebpf: &mut Ebpf, uplink: &str, port: u16) -> Result<SchedClassifierLinkId, XdpError> {
    let program_err = |e| XdpError::Program {
        what: "TC",
        source: Box::new(e),
    };
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_PROG_NAME)
        .ok_or(XdpError::Object {
            what: "the udp_encap_tc program",
        })?
        .try_into()
        .map_err(program_err)?;
    program.load().map_err(program_err)?;
    let attach_err = |e| XdpError::TcAttach {
        interface: uplink.to_string(),
        source: Box::new(e),
    };
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if tcx {
        return program
            .attach_with_options(
                uplink,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(Default::default()),
            )
            .map_err(attach_err);
    }
    match aya::programs::tc::qdisc_add_clsact(uplink) {
        Ok(()) => {}
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(XdpError::Clsact {
                interface: uplink.to_string(),
                source: Box::new(e),
            });
        }
    }
    let handle = TcHandle::from(u32::from(port));
    let options = || {
        TcAttachOptions::Netlink(NlOptions {
            priority: TC_PRIORITY,
            handle,
            classid: None,
        })
    };
    match program.attach_with_options(uplink, TcAttachType::Ingress, options()) {
        Ok(link) => Ok(link),
        Err(first) => {
            // EEXIST: a classifier sits at our priority and handle. Only this
            // instance (its UDP port is bound) uses them: a killed run's.
            let stale = SchedClassifierLink::attached(
                uplink,
                TcAttachType::Ingress,
                TC_PRIORITY,
                handle,
                None,
            )
            .map_err(|e| attach_err(ProgramError::IOError(e)))?;
            match program.attach_to_link(stale) {
                Ok(link) => {
                    log::info!("replaced the TC classifier a previous run left on {uplink}");
                    Ok(link)
                }
                Err(_) => Err(attach_err(first)),
            }
        }
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

/// The map key of `peer`: address (IPv4 as IPv4-mapped IPv6) and port as on
/// the wire. An IPv4-mapped `SocketAddr::V6` (what a dual-stack socket
/// reports for an IPv4 peer) gives the same key as its `SocketAddr::V4`.
pub fn peer_key(peer: SocketAddr) -> PeerKey {
    let port = peer.port().to_be_bytes();
    match peer {
        SocketAddr::V4(a) => PeerKey::v4(a.ip().octets(), port),
        SocketAddr::V6(a) => PeerKey::new(a.ip().octets(), port),
    }
}

/// The peer a map key stands for (the padding is ignored): `V4` for an
/// IPv4-mapped address, `V6` (flow info and scope 0) otherwise.
pub fn key_peer(key: &PeerKey) -> SocketAddr {
    let port = u16::from_be_bytes(key.port);
    match key.addr.split_first_chunk::<12>() {
        Some((prefix, &[a, b, c, d])) if *prefix == V4_MAPPED_PREFIX => {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port))
        }
        _ => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(key.addr), port, 0, 0)),
    }
}

/// `peer` as the map stores it: IPv4-mapped IPv6 as IPv4, no flow info or
/// scope.
pub fn canonical(peer: SocketAddr) -> SocketAddr {
    key_peer(&peer_key(peer))
}

/// The config record for the program.
pub fn config_for(listen_port: u16, enforce: bool, l2_len: u8) -> Config {
    Config {
        listen_port: listen_port.to_be_bytes(),
        enforce: u8::from(enforce),
        l2_len,
    }
}

/// The link header in front of the IP header for an ARPHRD_* link type, or
/// `None` when the program cannot parse that link.
pub fn l2_len_for(arphrd: u16) -> Option<u8> {
    match arphrd {
        // Loopback frames carry a (zeroed) Ethernet header too.
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(L2_ETHERNET),
        // tun, wwan modems in raw-ip mode, and PPP, which takes its 2-byte
        // protocol field off and resets the MAC header before the stack (and
        // XDP or TC) sees the packet.
        ARPHRD_NONE | ARPHRD_RAWIP | ARPHRD_PPP => Some(L2_NONE),
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
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// The bytes as `bpftool map dump` prints them.
    fn raw(key: PeerKey) -> [u8; 20] {
        // SAFETY: PeerKey is repr(C), 20 bytes, no implicit padding.
        unsafe { std::mem::transmute(key) }
    }

    #[test]
    fn ipv4_key_is_mapped_wire_order_with_zero_padding() {
        let peer = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 12345));
        let key = peer_key(peer);
        assert_eq!(
            raw(key),
            [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xc6, 0x12, 0x00, 0x01, 0x30, 0x39, 0x00,
                0x00
            ]
        );
        assert_eq!(key_peer(&key), peer);
        // A dual-stack socket's view of the same peer is the same key.
        let mapped = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped(), 12345));
        assert_eq!(peer_key(mapped), key);
        assert_eq!(canonical(mapped), peer);
    }

    #[test]
    fn ipv6_key_is_wire_order_with_zero_padding() {
        let ip: Ipv6Addr = "2001:db8::1:2".parse().unwrap();
        let peer = SocketAddr::V6(SocketAddrV6::new(ip, 51000, 7, 3));
        let key = peer_key(peer);
        assert_eq!(
            raw(key),
            [
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0x02, 0xc7, 0x38, 0, 0
            ]
        );
        // Flow info and scope are not part of the key.
        assert_eq!(key_peer(&key), SocketAddr::from((ip, 51000)));
        assert_ne!(
            peer_key(SocketAddr::from((ip, 51001))),
            key,
            "port is part of the key"
        );
    }

    #[test]
    fn test_contexts_carry_the_ifindex() {
        let x = xdp_test_ctx(60, 7);
        assert_eq!(x.len(), 24);
        assert_eq!(&x[4..8], &60u32.to_ne_bytes());
        assert_eq!(&x[12..16], &7u32.to_ne_bytes());
        let s = skb_test_ctx(9, 60);
        assert_eq!(s.len(), 164);
        assert_eq!(&s[40..44], &9u32.to_ne_bytes());
        assert_eq!(&s[160..164], &60u32.to_ne_bytes());
        assert!(s[..40].iter().chain(&s[44..160]).all(|b| *b == 0));
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
        assert_eq!(l2_len_for(ARPHRD_PPP), Some(0));
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
