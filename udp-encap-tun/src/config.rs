//! `--config FILE`: the daemon's options from a TOML file (SPEC decision 13).
//!
//! Each key is the name of a long option without its dashes
//! (`listen-port = 12345`, `bind-to-interface = "wwan1"`, `insecure-no-auth =
//! true`, a repeatable option takes an array). Options given on the command
//! line win over the file.
//!
//! The keys are not listed here: they are read from the clap definition of
//! the command ([`clap::Command`]), so an option added to the command line is
//! a config key at once, with the same value parser. The file's settings
//! become command-line arguments (`--key=value`, put before the real ones)
//! and the whole line is parsed by clap as usual, so requirements and
//! conflicts are checked in one place. Before that each value is checked on
//! its own by the option's own parser, so a bad value is reported with the
//! file, the line and the key, as is an unknown key.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, Command};
use toml::{Spanned, Value};

/// The id of the `--config` option in the command (its long name too).
pub const CONFIG_ARG: &str = "config";

/// A config file that cannot be used; the message names the file, the line
/// and the key, and says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config file {}", self.path.display())?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        if let Some(k) = &self.key {
            write!(f, ", key `{k}`")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

/// The command line with the file's settings put in, and which options came
/// from the file (for a note when clap refuses the combination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub argv: Vec<OsString>,
    pub file: Option<PathBuf>,
    /// `--key` of every option taken from the file, in file order.
    pub from_file: Vec<String>,
}

/// Puts the settings of the `--config` file named in `argv` into `argv`, for
/// `cmd` to parse. Without `--config`, or for a subcommand, `argv` comes back
/// as it is (clap then reports its own errors, `--help` included).
pub fn expand(cmd: &Command, argv: Vec<OsString>) -> Result<Expanded, ConfigError> {
    let unchanged = |argv| Ok(Expanded { argv, file: None, from_file: Vec::new() });
    // A lenient first pass only to find `--config` and what the command
    // line itself sets; the real parse comes after.
    let Ok(m) = cmd.clone().ignore_errors(true).try_get_matches_from(&argv) else {
        return unchanged(argv);
    };
    if m.subcommand().is_some() {
        return unchanged(argv);
    }
    let Some(path) = m
        .get_raw(CONFIG_ARG)
        .and_then(|mut v| v.next_back())
        .map(PathBuf::from)
    else {
        return unchanged(argv);
    };
    let on_command_line = |id: &str| m.value_source(id) == Some(ValueSource::CommandLine);
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
        path: path.clone(),
        line: 0,
        key: None,
        msg: format!("cannot read it ({e}); check the path given to --config and its permissions"),
    })?;
    let settings = settings_from_toml(cmd, &path, &text)?;
    let mut file_args = Vec::new();
    let mut from_file = Vec::new();
    for s in settings {
        if on_command_line(s.arg.get_id().as_str()) {
            continue;
        }
        from_file.push(format!("--{}", s.key));
        file_args.extend(s.args);
    }
    let mut out = Vec::with_capacity(argv.len() + file_args.len());
    let mut rest = argv.into_iter();
    out.extend(rest.next());
    out.extend(file_args);
    out.extend(rest);
    Ok(Expanded { argv: out, file: Some(path), from_file })
}

/// One key of the file, checked, as the arguments it stands for.
struct Setting<'c> {
    key: String,
    arg: &'c Arg,
    args: Vec<OsString>,
}

/// Checks every key of `text` against the options of `cmd` and turns it
/// into command-line arguments, in the order of the file.
fn settings_from_toml<'c>(cmd: &'c Command, path: &Path, text: &str) -> Result<Vec<Setting<'c>>, ConfigError> {
    let table: BTreeMap<Spanned<String>, Spanned<Value>> = toml::from_str(text).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: e.span().map_or(0, |s| line_of(text, s.start)),
        key: None,
        msg: format!("not valid TOML: {}", e.message()),
    })?;
    let mut keys: Vec<_> = table.into_iter().collect();
    keys.sort_by_key(|(k, _)| k.span().start);
    let mut out = Vec::with_capacity(keys.len());
    for (key, value) in keys {
        let line = line_of(text, key.span().start);
        let err = |msg: String| ConfigError {
            path: path.to_path_buf(),
            line,
            key: Some(key.get_ref().clone()),
            msg,
        };
        let arg = option_for_key(cmd, key.get_ref()).map_err(err)?;
        let args = to_args(cmd, arg, key.get_ref(), value.get_ref()).map_err(err)?;
        out.push(Setting { key: key.into_inner(), arg, args });
    }
    Ok(out)
}

