//! Codecs as the rest of the server names them ([`TrackCodec`]), from and to str0m's payload
//! parameters: the publisher's codec is described once, and each subscriber's connection
//! finds the payload type it negotiated for the same codec.

use std::collections::HashMap;

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

/// An audio or video m-line of an SDP: its mid, its payload types in the order listed (the
/// order of preference), and whether RED (RFC 2198) is among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSection {
    pub mid: String,
    pub kind: MediaKind,
    pub pts: Vec<String>,
    pub red: bool,
    /// The client receives on it (`recvonly` or `sendrecv`).
    pub client_receives: bool,
}

/// The audio and video m-lines of `sdp` that have a mid.
pub fn media_sections(sdp: &str) -> Vec<MediaSection> {
    let mut out = Vec::new();
    let mut section: Option<(Option<String>, MediaSection)> = None;
    let close = |section: Option<(Option<String>, MediaSection)>, out: &mut Vec<_>| {
        if let Some((Some(mid), s)) = section {
            out.push(MediaSection { mid, ..s });
        }
    };
    for line in sdp.lines() {
        if line.starts_with("m=") {
            close(section.take(), &mut out);
            if is_media_line(line) {
                let pts = line.split(' ').skip(3).map(str::to_owned).collect();
                let kind = if line.starts_with("m=audio") {
                    MediaKind::Audio
                } else {
                    MediaKind::Video
                };
                let s = MediaSection {
                    mid: String::new(),
                    kind,
                    pts,
                    red: false,
                    client_receives: true,
                };
                section = Some((None, s));
            }
        } else if let Some((mid, s)) = &mut section {
            if let Some(m) = line.strip_prefix("a=mid:") {
                *mid = Some(m.trim().to_owned());
            } else if matches!(line, "a=sendonly" | "a=inactive") {
                s.client_receives = false;
            } else if let Some((_, codec)) = line
                .strip_prefix("a=rtpmap:")
                .and_then(|l| l.split_once(' '))
            {
                s.red |= codec.to_ascii_lowercase().starts_with("red/");
            }
        }
    }
    close(section, &mut out);
    out
}

fn is_media_line(line: &str) -> bool {
    line.starts_with("m=audio ") || line.starts_with("m=video ")
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

/// `sdp` (the server's offer or answer) with the payload types of each m-line the client has
/// described in the order it listed them (`client_order`: payload types by mid). A browser
/// sends with the first codec of the server's description it supports, and str0m writes its
/// own configured order: without this a client that prefers H.264 (or RED around Opus) still
/// sends VP8 (plain Opus). Payload types keep their numbers across the session (str0m takes
/// the client's), so they are matched by number; any the client did not list go last.
pub fn in_client_order(sdp: &str, client_order: &HashMap<String, Vec<String>>) -> String {
    let mut lines: Vec<String> = sdp.split("\r\n").map(str::to_owned).collect();
    let mut i = 0;
    while i < lines.len() {
        if !is_media_line(&lines[i]) {
            i += 1;
            continue;
        }
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].starts_with("m="))
            .unwrap_or(lines.len());
        let order = lines[i + 1..end]
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .and_then(|mid| client_order.get(mid.trim()));
        if let Some(order) = order {
            let mut fields: Vec<&str> = lines[i].split(' ').collect();
            if fields.len() > 3 {
                fields[3..]
                    .sort_by_key(|pt| order.iter().position(|o| o == pt).unwrap_or(usize::MAX));
            }
            lines[i] = fields.join(" ");
        }
        i = end;
    }
    lines.join("\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_read_per_m_line() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\na=rtpmap:63 red/48000/2\r\na=mid:b\r\n\
                   m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:c\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        let section = |mid: &str, pts: &[&str], red| MediaSection {
            mid: mid.into(),
            kind: MediaKind::Audio,
            pts: pts.iter().map(|p| p.to_string()).collect(),
            red,
            client_receives: mid == "b",
        };
        assert_eq!(
            media_sections(sdp),
            vec![
                section("a", &["111"], false),
                section("b", &["63", "111"], true)
            ],
            "data and mid-less m-lines left out"
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
    fn server_descriptions_list_codecs_in_the_client_order() {
        let client = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 63 111 0\r\na=mid:0\r\n\
                      m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n\
                      m=video 9 UDP/TLS/RTP/SAVPF 103 104 96 97\r\na=mid:2\r\n";
        let order: HashMap<_, _> = media_sections(client)
            .into_iter()
            .map(|s| (s.mid, s.pts))
            .collect();
        let server = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\na=rtpmap:111 opus/48000/2\r\na=mid:0\r\n\
                      m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n\
                      m=video 9 UDP/TLS/RTP/SAVPF 96 97 100 103 104\r\na=mid:2\r\n\
                      m=video 9 UDP/TLS/RTP/SAVPF 96 97 103 104\r\na=mid:3\r\n";
        assert_eq!(
            in_client_order(server, &order),
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 63 111\r\na=rtpmap:111 opus/48000/2\r\na=mid:0\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 103 104 96 97 100\r\na=mid:2\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96 97 103 104\r\na=mid:3\r\n",
            "RED and H.264 first as the client listed them, one the client lacks last; an \
             m-line the client has not described (mid 3) as it was"
        );
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
