//! When the server re-reads its client list: only a version that has
//! stopped changing.
//!
//! `credentials client|revoke` replace the file atomically (a rename), but
//! an operator may rewrite it in place: `cp`, `cat >`, an editor that
//! truncates first. Read in the middle, such a file holds the lines written
//! so far, and a list cut at a line boundary parses fine: the clients in
//! the missing part would be revoked, their entries dropped, their
//! connections broken. So a version is read only once it has settled:
//!
//! - its stamp (inode, size, mtime, ctime) has not changed for [`SETTLE`];
//! - and no writer is known to hold it: inotify on the file's directory
//!   reports `IN_MODIFY` for each write and `IN_CLOSE_WRITE` when the
//!   writer closes it, so a slow copy that pauses longer than [`SETTLE`]
//!   between two lines is still waited for. A writer that keeps the file
//!   open without writing for [`WRITER_STALL`] is taken to be done (an
//!   editor holding it, a forgotten `exec 3>`), and the version is read.
//!
//! An intentional emptying (`: > clients.txt`) is a truncation followed by a
//! close: it settles after [`SETTLE`] like any other version and revokes
//! everyone. Without inotify (a file system that has none, the watch limit
//! reached) only the stamp rule applies. Revocation stays within a second:
//! the daemon looks every 100 ms, so a replaced list is read at most
//! `SETTLE` + 100 ms after its last change.
//!
//! [`Settle`] is the pure rule (stamps and events in, `now` injected);
//! [`ListWatch`] feeds it from `stat` and inotify.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// A version must be unchanged this long before it is read.
pub const SETTLE: Duration = Duration::from_millis(500);
/// A writer that has held the file open without changing it this long is
/// taken to be done.
pub const WRITER_STALL: Duration = Duration::from_secs(5);
/// Timestamps this close to the wall clock may hide a second write in the
/// same tick of a coarse file-system clock: such a version is read once
/// more when it is older (git's "racy" rule).
const RACY: Duration = Duration::from_secs(2);

/// What identifies a version of the client list file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(path: &Path) -> io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// Changed within [`RACY`] of the wall clock.
    fn is_recent(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let racy = i64::try_from(RACY.as_secs()).unwrap_or(2);
        now.saturating_sub(self.mtime.0.max(self.ctime.0)) < racy
    }
}

/// What `stat` says about the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// No file (deleted, or between an editor's unlink and its new file).
    Missing,
    File(FileStamp),
}

/// The settling rule, pure: observations and writer events in, "read this
/// version now" out.
#[derive(Debug, Default)]
pub struct Settle {
    /// The last observation and when it was first made.
    observed: Option<(Seen, Instant)>,
    /// A writer modified the file and has not closed it, since.
    writer: Option<Instant>,
    /// The version last read (installed, or refused as invalid).
    read: Option<Seen>,
    /// That version was recent when read: read it once more when it is not.
    read_while_recent: bool,
}

impl Settle {
    /// A rule that considers `seen` already read (the list loaded at start).
    pub fn loaded(seen: Seen, recent: bool) -> Settle {
        Settle {
            read: Some(seen),
            read_while_recent: recent,
            ..Settle::default()
        }
    }

    /// inotify: the file was written to (or truncated).
    pub fn modified(&mut self, now: Instant) {
        self.writer.get_or_insert(now);
    }

    /// inotify: a writer closed it, or the name now points to another file
    /// (renamed over, created, deleted): no writer is known to hold it.
    pub fn closed(&mut self) {
        self.writer = None;
    }

    /// `stat` said `seen` at `now` (`recent`: its timestamps are within
    /// [`RACY`] of the wall clock). True: read this version now, then call
    /// [`Settle::was_read`].
    pub fn observe(&mut self, seen: Seen, recent: bool, now: Instant) -> bool {
        let since = match self.observed {
            Some((s, since)) if s == seen => since,
            _ => {
                self.observed = Some((seen, now));
                now
            }
        };
        if self.read == Some(seen) {
            // The racy rule: the version we read may have been written to
            // again within the same timestamp tick; read it once more.
            return self.read_while_recent && !recent;
        }
        let stable = now.saturating_duration_since(since);
        if stable < SETTLE {
            return false;
        }
        // A writer still holds it: wait for its close, up to WRITER_STALL
        // without change.
        self.writer.is_none() || stable >= WRITER_STALL
    }

