//! The status report: one data model of a running daemon, rendered three
//! ways, so that the renderings cannot drift apart:
//!
//! - JSON (`udp-encap-tun status --json`): the model as serde writes it. The
//!   daemon sends this over its status socket; the field names are part of
//!   the interface (README, "Reading the counters") and stay stable.
//! - text (`udp-encap-tun status`): one fact per line, rendered by the
//!   `status` command from the JSON it received.
//! - the Prometheus text exposition format (`--metrics-listen`): counters as
//!   `udp_encap_tun_<name>_total`, gauges for entries, the pool, leases and
//!   the XDP map, labelled with the interface and the mode.
//!
//! Pure: no sockets, no clock. The daemon fills a [`Report`]
//! (`daemon::status`).

use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Everything `status` shows. Field names are stable (README).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    /// `server` or `client`.
    pub mode: String,
    pub auth: bool,
    pub interface: Interface,
    pub uplink: Uplink,
    pub listen_port: u16,
    pub endpoint_port: Option<u16>,
    /// The MSS clamp of paths over IPv4.
    pub max_mss: u16,
    /// The MSS clamp of paths over IPv6 (20 bytes of outer header more);
    /// absent when the socket carries no IPv6.
    #[serde(default)]
    pub max_mss_ipv6: Option<u16>,
    /// The outer families the UDP socket carries: `ipv4`, `ipv6` or
    /// `ipv4+ipv6` (a dual-stack socket).
    #[serde(default)]
    pub families: Option<String>,
    pub offloads: Offloads,
    pub uptime_seconds: u64,
    /// Server only.
    pub pool: Option<PoolInfo>,
    /// Absent when the gate is off.
    pub xdp: Option<XdpInfo>,
    /// Every counter by name, in a fixed order: the data path's
    /// (`src/counters.rs`), then authentication's, then the XDP program's.
    pub counters: Counters,
    /// Why the XDP counters could not be read, if they could not.
    pub xdp_counters_error: Option<String>,
    /// Server: one per `connection_store` entry, by generated address.
    /// Left out of the metrics snapshot (it can hold 65536 entries).
    pub peers: Vec<Peer>,
    /// Client: one per server it holds a lease with.
    pub leases: Vec<Lease>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uplink {
    pub name: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offloads {
    pub tun: bool,
    pub udp_gso: bool,
    pub udp_gro: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub capacity: u64,
    pub entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpInfo {
    /// `native` or `generic`.
    pub mode: String,
    pub pins: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The UDP path of the entry; `null` for a session that has not proven
    /// one yet (a `pending` line in the text).
    pub peer: Option<SocketAddr>,
    pub address: Ipv4Addr,
    pub idle_ms: u64,
    pub expires_in_ms: u64,
    /// The credential's id (server with authentication).
    pub client: Option<String>,
    /// The session id, 16 hex digits (server with authentication).
    #[serde(default)]
    pub session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub server: Ipv4Addr,
    pub expires_in_ms: u64,
    /// Where the datagrams for the server go.
    pub path: SocketAddr,
    pub session: String,
    /// `bound` (data flows) or `binding` (proving our UDP path).
    pub state: String,
    /// Since a datagram of the server was last heard.
    pub heard_ms: u64,
}

/// `name -> value` in a fixed order; a JSON object in that order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(pub Vec<(String, u64)>);

impl Counters {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    pub fn push(&mut self, name: impl Into<String>, value: u64) {
        self.0.push((name.into(), value));
    }
}

impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Counters;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of counter names and values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Counters, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0).min(256));
                while let Some((k, v)) = a.next_entry::<String, u64>()? {
                    out.push((k, v));
                }
                Ok(Counters(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Counters that are levels, not totals: exported as gauges, not `_total`.
pub const GAUGE_COUNTERS: &[&str] = &["xdp_map_entries"];

impl Report {
    pub fn to_json(&self) -> String {
        // Serializing plain data into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads what the daemon sent. A daemon that refused (not allowed, ...)
    /// answers a line of text; that line becomes the error.
    pub fn from_reply(reply: &str) -> Result<Report, String> {
        serde_json::from_str(reply).map_err(|e| {
            let line = reply.lines().next().unwrap_or_default().trim();
            match line.strip_prefix("error: ") {
                Some(why) => why.to_string(),
                None => format!(
                    "the daemon's answer is not a status report ({e}): is it another version of \
                     udp-encap-tun? Restart it with this one"
                ),
            }
        })
    }

    /// The text of `udp-encap-tun status`: one fact per line (README,
    /// "Reading the counters").
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let on = |b: bool| if b { "on" } else { "off" };
        let _ = writeln!(t, "version {}", self.version);
        let _ = writeln!(t, "mode {}", self.mode);
        let _ = writeln!(t, "auth {}", on(self.auth));
        let i = &self.interface;
        let _ = writeln!(t, "interface {} {}/{} mtu {}", i.name, i.address, i.prefix, i.mtu);
        let _ = writeln!(t, "uplink {} mtu {}", self.uplink.name, self.uplink.mtu);
        let _ = writeln!(t, "listen_port {}", self.listen_port);
        if let Some(p) = self.endpoint_port {
            let _ = writeln!(t, "endpoint_port {p}");
        }
        let _ = writeln!(t, "max_mss {}", self.max_mss);
        if let Some(m) = self.max_mss_ipv6 {
            let _ = writeln!(t, "max_mss_ipv6 {m}");
        }
        if let Some(f) = &self.families {
            let _ = writeln!(t, "families {f}");
        }
        let o = self.offloads;
        let _ = writeln!(t, "offloads tun {} udp_gso {} udp_gro {}", on(o.tun), on(o.udp_gso), on(o.udp_gro));
        let _ = writeln!(t, "uptime_seconds {}", self.uptime_seconds);
        if let Some(p) = &self.pool {
            let _ = writeln!(t, "pool {}/{} capacity {} entries {}", p.network, p.prefix, p.capacity, p.entries);
        }
        match &self.xdp {
            None => {
                let _ = writeln!(t, "xdp off");
            }
            Some(x) => {
                let _ = writeln!(t, "xdp {} pins {}", x.mode, x.pins);
            }
        }
        for (name, v) in &self.counters.0 {
            let _ = writeln!(t, "counter {name} {v}");
        }
        if let Some(e) = &self.xdp_counters_error {
            let _ = writeln!(t, "xdp_counters_error {e}");
        }
        for p in &self.peers {
            let _ = match p.peer {
                Some(peer) => write!(t, "peer {peer} {} idle_ms {} expires_in_ms {}", p.address, p.idle_ms, p.expires_in_ms),
                None => write!(t, "pending {} idle_ms {} expires_in_ms {}", p.address, p.idle_ms, p.expires_in_ms),
            };
            if let Some(id) = &p.client {
                let _ = write!(t, " client {id}");
            }
            if let Some(s) = &p.session {
                let _ = write!(t, " session {s}");
            }
            let _ = writeln!(t);
        }
        for l in &self.leases {
            let _ = writeln!(
                t,
                "lease {} expires_in_ms {} path {} session {} state {} heard_ms {}",
                l.server, l.expires_in_ms, l.path, l.session, l.state, l.heard_ms
            );
        }
        t
    }

    /// The Prometheus text exposition format (version 0.0.4): every
    /// counter as `udp_encap_tun_<name>_total`, gauges for the entries, the
    /// pool, the leases and the XDP map, each series labelled with the
    /// interface and the mode.
    pub fn to_prometheus(&self) -> String {
        let labels = format!(
            "interface=\"{}\",mode=\"{}\"",
            label_value(&self.interface.name),
            label_value(&self.mode)
        );
        let mut t = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let name = metric_name(name);
            let _ = writeln!(t, "# HELP udp_encap_tun_{name} {help}");
            let _ = writeln!(t, "# TYPE udp_encap_tun_{name} {kind}");
            let _ = writeln!(t, "udp_encap_tun_{name}{{{labels}}} {value}");
        };
        metric("uptime_seconds", "gauge", "Seconds since the daemon started.", self.uptime_seconds);
        if let Some(p) = &self.pool {
            metric("entries", "gauge", "Live connection_store entries (peers with an address).", p.entries);
            metric("pool_capacity", "gauge", "Addresses the pool can give to peers.", p.capacity);
        }
        if self.mode == "client" {
            metric("leases", "gauge", "Servers this client holds a lease with.", self.leases.len() as u64);
        }
        for (name, v) in &self.counters.0 {
            if GAUGE_COUNTERS.contains(&name.as_str()) {
                metric(name, "gauge", &format!("`{name}` of udp-encap-tun status."), *v);
            } else {
                let total = format!("{name}_total");
                metric(&total, "counter", &format!("Counter `{name}` of udp-encap-tun status (README)."), *v);
            }
        }
        // Configuration as labels of a constant series, the usual `_info` way.
        let _ = writeln!(t, "# HELP udp_encap_tun_info What this daemon runs as (always 1).");
        let _ = writeln!(t, "# TYPE udp_encap_tun_info gauge");
        let _ = writeln!(
            t,
            "udp_encap_tun_info{{{labels},version=\"{}\",uplink=\"{}\",auth=\"{}\",xdp=\"{}\"}} 1",
            label_value(&self.version),
            label_value(&self.uplink.name),
            if self.auth { "on" } else { "off" },
            label_value(self.xdp.as_ref().map_or("off", |x| x.mode.as_str())),
        );
        t
    }
}

/// A metric name keeps `[a-zA-Z0-9_]`; anything else becomes `_`.
fn metric_name(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

/// A label value with `\`, `"` and newlines escaped, as the format asks.
fn label_value(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn server() -> Report {
        Report {
            version: "0.1.0".into(),
            mode: "server".into(),
            auth: true,
            interface: Interface { name: "tun0".into(), address: Ipv4Addr::new(198, 18, 0, 1), prefix: 24, mtu: 1400 },
            uplink: Uplink { name: "eth0".into(), mtu: 1500 },
            listen_port: 12345,
            endpoint_port: None,
            max_mss: 1360,
            max_mss_ipv6: Some(1340),
            families: Some("ipv4+ipv6".into()),
            offloads: Offloads { tun: true, udp_gso: true, udp_gro: false },
            uptime_seconds: 7,
            pool: Some(PoolInfo { network: Ipv4Addr::new(198, 18, 0, 0), prefix: 24, capacity: 253, entries: 1 }),
            xdp: Some(XdpInfo { mode: "generic".into(), pins: "/sys/fs/bpf/udp-encap-tun/1-eth0-12345".into() }),
            counters: Counters(vec![
                ("tun_rx_packets".into(), 5),
                ("discard_not_tcp".into(), 0),
                ("xdp_map_entries".into(), 1),
            ]),
            xdp_counters_error: None,
            peers: vec![Peer {
                peer: Some("192.0.2.2:40000".parse().unwrap()),
                address: Ipv4Addr::new(198, 18, 0, 2),
                idle_ms: 10,
                expires_in_ms: 290_000,
                client: Some("alice".into()),
                session: Some("0102030405060708".into()),
            }, Peer {
                peer: Some("[2001:db8::2]:40000".parse().unwrap()),
                address: Ipv4Addr::new(198, 18, 0, 3),
                idle_ms: 20,
                expires_in_ms: 280_000,
                client: Some("bob".into()),
                session: None,
            }],
            leases: vec![],
        }
    }

    #[test]
    fn text_is_the_documented_lines() {
        let t = server().to_text();
        assert_eq!(
            t,
            "version 0.1.0\nmode server\nauth on\ninterface tun0 198.18.0.1/24 mtu 1400\n\
             uplink eth0 mtu 1500\nlisten_port 12345\nmax_mss 1360\nmax_mss_ipv6 1340\nfamilies ipv4+ipv6\n\
             offloads tun on udp_gso on udp_gro off\nuptime_seconds 7\n\
             pool 198.18.0.0/24 capacity 253 entries 1\n\
             xdp generic pins /sys/fs/bpf/udp-encap-tun/1-eth0-12345\n\
             counter tun_rx_packets 5\ncounter discard_not_tcp 0\ncounter xdp_map_entries 1\n\
             peer 192.0.2.2:40000 198.18.0.2 idle_ms 10 expires_in_ms 290000 client alice session 0102030405060708\n\
             peer [2001:db8::2]:40000 198.18.0.3 idle_ms 20 expires_in_ms 280000 client bob\n"
        );
    }

    #[test]
    fn json_round_trips_and_keeps_counter_order() {
        let r = server();
        let j = r.to_json();
        assert!(j.contains(r#""counters":{"tun_rx_packets":5,"discard_not_tcp":0,"xdp_map_entries":1}"#), "{j}");
        assert!(j.contains(r#""peer":"192.0.2.2:40000""#), "{j}");
        assert!(j.contains(r#""peer":"[2001:db8::2]:40000""#), "{j}");
        assert!(j.contains(r#""max_mss_ipv6":1340"#), "{j}");
        assert_eq!(Report::from_reply(&j).unwrap(), r);
    }

    #[test]
    fn refusals_and_garbage_are_errors() {
        let e = Report::from_reply("error: only root or the daemon's user may read its status\n").unwrap_err();
        assert_eq!(e, "only root or the daemon's user may read its status");
        assert!(Report::from_reply("mode server\n").unwrap_err().contains("not a status report"));
    }

    #[test]
    fn prometheus_exposition() {
        let mut r = server();
        r.interface.name = "t\"u\\n\n".into();
        let p = r.to_prometheus();
        let l = r#"{interface="t\"u\\n\n",mode="server"}"#;
        assert!(p.contains(&format!("# TYPE udp_encap_tun_tun_rx_packets_total counter\nudp_encap_tun_tun_rx_packets_total{l} 5\n")), "{p}");
        assert!(p.contains(&format!("udp_encap_tun_discard_not_tcp_total{l} 0\n")), "{p}");
        assert!(p.contains(&format!("# TYPE udp_encap_tun_xdp_map_entries gauge\nudp_encap_tun_xdp_map_entries{l} 1\n")), "{p}");
        assert!(p.contains(&format!("udp_encap_tun_entries{l} 1\n")), "{p}");
        assert!(p.contains(&format!("udp_encap_tun_pool_capacity{l} 253\n")), "{p}");
        assert!(!p.contains("xdp_map_entries_total"), "{p}");
        assert!(!p.contains("udp_encap_tun_leases"), "a server has no leases gauge: {p}");
        assert!(p.contains(r#"xdp="generic"} 1"#), "{p}");
        // Every sample line: name{labels} value, and each name has a TYPE.
        for line in p.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap();
            assert!(p.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
            assert!(line.rsplit(' ').next().unwrap().parse::<u64>().is_ok(), "{line}");
        }
    }
}
