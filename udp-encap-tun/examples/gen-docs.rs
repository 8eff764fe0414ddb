//! Writes the man page udp-encap-tun(8) and the shell completions, both
//! generated from the clap definition of the command line, so that they
//! always match the binary (`cargo xtask package` puts them in the Debian
//! package).
//!
//!     cargo run --example gen-docs -- OUTDIR
//!
//! OUTDIR gets `udp-encap-tun.8` and `completions/{udp-encap-tun.bash,
//! _udp-encap-tun, udp-encap-tun.fish}`.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use udp_encap_tun::cli::Cli;

/// What the generated page cannot know: the files, the signals, the unit.
const EXTRA: &str = r#".SH FILES
.TP
.I /etc/udp-encap-tun/NAME.toml
Options of the instance NAME, read with \fB\-\-config\fR: each key is a long option without its dashes (\fBlisten\-port = 12345\fR). Options on the command line win. \fI/etc/udp\-encap\-tun/example.toml\fR shows a server and a client.
.TP
.I /lib/systemd/system/udp\-encap\-tun@.service
Runs one instance per config file: \fBsystemctl enable \-\-now udp\-encap\-tun@NAME\fR.
.TP
.I /var/lib/udp\-encap\-tun
Session state (\fB\-\-state\-dir\fR).
.TP
.I /sys/fs/bpf/udp\-encap\-tun/
Pinned maps of the XDP gate, one directory per instance.
.SH SIGNALS
SIGINT and SIGTERM stop the daemon cleanly (the XDP program detached, its pins removed). SIGHUP re\-reads the client list (\fBsystemctl reload\fR).
.SH EXIT STATUS
0 after a clean stop; 1 when it cannot start or run (the message says why and what to do); 2 for a wrong command line or config file.
.SH SEE ALSO
.BR ip (8),
.BR bpftool (8),
.BR systemd.exec (5),
/usr/share/doc/udp\-encap\-tun/README.md
"#;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).unwrap_or_else(|| "target/generated".into()));
    std::fs::create_dir_all(out.join("completions"))?;
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration")
        .source(format!("udp-encap-tun {}", env!("CARGO_PKG_VERSION")))
        .render(&mut page)?;
    page.extend_from_slice(EXTRA.as_bytes());
    std::fs::write(out.join("udp-encap-tun.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, "udp-encap-tun", out.join("completions"))?;
    }
    println!("man page and completions in {}", out.display());
    Ok(())
}