/// The option a key names, or why there is none.
fn option_for_key<'c>(cmd: &'c Command, key: &str) -> Result<&'c Arg, String> {
    if key == CONFIG_ARG {
        return Err("a config file cannot name another one; give --config on the command line only".into());
    }
    let settable = |a: &&Arg| {
        !matches!(a.get_action(), ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version)
    };
    if let Some(a) = cmd
        .get_arguments()
        .filter(settable)
        .find(|a| a.get_long() == Some(key) || a.get_all_aliases().is_some_and(|al| al.contains(&key)))
    {
        return Ok(a);
    }
    let dashed = key.replace('_', "-");
    let hint = match cmd.get_arguments().filter(settable).find(|a| a.get_long() == Some(dashed.as_str())) {
        Some(_) => format!("did you mean `{dashed}`? "),
        None => String::new(),
    };
    Err(format!(
        "unknown key: {hint}the keys are the long options of `{} --help` without the leading `--`",
        cmd.get_name()
    ))
}

/// The command-line arguments that stand for `key = value`, each value
/// checked by the option's own parser.
fn to_args(cmd: &Command, arg: &Arg, key: &str, value: &Value) -> Result<Vec<OsString>, String> {
    let flag = || OsString::from(format!("--{key}"));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => match value {
            // `true` gives the flag; `false` leaves it out (the default).
            Value::Boolean(b) => {
                let on = *b == matches!(arg.get_action(), ArgAction::SetTrue);
                Ok(if on { vec![flag()] } else { Vec::new() })
            }
            other => Err(format!("takes true or false, not {}", describe(other))),
        },
        ArgAction::Count => match value {
            Value::Integer(n) if (0..=255).contains(n) => Ok((0..*n).map(|_| flag()).collect()),
            other => Err(format!("takes a count (0-255), not {}", describe(other))),
        },
        ArgAction::Append => {
            let items: Vec<&Value> = match value {
                Value::Array(a) => a.iter().collect(),
                one => vec![one],
            };
            items
                .into_iter()
                .map(|v| scalar(v).and_then(|s| checked(cmd, key, s)))
                .collect()
        }
        _ => match value {
            Value::Array(_) => Err("takes one value, not an array (this option cannot be repeated)".into()),
            v => Ok(vec![checked(cmd, key, scalar(v)?)?]),
        },
    }
}

fn scalar(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Datetime(d) => Ok(d.to_string()),
        other => Err(format!("takes a value (a string or a number), not {}", describe(other))),
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table (options are top-level keys: no [sections])",
    }
}

/// Runs the option's own parser on `value` alone: the same checks, and the
/// same message, as on the command line. Only errors about the value count
/// here; what the option needs besides itself (`requires`, conflicts) is
/// checked when the whole command line is parsed.
fn checked(cmd: &Command, key: &str, value: String) -> Result<OsString, String> {
    let one = OsString::from(format!("--{key}={value}"));
    let probe = cmd.clone().mut_args(|a| a.required(false));
    match probe.try_get_matches_from([OsStr::new(cmd.get_name()), one.as_os_str()]) {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::InvalidValue
                    | ErrorKind::ValueValidation
                    | ErrorKind::InvalidUtf8
                    | ErrorKind::WrongNumberOfValues
                    | ErrorKind::TooManyValues
                    | ErrorKind::TooFewValues
                    | ErrorKind::NoEquals
            ) =>
        {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            Err(first.strip_prefix("error: ").unwrap_or(first).to_string())
        }
        _ => Ok(one),
    }
}

