//! The signaling sockets open, in total and per client IP address: an upgrade over either cap
//! is refused before a session exists, so one host cannot hold the server's sessions (and
//! with them its rooms and media connections) by opening sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server holds its maximum of {0} signaling connections")]
    Total(usize),
    #[error("this address holds its maximum of {0} signaling connections")]
    PerIp(usize),
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Every update is one increment or decrement: consistent even after a panic.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more socket from `ip`, unless that passes `max_total` or `max_per_ip` (0: no
    /// cap). The socket is counted until the guard drops.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<ConnectionGuard, Refused> {
        let mut counts = self.lock();
        if max_total != 0 && counts.total >= max_total {
            return Err(Refused::Total(max_total));
        }
        let from_ip = counts.per_ip.get(&ip).copied().unwrap_or(0);
        if max_per_ip != 0 && from_ip >= max_per_ip {
            return Err(Refused::PerIp(max_per_ip));
        }
        counts.total += 1;
        counts.per_ip.insert(ip, from_ip + 1);
        Ok(ConnectionGuard {
            connections: self.clone(),
            ip,
        })
    }
}

/// One counted socket.
#[derive(Debug)]
pub struct ConnectionGuard {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut counts = self.connections.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_in_total_and_frees_on_drop() {
        let c = Arc::new(Connections::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = c.admit(a, 3, 2).unwrap();
        let _a2 = c.admit(a, 3, 2).unwrap();
        assert_eq!(c.admit(a, 3, 2).unwrap_err(), Refused::PerIp(2));
        let _b1 = c.admit(b, 3, 2).unwrap();
        assert_eq!(c.admit(b, 3, 2).unwrap_err(), Refused::Total(3));
        drop(a1);
        let _a3 = c.admit(a, 3, 2).unwrap();
        assert!(c.admit(b, 0, 0).is_ok(), "0: no cap");
        drop((_a2, _a3, _b1));
        let counts = c.lock();
        assert_eq!((counts.total, counts.per_ip.len()), (0, 0));
    }
}
