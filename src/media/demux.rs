//! Which connection an incoming datagram belongs to, in O(1): a connectivity check by the
//! server's ICE username fragment in its STUN USERNAME attribute ("server-ufrag:client-ufrag"),
//! everything else by the remote address once the connection has answered a check from it. The
//! engine still verifies the check's MESSAGE-INTEGRITY; this only routes. A datagram that matches
//! neither is dropped and counted, never offered to every connection in turn.
//!
//! Checks go by ufrag even from a bound address: a new client can arrive from the address of
//! one that vanished while its connection still waits out its timeout (a NAT, or the OS, handing
//! the port on). Routed by address, its checks would reach the old connection, which ignores
//! them, and it would never connect. Its connection's first answer rebinds the address.

use std::collections::HashMap;
use std::net::SocketAddr;

/// A connection's index on its worker.
pub type ConnId = u32;

#[derive(Debug, Default)]
pub struct Demux {
    by_ufrag: HashMap<String, ConnId>,
    by_addr: HashMap<SocketAddr, ConnId>,
}

impl Demux {
    pub fn add_ufrag(&mut self, ufrag: String, conn: ConnId) {
        self.by_ufrag.insert(ufrag, conn);
    }

    /// After an ICE restart: the connection answers checks under its new ufrag only.
    pub fn replace_ufrag(&mut self, old: &str, new: String, conn: ConnId) {
        if self.by_ufrag.get(old) == Some(&conn) {
            self.by_ufrag.remove(old);
        }
        self.by_ufrag.insert(new, conn);
    }

    /// Binds a remote address to a connection: the connection sent a STUN response there, so
    /// the address passed the connection's integrity check.
    pub fn bind_addr(&mut self, addr: SocketAddr, conn: ConnId) {
        self.by_addr.insert(addr, conn);
    }

    /// Forgets everything routed to `conn`.
    pub fn remove(&mut self, conn: ConnId) {
        self.by_ufrag.retain(|_, c| *c != conn);
        self.by_addr.retain(|_, c| *c != conn);
    }

    pub fn route(&self, source: SocketAddr, datagram: &[u8]) -> Option<ConnId> {
        if let Some(conn) = stun_local_ufrag(datagram).and_then(|u| self.by_ufrag.get(u)) {
            return Some(*conn);
        }
        self.by_addr.get(&source).copied()
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.by_ufrag.len(), self.by_addr.len())
    }
}

/// Whether a datagram is STUN (RFC 7983 demultiplexing: first byte 0..=3).
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| *b < 4)
}

/// The first half of a STUN message's USERNAME: the receiver's (our) ufrag.
fn stun_local_ufrag(datagram: &[u8]) -> Option<&str> {
    const HEADER: usize = 20;
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    const USERNAME: u16 = 0x0006;
    if !is_stun(datagram) || datagram.len() < HEADER || datagram[4..8] != MAGIC {
        return None;
    }
    let declared = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    let body = datagram.get(HEADER..HEADER + declared)?;
    let mut i = 0;
    while i + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[i], body[i + 1]]);
        let len = usize::from(u16::from_be_bytes([body[i + 2], body[i + 3]]));
        let value = body.get(i + 4..i + 4 + len)?;
        if kind == USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        i += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        // A PRIORITY attribute first, so the parser has to walk.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn routes_by_ufrag_then_address() {
        let mut d = Demux::default();
        d.add_ufrag("srv1".into(), 1);
        d.add_ufrag("srv2".into(), 2);
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(d.route(a, &binding_request("srv2:cli")), Some(2));
        assert_eq!(d.route(a, &binding_request("nobody:cli")), None);
        assert_eq!(
            d.route(a, &[0x80, 0x60, 0, 1]),
            None,
            "RTP from an unknown address"
        );
        d.bind_addr(a, 2);
        assert_eq!(d.route(a, &[0x80, 0x60, 0, 1]), Some(2));
        d.remove(2);
        assert_eq!(d.len(), (1, 0));
        assert_eq!(d.route(a, &binding_request("srv2:cli")), None);
    }

    #[test]
    fn a_check_from_an_address_bound_elsewhere_goes_by_ufrag() {
        let mut d = Demux::default();
        d.add_ufrag("old".into(), 1);
        d.add_ufrag("new".into(), 2);
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        d.bind_addr(a, 1);
        // The old connection's client vanished; a new one has its address.
        assert_eq!(d.route(a, &binding_request("new:cli")), Some(2));
        // Anything but a check still goes by the address until the new connection answers.
        assert_eq!(d.route(a, &[0x80, 0x60, 0, 1]), Some(1));
        d.bind_addr(a, 2);
        assert_eq!(d.route(a, &[0x80, 0x60, 0, 1]), Some(2));
        // The old connection leaving does not take the new one's address with it.
        d.remove(1);
        assert_eq!(d.route(a, &[0x80, 0x60, 0, 1]), Some(2));
        // A check with an unknown ufrag, and a binding indication (no USERNAME), go by address.
        assert_eq!(d.route(a, &binding_request("nobody:cli")), Some(2));
    }

    #[test]
    fn hostile_stun_does_not_panic() {
        let good = binding_request("srv:cli");
        for cut in 0..good.len() {
            let _ = stun_local_ufrag(&good[..cut]);
        }
        let mut lying = good.clone();
        lying[3] = 0xff; // declared length beyond the datagram
        assert_eq!(stun_local_ufrag(&lying), None);
        let mut bad_attr = good.clone();
        bad_attr[22] = 0xff; // attribute length beyond the body
        assert_eq!(stun_local_ufrag(&bad_attr), None);
        assert_eq!(stun_local_ufrag(&good), Some("srv"));
    }
}
