//! Codecs as the rest of the server names them ([`TrackCodec`]), from and to str0m's payload
//! parameters: the publisher's codec is described once, and each subscriber's connection
//! finds the payload type it negotiated for the same codec.

use str0m::Rtc;
use str0m::format::PayloadParams;

use str0m::media::{MediaKind as StrMediaKind, Mid, Pt};

use crate::types::{MediaKind, TrackCodec};

pub fn kind_of(kind: StrMediaKind) -> MediaKind {
    match kind {
        StrMediaKind::Audio => MediaKind::Audio,
        StrMediaKind::Video => MediaKind::Video,
    }
}

pub fn str0m_kind(kind: MediaKind) -> StrMediaKind {
    match kind {
        MediaKind::Audio => StrMediaKind::Audio,
        MediaKind::Video => StrMediaKind::Video,
    }
}

pub fn track_codec(kind: MediaKind, params: &PayloadParams) -> TrackCodec {
    let spec = params.spec();
    let prefix = match kind {
        MediaKind::Audio => "audio",
        MediaKind::Video => "video",
    };
    TrackCodec {
        mime_type: format!("{prefix}/{}", spec.codec),
        clock_rate: spec.clock_rate.get(),
        channels: spec.channels.map_or(0, u16::from),
        sdp_fmtp_line: spec.format.to_string(),
    }
}

/// The payload type `rtc` negotiated on `mid` for `codec`, if the remote accepted that codec.
/// Also the payload type of RED around it, if the remote accepted that too.
pub fn payload_type_for(
    rtc: &Rtc,
    mid: Mid,
    kind: MediaKind,
    codec: &TrackCodec,
) -> Option<(u8, Option<u8>)> {
    let accepted = rtc.media(mid)?.remote_pts();
    let taken = |pt: &Pt| accepted.is_empty() || accepted.contains(pt);
    let params = rtc.codec_config().params();
    let negotiated = params
        .iter()
        .filter(|p| taken(&p.pt()))
        .map(|p| (track_codec(kind, p), *p.pt()));
    let pt = negotiated_payload_type(codec, negotiated)?;
    let red = params
        .iter()
        .find(|p| *p.pt() == pt)
        .and_then(|p| p.red())
        .filter(|red| !accepted.is_empty() && taken(red))
        .map(|red| *red);
    Some((pt, red))
}

/// The payload type for `codec` among `negotiated`: same MIME type, and for codecs with
/// parameters (H.264 profiles) the same fmtp line where one matches.
fn negotiated_payload_type(
    codec: &TrackCodec,
    negotiated: impl Iterator<Item = (TrackCodec, u8)>,
) -> Option<u8> {
    let mut by_mime = None;
    for (c, pt) in negotiated {
        if c.mime_type.eq_ignore_ascii_case(&codec.mime_type) {
            if c.sdp_fmtp_line == codec.sdp_fmtp_line {
                return Some(pt);
            }
            by_mime.get_or_insert(pt);
        }
    }
    by_mime
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(mime: &str, fmtp: &str) -> TrackCodec {
        TrackCodec {
            mime_type: mime.into(),
            clock_rate: 90000,
            channels: 0,
            sdp_fmtp_line: fmtp.into(),
        }
    }

    #[test]
    fn payload_type_prefers_exact_fmtp() {
        let want = codec("video/H264", "profile-level-id=42e01f;packetization-mode=1");
        let list = || {
            vec![
                (codec("video/VP8", ""), 96),
                (
                    codec("video/h264", "profile-level-id=42001f;packetization-mode=0"),
                    102,
                ),
                (
                    codec("video/H264", "profile-level-id=42e01f;packetization-mode=1"),
                    106,
                ),
            ]
        };
        assert_eq!(
            negotiated_payload_type(&want, list().into_iter()),
            Some(106)
        );
        assert_eq!(
            negotiated_payload_type(&want, list().into_iter().take(2)),
            Some(102)
        );
        assert_eq!(
            negotiated_payload_type(&want, list().into_iter().take(1)),
            None
        );
    }

    #[test]
    fn str0m_codecs_describe_themselves() {
        let rtc = Rtc::builder().build(std::time::Instant::now());
        let vp8 = rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| track_codec(MediaKind::Video, p).mime_type == "video/VP8");
        assert!(vp8.is_some(), "VP8 is configured by default");
        let opus = rtc
            .codec_config()
            .params()
            .iter()
            .map(|p| track_codec(MediaKind::Audio, p))
            .find(|c| c.mime_type == "audio/opus")
            .expect("opus");
        assert_eq!((opus.clock_rate, opus.channels), (48000, 2));
    }
}
