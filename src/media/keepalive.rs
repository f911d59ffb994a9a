//! ICE keepalives the engine does not count. The server is ICE-lite, and str0m forgets a
//! candidate pair 15 s after the client's last STUN Binding *request* on it. Browsers send one
//! every few seconds (consent freshness, RFC 7675); libnice, under GStreamer's webrtcbin and
//! Janus's gateways, by default keeps the pair alive with Binding *indications* (RFC 8445
//! §11) every 25 s, which str0m ignores: such a client's media was cut 15-25 s into the call
//! ("ICE disconnected"). An indication from a client's validated address is therefore turned
//! into a Binding request the engine can verify (signed with the server's own ICE password,
//! named with both ufrags), and the engine's answer to it is not sent.

use ring::hmac;
use str0m::IceCreds;
use str0m::ice::{StunMessage, TransId};

/// STUN message type of a Binding indication (method 0x001, class indication).
const BINDING_INDICATION: [u8; 2] = [0x00, 0x11];
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const HEADER_LEN: usize = 20;
/// The PRIORITY a request carries; the pair already exists, so it makes no new candidate.
const PRIORITY: u32 = 0x7eff_ffff;

/// Whether `datagram` is a STUN Binding indication.
pub fn is_binding_indication(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[..2] == BINDING_INDICATION
        && datagram[4..8] == MAGIC_COOKIE
}

/// The transaction id of a STUN message (None: too short to be one).
pub fn transaction_id(datagram: &[u8]) -> Option<[u8; 12]> {
    datagram.get(8..HEADER_LEN)?.try_into().ok()
}

/// A Binding request from the client to the server (`local` are the server's credentials,
/// `remote_ufrag` the client's), as the client would send it: the engine verifies it with the
/// server's password. Returns the datagram and its transaction id.
pub fn liveness_request(local: &IceCreds, remote_ufrag: &str) -> Option<(Vec<u8>, [u8; 12])> {
    let username = format!("{}:{remote_ufrag}", local.ufrag);
    // The client is the controlling agent (the server is ICE-lite); no nomination.
    let message = StunMessage::binding_request(
        &username,
        TransId::new(),
        true,
        rand::random(),
        PRIORITY,
        false,
    );
    let mut buf = vec![0u8; 256];
    let len = message
        .to_bytes(Some(local.pass.as_bytes()), &mut buf, sha1_hmac)
        .ok()?;
    buf.truncate(len);
    let id = transaction_id(&buf)?;
    Some((buf, id))
}

fn sha1_hmac(key: &[u8], payloads: &[&[u8]]) -> [u8; 20] {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in payloads {
        ctx.update(p);
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_verify_with_the_servers_password_and_indications_are_recognised() {
        let local = IceCreds {
            ufrag: "srv".into(),
            pass: "server-password-of-24-ch".into(),
        };
        let (request, id) = liveness_request(&local, "cli").expect("a request");
        let parsed = StunMessage::parse(&request).expect("it parses");
        assert!(parsed.is_binding_request());
        assert_eq!(parsed.split_username(), Some(("srv", "cli")));
        assert!(parsed.verify(local.pass.as_bytes(), sha1_hmac));
        assert!(!parsed.verify(b"another password", sha1_hmac));
        assert_eq!(transaction_id(&request), Some(id));
        assert!(!is_binding_indication(&request));

        let mut indication = vec![0x00, 0x11, 0x00, 0x00];
        indication.extend_from_slice(&MAGIC_COOKIE);
        indication.extend_from_slice(&[7; 12]);
        assert!(is_binding_indication(&indication));
        assert!(!is_binding_indication(&indication[..19]));
        indication[4] = 0;
        assert!(!is_binding_indication(&indication));
    }
}
