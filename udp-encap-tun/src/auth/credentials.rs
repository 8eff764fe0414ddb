//! The files of authentication and the `credentials` subcommand that makes
//! them (docs/auth.md shows them whole).
//!
//! Server side, in one directory (default `/etc/udp-encap-tun`):
//! - `server.crt`: the self-signed TLS certificate (PEM, ECDSA P-256).
//! - `server.key`: its private key (PEM PKCS#8, mode 0600).
//! - `clients.txt`: the client list, one `ID sha256:HEX` per line, where HEX
//!   is the SHA-256 of the client's 32-byte secret. `#` starts a comment.
//!
//! Client side, one file per client, `NAME.credential` (mode 0600):
//!
//! ```text
//! id = alice
//! secret = <64 hex digits: 32 random bytes>
//! server-pin = sha256:<64 hex digits: SHA-256 of server.crt's DER>
//! ```
//!
//! Secrets are 256 bits from the OS random source (ring's `SystemRandom`,
//! i.e. getrandom(2)). Because they are random and long, a plain SHA-256 is
//! enough to store them: there is nothing to brute-force that a slow,
//! salted hash would protect.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use subtle::ConstantTimeEq;

use super::AuthError;
use super::protocol::{SECRET_LEN, valid_id};

pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const CLIENTS: &str = "clients.txt";
pub const DEFAULT_DIR: &str = "/etc/udp-encap-tun";

/// Client lists larger than this are refused (about 100,000 clients).
const MAX_CLIENT_LIST: u64 = 16 << 20;
/// Credentials, certificates and keys are small; a bigger file is a mistake.
const MAX_SMALL_FILE: u64 = 1 << 20;

const CLIENTS_HEADER: &str = "\
# udp-encap-tun client list (the server reads it: --clients FILE).
# One client per line: `ID sha256:HEX`, HEX being the SHA-256 of the client's
# 32-byte secret (the secret itself is only in the client's credential file).
# `udp-encap-tun credentials client` adds lines; to revoke a client delete its
# line (or run `udp-encap-tun credentials revoke`). The server re-reads this
# file once a change has settled (half a second without a write, the writer
# done) and on SIGHUP, so rewriting it in place is safe.
";

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Exactly 64 hex digits (either case) into 32 bytes.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        let (hi, lo) = match pair {
            [h, l] => (digit(*h)?, digit(*l)?),
            _ => return None,
        };
        // Two hex digits always fit a byte.
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

pub fn format_pin(pin: &[u8; 32]) -> String {
    format!("sha256:{}", hex(pin))
}

pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    unhex32(s.strip_prefix("sha256:")?)
}

pub fn random_secret() -> Result<[u8; SECRET_LEN], AuthError> {
    let mut s = [0u8; SECRET_LEN];
    ring::rand::SystemRandom::new().fill(&mut s).map_err(|_| {
        AuthError::Config(
            "the operating system's random source failed; cannot make a secret".into(),
        )
    })?;
    Ok(s)
}

/// Reads at most `limit` bytes; a longer file is an error, not a truncation.
pub(crate) fn read_bounded(
    path: &Path,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, AuthError> {
    let f = fs::File::open(path).map_err(|source| AuthError::Read {
        what,
        path: path.into(),
        source,
    })?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|source| AuthError::Read {
            what,
            path: path.into(),
            source,
        })?;
    if buf.len() as u64 > limit {
        return Err(AuthError::BadFile {
            what,
            path: path.into(),
            msg: format!("larger than {limit} bytes"),
        });
    }
    Ok(buf)
}

fn read_text(path: &Path, what: &'static str, limit: u64) -> Result<String, AuthError> {
    String::from_utf8(read_bounded(path, what, limit)?).map_err(|_| AuthError::BadFile {
        what,
        path: path.into(),
        msg: "not UTF-8 text".into(),
    })
}

