//! The pool of UDP ports media may use: one port per server-side peer connection, handed out
//! round-robin and returned when the lease is dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use crate::config::PortRange;

#[derive(Debug)]
pub struct PortPool {
    range: PortRange,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    in_use: HashSet<u16>,
    next: u16,
}

/// A port reserved for one peer connection; returned to the pool on drop.
#[derive(Debug)]
pub struct PortLease {
    pool: Option<Arc<PortPool>>,
    port: u16,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.lock().in_use.remove(&self.port);
        }
    }
}

impl PortPool {
    pub fn new(range: PortRange) -> Arc<Self> {
        Arc::new(PortPool {
            range,
            state: Mutex::new(PoolState {
                in_use: HashSet::new(),
                next: range.lo,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A port free in the pool and bindable on `ip` right now (another process may hold some of
    /// the range). With the ephemeral range, port 0: the kernel picks at bind time.
    pub fn lease(self: &Arc<Self>, ip: IpAddr) -> Option<PortLease> {
        if self.range.is_ephemeral() {
            return Some(PortLease {
                pool: None,
                port: 0,
            });
        }
        let mut state = self.lock();
        for _ in 0..self.range.len() {
            let port = state.next;
            state.next = if port >= self.range.hi {
                self.range.lo
            } else {
                port + 1
            };
            if state.in_use.contains(&port) {
                continue;
            }
            if UdpSocket::bind(SocketAddr::new(ip, port)).is_ok() {
                state.in_use.insert(port);
                return Some(PortLease {
                    pool: Some(self.clone()),
                    port,
                });
            }
        }
        None
    }

    pub fn in_use(&self) -> usize {
        self.lock().in_use.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_robin_and_returns_on_drop() {
        // A range unlikely to be busy on a test machine; skip busy ports like production does.
        let pool = PortPool::new(PortRange {
            lo: 47110,
            hi: 47112,
        });
        let ip = IpAddr::from([127, 0, 0, 1]);
        let a = pool.lease(ip).unwrap();
        let b = pool.lease(ip).unwrap();
        let c = pool.lease(ip).unwrap();
        assert_ne!(a.port(), b.port());
        assert_ne!(b.port(), c.port());
        assert!(pool.lease(ip).is_none(), "exhausted");
        let freed = b.port();
        drop(b);
        assert_eq!(pool.in_use(), 2);
        assert_eq!(pool.lease(ip).unwrap().port(), freed);
    }

    #[test]
    fn ephemeral_is_port_zero() {
        let pool = PortPool::new(PortRange::EPHEMERAL);
        assert_eq!(pool.lease(IpAddr::from([127, 0, 0, 1])).unwrap().port(), 0);
    }
}
