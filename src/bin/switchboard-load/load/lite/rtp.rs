//! What the lite receivers read without decrypting: the kind of a datagram (RFC 7983
//! demultiplexing), the clear part of an SRTP packet's RTP header, and per-SSRC extended
//! sequence numbers with duplicate detection.

/// What a datagram on a WebRTC 5-tuple is, by its first bytes (RFC 7983, as str0m reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Dtls,
    /// SRTP media.
    Rtp,
    /// SRTCP.
    Rtcp,
    Other,
}

pub fn classify(d: &[u8]) -> Kind {
    match d {
        [0..=1, ..] if d.len() >= 20 => Kind::Stun,
        [20..=63, ..] => Kind::Dtls,
        [128..=191, b1, _, ..] => match b1 & 0x7f {
            64..=95 => Kind::Rtcp,
            _ => Kind::Rtp,
        },
        _ => Kind::Other,
    }
}

/// The fields of an RTP header that SRTP leaves in clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    /// Fixed header, CSRCs and header extension: where the (encrypted) payload starts.
    pub header_len: usize,
}

/// Parses the clear RTP header of an SRTP packet; `None` if it is not a well-formed one.
pub fn parse_header(d: &[u8]) -> Option<RtpHeader> {
    if d.len() < 12 || d[0] >> 6 != 2 {
        return None;
    }
    let mut len = 12 + 4 * usize::from(d[0] & 0x0f);
    if d[0] & 0x10 != 0 {
        let ext = d.get(len..len + 4)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    if len > d.len() {
        return None;
    }
    Some(RtpHeader {
        ssrc: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        seq: u16::from_be_bytes([d[2], d[3]]),
        timestamp: u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
        header_len: len,
    })
}

/// Sequence numbers remembered behind the highest one, for duplicates and late arrivals.
const WINDOW: u64 = 1024;

/// What one sequence number turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen before: its extended sequence number.
    New(u64),
    Duplicate,
    /// Older than the window: cannot tell a duplicate from a late packet, so not counted.
    TooOld,
}

/// Extends 16-bit sequence numbers (RFC 3550 A.1 style: a jump of under half the space is
/// forward, otherwise backward) and remembers the last [`WINDOW`] of them.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// Highest extended number so far (the first packet is put at 65,536 + its number, so a
    /// reordered packet before it stays positive).
    max: u64,
    /// Lowest extended number counted.
    min: u64,
    bits: [u64; (WINDOW / 64) as usize],
    started: bool,
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self {
            max: 0,
            min: 0,
            bits: [0; (WINDOW / 64) as usize],
            started: false,
        }
    }
}

impl SeqTracker {
    pub fn push(&mut self, seq: u16) -> Seen {
        if !self.started {
            self.started = true;
            let ext = (1 << 16) + u64::from(seq);
            self.max = ext;
            self.min = ext;
            self.set(ext);
            return Seen::New(ext);
        }
        let delta = i64::from(seq.wrapping_sub(self.max as u16) as i16);
        // max ≥ 65,536 and delta ≥ -32,768: never negative.
        let ext = (self.max as i64 + delta) as u64;
        if delta > 0 {
            if ext - self.max >= WINDOW {
                self.bits = [0; (WINDOW / 64) as usize];
            } else {
                for s in self.max + 1..ext {
                    self.clear(s);
                }
            }
            self.max = ext;
            self.set(ext);
            return Seen::New(ext);
        }
        if self.max - ext >= WINDOW {
            return Seen::TooOld;
        }
        if self.get(ext) {
            return Seen::Duplicate;
        }
        self.set(ext);
        self.min = self.min.min(ext);
        Seen::New(ext)
    }

    /// Lowest and highest extended numbers counted (None before the first packet).
    pub fn range(&self) -> Option<(u64, u64)> {
        self.started.then_some((self.min, self.max))
    }

