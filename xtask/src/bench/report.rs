//! The benchmark's outputs: a Markdown table, results.json and an SVG chart
//! (written by hand: bars of tunnel vs raw per case on a log scale, with the
//! ratio, and the latency percentiles).

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Case, CaseResult, Results, Run};

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s.get(n / 2).copied().unwrap_or(f64::NAN),
        n => {
            (s.get(n / 2 - 1).copied().unwrap_or(f64::NAN)
                + s.get(n / 2).copied().unwrap_or(f64::NAN))
                / 2.0
        }
    }
}

/// Nearest-rank percentile of integer samples, as f64.
pub fn percentile(v: &[u64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s.get(rank.clamp(1, s.len()) - 1).copied().unwrap_or(0) as f64
}

fn gbps(runs: &[Run]) -> Vec<f64> {
    runs.iter().map(|r| r.gbps).collect()
}

/// Tunnel over raw for each pair of runs made back to back (run i of each
/// path): the spread of these is how far the ratio can be trusted, since slow
/// drift of the machine hits both runs of a pair alike.
pub fn pair_ratios(tunnel: &[f64], raw: &[f64]) -> Vec<f64> {
    tunnel
        .iter()
        .zip(raw)
        .filter(|(_, w)| **w > 0.0)
        .map(|(t, w)| t / w)
        .collect()
}

fn minmax(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(*x), b.max(*x))
        })
}

/// Daemon CPU seconds per GB (10^9 bytes) over all tunnel runs of a case:
/// (server + client, server, client).
pub fn cpu_per_gb(r: &CaseResult) -> (f64, f64, f64) {
    let bytes: u64 = r.tunnel.iter().map(|r| r.bytes).sum();
    let (s, c) = r
        .tunnel
        .iter()
        .filter_map(|r| r.cpu)
        .fold((0.0, 0.0), |(a, b), (s, c)| (a + s, b + c));
    let gb = bytes as f64 / 1e9;
    ((s + c) / gb, s / gb, c / gb)
}

fn fmt_g(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.1}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_median_range(v: &[f64]) -> String {
    let (lo, hi) = minmax(v);
    format!("{} ({}–{})", fmt_g(median(v)), fmt_g(lo), fmt_g(hi))
}

