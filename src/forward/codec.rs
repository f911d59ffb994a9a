//! Which packets start a keyframe, read from the RTP payload of each video codec the server
//! forwards. A new subscriber is sent nothing before such a packet: a decoder that starts on a
//! delta frame shows nothing (or garbage) until the next keyframe anyway. For VP8 also the
//! picture numbering a layer switch must keep continuous, and the picture size of a keyframe.

use super::packet::Vp8Ids;

/// The video payload formats whose keyframes the forwarder recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    Vp8,
    Vp9,
    H264,
    Av1,
}

impl VideoFormat {
    /// From a MIME type such as `video/VP8` (case-insensitive). None for audio and for video
    /// codecs whose keyframes are not recognised (their subscribers are not held back).
    pub fn from_mime(mime: &str) -> Option<Self> {
        let (_, name) = mime.split_once('/')?;
        match name.to_ascii_uppercase().as_str() {
            "VP8" => Some(VideoFormat::Vp8),
            "VP9" => Some(VideoFormat::Vp9),
            "H264" => Some(VideoFormat::H264),
            "AV1" => Some(VideoFormat::Av1),
            _ => None,
        }
    }

    /// Whether this payload is the first packet of a keyframe.
    pub fn starts_keyframe(self, payload: &[u8]) -> bool {
        match self {
            VideoFormat::Vp8 => vp8_keyframe_start(payload),
            VideoFormat::Vp9 => vp9_keyframe_start(payload),
            VideoFormat::H264 => h264_has_keyframe(payload),
            VideoFormat::Av1 => av1_keyframe_start(payload),
        }
    }

    /// The VP8 picture numbering of a packet (None for other codecs or a bad descriptor).
    pub fn vp8_ids(self, payload: &[u8]) -> Option<Vp8Ids> {
        match self {
            VideoFormat::Vp8 => vp8_descriptor(payload).map(|(ids, _)| ids),
            _ => None,
        }
    }

    /// The picture size a keyframe's first packet declares, where the codec puts it in the
    /// payload header (VP8).
    pub fn keyframe_size(self, payload: &[u8]) -> Option<(u16, u16)> {
        match self {
            VideoFormat::Vp8 => vp8_keyframe_size(payload),
            _ => None,
        }
    }
}

/// RFC 7741: the VP8 payload descriptor. Returns the picture numbering and where the VP8
/// payload header starts, or None when the descriptor is truncated.
fn vp8_descriptor(p: &[u8]) -> Option<(Vp8Ids, usize)> {
    let b0 = *p.first()?;
    let mut ids = Vp8Ids::default();
    let mut i = 1;
    if b0 & 0x80 != 0 {
        // X: extension byte with I, L, T, K.
        let x = *p.get(i)?;
        i += 1;
        if x & 0x80 != 0 {
            // I: picture id, 7 or 15 bits (M).
            let hi = *p.get(i)?;
            if hi & 0x80 != 0 {
                ids.picture_id = Some(u16::from(hi & 0x7f) << 8 | u16::from(*p.get(i + 1)?));
                i += 2;
            } else {
                ids.picture_id = Some(u16::from(hi));
                i += 1;
            }
        }
        if x & 0x40 != 0 {
            ids.tl0_pic_idx = Some(*p.get(i)?); // L: TL0PICIDX
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1; // T or K: TID/Y/KEYIDX
        }
    }
    (i <= p.len()).then_some((ids, i))
}

/// The first packet of a VP8 frame (S set, partition 0).
fn vp8_frame_start(b0: u8) -> bool {
    b0 & 0x10 != 0 && b0 & 0x07 == 0
}

/// A keyframe starts with S set, partition 0, and a frame tag whose low bit is 0.
fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    vp8_frame_start(b0)
        && vp8_descriptor(p).is_some_and(|(_, i)| p.get(i).is_some_and(|tag| tag & 0x01 == 0))
}

