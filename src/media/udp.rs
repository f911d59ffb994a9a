//! Batched UDP I/O on one worker's socket: `recvmmsg` through quinn-udp (which also reports the
//! destination address of each datagram, needed when the socket is bound to every interface)
//! and `sendmmsg` for the outgoing batch (quinn-udp only batches datagrams to one destination,
//! and an SFU sends to many). Large kernel buffers, since default ones lose bursts.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use quinn_udp::{RecvMeta, UdpSocketState};
use socket2::SockAddr;

/// Datagrams per `sendmmsg` call; the batch is flushed when it holds this many.
pub const SEND_BATCH: usize = 64;
/// Largest datagram read (a GRO buffer can hold several).
const RECV_BUF: usize = 64 * 1024;

/// What the kernel holds for a socket's receive side (Linux's `SO_MEMINFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveQueue {
    /// Bytes waiting to be read.
    pub queued: u32,
    /// The receive buffer's size.
    pub capacity: u32,
    /// Datagrams dropped on arrival since the socket was opened, because the buffer was full
    /// (the socket's `sk_drops`): the reader was too slow.
    pub drops: u32,
}

pub fn receive_queue(socket: &impl AsRawFd) -> io::Result<ReceiveQueue> {
    // <asm-generic/socket.h>; the libc crate names only the offsets into the answer.
    const SO_MEMINFO: libc::c_int = 55;
    let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ReceiveQueue {
        queued: info[libc::SK_MEMINFO_RMEM_ALLOC as usize],
        capacity: info[libc::SK_MEMINFO_RCVBUF as usize],
        drops: info[libc::SK_MEMINFO_DROPS as usize],
    })
}

