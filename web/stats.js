// stats.js — per-tile numbers from getStats(): bitrate, packet loss, resolution, fps, RTT.
//
// Once a second every peer connection is asked for its stats. A remote tile's numbers come from
// the inbound-rtp entries whose trackIdentifier is one of the tile's tracks; our own tiles use
// the outbound-rtp entries that send our tracks (summed over all connections in mesh rooms).
// The same snapshot drives the overlay, the "no audio / no video arriving" badges and the
// test hook.

/** Round-trip time (ms) of the connection's selected candidate pair, or null. */
function selectedRtt(report, transportId) {
  let pairId = null;
  for (const s of report.values()) {
    if (s.type === "transport" && (!transportId || s.id === transportId) && s.selectedCandidatePairId) {
      pairId = s.selectedCandidatePairId;
      break;
    }
  }
  let pair = pairId ? report.get(pairId) : null;
  if (!pair) {
    for (const s of report.values()) {
      if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
    }
  }
  return pair?.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null;
}

function fmtBitrate(kbps) {
  return kbps >= 1000 ? `${(kbps / 1000).toFixed(1)} Mbps` : `${Math.round(kbps)} kbps`;
}

export class StatsMonitor {
  #timer = null;
  #prev = new Map(); // tile id -> {t, bytes, packets, lost, videoFrames, audioPackets, stalledFor}
  #getPeers;
  #getTiles;
  #onTile;

  /**
   * @param {object} o
   * @param {() => {pc: RTCPeerConnection}[]} o.getPeers
   * @param {() => import('./ui.js').Tile[]} o.getTiles
   * @param {(tile, stats) => void} o.onTile   called with each tile's fresh snapshot
   */
  constructor({ getPeers, getTiles, onTile }) {
    this.#getPeers = getPeers;
    this.#getTiles = getTiles;
    this.#onTile = onTile;
  }

  start(intervalMs = 1000) {
    this.stop();
    this.#timer = setInterval(() => this.#tick().catch((e) => console.warn("[stats]", e)), intervalMs);
  }

  stop() {
    clearInterval(this.#timer);
    this.#timer = null;
    this.#prev.clear();
  }

  async #tick() {
    const reports = (
      await Promise.all(this.#getPeers().map(({ pc }) => pc.getStats().catch(() => null)))
    ).filter(Boolean);

    // Index what we need: inbound by track id, outbound by the track id of their media source.
    const inbound = new Map(); // track id -> {s, report}
    const outbound = new Map(); // track id -> [{s, report}]
    for (const report of reports) {
      for (const s of report.values()) {
        if (s.type === "inbound-rtp" && s.trackIdentifier) {
          inbound.set(s.trackIdentifier, { s, report });
        } else if (s.type === "outbound-rtp" && s.mediaSourceId) {
          const src = report.get(s.mediaSourceId);
          if (!src?.trackIdentifier) continue;
          if (!outbound.has(src.trackIdentifier)) outbound.set(src.trackIdentifier, []);
          outbound.get(src.trackIdentifier).push({ s, report });
        }
      }
    }

    const now = performance.now();
    const seen = new Set();
    for (const tile of this.#getTiles()) {
      seen.add(tile.id);
      const tracks = tile.stream?.getTracks() ?? [];
      const stats = tile.local ? this.#local(tracks, outbound) : this.#remote(tracks, inbound);
      this.#rates(tile.id, stats, now);
      this.#onTile(tile, stats, this.#format(stats));
    }
    for (const id of this.#prev.keys()) if (!seen.has(id)) this.#prev.delete(id);
  }

  #remote(tracks, inbound) {
    const stats = { direction: "in", video: null, audio: null, rttMs: null, bytes: 0, packets: 0, lost: 0 };
    for (const track of tracks) {
      const hit = inbound.get(track.id);
      if (!hit) continue;
      const { s, report } = hit;
      stats.bytes += s.bytesReceived ?? 0;
      stats.packets += s.packetsReceived ?? 0;
      stats.lost += Math.max(0, s.packetsLost ?? 0);
      stats.rttMs ??= selectedRtt(report, s.transportId);
      if (s.kind === "video") {
        stats.video = {
          framesDecoded: s.framesDecoded ?? 0,
          packetsReceived: s.packetsReceived ?? 0,
          bytesReceived: s.bytesReceived ?? 0,
          width: s.frameWidth ?? 0,
          height: s.frameHeight ?? 0,
          fps: s.framesPerSecond ?? 0,
          codec: report.get(s.codecId)?.mimeType ?? null,
        };
      } else {
        stats.audio = {
          packetsReceived: s.packetsReceived ?? 0,
          bytesReceived: s.bytesReceived ?? 0,
          audioLevel: s.audioLevel ?? 0,
          codec: report.get(s.codecId)?.mimeType ?? null,
        };
      }
    }
    return stats;
  }

  #local(tracks, outbound) {
    const stats = { direction: "out", video: null, audio: null, rttMs: null, bytes: 0, packets: 0, lost: 0 };
    const rtts = [];
    for (const track of tracks) {
      for (const { s, report } of outbound.get(track.id) ?? []) {
        stats.bytes += s.bytesSent ?? 0;
        stats.packets += s.packetsSent ?? 0;
        const remote = s.remoteId ? report.get(s.remoteId) : null;
        if (remote) stats.lost += Math.max(0, remote.packetsLost ?? 0);
        const rtt = remote?.roundTripTime != null ? remote.roundTripTime * 1000 : selectedRtt(report, s.transportId);
        if (rtt != null) rtts.push(rtt);
        if (s.kind === "video") {
          const v = (stats.video ??= { framesEncoded: 0, packetsSent: 0, width: 0, height: 0, fps: 0 });
          v.framesEncoded += s.framesEncoded ?? 0;
          v.packetsSent += s.packetsSent ?? 0;
          v.width = Math.max(v.width, s.frameWidth ?? 0);
          v.height = Math.max(v.height, s.frameHeight ?? 0);
          v.fps = Math.max(v.fps, s.framesPerSecond ?? 0);
        } else {
          const a = (stats.audio ??= { packetsSent: 0 });
          a.packetsSent += s.packetsSent ?? 0;
        }
      }
    }
    if (rtts.length) stats.rttMs = rtts.reduce((a, b) => a + b, 0) / rtts.length;
    return stats;
  }