/// One row per case: medians, ratio, CPU, retransmits.
fn throughput_table(s: &mut String, cases: &[(Case, CaseResult)], raw_label: &str) {
    let _ = writeln!(
        s,
        "| case | tunnel Gbit/s | {raw_label} | tunnel / raw | daemons' CPU s/GB (server + client) | retransmits/run tunnel / raw |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for (case, cr) in cases {
        let (t, w) = (gbps(&cr.tunnel), gbps(&cr.raw));
        let (cpu, cs, cc) = cpu_per_gb(cr);
        let pairs = minmax(&pair_ratios(&t, &w));
        let retr = |runs: &[Run]| {
            median(
                &runs
                    .iter()
                    .map(|r| r.retransmits as f64)
                    .collect::<Vec<_>>(),
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} ({:.2}–{:.2}) | {:.2} ({:.2} + {:.2}) | {:.0} / {:.0} |",
            case.label(),
            fmt_median_range(&t),
            fmt_median_range(&w),
            median(&t) / median(&w),
            pairs.0,
            pairs.1,
            cpu,
            cs,
            cc,
            retr(&cr.tunnel),
            retr(&cr.raw)
        );
    }
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Machine:\n");
    for (k, v) in &r.facts {
        let _ = writeln!(s, "- {k}: {v}");
    }
    let _ = writeln!(
        s,
        "\nThroughput: iperf3, {} runs of {} s per case and path, tunnel and raw alternated; \
         median (min–max) in Gbit/s. tunnel / raw: median over median, and in brackets the lowest \
         and highest ratio of two runs made back to back. CPU: utime+stime of both daemons per 10^9 bytes moved.\n",
        r.runs, r.seconds
    );
    throughput_table(&mut s, &r.cases, "raw veth Gbit/s");
    if !r.cases_v6.is_empty() {
        let _ = writeln!(
            s,
            "\nIPv6 uplink (--ipv6): the same cases with the client reaching the server over the uplink \
             veth's IPv6 addresses (--endpoint-v6; the inner traffic stays IPv4), against raw TCP over the \
             other veth's IPv6 addresses, alternated the same way, after the IPv4 cases above.\n"
        );
        throughput_table(&mut s, &r.cases_v6, "raw IPv6 veth Gbit/s");
    }
    let (t50, t99) = (
        percentile(&r.rr_tunnel, 50.0) / 1e3,
        percentile(&r.rr_tunnel, 99.0) / 1e3,
    );
    let (w50, w99) = (
        percentile(&r.rr_raw, 50.0) / 1e3,
        percentile(&r.rr_raw, 99.0) / 1e3,
    );
    let _ = writeln!(
        s,
        "\nLatency: {} B request / {} B response over one TCP connection (TCP_NODELAY), \
         {} runs of {} s per path, alternated; {} round trips through the tunnel, {} raw.\n",
        super::rr::MSG,
        super::rr::MSG,
        r.runs,
        r.rr_seconds,
        r.rr_tunnel.len(),
        r.rr_raw.len()
    );
    let _ = writeln!(
        s,
        "| round trip | tunnel µs | raw veth µs | tunnel − raw µs |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|");
    let _ = writeln!(s, "| median | {t50:.1} | {w50:.1} | {:+.1} |", t50 - w50);
    let _ = writeln!(s, "| p99 | {t99:.1} | {w99:.1} | {:+.1} |", t99 - w99);
    if let Some((us, busy)) = &r.rr_busy {
        let (b50, b99) = (percentile(busy, 50.0) / 1e3, percentile(busy, 99.0) / 1e3);
        let _ = writeln!(s, "| median, daemons with --busy-poll {us} | {b50:.1} | {w50:.1} | {:+.1} |", b50 - w50);
        let _ = writeln!(s, "| p99, daemons with --busy-poll {us} | {b99:.1} | {w99:.1} | {:+.1} |", b99 - w99);
        let _ = writeln!(
            s,
            "\nThe --busy-poll rows come from a second pass ({} round trips) with both daemons restarted with \
             that option; raw is over both passes.",
            busy.len()
        );
    }
    if let Some(w) = &r.wake {
        let _ = writeln!(
            s,
            "\nWake-ups: two threads pinned to CPUs 0 and 1 passing one byte back and forth take \
             {:.1} µs per round trip (median; p99 {:.1}), that is two wake-ups of a thread sleeping on \
             the other CPU. A round trip through the tunnel has four more wake-ups than raw: each \
             daemon wakes once each way.",
            percentile(w, 50.0) / 1e3,
            percentile(w, 99.0) / 1e3
        );
    }
    let _ = writeln!(
        s,
        "\nBatching over the whole benchmark (daemon counters: packets per system call; \
         `cargo test` only checks that batching happens at all):"
    );
    for b in batching(r) {
        let _ = writeln!(
            s,
            "- {}: {:.1} datagrams per sendmsg, {:.1} segments per TUN read, {:.1} datagrams per \
             recvmsg, {:.1} segments per TUN write; {} TUN reads took a second sendmsg",
            b.who, b.per_send, b.per_tun_read, b.per_recv, b.per_tun_write, b.second_sends
        );
    }
    let nonzero: Vec<_> = r
        .counters
        .iter()
        .filter(|(_, k, v)| {
            *v > 0 && (k.contains("discard") || k.contains("udp_") || k.contains("tun_"))
        })
        .filter(|(who, k, _)| who.ends_with("kernel") || k.starts_with("discard"))
        .collect();
    let _ = writeln!(
        s,
        "\nDrops during the benchmark (daemon discard counters, kernel UDP errors, TUN queue drops):"
    );
    if nonzero.is_empty() {
        let _ = writeln!(s, "none");
    }
    for (who, k, v) in nonzero {
        let _ = writeln!(s, "- {who}: {k} +{v}");
    }
    s
}

/// One daemon's batching figures, from the counter deltas of the run.
pub struct Batching {
    pub who: String,
    pub per_send: f64,
    pub per_tun_read: f64,
    pub per_recv: f64,
    pub per_tun_write: f64,
    /// udp_send_calls - tun_reads: reads whose super-segment did not fit
    /// one GSO send (0 when the TUN's gso_max_segs cap works).
    pub second_sends: i64,
}

pub fn batching(r: &Results) -> Vec<Batching> {
    ["server daemon", "client daemon"]
        .iter()
        .map(|who| {
            let get = |name: &str| {
                r.counters
                    .iter()
                    .find(|(w, k, _)| w == who && k == name)
                    .map_or(0, |(_, _, v)| *v)
            };
            let ratio = |a: &str, b: &str| get(a) as f64 / get(b).max(1) as f64;
            Batching {
                who: (*who).to_string(),
                per_send: ratio("udp_tx_packets", "udp_send_calls"),
                per_tun_read: ratio("tun_rx_packets", "tun_reads"),
                per_recv: ratio("udp_rx_packets", "udp_recv_calls"),
                per_tun_write: ratio("tun_tx_packets", "tun_writes"),
                second_sends: get("udp_send_calls") as i64 - get("tun_reads") as i64,
            }
        })
        .collect()
}

