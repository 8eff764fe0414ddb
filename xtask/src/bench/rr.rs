//! Request/response latency: one TCP connection, a tiny request, a tiny
//! response, the next request only after the response (TCP_NODELAY on both
//! ends). The server is a thread of this process that joined the server
//! namespace; each measurement's client is a thread that joined the client
//! namespace.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::topo::{self, RR_PORT};

/// Bytes of each request and of each response.
pub const MSG: usize = 64;
const WARMUP: usize = 200;

/// The echo server; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Server {
    pub fn start(ns: &str) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = topo::spawn_in_netns(ns, move || {
            let listener = match TcpListener::bind(("0.0.0.0", RR_PORT)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    bail!("bind 0.0.0.0:{RR_PORT}: {e}");
                }
            };
            listener.set_nonblocking(true)?;
            let _ = tx.send(Ok(()));
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => serve(s, &flag)?,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Server {
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => bail!("request/response server: {e}"),
            Err(_) => bail!("request/response server did not start"),
        }
    }
}

fn serve(mut s: TcpStream, stop: &AtomicBool) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; MSG];
    let resp = [0x5au8; MSG];
    loop {
        let mut got = 0;
        while got < MSG {
            match s.read(buf.get_mut(got..).unwrap_or_default()) {
                Ok(0) => return Ok(()),
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                }
                Err(_) => return Ok(()), // the client went away: next connection
            }
        }
        if s.write_all(&resp).is_err() {
            return Ok(());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            match h.join() {
                Ok(Err(e)) => eprintln!("bench: request/response server: {e:#}"),
                Err(_) => eprintln!("bench: request/response server panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Round trips over one connection to `to` for `dur`, from a thread in `ns`.
/// Returns each round trip in nanoseconds (warm-up excluded).
pub fn measure(ns: &str, to: SocketAddr, dur: Duration) -> Result<Vec<u64>> {
    let h = topo::spawn_in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .with_context(|| format!("request/response: connect to {to}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let req = [0xa5u8; MSG];
        let mut buf = [0u8; MSG];
        let mut out = Vec::with_capacity(100_000);
        let mut i = 0usize;
        let mut end = None;
        loop {
            if i == WARMUP {
                end = Some(Instant::now() + dur);
            }
            if end.is_some_and(|e| Instant::now() >= e) || topo::interrupted() {
                break;
            }
            let t0 = Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut buf)
                .with_context(|| format!("request/response: no answer from {to}"))?;
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if i >= WARMUP {
                out.push(ns);
            }
            i += 1;
        }
        Ok(out)
    })?;
    let v = h
        .join()
        .map_err(|_| anyhow::anyhow!("request/response client panicked"))??;
    topo::check_interrupted()?;
    Ok(v)
}

/// What a wake-up across CPUs costs on this machine: two threads, pinned to
/// CPUs 0 and 1, pass one byte back and forth over a socket pair for `dur`.
/// Each round trip is two wake-ups of a thread sleeping on another CPU, as
/// each daemon's is when a packet reaches it. Returns each round trip in
/// nanoseconds, or None with fewer than 2 CPUs.
pub fn wake_round_trips(dur: Duration) -> Result<Option<Vec<u64>>> {
    use std::os::unix::net::UnixStream;
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(None);
    }
    let (mut a, mut b) = UnixStream::pair().context("wake-up test: socketpair")?;
    let echo = std::thread::spawn(move || -> Result<()> {
        pin_to_cpu(1)?;
        let mut byte = [0u8; 1];
        // Ends when the other side closes its end (read returns 0).
        while b.read(&mut byte)? == 1 {
            b.write_all(&byte)?;
        }
        Ok(())
    });
    // Both ends are threads of their own, so the caller's affinity stays.
    let measure = std::thread::spawn(move || -> Result<Vec<u64>> {
        pin_to_cpu(0)?;
        let mut out = Vec::with_capacity(100_000);
        let mut byte = [0u8; 1];
        let mut i = 0usize;
        let mut end = None;
        while end.is_none_or(|e| Instant::now() < e) && !topo::interrupted() {
            if i == WARMUP {
                end = Some(Instant::now() + dur);
            }
            let t0 = Instant::now();
            a.write_all(&byte)?;
            a.read_exact(&mut byte)?;
            if i >= WARMUP {
                out.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            i += 1;
        }
        Ok(out)
        // `a` is dropped here: the echo thread reads 0 and ends.
    });
    let out = measure
        .join()
        .map_err(|_| anyhow::anyhow!("wake-up test: measuring thread panicked"))?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("wake-up test: echo thread panicked"))??;
    topo::check_interrupted()?;
    out.map(Some)
}

/// Pins the calling thread to one CPU (sched_setaffinity(2)).
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data and zeroed is the empty set; CPU_SET
    // writes within it (cpu is 0 or 1, far below CPU_SETSIZE) and
    // sched_setaffinity only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("sched_setaffinity(CPU {cpu}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}