/// The certificate chain in a PEM file (end-entity first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthError> {
    let what = "certificate";
    let pem = read_bounded(path, what, MAX_SMALL_FILE)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AuthError::BadFile {
            what,
            path: path.into(),
            msg: format!("not a PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(AuthError::BadFile {
            what,
            path: path.into(),
            msg: "holds no `BEGIN CERTIFICATE` block".into(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, AuthError> {
    let what = "private key";
    let pem = read_bounded(path, what, MAX_SMALL_FILE)?;
    super::warn_if_readable_by_others(path, what);
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| AuthError::BadFile {
        what,
        path: path.into(),
        msg: format!("not a PEM private key: {e}"),
    })
}

/// The pin of the first certificate in a PEM file.
pub fn pin_of_cert_file(path: &Path) -> Result<[u8; 32], AuthError> {
    let certs = load_certs(path)?;
    let first = certs.first().ok_or_else(|| AuthError::BadFile {
        what: "certificate",
        path: path.into(),
        msg: "holds no certificate".into(),
    })?;
    Ok(sha256(first.as_ref()))
}

/// How a presented credential compares with the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    UnknownId,
    WrongSecret,
}

/// The server's client list: id -> SHA-256 of the secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientList {
    clients: HashMap<String, [u8; 32]>,
}

impl ClientList {
    pub fn parse(text: &str, path: &Path) -> Result<ClientList, AuthError> {
        let mut clients = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let err = |msg: String| AuthError::Parse {
                what: "client list",
                path: path.into(),
                line: i + 1,
                msg,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(id), Some(hash), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(err("expected `ID sha256:HEX`".into()));
            };
            if !valid_id(id) {
                return Err(err(format!(
                    "`{id}` is not a client id (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
                )));
            }
            let hash = parse_pin(hash).ok_or_else(|| {
                err("the hash must be `sha256:` followed by 64 hex digits".into())
            })?;
            if clients.insert(id.to_string(), hash).is_some() {
                return Err(err(format!("client `{id}` is listed twice; keep one line")));
            }
        }
        Ok(ClientList { clients })
    }

    pub fn load(path: &Path) -> Result<ClientList, AuthError> {
        Self::parse(&read_text(path, "client list", MAX_CLIENT_LIST)?, path)
    }

    pub fn check(&self, id: &str, secret: &[u8; SECRET_LEN]) -> Verdict {
        let h = sha256(secret);
        match self.clients.get(id) {
            Some(want) if bool::from(h.ct_eq(want)) => Verdict::Valid,
            Some(_) => Verdict::WrongSecret,
            None => {
                // Same work as a known id, so timing does not tell ids apart.
                let _ = h.ct_eq(&[0u8; 32]);
                Verdict::UnknownId
            }
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.clients.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// One line of the file for a client.
    pub fn line(id: &str, secret: &[u8; SECRET_LEN]) -> String {
        format!("{id} {}\n", format_pin(&sha256(secret)))
    }
}

/// A client's credential file.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredential {
    pub id: String,
    pub secret: [u8; SECRET_LEN],
    /// SHA-256 of the server certificate; `None` when the client trusts a CA
    /// (`--ca`) instead.
    pub server_pin: Option<[u8; 32]>,
}

impl std::fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret (logs, panics, `{:?}` of a config).
        f.debug_struct("ClientCredential")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("server_pin", &self.server_pin.as_ref().map(format_pin))
            .finish()
    }
}

impl ClientCredential {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "# udp-encap-tun client credential (the client reads it: --credential FILE).\n\
             # Whoever holds this file can authenticate as `{id}`: keep it mode 0600.\n\
             id = {id}\n\
             secret = {secret}\n",
            id = self.id,
            secret = hex(&self.secret),
        );
        if let Some(pin) = &self.server_pin {
            s.push_str(&format!("server-pin = {}\n", format_pin(pin)));
        }
        s
    }

    pub fn parse(text: &str, path: &Path) -> Result<ClientCredential, AuthError> {
        let what = "credential";
        let (mut id, mut secret, mut pin) = (None, None, None);
        for (i, raw) in text.lines().enumerate() {
            let err = |msg: String| AuthError::Parse {
                what,
                path: path.into(),
                line: i + 1,
                msg,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| err("expected `key = value`".into()))?;
            let (k, v) = (k.trim(), v.trim());
            let dup = |slot_full: bool| {
                if slot_full {
                    Err(err(format!("`{k}` is given twice")))
                } else {
                    Ok(())
                }
            };
            match k {
                "id" => {
                    dup(id.is_some())?;
                    if !valid_id(v) {
                        return Err(err(format!("`{v}` is not a client id")));
                    }
                    id = Some(v.to_string());
                }
                "secret" => {
                    dup(secret.is_some())?;
                    secret = Some(
                        unhex32(v).ok_or_else(|| err("the secret must be 64 hex digits".into()))?,
                    );
                }
                "server-pin" => {
                    dup(pin.is_some())?;
                    pin = Some(parse_pin(v).ok_or_else(|| {
                        err("the pin must be `sha256:` followed by 64 hex digits".into())
                    })?);
                }
                other => {
                    return Err(err(format!(
                        "unknown key `{other}` (known: id, secret, server-pin)"
                    )));
                }
            }
        }
        let missing = |k: &str| AuthError::BadFile {
            what,
            path: path.into(),
            msg: format!("has no `{k} = ...` line"),
        };
        Ok(ClientCredential {
            id: id.ok_or_else(|| missing("id"))?,
            secret: secret.ok_or_else(|| missing("secret"))?,
            server_pin: pin,
        })
    }

    pub fn load(path: &Path) -> Result<ClientCredential, AuthError> {
        let text = read_text(path, "credential", MAX_SMALL_FILE)?;
        super::warn_if_readable_by_others(path, "credential");
        Self::parse(&text, path)
    }
}

