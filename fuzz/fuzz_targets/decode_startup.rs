//! Threat: a hostile or broken client on the listening socket. Before authentication, the
//! broker parses untagged startup-phase packets (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest) from anyone who can connect. A panic here lets an unauthenticated peer kill
//! its session task (or the process under `panic = "abort"`); a NUL smuggled into a parameter
//! would let a client inject extra key/value pairs into the StartupMessage the broker builds
//! for the server.
//!
//! Input: the 4-byte length prefix followed by the packet body, as read from the socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbroker::proto::startup::{Packet, body_len, parse};

fuzz_target!(|data: &[u8]| {
    let Some((prefix, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(len) = body_len(*prefix) else {
        return;
    };
    // The session reads exactly `len` more bytes; a short input is a truncated read.
    let Some(body) = rest.get(..len) else {
        return;
    };
    if let Ok(Packet::Startup(startup)) = parse(body) {
        for (name, value) in &startup.params {
            assert!(!name.is_empty(), "empty parameter name accepted");
            assert!(!name.contains('\0'), "NUL in parameter name {name:?}");
            assert!(!value.contains('\0'), "NUL in parameter value {value:?}");
        }
        for option in &startup.protocol_options {
            assert!(!option.contains('\0'), "NUL in protocol option {option:?}");
        }
    }
    // Parsing the body on its own, whatever the prefix said, must not panic either.
    let _ = parse(rest);
});
