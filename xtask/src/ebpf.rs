//! Building the eBPF crate (issue 3). Placeholder.

use std::path::PathBuf;

pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    anyhow::bail!("not yet")
}