    fn slot(ext: u64) -> (usize, u64) {
        let i = ext % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn set(&mut self, ext: u64) {
        let (w, b) = Self::slot(ext);
        self.bits[w] |= b;
    }

    fn clear(&mut self, ext: u64) {
        let (w, b) = Self::slot(ext);
        self.bits[w] &= !b;
    }

    fn get(&self, ext: u64) -> bool {
        let (w, b) = Self::slot(ext);
        self.bits[w] & b != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_like_rfc_7983() {
        assert_eq!(classify(&[0; 20]), Kind::Stun);
        assert_eq!(classify(&[0; 10]), Kind::Other);
        assert_eq!(classify(&[22, 254, 253]), Kind::Dtls);
        assert_eq!(classify(&[0x80, 96, 0, 0]), Kind::Rtp);
        assert_eq!(classify(&[0x80, 0x80 | 96, 0, 0]), Kind::Rtp);
        assert_eq!(classify(&[0x80, 200, 0, 0]), Kind::Rtcp);
        assert_eq!(classify(&[0x81, 205, 0, 0]), Kind::Rtcp);
        assert_eq!(classify(&[]), Kind::Other);
        assert_eq!(classify(&[0xff, 1, 2]), Kind::Other);
    }

    #[test]
    fn parses_clear_header() {
        let mut d = vec![0x90, 96, 0x12, 0x34, 0, 0, 0, 7, 0xde, 0xad, 0xbe, 0xef];
        d.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]);
        d.extend_from_slice(&[9; 30]);
        let h = parse_header(&d).unwrap();
        assert_eq!(
            h,
            RtpHeader {
                ssrc: 0xdead_beef,
                seq: 0x1234,
                timestamp: 7,
                header_len: 20,
            }
        );
        // Extension longer than the packet, wrong version, too short: rejected.
        let mut bad = d[..16].to_vec();
        bad[15] = 9;
        assert_eq!(parse_header(&bad), None);
        assert_eq!(parse_header(&[0x40; 12]), None);
        assert_eq!(parse_header(&d[..11]), None);
        assert_eq!(parse_header(&d[..13]), None);
        // CSRCs.
        let mut c = vec![0x82, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        c.extend_from_slice(&[0; 8]);
        assert_eq!(parse_header(&c).unwrap().header_len, 20);
    }

    #[test]
    fn extends_across_wrap_and_tells_duplicates() {
        let mut t = SeqTracker::default();
        let mut out = Vec::new();
        for s in [65534u16, 65535, 0, 2, 1, 1, 3] {
            out.push(t.push(s));
        }
        let base = 65536 + 65534;
        assert_eq!(
            out,
            vec![
                Seen::New(base),
                Seen::New(base + 1),
                Seen::New(base + 2),
                Seen::New(base + 4),
                Seen::New(base + 3),
                Seen::Duplicate,
                Seen::New(base + 5),
            ]
        );
        assert_eq!(t.range(), Some((base, base + 5)));
        // Reordered before the first packet.
        let mut t = SeqTracker::default();
        assert_eq!(t.push(10), Seen::New(65546));
        assert_eq!(t.push(9), Seen::New(65545));
        assert_eq!(t.range(), Some((65545, 65546)));
    }

    #[test]
    fn window_forgets_and_refuses_old() {
        let mut t = SeqTracker::default();
        t.push(0);
        t.push(1);
        // A jump clears the slots it skips, so their reuse is not a false duplicate.
        assert_eq!(t.push(1025), Seen::New(65536 + 1025));
        assert_eq!(t.push(1024), Seen::New(65536 + 1024));
        assert_eq!(t.push(1), Seen::TooOld);
        assert_eq!(t.push(2000), Seen::New(65536 + 2000));
        assert_eq!(t.push(1500), Seen::New(65536 + 1500));
        assert_eq!(t.push(1500), Seen::Duplicate);
        // A jump over the whole window.
        assert_eq!(t.push(9000), Seen::New(65536 + 9000));
        assert_eq!(t.push(8999), Seen::New(65536 + 8999));
    }
}