// ---- writing files -------------------------------------------------------

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `contents` to `path` with `mode`, atomically: readers (the server
/// re-reading the client list) see the old file or the new one, never half.
/// `replace = false` refuses to overwrite an existing file.
pub(crate) fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    replace: bool,
) -> Result<(), AuthError> {
    let werr = |source| AuthError::Write {
        path: path.into(),
        source,
    };
    let tmp = tmp_path(path);
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits away; set exactly what we mean.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        if replace {
            fs::rename(&tmp, path)
        } else {
            // link(2) fails if `path` exists: no check-then-write race.
            fs::hard_link(&tmp, path)
        }
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(AuthError::Exists {
            path: path.into(),
            hint: "move it away or pick another name",
        }),
        Err(e) => Err(werr(e)),
    }
}

fn ensure_dir(dir: &Path) -> Result<(), AuthError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AuthError::Write {
            path: dir.into(),
            source,
        })
}

/// What `credentials server` made.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub clients: PathBuf,
    pub pin: [u8; 32],
}

/// Makes `DIR/server.crt`, `DIR/server.key` and (if missing) an empty
/// `DIR/clients.txt`. `names` become the certificate's subject alternative
/// names (DNS names or IP addresses; only `--ca` clients look at them).
pub fn make_server_files(
    dir: &Path,
    names: &[String],
    force: bool,
) -> Result<ServerFiles, AuthError> {
    ensure_dir(dir)?;
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let clients = dir.join(CLIENTS);
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(AuthError::Exists {
                    path: p.clone(),
                    hint: "every client pins the current certificate, so a new one needs the new pin in \
                           every credential file; pass --force to make it anyway",
                });
            }
        }
    }
    let mut sans = vec!["udp-encap-tun".to_string()];
    sans.extend(names.iter().cloned());
    let mut params = rcgen::CertificateParams::new(sans)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "udp-encap-tun server");
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    if !clients.exists() {
        write_file(&clients, CLIENTS_HEADER.as_bytes(), 0o600, false)?;
    }
    Ok(ServerFiles {
        cert: cert_path,
        key: key_path,
        clients,
        pin: sha256(cert.der().as_ref()),
    })
}

