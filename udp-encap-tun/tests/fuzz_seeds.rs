//! Every committed fuzz seed (`fuzz/seeds/<target>/*`), regression seeds
//! included, replayed through the fuzz targets' own code on stable Rust, so
//! a regression fails `cargo test` (and CI) without a fuzzer.
//!
//! The targets are not copied: this file includes `fuzz/fuzz_targets/*.rs`
//! and the fuzz crate's helpers (`fuzz/src/lib.rs`) as modules. Each target
//! keeps its body in `pub fn run(data: &[u8])` and compiles its
//! `fuzz_target!` line (and `no_main`) only outside `cfg(test)`; its
//! `use udp_encap_tun_fuzz::...` resolves here through `extern crate self`.

// Test fixtures and the fuzz targets' own assertions (they panic on purpose).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

extern crate self as udp_encap_tun_fuzz;

use std::collections::BTreeSet;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod helpers;
pub use helpers::*;

#[path = "../../fuzz/fuzz_targets/auth_messages.rs"]
mod auth_messages;
#[path = "../../fuzz/fuzz_targets/core_both_ways.rs"]
mod core_both_ways;
#[path = "../../fuzz/fuzz_targets/session_control.rs"]
mod session_control;
#[path = "../../fuzz/fuzz_targets/state_file.rs"]
mod state_file;
#[path = "../../fuzz/fuzz_targets/tso_read.rs"]
mod tso_read;
#[path = "../../fuzz/fuzz_targets/wire_segment.rs"]
mod wire_segment;
#[path = "../../fuzz/fuzz_targets/wire_tun_packet.rs"]
mod wire_tun_packet;

/// A target's name (its `[[bin]]` in fuzz/Cargo.toml) and its entry point.
type Target = (&'static str, fn(&[u8]));

/// Every target of fuzz/Cargo.toml.
const TARGETS: [Target; 7] = [
    ("auth_messages", auth_messages::run),
    ("core_both_ways", core_both_ways::run),
    ("session_control", session_control::run),
    ("state_file", state_file::run),
    ("tso_read", tso_read::run),
    ("wire_segment", wire_segment::run),
    ("wire_tun_packet", wire_tun_packet::run),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The `[[bin]]` names of fuzz/Cargo.toml (each one is a target).
fn declared_targets() -> BTreeSet<String> {
    let manifest = fuzz_dir().join("Cargo.toml");
    let text = fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("read {}: {e}", manifest.display()));
    let mut names = BTreeSet::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            let name = v.trim_start().trim_start_matches('=').trim().trim_matches('"');
            names.insert(name.to_string());
        }
    }
    names
}

/// The list above, fuzz/Cargo.toml and fuzz/seeds/ name the same targets:
/// a new target (or a seed directory for one) cannot be left out here.
#[test]
fn every_fuzz_target_and_seed_directory_is_replayed() {
    let here: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        declared_targets(),
        here,
        "fuzz/Cargo.toml and tests/fuzz_seeds.rs list different targets"
    );
    let seeds = fuzz_dir().join("seeds");
    let dirs: BTreeSet<String> = fs::read_dir(&seeds)
        .unwrap_or_else(|e| panic!("read {}: {e}", seeds.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs, here, "fuzz/seeds/ has directories for other targets than tests/fuzz_seeds.rs");
}

/// Each target runs every one of its seeds without a panic (a failed check
/// of the target is a panic). All seeds run; the failures are listed by file.
#[test]
fn committed_seeds_pass_their_targets() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for (name, run) in TARGETS {
        let dir = fuzz_dir().join("seeds").join(name);
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds in {}", dir.display());
        for f in files {
            let data = fs::read(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
            ran += 1;
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{name} {}: {msg}", f.display()));
            }
        }
    }
    eprintln!("replayed {ran} seeds");
    assert!(failures.is_empty(), "seeds that fail their fuzz target:\n{}", failures.join("\n"));
}
