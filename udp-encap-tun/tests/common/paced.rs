//! A transfer spread over seconds, so that a fault strikes while bytes
//! move: an upload at a steady rate with a download at the same time, over
//! the [`super::AppServer`] protocol, both checked by SHA-256.

use std::fs;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{Netns, ServerConn, Sha, fill_payload, hex, recv_to_eof};

/// An upload at a steady rate (`chunk` bytes every `gap`) for `chunks`
/// chunks, with a download of `download` bytes at the same time, over the
/// [`AppServer`] protocol. I/O timeouts `io_timeout`.
pub struct Paced {
    pub id: u64,
    pub chunk: usize,
    pub chunks: u64,
    pub gap: Duration,
    pub download: u64,
    pub io_timeout: Duration,
}

#[derive(Debug)]
pub struct PacedResult {
    pub sent: u64,
    pub sent_sha: Sha,
    pub received: u64,
    pub received_sha: Sha,
}

pub fn paced_transfer(ns: &Netns, dest: SocketAddrV4, p: Paced) -> JoinHandle<io::Result<PacedResult>> {
    let path = ns.path();
    let ns_name = ns.name().to_string();
    thread::spawn(move || {
        // Same setns as the harness's spawn_in_netns, done by hand so the
        // closure can return io errors.
        let f = fs::File::open(&path)?;
        // SAFETY: a valid open namespace fd; affects this thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert!(r == 0, "setns {ns_name}");
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(dest), Duration::from_secs(10))?;
        s.set_read_timeout(Some(p.io_timeout))?;
        s.set_write_timeout(Some(p.io_timeout))?;
        let total = p.chunk as u64 * p.chunks;
        let seed = p.id.wrapping_mul(31) ^ 0xabc;
        let mut hdr = Vec::new();
        for w in [p.id, total, p.download, seed] {
            hdr.extend_from_slice(&w.to_be_bytes());
        }
        // The server sends its download with seed `hdr.seed ^ DOWN`.
        s.write_all(&hdr)?;
        let mut r = s.try_clone()?;
        let reader = thread::spawn(move || recv_to_eof(&mut r));
        let mut h = Sha256::new();
        let mut buf = vec![0u8; p.chunk];
        let mut off = 0u64;
        let start = Instant::now();
        for i in 0..p.chunks {
            fill_payload(seed, off, &mut buf);
            s.write_all(&buf)?;
            h.update(&buf);
            off += p.chunk as u64;
            // Steady rate: chunk i+1 is due at (i+1) * gap from the start.
            let due = start + p.gap * u32::try_from(i + 1).unwrap();
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
        }
        s.shutdown(Shutdown::Write)?;
        let (received, received_sha) = reader
            .join()
            .map_err(|_| io::Error::other("reader panicked"))??;
        Ok(PacedResult {
            sent: off,
            sent_sha: h.finalize().into(),
            received,
            received_sha,
        })
    })
}

pub fn assert_paced_ok(r: &PacedResult, conn: &ServerConn, download: u64, seed_id: u64) {
    assert!(conn.error.is_none(), "server side failed: {:?}", conn.error);
    assert_eq!(conn.id, seed_id);
    assert_eq!(conn.received, r.sent, "upload length");
    assert_eq!(hex(&conn.received_sha), hex(&r.sent_sha), "upload SHA-256");
    assert_eq!(r.received, download, "download length");
    assert_eq!(
        hex(&r.received_sha),
        hex(&conn.sent_sha),
        "download SHA-256"
    );
}


/// A download that the client reads at a steady rate (`chunk` bytes every
/// `gap`) through a small receive buffer, so the server's writes are held
/// back by TCP's flow control and the bytes move for the whole
/// `download / chunk * gap`: a fault at any moment in between strikes a
/// transfer under way. No upload (the header, then EOF). The result's
/// `received`/`received_sha` are checked against the server's `sent_sha`
/// with [`assert_download_ok`].
pub fn paced_download(
    ns: &Netns,
    dest: SocketAddrV4,
    id: u64,
    download: u64,
    chunk: usize,
    gap: Duration,
    io_timeout: Duration,
) -> JoinHandle<io::Result<PacedResult>> {
    paced_download_from(ns, None, dest, id, download, chunk, gap, io_timeout)
}

/// [`paced_download`] from source address `src` (a second TUN's, say).
#[allow(clippy::too_many_arguments)]
pub fn paced_download_from(
    ns: &Netns,
    src: Option<std::net::Ipv4Addr>,
    dest: SocketAddrV4,
    id: u64,
    download: u64,
    chunk: usize,
    gap: Duration,
    io_timeout: Duration,
) -> JoinHandle<io::Result<PacedResult>> {
    let path = ns.path();
    thread::spawn(move || {
        let f = fs::File::open(&path)?;
        // SAFETY: a valid open namespace fd; affects this thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        // Small, so that the server cannot run far ahead of the reader.
        sock.set_recv_buffer_size(128 * 1024)?;
        if let Some(src) = src {
            sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
        }
        sock.connect_timeout(&SocketAddr::V4(dest).into(), Duration::from_secs(10))?;
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(io_timeout))?;
        let mut hdr = Vec::new();
        for w in [id, 0, download, id.wrapping_mul(31) ^ 0xabc] {
            hdr.extend_from_slice(&w.to_be_bytes());
        }
        s.write_all(&hdr)?;
        s.shutdown(Shutdown::Write)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; chunk];
        let (mut got, start, mut i) = (0u64, Instant::now(), 0u32);
        loop {
            let n = io::Read::read(&mut s, &mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n as u64;
            if got >= (u64::from(i) + 1) * chunk as u64 {
                i += 1;
                let due = start + gap * i;
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
            }
        }
        Ok(PacedResult { sent: 0, sent_sha: Sha256::new().finalize().into(), received: got, received_sha: h.finalize().into() })
    })
}

/// The download of [`paced_download`] arrived whole and unchanged, on the one
/// connection the server served.
pub fn assert_download_ok(r: &PacedResult, conn: &ServerConn, download: u64, id: u64) {
    assert!(conn.error.is_none(), "server side failed: {:?}", conn.error);
    assert_eq!(conn.id, id);
    assert_eq!(r.received, download, "download length");
    assert_eq!(hex(&r.received_sha), hex(&conn.sent_sha), "download SHA-256");
}
