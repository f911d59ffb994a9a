//! The load generator behind `switchboard-load`: synthetic participants (the
//! [`switchboard::client`] module: real signaling, ICE, DTLS, SRTP) join rooms on a running
//! server over loopback, publish and receive for a set time, and the run is measured from both
//! sides: delivery, loss, latency and join time at the subscribers; forwarded packets (from
//! `/metrics`), CPU time and RSS (from `/proc`) at the server; and the generator's own CPU.
//! Receive-only subscribers run on the cheaper [`lite`] receivers by default (str0m, one thread
//! and one socket for all, sampled decryption), so that the generator costs less per packet
//! than the server it measures; `--subscriber-engine webrtc` makes them webrtc-rs clients too.
//! Publishers may send simulcast (`--simulcast`) and lite subscribers report a tile size
//! (`--subscriber-tile`), and the report gives the server's forwarded video packets by layer.

pub mod histogram;
pub mod lite;
pub mod report;
pub mod run;
pub mod server;
pub mod system;
pub mod target;
#[cfg(test)]
mod testing;

use std::sync::OnceLock;
use std::time::Duration;

use switchboard::client::MediaProfile;

static WORKER_THREADS: OnceLock<usize> = OnceLock::new();

/// Records how many runtime worker threads the generator uses (for the report).
pub fn set_worker_threads(n: usize) {
    let _ = WORKER_THREADS.set(n);
}

pub fn worker_threads() -> Option<usize> {
    WORKER_THREADS.get().copied()
}

/// `20s`, `1.5s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(v) = text.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('m') {
        (v, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 20s, 500ms, 2m)"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("`{text}` is not a duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// A tile size a subscriber reports for every video it receives (`--subscriber-tile WxH`), in
/// device pixels: the server forwards the smallest simulcast layer that covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// `320x180` (also `320X180`, `320×180`): both sides from 1 to 16384.
pub fn parse_tile(text: &str) -> Result<Tile, String> {
    let text = text.trim();
    let bad = || format!("`{text}` is not a tile size WxH (e.g. 320x180)");
    let (w, h) = text.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let side = |v: &str| -> Result<u32, String> {
        let v: u32 = v.trim().parse().map_err(|_| bad())?;
        if (1..=16_384).contains(&v) {
            Ok(v)
        } else {
            Err(format!("`{text}`: each side must be 1 to 16384 pixels"))
        }
    };
    Ok(Tile {
        width: side(w)?,
        height: side(h)?,
    })
}

/// A media profile of `video_kbps` split into frames of `fps`, each cut into the fewest packets
/// of at most `max_packet` payload bytes, all of equal size (so the bitrate is exact).
pub fn video_profile(
    video_kbps: u32,
    fps: u32,
    max_packet: usize,
    audio_pps: u32,
    audio_bytes: usize,
) -> MediaProfile {
    let fps = fps.max(1);
    let max_packet = max_packet.max(switchboard::client::payload::PAYLOAD_HEADER_LEN);
    let frame_bytes = (u64::from(video_kbps) * 1000 / 8 / u64::from(fps)).max(1) as usize;
    let packets = frame_bytes.div_ceil(max_packet).max(1);
    let size = frame_bytes.div_ceil(packets);
    MediaProfile {
        video_codec: Default::default(),
        video_fps: fps,
        video_packets_per_frame: packets as u32,
        video_packet_size: size.max(switchboard::client::payload::PAYLOAD_HEADER_LEN),
        audio_packets_per_second: audio_pps.max(1),
        audio_packet_size: audio_bytes,
        // Like a real encoder: a key frame every 2 s, and one at once when asked (PLI/FIR).
        keyframe_interval_frames: fps * 2,
        plain_add_track: false,
        paced: true,
        simulcast: false,
        speaking_dbov: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn tiles() {
        let t = |width, height| Ok(Tile { width, height });
        assert_eq!(parse_tile("320x180"), t(320, 180));
        assert_eq!(parse_tile(" 1280X720 "), t(1280, 720));
        assert_eq!(parse_tile("640×360"), t(640, 360));
        assert_eq!(
            parse_tile("320x180").map(|t| t.to_string()),
            Ok("320x180".into())
        );
        for bad in [
            "",
            "320",
            "x180",
            "320x",
            "320x180x2",
            "0x180",
            "320x0",
            "-1x180",
            "1.5x2",
            "99999x1",
            "axb",
            "320 180",
        ] {
            assert!(parse_tile(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn default_video_is_1200_kbps_in_packets_up_to_1100_bytes() {
        let p = video_profile(1200, 30, 1100, 50, 100);
        assert_eq!(p.video_packets_per_frame, 5);
        assert_eq!(p.video_packet_size, 1000);
        let bits = p.video_fps * p.video_packets_per_frame * p.video_packet_size as u32 * 8;
        assert_eq!(bits, 1_200_000);
        let p = video_profile(300, 15, 1100, 50, 100);
        assert_eq!(p.video_packets_per_frame, 3);
        assert!(p.video_packet_size <= 1100);
    }
}
