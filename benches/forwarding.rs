//! The per-packet forwarding path in isolation, and this machine's own limit for comparison.
//!
//! `forward_path/fanout/N`: one incoming ~1100-byte RTP packet is parsed, routed by a
//! `TrackForwarder` to N subscribers (keyframe check, header rewrite), and for each subscriber
//! marshalled, SRTP-encrypted with that subscriber's own context and sent on a loopback UDP
//! socket. Throughput is reported per forwarded packet (N per iteration).
//!
//! `machine_limit/srtp_sendmmsg`: SRTP-encrypt-and-send of ~1100-byte packets on one core over
//! loopback with `sendmmsg` in batches of 32: the ceiling any SFU on this box works under.
//!
//! Everything sends to 127.0.0.1 only.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use switchboard::forward::{Delivery, KeyframeThrottle, MediaPacket, Rewriter, TrackForwarder};

const PAYLOAD: usize = 1100;

fn srtp_context(seed: u8) -> Context {
    let provider = rtc::crypto::default_provider().expect("a crypto provider is compiled in");
    let key = [seed; 16];
    let salt = [seed.wrapping_add(1); 14];
    Context::new(
        &key,
        &salt,
        ProtectionProfile::Aes128CmHmacSha1_80,
        None,
        None,
        provider.crypto(),
    )
    .expect("valid key and salt lengths")
}

fn incoming_packet(seq: u16) -> Bytes {
    let packet = rtc::rtp::Packet {
        header: rtc::rtp::header::Header {
            version: 2,
            payload_type: 96,
            sequence_number: seq,
            timestamp: u32::from(seq) * 3000,
            ssrc: 0x1234_5678,
            ..Default::default()
        },
        // A VP8 payload descriptor and key-frame tag, then filler.
        payload: Bytes::from([&[0x10u8, 0x50][..], &[0xAB; PAYLOAD - 2]].concat()),
    };
    packet.marshal().expect("marshal").freeze()
}

/// A connected sending socket, and a thread (on the other core) that reads everything sent to
/// it, as a subscriber would, so the measured side pays for delivery but not for receiving.
/// The thread ends when the returned socket is dropped and the read times out.
fn sink() -> UdpSocket {
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind sink");
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind source");
    tx.connect(rx.local_addr().expect("addr")).expect("connect");
    for s in [&rx, &tx] {
        let s = socket2::SockRef::from(s);
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
    }
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while rx.recv(&mut buf).is_ok() {}
    });
    tx
}

/// The forwarder's packet as the publisher's connection would hand it over.
fn to_media_packet(packet: rtc::rtp::Packet) -> MediaPacket {
    MediaPacket::received(
        u64::from(packet.header.sequence_number),
        packet.header.timestamp,
        packet.header.marker,
        0,
        Arc::from(&packet.payload[..]),
        Instant::now(),
    )
}

/// One delivery as the subscriber's connection would write it.
fn to_rtp_packet(packet: &MediaPacket, d: &Delivery<usize>, ssrc: u32) -> rtc::rtp::Packet {
    rtc::rtp::Packet {
        header: rtc::rtp::header::Header {
            version: 2,
            marker: d.marker,
            payload_type: d.header.payload_type,
            sequence_number: d.header.seq as u16,
            timestamp: d.header.timestamp,
            ssrc,
            ..Default::default()
        },
        payload: Bytes::from_owner(packet.payload.clone()),
    }
}

fn forward_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_path");
    group.measurement_time(Duration::from_secs(4));
    for fanout in [1usize, 10, 100] {
        let mut forwarder = TrackForwarder::new("video/VP8", 1, KeyframeThrottle::DEFAULT_INTERVAL);
        let mut srtp: Vec<Context> = (0..fanout)
            .map(|i| {
                forwarder.add_downtrack(i, Rewriter::new(96, 90_000, 0, 0), Some(0));
                srtp_context(i as u8)
            })
            .collect();
        let tx = sink();
        let mut seq: u16 = 0;
        let mut out = BytesMut::with_capacity(1500);
        let mut deliveries = Vec::with_capacity(fanout);
        group.throughput(Throughput::Elements(fanout as u64));
        group.bench_with_input(BenchmarkId::new("fanout", fanout), &fanout, |b, _| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                let raw = incoming_packet(seq);
                let mut buf = raw.clone();
                let parsed = rtc::rtp::Packet::unmarshal(&mut buf).expect("parse");
                let mut packet = to_media_packet(parsed);
                // Every packet reads as a VP8 keyframe start, so no subscriber is held back.
                if forwarder.ingest(&mut packet) {
                    forwarder.forward(&packet, &mut deliveries);
                }
                for d in &deliveries {
                    let rtp = to_rtp_packet(&packet, d, 1000 + d.to as u32);
                    out.clear();
                    out.resize(rtp.marshal_size(), 0);
                    rtp.marshal_to(&mut out).expect("marshal");
                    let protected = srtp[d.to]
                        .encrypt_rtp_with_header(&out, &rtp.header)
                        .expect("encrypt");
                    let _ = tx.send(&protected);
                }
            });
        });
    }
    group.finish();
}

fn machine_limit(c: &mut Criterion) {
    const BATCH: usize = 32;
    let mut group = c.benchmark_group("machine_limit");
    group.measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(BATCH as u64));
    let tx = sink();
    let mut srtp = srtp_context(7);
    let mut packets: Vec<rtc::rtp::Packet> = (0..BATCH)
        .map(|i| {
            let mut buf = incoming_packet(i as u16);
            rtc::rtp::Packet::unmarshal(&mut buf).expect("parse")
        })
        .collect();
    let mut seq: u16 = 0;
    group.bench_function("srtp_sendmmsg", |b| {
        b.iter(|| {
            let mut protected = Vec::with_capacity(BATCH);
            for p in &mut packets {
                seq = seq.wrapping_add(1);
                p.header.sequence_number = seq;
                let plain = p.marshal().expect("marshal");
                protected.push(
                    srtp.encrypt_rtp_with_header(&plain, &p.header)
                        .expect("encrypt"),
                );
            }
            send_batch(&tx, &protected);
        });
    });
    group.finish();
}

#[cfg(target_os = "linux")]
fn send_batch(socket: &UdpSocket, packets: &[BytesMut]) {
    use std::os::fd::AsRawFd;
    let mut iovecs: Vec<libc::iovec> = packets
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero msghdr is a valid "no name, no control" header.
            let mut hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
            hdr.msg_hdr.msg_iov = iov as *mut libc::iovec;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr
        })
        .collect();
    // SAFETY: the socket is connected; every header points at a live iovec over a live buffer.
    unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            0,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn send_batch(socket: &UdpSocket, packets: &[BytesMut]) {
    for p in packets {
        let _ = socket.send(p);
    }
}

criterion_group!(benches, forward_path, machine_limit);
criterion_main!(benches);
