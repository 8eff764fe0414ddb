//! Credentials for tests: a server directory made by the real binary's
//! `credentials` subcommands, clients added and revoked the same way.

use std::path::PathBuf;
use std::process::Command;

use super::{ArtifactDir, BIN, run_cmd};

/// `udp-encap-tun ARGS` on the host (the credential commands touch only files).
pub fn bin(args: &[&str]) -> String {
    run_cmd(Command::new(*BIN).args(args))
}

/// A server credential directory: certificate, key, client list.
pub struct CredDir {
    pub dir: PathBuf,
    pub pin: String,
}

impl CredDir {
    pub fn new(art: &ArtifactDir, name: &str) -> CredDir {
        let dir = art.file(name);
        let d = dir.to_str().unwrap().to_string();
        let out = bin(&["credentials", "server", "--dir", &d]);
        let cert = dir.join("server.crt");
        let pin = bin(&["credentials", "pin", "--cert", cert.to_str().unwrap()])
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap_or_else(|| panic!("no pin printed by `credentials pin`; server said: {out}"))
            .to_string();
        assert!(
            out.contains(&pin),
            "`credentials server` did not print the pin {pin}: {out}"
        );
        CredDir { dir, pin }
    }

    pub fn path(&self, f: &str) -> String {
        self.dir.join(f).to_str().unwrap().to_string()
    }

    /// Adds client `name`; returns its credential file.
    pub fn client(&self, name: &str) -> PathBuf {
        bin(&[
            "credentials",
            "client",
            "--dir",
            &self.path(""),
            "--name",
            name,
        ]);
        let f = self.dir.join(format!("{name}.credential"));
        assert!(f.exists(), "no credential file {}", f.display());
        f
    }

    pub fn revoke(&self, name: &str) {
        bin(&[
            "credentials",
            "revoke",
            "--dir",
            &self.path(""),
            "--name",
            name,
        ]);
    }

    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.path("server.crt"),
            "--key".into(),
            self.path("server.key"),
            "--clients".into(),
            self.path("clients.txt"),
        ]
    }
}

