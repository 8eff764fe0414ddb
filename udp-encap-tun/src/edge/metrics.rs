//! `--metrics-listen ADDR:PORT`: the Prometheus endpoint (`GET /metrics`).
//!
//! Scrapers never touch the data path. The daemon's loop publishes a
//! [`Report`] snapshot once a second ([`Metrics::publish`]: it swaps an
//! `Arc` under a mutex held for that swap only); the endpoint runs on a
//! thread of its own, with its own single-threaded runtime, and renders the
//! latest snapshot for each scrape. It is bounded, since anyone who can
//! reach the port can connect: at most [`MAX_CONNECTIONS`] at once (more are
//! closed at once), a request head of at most [`MAX_HEAD`] bytes, and
//! [`DEADLINE`] for a whole exchange, so a slow or stuck client only holds
//! its own connection, never the loop.
//!
//! The request head is parsed by `httparse` (hyper's parser): one route and
//! one method do not need a whole HTTP stack, but untrusted bytes should meet
//! a parser that has been fuzzed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::core::ratelog::RateLimitedLog;
use crate::report::Report;

/// Scrapes served at once; more connections are closed at once.
pub const MAX_CONNECTIONS: usize = 8;
/// The most a request head may take.
pub const MAX_HEAD: usize = 8192;
/// A whole exchange (request head in, response out).
pub const DEADLINE: Duration = Duration::from_secs(5);

type Snapshot = Arc<Mutex<Option<Arc<Report>>>>;

/// The running endpoint. Dropping it stops the thread.
pub struct Metrics {
    latest: Snapshot,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl Metrics {
    /// Binds `addr` now (so a port in use fails the start) and serves it on a
    /// thread of its own.
    pub fn start(addr: SocketAddr) -> Result<Metrics> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| {
            format!("cannot listen on {addr} for --metrics-listen: another program uses the port, or the address is not on this host; pick another")
        })?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let latest: Snapshot = Arc::new(Mutex::new(None));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .context("cannot start the metrics runtime")?;
        let shared = latest.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || rt.block_on(serve(listener, shared, stop_rx)))
            .context("cannot start the metrics thread")?;
        log::info!("metrics at http://{addr}/metrics");
        Ok(Metrics { latest, stop: Some(stop_tx), thread: Some(thread), addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `report` what the next scrapes see.
    pub fn publish(&self, report: Report) {
        let r = Arc::new(report);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, latest: Snapshot, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("metrics endpoint disabled: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut busy_log = RateLimitedLog::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning.
                busy_log.log(Instant::now(), || format!("metrics: accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            busy_log.log(Instant::now(), || {
                format!("metrics: {MAX_CONNECTIONS} scrapes already in progress, closed the connection from {peer}")
            });
            drop(stream);
            continue;
        };
        let latest = latest.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(DEADLINE, exchange(stream, &latest)).await;
        });
    }
}

/// One request, one response, then the connection closes.
async fn exchange(mut stream: tokio::net::TcpStream, latest: &Snapshot) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let (status, body, head_only) = loop {
        let Some(free) = buf.get_mut(len..) else { break (431, String::new(), false) };
        if free.is_empty() {
            break (431, "request head too large\n".to_string(), false);
        }
        let n = stream.read(free).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf.get(..len).unwrap_or_default()) {
            Ok(httparse::Status::Partial) => continue,
            Err(_) => break (400, "bad request\n".to_string(), false),
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/");
                let head_only = req.method == Some("HEAD");
                break match (req.method, path) {
                    (Some("GET" | "HEAD"), "/metrics") => {
                        let snap = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        match snap {
                            Some(r) => (200, r.to_prometheus(), head_only),
                            None => (503, "no snapshot yet\n".to_string(), head_only),
                        }
                    }
                    (Some("GET" | "HEAD"), "/") => (200, "udp-encap-tun: metrics at /metrics\n".to_string(), head_only),
                    (Some("GET" | "HEAD"), _) => (404, "not found: the metrics are at /metrics\n".to_string(), head_only),
                    _ => (405, "only GET and HEAD\n".to_string(), false),
                };
            }
        }
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let content_type = if status == 200 { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain; charset=utf-8" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn report() -> Report {
        let j = r#"{"version":"0.1.0","mode":"client","auth":false,
            "interface":{"name":"tun0","address":"198.19.0.2","prefix":32,"mtu":1400},
            "uplink":{"name":"eth0","mtu":1500},"listen_port":1,"endpoint_port":2,"max_mss":1360,
            "offloads":{"tun":true,"udp_gso":true,"udp_gro":true},"uptime_seconds":3,"pool":null,
            "xdp":null,"counters":{"udp_tx_packets":42},"xdp_counters_error":null,"peers":[],"leases":[]}"#;
        Report::from_reply(j).unwrap()
    }

    #[test]
    fn serves_the_latest_snapshot_and_nothing_else() {
        let m = Metrics::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = m.local_addr();
        assert!(get(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 503"));
        m.publish(report());
        let r = get(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("udp_encap_tun_udp_tx_packets_total{interface=\"tun0\",mode=\"client\"} 42\n"), "{r}");
        let mut next = report();
        next.counters.0[0].1 = 43;
        m.publish(next);
        assert!(get(a, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").contains("} 43\n"));
        assert!(get(a, b"GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(a, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(get(a, big.as_bytes()).starts_with("HTTP/1.1 431"));
        let head = get(a, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn idle_connections_do_not_block_scrapes_beyond_the_bound() {
        let m = Metrics::start("127.0.0.1:0".parse().unwrap()).unwrap();
        m.publish(report());
        let a = m.local_addr();
        // Fill every slot with connections that never send a byte.
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| TcpStream::connect(a).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        // One more is closed without an answer rather than queued behind
        // them (queued, it would be answered once their deadline passed).
        let r = get(a, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.is_empty(), "served beyond the bound: {r}");
        // After their deadline the idle ones are dropped and scrapes work again.
        let end = Instant::now() + DEADLINE * 3;
        while !get(a, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200") {
            assert!(Instant::now() < end, "the idle connections were never dropped");
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(idle);
    }
}
