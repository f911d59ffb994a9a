//! Which packets start a keyframe, read from the RTP payload of each video codec the server
//! forwards. A new subscriber is sent nothing before such a packet: a decoder that starts on a
//! delta frame shows nothing (or garbage) until the next keyframe anyway.

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
}

/// RFC 7741: payload descriptor (S = start of partition, PID = 0), then the VP8 frame tag whose
/// low bit is 0 for a key frame.
fn vp8_keyframe_start(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else { return false };
    let start = b0 & 0x10 != 0 && b0 & 0x07 == 0;
    if !start {
        return false;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        // X: extension byte with I, L, T, K.
        let Some(&x) = p.get(i) else { return false };
        i += 1;
        if x & 0x80 != 0 {
            // I: picture id, 7 or 15 bits (M).
            let Some(&pid) = p.get(i) else { return false };
            i += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // L: TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // T or K: TID/Y/KEYIDX
        }
    }
    p.get(i).is_some_and(|tag| tag & 0x01 == 0)
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
