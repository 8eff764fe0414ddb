//! The `udp-encap-tun` binary: parse the command line, run. See README.md.

use std::process::ExitCode;

use udp_encap_tun::edge::control;
use udp_encap_tun::{cli, daemon};

fn main() -> ExitCode {
    // `--config FILE` folds the file's settings into the command line.
    let cli = udp_encap_tun::config::parse_cli();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let result = match (cli.command, cli.run) {
        (Some(cli::Command::Status { interface, json }), _) => control::query(&interface).and_then(|reply| {
            // The daemon sends its report as JSON; the text is rendered here
            // from the same model (src/report.rs), so the two cannot differ.
            let report = udp_encap_tun::report::Report::from_reply(&reply).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", reply.trim_end());
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }),
        (Some(cli::Command::Credentials(args)), _) => {
            udp_encap_tun::auth::run_credentials_command(&args)
        }
        // One thread: the data path polls epoll itself, so a packet's wake-up
        // never crosses threads (a futex round trip per batch otherwise).
        // Authentication tasks are rare and short and share it.
        (None, Some(args)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(daemon::run(args))),
        (None, None) => Err(anyhow::anyhow!("nothing to do: see --help")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp-encap-tun: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
