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
/// Also the payload type of RED around it, if the remote accepted RED on that m-line
/// (`red_accepted`: str0m's negotiated payload types list primary codecs only).
pub fn payload_type_for(
    rtc: &Rtc,
    mid: Mid,
    kind: MediaKind,
    codec: &TrackCodec,
    red_accepted: bool,
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
        .filter(|_| red_accepted)
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

/// The mids of the m-lines of `sdp` that list RED (RFC 2198) among their payload types, and
/// of those that do not.
pub fn red_by_mid(sdp: &str) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    let mut section: Option<(Option<String>, bool)> = None;
    let close = |section: Option<(Option<String>, bool)>, out: &mut Vec<(String, bool)>| {
        if let Some((Some(mid), red)) = section {
            out.push((mid, red));
        }
    };
    for line in sdp.lines() {
        if line.starts_with("m=") {
            close(section.take(), &mut out);
            section = Some((None, false));
        } else if let Some((mid, red)) = &mut section {
            if let Some(m) = line.strip_prefix("a=mid:") {
                *mid = Some(m.trim().to_owned());
            } else if let Some((_, codec)) = line
                .strip_prefix("a=rtpmap:")
                .and_then(|l| l.split_once(' '))
            {
                *red |= codec.to_ascii_lowercase().starts_with("red/");
            }
        }
    }
    close(section, &mut out);
    out
}

/// Whether an SDP negotiates transport-wide congestion control (the transport-wide sequence
/// number header extension), without which the server gets no feedback to estimate a downlink
/// from: None if it has no audio or video m-line to say it on.
pub fn negotiates_twcc(sdp: &str) -> Option<bool> {
    let mut media = false;
    for line in sdp.lines() {
        media |= line.starts_with("m=audio") || line.starts_with("m=video");
        if line.starts_with("a=extmap:") && line.contains("transport-wide-cc") {
            return Some(true);
        }
    }
    media.then_some(false)
}

/// `sdp` with RED listed first among each audio m-line's payload types. A browser sends with
/// the first codec of the answer it supports, and str0m lists Opus before the RED around it:
/// without this a browser that offered RED first still sends plain Opus.
pub fn red_first(sdp: &str) -> String {
    let lines: Vec<&str> = sdp.split("\r\n").collect();
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with("m=audio ") {
            i += 1;
            continue;
        }
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].starts_with("m="))
            .unwrap_or(lines.len());
        let red: Vec<&str> = lines[i + 1..end]
            .iter()
            .filter_map(|l| l.strip_prefix("a=rtpmap:"))
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, codec)| codec.to_ascii_lowercase().starts_with("red/"))
            .map(|(pt, _)| pt)
            .collect();
        // m=audio <port> <proto> <pt> <pt> ...
        let mut fields: Vec<&str> = lines[i].split(' ').collect();
        if !red.is_empty() && fields.len() > 3 {
            let (head, pts) = fields.split_at_mut(3);
            let mut reordered: Vec<&str> =
                red.iter().copied().filter(|pt| pts.contains(pt)).collect();
            reordered.extend(pts.iter().copied().filter(|pt| !red.contains(pt)));
            out[i] = head
                .iter()
                .copied()
                .chain(reordered)
                .collect::<Vec<_>>()
                .join(" ");
        }
        i = end;
    }
    out.join("\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn red_is_read_per_m_line() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a\r\na=rtpmap:111 opus/48000/2\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\na=rtpmap:63 red/48000/2\r\na=mid:b\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        assert_eq!(
            red_by_mid(sdp),
            vec![("a".to_owned(), false), ("b".to_owned(), true)]
        );
    }

    #[test]
    fn twcc_is_found_in_an_extmap_line_only() {
        let with = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n";
        assert_eq!(negotiates_twcc(with), Some(true));
        let feedback_only = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtcp-fb:96 transport-cc\r\na=x-transport-wide-cc\r\n";
        assert_eq!(negotiates_twcc(feedback_only), Some(false));
        let data_only = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
        assert_eq!(negotiates_twcc(data_only), None);
    }

    fn codec(mime: &str, fmtp: &str) -> TrackCodec {
        TrackCodec {
            mime_type: mime.into(),
            clock_rate: 90000,
            channels: 0,
            sdp_fmtp_line: fmtp.into(),
        }
    }

    #[test]
    fn red_goes_first_in_audio_m_lines_only() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 63 0\r\na=rtpmap:111 opus/48000/2\r\n\
                   a=rtpmap:63 red/48000/2\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 63\r\n\
                   a=rtpmap:63 red/90000\r\n";
        assert_eq!(
            red_first(sdp),
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 63 111 0\r\na=rtpmap:111 opus/48000/2\r\n\
             a=rtpmap:63 red/48000/2\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 63\r\n\
             a=rtpmap:63 red/90000\r\n"
        );
        let plain = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n";
        assert_eq!(red_first(plain), plain);
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
