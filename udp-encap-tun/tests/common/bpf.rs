//! The gate's pinned maps as an operator reads them: `bpftool map dump`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use super::run_cmd;

/// `bpftool map dump pinned PATH` as (key bytes, value bytes) entries, with
/// bpftool's element count checked. bpftool prints a short entry on one line
/// (`key: .. value: ..`) and a long one over several, 16 bytes a line.
pub fn map_dump(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = run_cmd(Command::new("bpftool").args(["map", "dump", "pinned"]).arg(path));
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut in_value = false;
    let mut found = None;
    let mut tokens = out.split_whitespace();
    while let Some(t) = tokens.next() {
        match t {
            "key:" => {
                entries.push((Vec::new(), Vec::new()));
                in_value = false;
            }
            "value:" => in_value = true,
            "Found" => found = tokens.next().and_then(|n| n.parse::<usize>().ok()),
            "element" | "elements" => {}
            hex => {
                let b = u8::from_str_radix(hex, 16)
                    .unwrap_or_else(|_| panic!("unexpected token `{hex}` in the dump:\n{out}"));
                let e = entries
                    .last_mut()
                    .unwrap_or_else(|| panic!("bytes before any key:\n{out}"));
                if in_value { e.1.push(b) } else { e.0.push(b) }
            }
        }
    }
    assert_eq!(
        found,
        Some(entries.len()),
        "bpftool's element count:\n{out}"
    );
    entries
}

/// The peers in the pinned map `DIR/peers`, decoded per docs/xdp.md: key =
/// address (16 bytes, wire order; IPv4 as `::ffff:a.b.c.d`, given back as
/// IPv4), port (2 bytes, big-endian), `00 00`; value = flags `01 00 00 00`.
pub fn map_peers(pin_dir: &Path) -> BTreeSet<SocketAddr> {
    let mut peers = BTreeSet::new();
    for (key, value) in map_dump(&pin_dir.join("peers")) {
        assert!(key.len() == 20 && key[18..] == [0, 0], "bad key {key:02x?} (want address, port, 00 00)");
        assert_eq!(value, [1, 0, 0, 0], "bad value for key {key:02x?}");
        let mut a = [0u8; 16];
        a.copy_from_slice(&key[..16]);
        let ip = IpAddr::V6(Ipv6Addr::from(a)).to_canonical();
        let peer = SocketAddr::new(ip, u16::from_be_bytes([key[16], key[17]]));
        assert!(peers.insert(peer), "duplicate key {peer}");
    }
    peers
}
