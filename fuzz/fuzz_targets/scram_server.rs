//! Threat: an unauthenticated client during SASL login. SCRAM-SHA-256 messages are parsed
//! before the client has proved anything, from bytes it fully controls (gs2 header, nonce,
//! channel-binding data, base64 proof). A panic kills the login task; accepting a message the
//! grammar forbids, or a proof that does not match the secret, would be an authentication
//! bypass. The second half also keeps the exchange's state machine honest: a message after a
//! failure must be refused, never accepted.
//!
//! Input: first byte picks the split point and mode; the rest is client-first + client-final,
//! or (mode 1) only client-final after a fixed valid client-first `n,,n=,r=abc`.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pgbroker::auth::scram::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramError, ScramServer};
use pgbroker::auth::userlist::ScramSecret;

/// PBKDF2 with 4096 iterations costs milliseconds: derive the verifier once per process.
fn secret() -> Arc<ScramSecret> {
    static SECRET: OnceLock<Arc<ScramSecret>> = OnceLock::new();
    let init = || Arc::new(ScramSecret::derive(b"pencil", b"fuzz-salt-16byte", 4096));
    Arc::clone(SECRET.get_or_init(init))
}

fn server(plus: bool) -> ScramServer {
    let (mech, cb) = if plus { (SCRAM_SHA_256_PLUS, Some(vec![0xab; 32])) } else { (SCRAM_SHA_256, None) };
    match ScramServer::new(secret(), mech, cb) {
        Ok(s) => s,
        Err(e) => panic!("cannot start {mech}: {e}"),
    }
}

/// Runs client-final and checks the outcome; nobody can know the random server nonce, and
/// without the password no proof can match.
fn finish(srv: &mut ScramServer, msg: &[u8]) {
    let r = srv.handle_client_final(msg);
    assert!(r.is_err(), "client-final accepted without the password: {r:?}");
    assert!(srv.client_key().is_none(), "client key recovered from a failed proof");
    // The exchange is over whatever happened: anything more is out of order.
    assert_eq!(srv.handle_client_final(msg), Err(ScramError::OutOfOrder));
    assert_eq!(srv.handle_client_first(msg), Err(ScramError::OutOfOrder));
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let plus = ctl & 0x80 != 0;
    let mut srv = server(plus);
    if ctl & 0x40 != 0 {
        // Valid client-first; only the final message is fuzzed.
        let first: &[u8] = if plus { b"p=tls-server-end-point,,n=,r=abc" } else { b"n,,n=,r=abc" };
        let reply = srv.handle_client_first(first);
        assert!(reply.is_ok(), "valid client-first refused: {reply:?}");
        finish(&mut srv, rest);
        return;
    }
    let split = (usize::from(ctl & 0x3f) * rest.len()) / 0x3f;
    let (first, last) = rest.split_at(split.min(rest.len()));
    match srv.handle_client_first(first) {
        Ok(reply) => {
            let text = String::from_utf8(reply).expect("server-first is not UTF-8");
            assert!(text.starts_with("r="), "server-first {text:?}");
            assert!(text.ends_with(",i=4096"), "server-first {text:?}");
            finish(&mut srv, last);
        }
        Err(_) => assert_eq!(srv.handle_client_final(last), Err(ScramError::OutOfOrder)),
    }
});
