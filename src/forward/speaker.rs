//! Speech detection for active-speaker ordering, from the audio level a publisher puts in
//! each audio packet (RFC 6464: 0 dBov loudest, -127 silence). Readings are taken over
//! [`SPEECH_INTERVAL`]: the share of packets louder than [`VOICE_DBOV`] says whether the
//! participant spoke, their mean amplitude how loud, smoothed across intervals so a breath
//! between words does not reorder a room.

use std::time::{Duration, Instant};

/// One reading per this interval.
pub const SPEECH_INTERVAL: Duration = Duration::from_millis(500);
/// Packets at least this loud count as voice.
const VOICE_DBOV: i8 = -50;
/// Share of voiced packets in an interval that starts speech, and below which it ends.
const START_SHARE: f32 = 0.4;
const STOP_SHARE: f32 = 0.15;
/// Weight of the newest interval in the smoothed loudness.
const SMOOTHING: f32 = 0.5;

#[derive(Debug, Clone, Default)]
pub struct SpeechMeter {
    interval_start: Option<Instant>,
    packets: u32,
    voiced: u32,
    amplitude_sum: f32,
    speaking: bool,
    loudness: f32,
}

impl SpeechMeter {
    /// Accounts one packet's audio level (dBov, 0 loudest).
    pub fn observe(&mut self, level_dbov: i8, now: Instant) {
        self.interval_start.get_or_insert(now);
        self.packets += 1;
        if level_dbov >= VOICE_DBOV {
            self.voiced += 1;
            self.amplitude_sum += 10f32.powf(f32::from(level_dbov) / 20.0);
        }
    }

    /// At the end of an interval: how loud the participant speaks (0 when not speaking),
    /// smoothed. None while the interval runs, or when nothing was heard since the last one.
    pub fn poll(&mut self, now: Instant) -> Option<f32> {
        let start = self.interval_start?;
        if now.saturating_duration_since(start) < SPEECH_INTERVAL {
            return None;
        }
        let share = self.voiced as f32 / self.packets.max(1) as f32;
        let amplitude = self.amplitude_sum / self.voiced.max(1) as f32;
        self.speaking = if self.speaking {
            share >= STOP_SHARE
        } else {
            share >= START_SHARE
        };
        let reading = if self.speaking { amplitude } else { 0.0 };
        self.loudness = SMOOTHING * reading + (1.0 - SMOOTHING) * self.loudness;
        if !self.speaking {
            self.loudness = 0.0;
        }
        *self = SpeechMeter {
            speaking: self.speaking,
            loudness: self.loudness,
            ..SpeechMeter::default()
        };
        Some(self.loudness)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interval(m: &mut SpeechMeter, t: Instant, levels: &[i8]) -> Option<f32> {
        for &l in levels {
            m.observe(l, t);
        }
        m.poll(t + SPEECH_INTERVAL)
    }

    #[test]
    fn speech_starts_and_stops_with_hysteresis_and_louder_reads_louder() {
        let t = Instant::now();
        let mut m = SpeechMeter::default();
        assert_eq!(m.poll(t), None, "nothing heard");
        assert_eq!(interval(&mut m, t, &[-127; 25]), Some(0.0), "silence");
        // Half the packets voiced at -20 dBov: speaking.
        let mut talk = [-20i8; 25];
        talk[..12].fill(-90);
        let a = interval(&mut m, t, &talk).unwrap();
        assert!(a > 0.0);
        // A pause between words (20 % voiced) keeps it speaking.
        let mut pause = [-90i8; 25];
        pause[..5].fill(-20);
        assert!(interval(&mut m, t, &pause).unwrap() > 0.0);
        // Silence ends it.
        assert_eq!(interval(&mut m, t, &[-90; 25]), Some(0.0));
        // Quieter speech reads quieter.
        let mut quiet = SpeechMeter::default();
        let q = interval(&mut quiet, t, &[-40; 25]).unwrap();
        let mut loud = SpeechMeter::default();
        let l = interval(&mut loud, t, &[-10; 25]).unwrap();
        assert!(0.0 < q && q < l);
    }
}