    /// Whether a writer is known to hold the file (for the log).
    pub fn writer_open(&self) -> bool {
        self.writer.is_some()
    }

    /// The caller read `seen` (whatever came of it).
    pub fn was_read(&mut self, seen: Seen, recent: bool) {
        self.read = Some(seen);
        self.read_while_recent = recent;
        self.writer = None;
    }
}

/// [`Settle`] fed from `stat` and inotify on the list's directory.
pub struct ListWatch {
    path: PathBuf,
    name: Option<OsString>,
    inotify: Option<Inotify>,
    settle: Settle,
}

impl std::fmt::Debug for ListWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListWatch")
            .field("path", &self.path)
            .field("inotify", &self.inotify.is_some())
            .field("settle", &self.settle)
            .finish()
    }
}

/// What [`ListWatch::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub seen: Seen,
    pub recent: bool,
    /// Read although a writer holds it open (it stalled).
    pub stalled_writer: bool,
}

impl ListWatch {
    /// Watches `path`, whose current version `stamp` was just loaded.
    pub fn new(path: &Path, stamp: Option<FileStamp>) -> ListWatch {
        let name = path.file_name().map(OsString::from);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .and_then(|i| {
                let mask = AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MOVED_FROM
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_DELETE;
                i.add_watch(&dir, mask).map(|_| i)
            })
            .map_err(|e| {
                log::warn!(
                    "cannot watch `{}` for writes ({e}): a client list rewritten in place is read \
                     once it has not changed for {SETTLE:?}",
                    dir.display()
                );
            })
            .ok();
        let settle = match stamp {
            Some(s) => Settle::loaded(Seen::File(s), s.is_recent()),
            None => Settle::default(),
        };
        ListWatch {
            path: path.to_path_buf(),
            name,
            inotify,
            settle,
        }
    }

    /// Drains inotify, stats the file; `Some` when a version is due.
    pub fn poll(&mut self, now: Instant) -> Option<Due> {
        self.drain_events(now);
        let (seen, recent) = match FileStamp::of(&self.path) {
            Ok(s) => (Seen::File(s), s.is_recent()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Seen::Missing, false),
            // Unreadable metadata (a permission change): try to read it, and
            // let the read say what is wrong, once.
            Err(_) => (Seen::Missing, false),
        };
        let writer = self.settle.writer_open();
        self.settle.observe(seen, recent, now).then_some(Due {
            seen,
            recent,
            stalled_writer: writer,
        })
    }

    /// The caller read the version `due` returned.
    pub fn was_read(&mut self, due: Due) {
        self.settle.was_read(due.seen, due.recent);
    }

    /// The caller read the file outside [`ListWatch::poll`] (SIGHUP).
    pub fn read_now(&mut self) {
        match FileStamp::of(&self.path) {
            Ok(s) => self.settle.was_read(Seen::File(s), s.is_recent()),
            Err(_) => self.settle.was_read(Seen::Missing, false),
        }
    }

