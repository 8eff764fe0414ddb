//! The authentication messages a peer sends us: the client's hello (read by
//! the server) and the server's reply (read by the client), on any bytes.
//! A hello that decodes must encode back to the same bytes; a reply must
//! keep its meaning through encode and decode (a refusal's lease and address
//! fields are defined as zero and ignored when they are not).
// Under `cargo test` (udp-encap-tun/tests/fuzz_seeds.rs includes this file
// and replays the committed seeds through `run`) there is no libFuzzer.
#![cfg_attr(not(test), no_main)]

use udp_encap_tun::auth::protocol::{Hello, REPLY_LEN, Reply};

/// One input: what libFuzzer hands the target, or a committed seed.
pub fn run(data: &[u8]) {
    if let Ok(hello) = Hello::decode(data) {
        let bytes = hello.encode().expect("a decoded hello encodes");
        assert_eq!(Some(bytes.as_slice()), data.get(..bytes.len()), "hello round trip");
        assert_eq!(Hello::decode(&bytes), Ok(hello));
    }
    if let Some(chunk) = data.first_chunk::<REPLY_LEN>()
        && let Ok(reply) = Reply::decode(*chunk)
    {
        assert_eq!(Reply::decode(reply.encode()), Ok(reply), "reply round trip");
    }
}

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run(data));