  /** Turns counters into rates against the previous tick, and tracks whether media flows. */
  #rates(id, stats, now) {
    const prev = this.#prev.get(id);
    const videoCount = stats.video?.framesDecoded ?? stats.video?.framesEncoded ?? 0;
    const audioCount = stats.audio?.packetsReceived ?? stats.audio?.packetsSent ?? 0;
    stats.bitrateKbps = 0;
    stats.lossPct = 0;
    stats.videoFlowing = false;
    stats.audioFlowing = false;
    if (prev) {
      const dt = (now - prev.t) / 1000;
      if (dt > 0) stats.bitrateKbps = Math.max(0, ((stats.bytes - prev.bytes) * 8) / 1000 / dt);
      const got = stats.packets - prev.packets;
      const lost = stats.lost - prev.lost;
      stats.lossPct = got + lost > 0 ? (Math.max(0, lost) / (got + Math.max(0, lost))) * 100 : 0;
      stats.videoFlowing = videoCount > prev.videoCount;
      stats.audioFlowing = audioCount > prev.audioCount;
    }
    // "Not arriving" only after two quiet seconds, so one slow tick does not flash a badge.
    stats.videoQuietFor = stats.videoFlowing ? 0 : (prev?.videoQuietFor ?? 0) + 1;
    stats.audioQuietFor = stats.audioFlowing ? 0 : (prev?.audioQuietFor ?? 0) + 1;
    this.#prev.set(id, {
      t: now,
      bytes: stats.bytes,
      packets: stats.packets,
      lost: stats.lost,
      videoCount,
      audioCount,
      videoQuietFor: stats.videoQuietFor,
      audioQuietFor: stats.audioQuietFor,
    });
  }

  #format(s) {
    const lines = [];
    if (s.video && s.video.width) {
      lines.push(`${s.video.width}×${s.video.height} · ${Math.round(s.video.fps)} fps`);
    } else if (!s.video) {
      lines.push("no video");
    }
    lines.push(`${s.direction === "in" ? "↓" : "↑"} ${fmtBitrate(s.bitrateKbps)} · loss ${s.lossPct.toFixed(1)}%`);
    if (s.rttMs != null) lines.push(`RTT ${Math.round(s.rttMs)} ms`);
    return lines.join("\n");
  }
}