/// Adds client `name` to `DIR/clients.txt` and writes its credential (with
/// the pin of `DIR/server.crt`) to `out` (default `DIR/NAME.credential`).
pub fn add_client(dir: &Path, name: &str, out: Option<&Path>) -> Result<PathBuf, AuthError> {
    if !valid_id(name) {
        return Err(AuthError::Config(format!(
            "`{name}` is not a client name: use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )));
    }
    let pin = pin_of_cert_file(&dir.join(SERVER_CERT))?;
    let list_path = dir.join(CLIENTS);
    let text = if list_path.exists() {
        read_text(&list_path, "client list", MAX_CLIENT_LIST)?
    } else {
        CLIENTS_HEADER.to_string()
    };
    let list = ClientList::parse(&text, &list_path)?;
    if list.contains(name) {
        return Err(AuthError::Config(format!(
            "client `{name}` is already in `{}`; to give it a new credential revoke it first \
             (`udp-encap-tun credentials revoke --name {name}`)",
            list_path.display()
        )));
    }
    let secret = random_secret()?;
    let cred = ClientCredential {
        id: name.to_string(),
        secret,
        server_pin: Some(pin),
    };
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join(format!("{name}.credential")));
    write_file(&out, cred.to_text().as_bytes(), 0o600, false)?;
    let mut new_text = text;
    if !new_text.is_empty() && !new_text.ends_with('\n') {
        new_text.push('\n');
    }
    new_text.push_str(&ClientList::line(name, &secret));
    if let Err(e) = write_file(&list_path, new_text.as_bytes(), 0o600, true) {
        let _ = fs::remove_file(&out);
        return Err(e);
    }
    Ok(out)
}

/// Removes client `name` from `DIR/clients.txt`. Returns whether it was there.
pub fn revoke_client(dir: &Path, name: &str) -> Result<bool, AuthError> {
    let list_path = dir.join(CLIENTS);
    let text = read_text(&list_path, "client list", MAX_CLIENT_LIST)?;
    // Validate first: never rewrite a file we do not understand.
    ClientList::parse(&text, &list_path)?;
    let mut found = false;
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| {
            let code = line.split('#').next().unwrap_or("");
            let hit = code.split_whitespace().next() == Some(name);
            found |= hit;
            !hit
        })
        .collect();
    if found {
        write_file(&list_path, kept.as_bytes(), 0o600, true)?;
    }
    Ok(found)
}

// ---- the subcommand --------------------------------------------------------

/// `udp-encap-tun credentials ...`: make the server certificate and the
/// client credentials.
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialsArgs {
    #[command(subcommand)]
    pub action: CredentialsAction,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CredentialsAction {
    /// Make the server's TLS certificate and key, and an empty client list;
    /// prints the certificate's pin.
    Server {
        /// Where to put server.crt, server.key and clients.txt.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// An extra DNS name or IP address for the certificate (repeatable);
        /// only clients that use --ca instead of the pin look at names.
        #[arg(long = "san", value_name = "NAME_OR_IP")]
        san: Vec<String>,
        /// Replace an existing certificate (every client then needs the new pin).
        #[arg(long)]
        force: bool,
    },
    /// Add a client: a line in clients.txt (only a hash of its secret) and a
    /// credential file to copy to the client.
    Client {
        /// The server's directory (made by `credentials server`).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// The client's id: 1-64 of A-Z a-z 0-9 . _ -
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Where to write the credential (default: DIR/NAME.credential).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke a client: remove it from clients.txt. A running server
    /// notices within a second (or at once with SIGHUP): it removes the
    /// client's entries and their XDP map entries at once and refuses its
    /// next attempt.
    Revoke {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(long, value_name = "NAME")]
        name: String,
    },
    /// Print the pin (SHA-256) of a certificate file.
    Pin {
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
    },
}

pub fn run_credentials_command(args: &CredentialsArgs) -> anyhow::Result<()> {
    match &args.action {
        CredentialsAction::Server { dir, san, force } => {
            let f = make_server_files(dir, san, *force)?;
            println!(
                "wrote {} (private key, mode 0600) and {} (certificate)",
                f.key.display(),
                f.cert.display()
            );
            println!("client list: {}", f.clients.display());
            println!("server pin: {}", format_pin(&f.pin));
            if *force {
                println!(
                    "the certificate changed: set `server-pin = {}` in every client's credential file",
                    format_pin(&f.pin)
                );
            }
            println!(
                "next: `udp-encap-tun credentials client --dir {} --name NAME` for each client",
                dir.display()
            );
            println!(
                "server: udp-encap-tun ... --cert {} --key {} --clients {}",
                f.cert.display(),
                f.key.display(),
                f.clients.display()
            );
        }
        CredentialsAction::Client { dir, name, out } => {
            let path = add_client(dir, name, out.as_deref())?;
            println!("added `{name}` to {}", dir.join(CLIENTS).display());
            println!(
                "wrote {} (mode 0600): copy it to the client, e.g.",
                path.display()
            );
            println!(
                "  scp {} CLIENT:/etc/udp-encap-tun/{name}.credential",
                path.display()
            );
            println!(
                "client: udp-encap-tun ... --endpoint-port PORT --credential /etc/udp-encap-tun/{name}.credential"
            );
            println!("a running server picks the new client up by itself (or send it SIGHUP)");
        }
        CredentialsAction::Revoke { dir, name } => {
            if revoke_client(dir, name)? {
                println!(
                    "revoked `{name}`: removed from {}",
                    dir.join(CLIENTS).display()
                );
                println!(
                    "a running server notices within a second (SIGHUP: at once), removes its entries \
                     and refuses its next attempt"
                );
            } else {
                anyhow::bail!(
                    "no client `{name}` in {}; nothing revoked",
                    dir.join(CLIENTS).display()
                );
            }
        }
        CredentialsAction::Pin { cert } => {
            println!("{}", format_pin(&pin_of_cert_file(cert)?));
        }
    }
    Ok(())
}