/// RFC 6386 §9.1: a keyframe's frame tag (3 bytes) is followed by the start code 9d 01 2a and
/// the 14-bit width and height (little-endian, the top 2 bits are the scaling).
fn vp8_keyframe_size(p: &[u8]) -> Option<(u16, u16)> {
    if !vp8_keyframe_start(p) {
        return None;
    }
    let (_, i) = vp8_descriptor(p)?;
    let h = p.get(i..i + 10)?;
    if h[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([h[6], h[7]]) & 0x3fff;
    let height = u16::from_le_bytes([h[8], h[9]]) & 0x3fff;
    Some((width, height))
}

/// Where the primary block of an RFC 2198 RED payload starts: after the 4-byte headers of the
/// redundant blocks (F bit set), the 1-byte header of the primary, and the redundant data.
/// None for a payload that does not parse.
pub fn red_primary_offset(p: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut redundant = 0usize;
    loop {
        let b = *p.get(i)?;
        if b & 0x80 == 0 {
            i += 1;
            break;
        }
        let len = usize::from(*p.get(i + 2)? & 0x03) << 8 | usize::from(*p.get(i + 3)?);
        redundant += len;
        i += 4;
    }
    let start = i + redundant;
    (start <= p.len()).then_some(start)
}

/// VP9 payload descriptor (draft-ietf-payload-vp9): B = beginning of a frame, P = inter-picture
/// predicted; a keyframe starts with B set and P clear (in spatial layer 0 when L is present).
fn vp9_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let (inter, layers, begins) = (b0 & 0x40 != 0, b0 & 0x20 != 0, b0 & 0x08 != 0);
    if inter || !begins {
        return false;
    }
    if !layers {
        return true;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let Some(&pid) = p.get(i) else { return false };
        i += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    // Layer indices: TID(3) U(1) SID(3) D(1).
    p.get(i).is_some_and(|l| (l >> 1) & 0x07 == 0)
}

/// RFC 6184: an IDR slice (5) or a sequence parameter set (7), alone, in a STAP-A aggregate, or
/// at the start of an FU-A fragment.
fn h264_has_keyframe(p: &[u8]) -> bool {
    let is_key = |nal_type: u8| nal_type == 5 || nal_type == 7;
    let Some(&b0) = p.first() else { return false };
    match b0 & 0x1f {
        24 => {
            // STAP-A: 16-bit size, NAL unit, repeated.
            let mut i = 1;
            while let (Some(&hi), Some(&lo)) = (p.get(i), p.get(i + 1)) {
                let size = usize::from(u16::from_be_bytes([hi, lo]));
                if p.get(i + 2).is_some_and(|h| is_key(h & 0x1f)) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        28 => p
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && is_key(fu & 0x1f)),
        t => is_key(t),
    }
}

/// AV1 RTP aggregation header: N = first packet of a coded video sequence (a keyframe), Z = the
/// first element continues an earlier packet's OBU.
fn av1_keyframe_start(p: &[u8]) -> bool {
    p.first().is_some_and(|h| h & 0x08 != 0 && h & 0x80 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types() {
        assert_eq!(VideoFormat::from_mime("video/VP8"), Some(VideoFormat::Vp8));
        assert_eq!(
            VideoFormat::from_mime("video/h264"),
            Some(VideoFormat::H264)
        );
        assert_eq!(VideoFormat::from_mime("audio/opus"), None);
        assert_eq!(VideoFormat::from_mime("video/H265"), None);
        assert_eq!(VideoFormat::from_mime("garbage"), None);
    }

    #[test]
    fn vp8() {
        let f = VideoFormat::Vp8;
        assert!(f.starts_keyframe(&[0x10, 0x50, 0x01]), "S, PID 0, key tag");
        assert!(!f.starts_keyframe(&[0x10, 0x51]), "delta frame");
        assert!(!f.starts_keyframe(&[0x00, 0x50]), "not a partition start");
        // X with a 15-bit picture id and TL0PICIDX, then a key tag.
        assert!(f.starts_keyframe(&[0x90, 0xc0, 0x81, 0x02, 0x07, 0x9c]));
        assert!(!f.starts_keyframe(&[0x90, 0xc0, 0x81]), "truncated");
        assert!(!f.starts_keyframe(&[]));
    }

    #[test]
    fn red_primary_block() {
        // One redundant block (pt 111, 3 bytes), then the primary (pt 111): "abc" then "XYZW".
        let red = [
            0xef, 0x03, 0xc0, 0x03, 0x6f, b'a', b'b', b'c', b'X', b'Y', b'Z', b'W',
        ];
        assert_eq!(red_primary_offset(&red), Some(8));
        // Only a primary.
        assert_eq!(red_primary_offset(&[0x6f, 1, 2]), Some(1));
        // Lengths beyond the payload, or headers cut short.
        assert_eq!(red_primary_offset(&[0xef, 0x03, 0xc0, 0x30, 0x6f, 1]), None);
        assert_eq!(red_primary_offset(&[0xef, 0x03]), None);
        assert_eq!(red_primary_offset(&[]), None);
    }

    #[test]
    fn vp8_picture_ids_and_keyframe_size() {
        let f = VideoFormat::Vp8;
        // 15-bit picture id 0x0102, TL0PICIDX 7.
        let ids = f.vp8_ids(&[0x90, 0xc0, 0x81, 0x02, 0x07, 0x9c]).unwrap();
        assert_eq!((ids.picture_id, ids.tl0_pic_idx), (Some(0x0102), Some(7)));
        let ids = f.vp8_ids(&[0x90, 0x80, 0x05, 0x9c]).unwrap();
        assert_eq!((ids.picture_id, ids.tl0_pic_idx), (Some(5), None));
        assert_eq!(f.vp8_ids(&[0x90, 0x80]), None, "truncated");
        assert_eq!(f.vp8_ids(&[0x10, 0x00]), Some(Vp8Ids::default()));
        // Key tag, start code, 640 x 360 (scaling bits set, ignored).
        let key = [
            0x10, 0x50, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x42, 0x68, 0x01,
        ];
        assert_eq!(f.keyframe_size(&key), Some((640, 360)));
        assert_eq!(f.keyframe_size(&key[..9]), None, "truncated");
        let mut delta = key;
        delta[1] = 0x51;
        assert_eq!(f.keyframe_size(&delta), None, "not a keyframe");
        assert_eq!(VideoFormat::H264.keyframe_size(&key), None);
    }

    #[test]
    fn vp9() {
        let f = VideoFormat::Vp9;
        assert!(f.starts_keyframe(&[0x08]), "B, not P");
        assert!(!f.starts_keyframe(&[0x48]), "inter predicted");
        assert!(!f.starts_keyframe(&[0x04]), "end only");
        assert!(f.starts_keyframe(&[0xa8, 0x05, 0x00]), "I + L, spatial 0");
        assert!(!f.starts_keyframe(&[0xa8, 0x05, 0x02]), "spatial 1");
    }

    #[test]
    fn h264() {
        let f = VideoFormat::H264;
        assert!(f.starts_keyframe(&[0x65, 0x88]), "IDR");
        assert!(f.starts_keyframe(&[0x67, 0x42]), "SPS");
        assert!(!f.starts_keyframe(&[0x41, 0x9a]), "non-IDR slice");
        assert!(f.starts_keyframe(&[0x78, 0x00, 0x02, 0x09, 0x10, 0x00, 0x02, 0x67, 0x42]));
        assert!(
            !f.starts_keyframe(&[0x78, 0x00, 0x02, 0x09, 0x10, 0x00, 0x09]),
            "truncated"
        );
        assert!(f.starts_keyframe(&[0x7c, 0x85]), "FU-A start of IDR");
        assert!(!f.starts_keyframe(&[0x7c, 0x05]), "FU-A middle");
    }

    #[test]
    fn av1() {
        assert!(VideoFormat::Av1.starts_keyframe(&[0x18]));
        assert!(!VideoFormat::Av1.starts_keyframe(&[0x10]));
        assert!(!VideoFormat::Av1.starts_keyframe(&[0x88]));
    }
}
