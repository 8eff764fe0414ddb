//! Sessions on disk (SPEC decision 11, "Restarts"): what a restarted server
//! needs to resume its live sessions with the same generated addresses, and
//! a restarted client to resume its sessions without waiting for its
//! applications.
//!
//! One JSON file per instance in `--state-dir`, named like the XDP pins
//! (`<netns inode>-<uplink>-<port>.json`), so instances on one host, in one
//! namespace or in several, never share or clobber each other's state. It
//! holds session keys: mode 0600 in a 0700 directory, written atomically (a
//! temporary file, fsync, rename, fsync of the directory), so a kill -9 at
//! any moment leaves the old version or the new one, never half of one.
//! Times are wall-clock (Unix milliseconds) on disk and instants in the core;
//! counters resume from the wall clock in microseconds, so a restarted side
//! never sends a counter it sent before.
//!
//! Missing, stale or corrupt state is never fatal: the daemon starts clean
//! and says so ([`load`] returns what it could read and why the rest went).

use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::core::session::{KeyBytes, SessionId, client, server};

/// The layout version of the file; another one is read as "no state".
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct File {
    pub format: u32,
    /// `server` or `client`: a file of the other role is not taken.
    pub role: String,
    pub saved_at_unix_ms: u64,
    #[serde(default)]
    pub sessions: Vec<ServerSession>,
    /// Server: freed addresses still in quarantine, least recently freed first.
    #[serde(default)]
    pub quarantine: Vec<Ipv4Addr>,
    #[serde(default)]
    pub leases: Vec<ClientLease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSession {
    pub id: String,
    pub client: String,
    pub addr: Ipv4Addr,
    pub peer: Option<SocketAddr>,
    pub keys: String,
    pub rx: u64,
    pub tx: u64,
    pub expires_unix_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientLease {
    pub server: Ipv4Addr,
    pub path: SocketAddr,
    pub id: String,
    pub keys: String,
    pub rx: u64,
    pub tx: u64,
    pub lease_ms: u64,
    pub expires_unix_ms: u64,
}

/// Instants against the wall clock, read once so that every conversion in
/// one save or load agrees.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Instant,
    pub wall_ms: u64,
}

impl Clock {
    pub fn now() -> Clock {
        Clock { now: Instant::now(), wall_ms: wall_ms() }
    }

    fn to_wall(self, t: Instant) -> u64 {
        match t.checked_duration_since(self.now) {
            Some(ahead) => self.wall_ms.saturating_add(ms(ahead)),
            None => self.wall_ms.saturating_sub(ms(self.now.saturating_duration_since(t))),
        }
    }

    /// `None` when the time has passed.
    fn to_instant(self, wall: u64) -> Option<Instant> {
        let ahead = wall.checked_sub(self.wall_ms).filter(|d| *d > 0)?;
        self.now.checked_add(Duration::from_millis(ahead))
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, ms)
}

/// Where counters start: the wall clock in microseconds.
pub fn counter_start() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn keys_hex(k: &KeyBytes) -> String {
    hex(&[&k.client_to_server[..], &k.server_to_client[..]].concat())
}

fn keys_from(s: &str) -> Option<KeyBytes> {
    Some(KeyBytes::from_exporter(&unhex::<64>(s)?))
}

fn session_from(s: &str) -> Option<SessionId> {
    Some(SessionId(unhex::<8>(s)?)).filter(|s| !s.is_zero())
}

impl File {
    pub fn server(sessions: &[server::Saved], quarantine: Vec<Ipv4Addr>, clock: Clock) -> File {
        File {
            format: FORMAT,
            role: "server".into(),
            saved_at_unix_ms: clock.wall_ms,
            sessions: sessions
                .iter()
                .map(|s| ServerSession {
                    id: hex(&s.id.0),
                    client: s.client.clone(),
                    addr: s.addr,
                    peer: s.peer,
                    keys: keys_hex(&s.keys),
                    rx: s.rx,
                    tx: s.tx,
                    expires_unix_ms: clock.to_wall(s.deadline),
                })
                .collect(),
            quarantine,
            leases: Vec::new(),
        }
    }

    pub fn client(leases: &[client::Saved], clock: Clock) -> File {
        File {
            format: FORMAT,
            role: "client".into(),
            saved_at_unix_ms: clock.wall_ms,
            leases: leases
                .iter()
                .map(|l| ClientLease {
                    server: l.server,
                    path: l.path,
                    id: hex(&l.id.0),
                    keys: keys_hex(&l.keys),
                    rx: l.rx,
                    tx: l.tx,
                    lease_ms: ms(l.lease),
                    expires_unix_ms: clock.to_wall(l.until),
                })
                .collect(),
            ..File::default()
        }
    }

    /// The server sessions still live, and how many were dropped (expired
    /// or unreadable).
    pub fn server_sessions(&self, clock: Clock) -> (Vec<server::Saved>, usize) {
        let live: Vec<_> = self
            .sessions
            .iter()
            .filter_map(|s| {
                Some(server::Saved {
                    id: session_from(&s.id)?,
                    client: s.client.clone(),
                    addr: s.addr,
                    peer: s.peer,
                    keys: keys_from(&s.keys)?,
                    rx: s.rx,
                    tx: s.tx,
                    deadline: clock.to_instant(s.expires_unix_ms)?,
                })
            })
            .collect();
        let dropped = self.sessions.len() - live.len();
        (live, dropped)
    }

    pub fn client_leases(&self, clock: Clock) -> (Vec<client::Saved>, usize) {
        let live: Vec<_> = self
            .leases
            .iter()
            .filter_map(|l| {
                Some(client::Saved {
                    server: l.server,
                    path: l.path,
                    id: session_from(&l.id)?,
                    keys: keys_from(&l.keys)?,
                    rx: l.rx,
                    tx: l.tx,
                    lease: Duration::from_millis(l.lease_ms),
                    until: clock.to_instant(l.expires_unix_ms)?,
                })
            })
            .collect();
        let dropped = self.leases.len() - live.len();
        (live, dropped)
    }
}

/// The state file of this instance.
pub fn path_for(dir: &Path, netns_inode: u64, uplink: &str, port: u16) -> PathBuf {
    dir.join(format!("{netns_inode}-{uplink}-{port}.json"))
}

/// What [`load`] found.
#[derive(Debug)]
pub enum Loaded {
    /// No file: a first start (or a clean one).
    Missing,
    File(File),
    /// A file that cannot be used, and why; it was moved aside to
    /// `NAME.corrupt` so that it can be looked at.
    Unusable(String),
}

pub fn load(path: &Path, role: &str) -> Loaded {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Unusable(format!("cannot read it: {e}")),
    };
    let why = match parse(&text, role) {
        Ok(f) => return Loaded::File(f),
        Err(why) => why,
    };
    let aside = path.with_extension("json.corrupt");
    let _ = fs::rename(path, &aside);
    Loaded::Unusable(format!("{why} (moved to {})", aside.display()))
}

