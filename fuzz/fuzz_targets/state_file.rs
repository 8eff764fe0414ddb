//! The state file a restarted daemon reads (`--state-dir`): any bytes
//! through `state::parse` and the conversion into sessions, for both roles.
//! A corrupt file must be refused or yield sessions with valid fields,
//! never panic; a file that parses must survive a save and a parse again
//! unchanged (what the daemon writes, it can read back).
//!
//! Input: the file's bytes (seeds: real files written by `state::save`).
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use udp_encap_tun::daemon::state::{self, Clock};

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    let clock = Clock::now();
    for role in ["server", "client"] {
        let Ok(f) = state::parse(data, role) else { continue };
        let (sessions, dropped) = f.server_sessions(clock);
        assert!(sessions.len() + dropped == f.sessions.len());
        for s in &sessions {
            assert!(!s.id.is_zero());
            assert!(s.deadline > clock.now);
        }
        let (leases, dropped) = f.client_leases(clock);
        assert!(leases.len() + dropped == f.leases.len());
        // What parsed, written back, parses to the same.
        let again = state::serialize(&f).expect("a parsed file serialises");
        assert_eq!(state::parse(&again, role).ok(), Some(f));
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