/// Binds a non-blocking UDP socket with large buffers.
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if buffer_bytes > 0 {
        // The kernel caps these at net.core.rmem_max / wmem_max; a smaller grant is not an error.
        if let Err(e) = socket.set_recv_buffer_size(buffer_bytes) {
            tracing::debug!("SO_RCVBUF {buffer_bytes}: {e}");
        }
        if let Err(e) = socket.set_send_buffer_size(buffer_bytes) {
            tracing::debug!("SO_SNDBUF {buffer_bytes}: {e}");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Receives in batches of up to `quinn_udp::BATCH_SIZE`.
pub struct Receiver {
    state: UdpSocketState,
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl Receiver {
    pub fn new(socket: &std::net::UdpSocket) -> io::Result<Self> {
        let n = quinn_udp::BATCH_SIZE;
        Ok(Receiver {
            state: UdpSocketState::new(socket.into())?,
            bufs: (0..n).map(|_| vec![0; RECV_BUF]).collect(),
            meta: vec![RecvMeta::default(); n],
        })
    }

    /// Reads one batch; returns how many buffers were filled (`WouldBlock`: nothing to read).
    pub fn recv(&mut self, socket: &std::net::UdpSocket) -> io::Result<usize> {
        let mut slices: [io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = {
            let mut bufs = self.bufs.iter_mut();
            std::array::from_fn(|_| match bufs.next() {
                Some(b) => io::IoSliceMut::new(b),
                None => io::IoSliceMut::new(&mut []),
            })
        };
        self.state.recv(socket.into(), &mut slices, &mut self.meta)
    }

    /// The datagrams of the last `n` buffers read: (source, destination ip, bytes), with
    /// GRO-coalesced buffers split at their stride.
    pub fn datagrams(
        &self,
        n: usize,
    ) -> impl Iterator<Item = (SocketAddr, Option<std::net::IpAddr>, &[u8])> {
        self.meta
            .iter()
            .zip(&self.bufs)
            .take(n)
            .flat_map(|(meta, buf)| {
                buf[..meta.len.min(buf.len())]
                    .chunks(meta.stride.max(1))
                    .map(move |d| (meta.addr, meta.dst_ip, d))
            })
    }
}

/// What became of a flushed batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    /// The send buffer was full or the destination refused: dropped, not queued.
    pub dropped: usize,
}

/// The outgoing datagrams of one loop turn, sent together.
#[derive(Default)]
pub struct Sender {
    addrs: Vec<SockAddr>,
    datagrams: Vec<Vec<u8>>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovecs` and `headers` are only filled and used inside `flush`,
// pointing into `addrs` and `datagrams` that `flush` borrows; between calls they are empty.
unsafe impl Send for Sender {}

impl Sender {
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    pub fn push(&mut self, to: SocketAddr, datagram: Vec<u8>) {
        self.addrs.push(SockAddr::from(to));
        self.datagrams.push(datagram);
    }

    /// Sends everything queued with as few `sendmmsg` calls as it takes, and empties the batch.
    /// Never waits: what the kernel will not take now is dropped.
    pub fn flush(&mut self, socket: &impl AsRawFd) -> Flushed {
        let fd = socket.as_raw_fd();
        let mut out = Flushed::default();
        let mut start = 0;
        while start < self.datagrams.len() {
            let end = (start + SEND_BATCH).min(self.datagrams.len());
            match self.send_range(fd, start, end) {
                Ok(n) => {
                    out.sent += n;
                    start += n.max(1);
                    if n == 0 {
                        out.dropped += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.dropped += self.datagrams.len() - start;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // One destination refused (e.g. unreachable): skip it, keep the rest.
                    tracing::debug!("sendmmsg: {e}");
                    out.dropped += 1;
                    start += 1;
                }
            }
        }
        self.addrs.clear();
        self.datagrams.clear();
        out
    }

    fn send_range(&mut self, fd: RawFd, start: usize, end: usize) -> io::Result<usize> {
        self.iovecs.clear();
        self.headers.clear();
        for datagram in &self.datagrams[start..end] {
            self.iovecs.push(libc::iovec {
                iov_base: datagram.as_ptr() as *mut libc::c_void,
                iov_len: datagram.len(),
            });
        }
        for (i, addr) in self.addrs[start..end].iter().enumerate() {
            // SAFETY: an all-zero msghdr is a valid empty header; the fields set below point
            // into `self.addrs` and `self.iovecs`, which outlive the call.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
            header.msg_hdr.msg_namelen = addr.len();
            header.msg_hdr.msg_iov = &mut self.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            self.headers.push(header);
        }
        // SAFETY: `headers` holds `end - start` initialised entries whose pointers are valid
        // for the duration of the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                0,
            )
        };
        self.iovecs.clear();
        self.headers.clear();
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_queue_counts_what_waits_and_what_a_full_buffer_refused() {
        // The smallest buffer the kernel grants, never read: most of a burst must be dropped.
        let full = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let sender = bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let empty = receive_queue(&full).unwrap();
        assert_eq!((empty.queued, empty.drops), (0, 0));
        let to = full.local_addr().unwrap();
        for _ in 0..500 {
            let _ = sender.send_to(&[0u8; 1000], to);
        }
        let q = receive_queue(&full).unwrap();
        assert!((400..=500).contains(&q.drops), "{} drops counted", q.drops);
        assert!(q.queued > 0 && q.queued <= q.capacity * 2, "{q:?}");
    }

    #[test]
    fn batch_round_trip_on_loopback() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let to = b.local_addr().unwrap();
        let mut sender = Sender::default();
        for i in 0..100u8 {
            sender.push(to, vec![i; 100 + usize::from(i)]);
        }
        assert_eq!(sender.len(), 100);
        let flushed = sender.flush(&a);
        assert_eq!(
            flushed,
            Flushed {
                sent: 100,
                dropped: 0
            }
        );
        assert!(sender.is_empty());

        let mut receiver = Receiver::new(&b).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 100 && std::time::Instant::now() < deadline {
            match receiver.recv(&b) {
                Ok(n) => got.extend(
                    receiver
                        .datagrams(n)
                        .map(|(from, dst, d)| (from, dst, d.to_vec())),
                ),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), 100);
        assert_eq!(got[7].0, a.local_addr().unwrap());
        assert_eq!(got[7].1, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(got[7].2, vec![7; 107]);
    }
}