fn throughput_json(cases: &[(Case, CaseResult)]) -> Vec<Value> {
    let run = |x: &Run| {
        json!({
            "gbit_per_s": x.gbps,
            "bytes": x.bytes,
            "retransmits": x.retransmits,
            "daemon_cpu_s": x.cpu.map(|(s, c)| json!({"server": s, "client": c})),
        })
    };
    cases
        .iter()
        .map(|(c, cr)| {
            let (t, w) = (gbps(&cr.tunnel), gbps(&cr.raw));
            let (cpu, cs, cc) = cpu_per_gb(cr);
            json!({
                "case": c.key(),
                "label": c.label(),
                "flows": c.flows,
                "reverse": c.reverse,
                "tunnel_gbit_median": median(&t),
                "raw_gbit_median": median(&w),
                "ratio": median(&t) / median(&w),
                "pair_ratios": pair_ratios(&t, &w),
                "daemon_cpu_s_per_gb": {"total": cpu, "server": cs, "client": cc},
                "tunnel_runs": cr.tunnel.iter().map(run).collect::<Vec<_>>(),
                "raw_runs": cr.raw.iter().map(run).collect::<Vec<_>>(),
            })
        })
        .collect()
}

pub fn json(r: &Results) -> Value {
    let cases = throughput_json(&r.cases);
    let lat = |v: &[u64]| {
        json!({
            "round_trips": v.len(),
            "median_us": percentile(v, 50.0) / 1e3,
            "p90_us": percentile(v, 90.0) / 1e3,
            "p99_us": percentile(v, 99.0) / 1e3,
            "max_us": percentile(v, 100.0) / 1e3,
        })
    };
    json!({
        "machine": r.facts.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "settings": {"runs": r.runs, "seconds": r.seconds, "rr_seconds": r.rr_seconds, "rr_message_bytes": super::rr::MSG},
        "throughput": cases,
        "throughput_ipv6": throughput_json(&r.cases_v6),
        "latency": {
            "tunnel": lat(&r.rr_tunnel),
            "raw": lat(&r.rr_raw),
            "wake_round_trip": r.wake.as_ref().map(|v| lat(v)),
            "tunnel_busy_poll": r.rr_busy.as_ref().map(|(us, v)| json!({"busy_poll_us": us, "round_trips": lat(v)})),
        },
        "counters": r.counters.iter().map(|(w, k, v)| json!({"who": w, "name": k, "delta": v})).collect::<Vec<_>>(),
        "batching": batching(r).iter().map(|b| json!({
            "who": b.who,
            "datagrams_per_sendmsg": b.per_send,
            "segments_per_tun_read": b.per_tun_read,
            "datagrams_per_recvmsg": b.per_recv,
            "segments_per_tun_write": b.per_tun_write,
            "tun_reads_with_a_second_sendmsg": b.second_sends,
        })).collect::<Vec<_>>(),
        "wall_seconds": r.wall.as_secs_f64(),
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const TUNNEL: &str = "#e07b39";
const RAW: &str = "#3a6ea5";

pub fn svg(r: &Results) -> String {
    let (w, left, right) = (920.0_f64, 230.0_f64, 130.0_f64);
    let plot_w = w - left - right;
    let bar_h = 16.0;
    let group_h = 2.0 * bar_h + 18.0;
    let top = 70.0;
    let thr_h = group_h * r.cases.len() as f64;
    let lat_top = top + thr_h + 80.0;
    let lat_rows = if r.rr_busy.is_some() { 4.0 } else { 2.0 };
    let lat_h = lat_rows * (2.0 * bar_h + 18.0);
    let h = lat_top + lat_h + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">udp-encap-tun: tunnel vs raw veth (cargo xtask bench)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="40" fill="#555">iperf3 Gbit/s, median of {} runs x {} s (log scale); right: tunnel / raw</text>"##,
        r.runs, r.seconds
    );
    legend(&mut s, left, 52.0);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-weight="bold">tunnel / raw</text>"#,
        w - right + 30.0,
        top - 8.0
    );

    // Throughput, log10 scale over whole decades that hold every median.
    let all: Vec<f64> = r
        .cases
        .iter()
        .flat_map(|(_, c)| [median(&gbps(&c.tunnel)), median(&gbps(&c.raw))])
        .filter(|x| *x > 0.0 && x.is_finite())
        .collect();
    let (lo, hi) = minmax(&all);
    let d0 = if lo.is_finite() {
        lo.log10().floor()
    } else {
        -2.0
    };
    let d1 = if hi.is_finite() {
        hi.log10().ceil().max(d0 + 1.0)
    } else {
        2.0
    };
    let x_of = |v: f64| left + plot_w * ((v.max(10f64.powf(d0)).log10() - d0) / (d1 - d0));
    let mut d = d0;
    while d <= d1 + 1e-9 {
        let x = x_of(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            top - 4.0,
            top + thr_h,
            top + thr_h + 14.0,
            trim(10f64.powf(d))
        );
        d += 1.0;
    }
    for (i, (case, cr)) in r.cases.iter().enumerate() {
        let y = top + group_h * i as f64;
        let (t, rw) = (median(&gbps(&cr.tunnel)), median(&gbps(&cr.raw)));
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + bar_h + 4.0,
            esc(&case.label())
        );
        for (j, (v, color)) in [(t, TUNNEL), (rw, RAW)].into_iter().enumerate() {
            let yy = y + j as f64 * bar_h;
            let x = x_of(v);
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                (x - left).max(1.0),
                bar_h - 2.0,
                x + 4.0,
                yy + bar_h - 4.0,
                fmt_g(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{:.3}</text>"#,
            w - right + 30.0,
            y + bar_h + 4.0,
            t / rw
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">Gbit/s</text>"##,
        left + plot_w / 2.0,
        top + thr_h + 30.0
    );

    // Latency, linear scale.
    let mut vals = vec![
        (
            "median".to_string(),
            percentile(&r.rr_tunnel, 50.0) / 1e3,
            percentile(&r.rr_raw, 50.0) / 1e3,
        ),
        (
            "p99".to_string(),
            percentile(&r.rr_tunnel, 99.0) / 1e3,
            percentile(&r.rr_raw, 99.0) / 1e3,
        ),
    ];
    if let Some((us, busy)) = &r.rr_busy {
        for (name, p) in [("median", 50.0), ("p99", 99.0)] {
            vals.push((
                format!("{name}, --busy-poll {us}"),
                percentile(busy, p) / 1e3,
                percentile(&r.rr_raw, p) / 1e3,
            ));
        }
    }
    let max = vals
        .iter()
        .flat_map(|(_, a, b)| [*a, *b])
        .filter(|x| x.is_finite())
        .fold(1.0, f64::max);
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{:.1}" fill="#555">request/response round trip, {} B each way, one TCP connection (µs, linear)</text>"##,
        lat_top - 12.0,
        super::rr::MSG
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-weight="bold">tunnel − raw</text>"#,
        w - right + 30.0,
        lat_top - 12.0
    );
    for (i, (name, t, rw)) in vals.iter().enumerate() {
        let y = lat_top + (2.0 * bar_h + 18.0) * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{name}</text>"#,
            left - 8.0,
            y + bar_h + 4.0
        );
        for (j, (v, color)) in [(*t, TUNNEL), (*rw, RAW)].into_iter().enumerate() {
            let yy = y + j as f64 * bar_h;
            let bw = if v.is_finite() {
                0.85 * plot_w * v / max
            } else {
                0.0
            };
            let _ = writeln!(
                s,
                r#"<rect x="{left}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{v:.1} µs</text>"#,
                bw.max(1.0),
                bar_h - 2.0,
                left + bw + 4.0,
                yy + bar_h - 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{:+.1} µs</text>"#,
            w - right + 30.0,
            y + bar_h + 4.0,
            t - rw
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn legend(s: &mut String, x: f64, y: f64) {
    let _ = writeln!(
        s,
        r#"<rect x="{x}" y="{:.1}" width="12" height="10" fill="{TUNNEL}"/><text x="{:.1}" y="{y:.1}">tunnel (udp-encap-tun)</text><rect x="{:.1}" y="{:.1}" width="12" height="10" fill="{RAW}"/><text x="{:.1}" y="{y:.1}">raw veth</text>"#,
        y - 9.0,
        x + 16.0,
        x + 170.0,
        y - 9.0,
        x + 186.0
    );
}

fn trim(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ratios_divide_runs_made_back_to_back() {
        let r = pair_ratios(&[8.0, 6.0, 9.0], &[16.0, 15.0, 18.0]);
        assert_eq!(r, vec![0.5, 0.4, 0.5]);
        assert_eq!(minmax(&r), (0.4, 0.5));
        // A raw run that moved nothing has no ratio; an unpaired run neither.
        assert_eq!(pair_ratios(&[8.0, 6.0, 1.0], &[0.0, 12.0]), vec![0.5]);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