/// The command line of this process, with the `--config` file's settings
/// put in, parsed. Exits with a message (status 2, as clap does) when the
/// file or the line is wrong.
pub fn parse_cli() -> crate::cli::Cli {
    use clap::{CommandFactory, FromArgMatches};
    let cmd = crate::cli::Cli::command();
    let x = match expand(&cmd, std::env::args_os().collect()) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("udp-encap-tun: error: {e}");
            std::process::exit(2);
        }
    };
    let parsed = cmd
        .try_get_matches_from(&x.argv)
        .and_then(|m| crate::cli::Cli::from_arg_matches(&m));
    match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if let (Some(file), false) = (&x.file, x.from_file.is_empty() || !e.use_stderr()) {
                eprintln!("(from {}: {})", file.display(), x.from_file.join(" "));
            }
            std::process::exit(e.exit_code());
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::{CommandFactory, Parser};

    fn write(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("uet-config-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        (p.clone(), Rm(p))
    }

    fn parse(argv: &[&str]) -> Result<Cli, String> {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let x = expand(&Cli::command(), argv).map_err(|e| e.to_string())?;
        Cli::try_parse_from(&x.argv).map_err(|e| e.to_string())
    }

    const SERVER: &str = "# a server\n\
        interface = \"tun0\"\n\
        listen-port = 12345\n\
        bind-to-interface = \"eth0\"\n\
        insecure-no-auth = true\n\
        entry-timeout = \"2s\"\n\
        xdp-mode = \"off\"\n";

    #[test]
    fn file_gives_the_options() {
        let (p, _rm) = write(SERVER);
        let cli = parse(&["udp-encap-tun", "--config", p.to_str().unwrap()]).unwrap();
        let run = cli.run.unwrap();
        assert_eq!(run.interface, "tun0");
        assert_eq!(run.listen_port, 12345);
        assert_eq!(run.bind_to_interface, "eth0");
        assert!(run.insecure_no_auth);
        assert_eq!(run.entry_timeout, std::time::Duration::from_secs(2));
        assert_eq!(run.xdp_mode, crate::cli::XdpMode::Off);
        assert!(run.endpoint_port.is_none());
    }

    #[test]
    fn command_line_wins() {
        let (p, _rm) = write(SERVER);
        let cli = parse(&[
            "udp-encap-tun", "--listen-port", "999", "--config", p.to_str().unwrap(), "--entry-timeout=7s",
        ])
        .unwrap();
        let run = cli.run.unwrap();
        assert_eq!(run.listen_port, 999);
        assert_eq!(run.entry_timeout, std::time::Duration::from_secs(7));
        assert_eq!(run.interface, "tun0");
    }

    #[test]
    fn false_flag_is_left_out_and_repeatable_takes_an_array() {
        let (p, _rm) = write(
            "interface = \"tun0\"\nlisten-port = 1\nbind-to-interface = \"eth0\"\n\
             insecure-no-auth = false\ntun-address = \"198.19.0.2/32\"\nroute = [\"192.0.2.0/24\", \"198.51.100.7/32\"]\n",
        );
        let run = parse(&["udp-encap-tun", "--config", p.to_str().unwrap()]).unwrap().run.unwrap();
        assert!(!run.insecure_no_auth);
        assert_eq!(run.route.len(), 2);
        assert_eq!(run.route[1].to_string(), "198.51.100.7/32");
    }

    #[test]
    fn every_long_option_is_a_key() {
        // Nothing hand-kept: each long option of the command is accepted.
        let cmd = Cli::command();
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if matches!(a.get_action(), ArgAction::Help | ArgAction::Version) || long == CONFIG_ARG {
                continue;
            }
            assert!(option_for_key(&cmd, long).is_ok(), "{long} is not a config key");
        }
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let (p, _rm) = write("interface = \"tun0\"\n\nlisten_port = 12345\n");
        let e = expand(&Cli::command(), ["x", "--config", p.to_str().unwrap()].map(OsString::from).to_vec())
            .unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (3, Some("listen_port")));
        let msg = e.to_string();
        assert!(msg.contains(p.to_str().unwrap()) && msg.contains("line 3"), "{msg}");
        assert!(msg.contains("did you mean `listen-port`"), "{msg}");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        for (text, line, key, says) in [
            ("interface = \"t\"\nlisten-port = 0\n", 2, "listen-port", "0 is not in 1..=65535"),
            ("listen-port = \"x\"\n", 1, "listen-port", "invalid digit"),
            ("\n\nentry-timeout = \"soon\"\n", 3, "entry-timeout", "not a duration"),
            ("xdp-mode = \"fast\"\n", 1, "xdp-mode", "fast"),
            ("insecure-no-auth = \"yes\"\n", 1, "insecure-no-auth", "true or false"),
            ("interface = [\"a\", \"b\"]\n", 1, "interface", "not an array"),
            ("pool = \"198.18.0.0/40\"\n", 1, "pool", "prefix length"),
            ("[server]\ninterface = \"t\"\n", 1, "server", "unknown key"),
            ("config = \"/etc/other.toml\"\n", 1, "config", "cannot name another"),
        ] {
            let (p, _rm) = write(text);
            let e = expand(&Cli::command(), ["x", "--config", p.to_str().unwrap()].map(OsString::from).to_vec())
                .unwrap_err();
            assert_eq!((e.line, e.key.as_deref()), (line, Some(key)), "{text:?}: {e}");
            assert!(e.to_string().contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn broken_toml_and_missing_file() {
        let (p, _rm) = write("interface = \"tun0\"\nlisten-port = \n");
        let e = expand(&Cli::command(), ["x", "--config", p.to_str().unwrap()].map(OsString::from).to_vec())
            .unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.to_string().contains("not valid TOML"), "{e}");
        let e = expand(&Cli::command(), ["x", "--config", "/nonexistent/uet.toml"].map(OsString::from).to_vec())
            .unwrap_err();
        assert!(e.to_string().contains("cannot read it"), "{e}");
    }

    #[test]
    fn without_config_nothing_changes() {
        let argv: Vec<OsString> = ["x", "status", "--interface", "tun0"].map(OsString::from).to_vec();
        assert_eq!(expand(&Cli::command(), argv.clone()).unwrap().argv, argv);
        let argv: Vec<OsString> = ["x", "--help"].map(OsString::from).to_vec();
        assert_eq!(expand(&Cli::command(), argv.clone()).unwrap().argv, argv);
    }

    #[test]
    fn conflicts_between_file_and_command_line_are_clap_errors() {
        let (p, _rm) = write("interface = \"t\"\nlisten-port = 1\nbind-to-interface = \"e\"\ncert = \"/c\"\n");
        let e = parse(&["udp-encap-tun", "--config", p.to_str().unwrap(), "--insecure-no-auth"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
    }
}
