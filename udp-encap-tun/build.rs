//! Embeds the XDP object built by `cargo xtask build-ebpf`, so one build
//! gives one binary that carries its own eBPF program.
//!
//! The object is copied into OUT_DIR (src/xdp.rs includes it from there).
//! `UDP_ENCAP_TUN_EBPF_OBJ=/path/to/object` overrides where it comes from.

use std::path::PathBuf;

const DEFAULT_OBJ: &str =
    "../udp-encap-tun-ebpf/target/bpfel-unknown-none/release/udp-encap-tun-ebpf";

fn main() {
    println!("cargo:rerun-if-env-changed=UDP_ENCAP_TUN_EBPF_OBJ");
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let obj = match std::env::var_os("UDP_ENCAP_TUN_EBPF_OBJ") {
        Some(p) => PathBuf::from(p),
        None => manifest_dir.join(DEFAULT_OBJ),
    };
    // Watch the file even when it is missing: cargo reruns this script once
    // it appears.
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("udp-encap-tun.bpf.o");
    if let Err(e) = std::fs::copy(&obj, &out) {
        eprintln!(
            "error: the XDP object {} is not there ({e}).\n\
             Build it first with:\n\n    cargo xtask build-ebpf\n\n\
             (or point UDP_ENCAP_TUN_EBPF_OBJ at a prebuilt object).",
            obj.display()
        );
        std::process::exit(1);
    }
}