    fn drain_events(&mut self, now: Instant) {
        let Some(ino) = &self.inotify else { return };
        loop {
            let events = match ino.read_events() {
                Ok(ev) if !ev.is_empty() => ev,
                _ => return, // EAGAIN: nothing more
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost: no writer is known any more.
                    self.settle.closed();
                    continue;
                }
                if ev.name.is_none() || ev.name != self.name {
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE)
                    || ev.mask.intersects(
                        AddWatchFlags::IN_MOVED_TO
                            | AddWatchFlags::IN_MOVED_FROM
                            | AddWatchFlags::IN_DELETE,
                    )
                {
                    self.settle.closed();
                } else if ev
                    .mask
                    .intersects(AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE)
                {
                    self.settle.modified(now);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stamp(size: u64, mtime: i64) -> Seen {
        Seen::File(FileStamp {
            dev: 1,
            ino: 7,
            size,
            mtime: (mtime, 0),
            ctime: (mtime, 0),
        })
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn a_replaced_list_is_read_once_it_has_been_still_for_settle() {
        let t0 = Instant::now();
        let mut s = Settle::loaded(stamp(100, 1), false);
        assert!(!s.observe(stamp(100, 1), false, t0), "the loaded version again");
        // A rename puts a new version there.
        let v2 = stamp(60, 5);
        assert!(!s.observe(v2, false, ms(t0, 100)));
        assert!(!s.observe(v2, false, ms(t0, 500)));
        assert!(s.observe(v2, false, ms(t0, 600)), "still for 500 ms: due");
        s.was_read(v2, false);
        assert!(!s.observe(v2, false, ms(t0, 700)), "read once");
    }

    #[test]
    fn a_slow_in_place_copy_is_waited_for_until_its_writer_closes() {
        let t0 = Instant::now();
        let mut s = Settle::loaded(stamp(100, 1), false);
        // Truncated, half written, then a pause of 3 s at a line boundary:
        // the stamp is still for longer than SETTLE, but the writer holds it.
        s.modified(ms(t0, 0));
        let half = stamp(50, 2);
        for t in (0..3000).step_by(100) {
            assert!(!s.observe(half, false, ms(t0, t)), "half-written list read at {t} ms");
        }
        // The rest arrives; the writer closes.
        s.modified(ms(t0, 3000));
        let whole = stamp(100, 3);
        assert!(!s.observe(whole, false, ms(t0, 3000)));
        s.closed();
        assert!(!s.observe(whole, false, ms(t0, 3300)));
        assert!(s.observe(whole, false, ms(t0, 3500)));
    }

    #[test]
    fn an_intentional_emptying_is_read_after_settle() {
        let t0 = Instant::now();
        let mut s = Settle::loaded(stamp(100, 1), false);
        // `: > clients.txt`: truncate and close at once.
        s.modified(t0);
        s.closed();
        let empty = stamp(0, 2);
        assert!(!s.observe(empty, false, ms(t0, 100)));
        assert!(s.observe(empty, false, ms(t0, 600)));
    }

    #[test]
    fn a_writer_that_stalls_is_taken_to_be_done() {
        let t0 = Instant::now();
        let mut s = Settle::loaded(stamp(100, 1), false);
        s.modified(t0);
        let v = stamp(40, 2);
        assert!(!s.observe(v, false, ms(t0, 0)));
        assert!(!s.observe(v, false, ms(t0, 4900)));
        assert!(s.observe(v, false, ms(t0, 5000)));
    }

    #[test]
    fn a_missing_file_settles_too_and_a_recent_version_is_read_once_more() {
        let t0 = Instant::now();
        let mut s = Settle::loaded(stamp(100, 1), false);
        assert!(!s.observe(Seen::Missing, false, t0));
        assert!(s.observe(Seen::Missing, false, ms(t0, 500)));
        s.was_read(Seen::Missing, false);
        assert!(!s.observe(Seen::Missing, false, ms(t0, 900)));
        // A new file, read while its timestamps are recent...
        let v = stamp(80, 9);
        assert!(!s.observe(v, true, ms(t0, 1000)));
        assert!(s.observe(v, true, ms(t0, 1500)));
        s.was_read(v, true);
        assert!(!s.observe(v, true, ms(t0, 1600)));
        // ...is read once more when they are not, and then no more.
        assert!(s.observe(v, false, ms(t0, 3600)));
        s.was_read(v, false);
        assert!(!s.observe(v, false, ms(t0, 3700)));
    }

    /// The edge on a real directory: `cat >`-style writes with a pause at a
    /// line boundary are not due until the writer closes.
    #[test]
    fn inotify_sees_an_open_writer_on_a_real_file() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("uet-listwatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clients.txt");
        std::fs::write(&path, "a\nb\n").unwrap();
        let mut w = ListWatch::new(&path, FileStamp::of(&path).ok());
        assert!(w.inotify.is_some(), "no inotify here");
        let t0 = Instant::now();
        assert!(w.poll(t0).is_none());
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        f.write_all(b"a\n").unwrap();
        f.flush().unwrap();
        assert!(w.poll(ms(t0, 100)).is_none());
        // Well past SETTLE, the writer still holds it.
        assert!(w.poll(ms(t0, 2000)).is_none(), "a half-written file was due");
        f.write_all(b"b\nc\n").unwrap();
        drop(f);
        assert!(w.poll(ms(t0, 2100)).is_none());
        let due = w.poll(ms(t0, 2700)).expect("due once closed and still");
        assert!(!due.stalled_writer);
        w.was_read(due);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\nc\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