/// The file's bytes as this build reads them, or why not (the fuzz target
/// `state_file` drives it with any bytes).
pub fn parse(text: &[u8], role: &str) -> Result<File, String> {
    match serde_json::from_slice::<File>(text) {
        Ok(f) if f.format != FORMAT => Err(format!("it has format {}, this build reads {FORMAT}", f.format)),
        Ok(f) if f.role != role => Err(format!("it belongs to a {} (this is a {role})", f.role)),
        Ok(f) => Ok(f),
        Err(e) => Err(format!("it is not valid: {e}")),
    }
}

/// The bytes [`save`] writes.
pub fn serialize(file: &File) -> io::Result<Vec<u8>> {
    serde_json::to_vec_pretty(file).map_err(io::Error::other)
}

/// Writes `file` to `path` atomically, mode 0600, creating the directory
/// (mode 0700) if needed.
pub fn save(path: &Path, file: &File) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("the state path has no directory"))?;
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serialize(file)?;
    {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // A file left by an older run with other permissions: tighten it.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Removes the state file (nothing left to resume).
pub fn remove(path: &Path) {
    let _ = fs::remove_file(path);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("uet-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn keys() -> KeyBytes {
        let mut out = [0u8; 64];
        for (i, b) in out.iter_mut().enumerate() {
            *b = i as u8;
        }
        KeyBytes::from_exporter(&out)
    }

    #[test]
    fn server_state_round_trips_through_the_file() {
        let d = dir("server");
        let path = path_for(&d, 4026531840, "eth0", 12345);
        assert!(path.ends_with("4026531840-eth0-12345.json"));
        let clock = Clock::now();
        let saved = vec![server::Saved {
            id: SessionId([1, 2, 3, 4, 5, 6, 7, 8]),
            client: "alice".into(),
            addr: "198.18.0.7".parse().unwrap(),
            peer: Some("[2001:db8::2]:40000".parse().unwrap()),
            keys: keys(),
            rx: 5,
            tx: 9,
            deadline: clock.now + Duration::from_secs(100),
        }];
        let q = vec!["198.18.0.9".parse().unwrap()];
        save(&path, &File::server(&saved, q.clone(), clock)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let Loaded::File(f) = load(&path, "server") else { panic!() };
        assert_eq!(f.quarantine, q);
        let (back, dropped) = f.server_sessions(clock);
        assert_eq!(dropped, 0);
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].id, back[0].addr, back[0].peer, back[0].keys.clone()), (saved[0].id, saved[0].addr, saved[0].peer, keys()));
        let off = back[0].deadline.max(saved[0].deadline) - back[0].deadline.min(saved[0].deadline);
        assert!(off < Duration::from_millis(2), "deadline kept to the millisecond: {off:?}");
        // Later, the session has expired: dropped, counted.
        let later = Clock { now: clock.now + Duration::from_secs(200), wall_ms: clock.wall_ms + 200_000 };
        assert_eq!(f.server_sessions(later), (vec![], 1));
        // A client does not take a server's file.
        assert!(matches!(load(&path, "client"), Loaded::Unusable(_)));
        assert!(matches!(load(&path, "server"), Loaded::Missing), "moved aside");
        assert!(path.with_extension("json.corrupt").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_and_missing_state_start_clean() {
        let d = dir("corrupt");
        let path = path_for(&d, 1, "c0", 1);
        assert!(matches!(load(&path, "client"), Loaded::Missing));
        fs::create_dir_all(&d).unwrap();
        for junk in [&b"{not json"[..], b"", b"{\"format\": 99, \"role\": \"client\", \"saved_at_unix_ms\": 0}"] {
            fs::write(&path, junk).unwrap();
            assert!(matches!(load(&path, "client"), Loaded::Unusable(_)), "{junk:?}");
        }
        // Bad hex or a zero session id: that entry is dropped, the rest kept.
        let clock = Clock::now();
        let good = client::Saved {
            server: "192.0.2.1".parse().unwrap(),
            path: "192.0.2.1:12345".parse().unwrap(),
            id: SessionId([9; 8]),
            keys: keys(),
            rx: 1,
            tx: 2,
            lease: Duration::from_secs(300),
            until: clock.now + Duration::from_secs(300),
        };
        let mut f = File::client(&[good.clone(), good.clone()], clock);
        f.leases[1].keys = "zz".into();
        save(&path, &f).unwrap();
        let Loaded::File(f) = load(&path, "client") else { panic!() };
        let (leases, dropped) = f.client_leases(clock);
        assert_eq!((leases.len(), dropped), (1, 1));
        assert_eq!(leases[0].id, good.id);
        assert_eq!(session_from("0000000000000000"), None);
        fs::remove_dir_all(&d).unwrap();
    }
}
