// ui.js — everything that touches the DOM: lobby, status, banner, tile grid, chat, controls.
//
// app.js decides *what* is shown; this module only knows *how*. Text from the network is only
// ever put into the page with textContent.

const $ = (id) => document.getElementById(id);

/** Up to two initials for the avatar shown when a tile has no video. */
function initials(name) {
  const parts = String(name || "?").trim().split(/\s+/).filter(Boolean);
  const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : (parts[0] ?? "?").slice(0, 2);
  return letters.toUpperCase();
}

/** A stable hue per participant so avatars are told apart at a glance. */
function hue(key) {
  let h = 0;
  for (const c of String(key)) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

const MIC_OFF_SVG =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5-3a5 5 0 0 1-10 0H5a7 7 0 0 0 6 6.92V21h2v-3.08A7 7 0 0 0 19 11h-2z"/><path d="M3 3l18 18" stroke="currentColor" stroke-width="2.2"/></svg>';
const CAM_OFF_SVG =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M17 10.5V7a1 1 0 0 0-1-1H4a1 1 0 0 0-1 1v10a1 1 0 0 0 1 1h12a1 1 0 0 0 1-1v-3.5l4 4v-11l-4 4z"/><path d="M3 3l18 18" stroke="currentColor" stroke-width="2.2"/></svg>';

/** Remote cameras above which the grid shows the active speakers large and the rest small. */
const CROWDED = 6;

/** One video tile: a participant's camera, a screen share, or our own preview. */
export class Tile {
  /**
   * @param {{id: string, participantId: string, name: string, kind: 'camera'|'screen',
   *          local?: boolean}} o   `local`: our own camera preview or our own screen share
   */
  constructor({ id, participantId, name, kind, local = false }) {
    this.id = id;
    this.participantId = participantId;
    this.kind = kind;
    this.local = local;
    this.stream = null;
    this.stats = null; // last stats snapshot (see stats.js)
    this.micOff = false;
    this.camOff = false;
    this.#speakUntil = 0;

    const el = document.createElement("div");
    el.className = "tile";
    el.dataset.tileId = id;
    el.dataset.participantId = participantId;
    el.dataset.kind = kind;
    if (local) el.dataset.local = "";
    else el.dataset.remote = "";
    el.innerHTML = `
      <video autoplay playsinline></video>
      <div class="avatar"><span></span></div>
      <div class="badges">
        <span class="badge mic-off" title="Microphone off" hidden>${MIC_OFF_SVG}</span>
        <span class="badge cam-off" title="Camera off" hidden>${CAM_OFF_SVG}</span>
      </div>
      <div class="paused-note" hidden></div>
      <div class="stall-note" hidden>Connection unstable</div>
      <div class="nameplate"></div>
      <pre class="stats-overlay"></pre>`;
    this.el = el;
    this.video = el.querySelector("video");
    // Our own preview and screen shares never play sound here (no echo, no duplicate audio).
    this.video.muted = local || kind === "screen";
    if (local && kind === "camera") this.video.classList.add("mirror");
    this.avatar = el.querySelector(".avatar");
    this.avatar.style.setProperty("--hue", hue(participantId));
    this.nameplate = el.querySelector(".nameplate");
    this.micBadge = el.querySelector(".mic-off");
    this.camBadge = el.querySelector(".cam-off");
    this.statsEl = el.querySelector(".stats-overlay");
    this.pausedNote = el.querySelector(".paused-note");
    this.stallNote = el.querySelector(".stall-note");
    this.videoPaused = null;
    this.stalled = false;
    this.setName(name);
    this.#refreshVideo();
  }

  #speakUntil;

  setName(name) {
    this.name = name;
    if (this.kind === "screen") this.nameplate.textContent = this.local ? "Your screen" : `${name}’s screen`;
    else this.nameplate.textContent = this.local ? `${name} (you)` : name;
    this.avatar.querySelector("span").textContent = initials(name);
  }

  /** Shows `stream` (re-assigning reloads the element, so tracks added later are picked up). */
  setStream(stream) {
    this.stream = stream;
    this.video.srcObject = stream;
    if (stream) this.video.play().catch(() => {});
    this.#refreshVideo();
  }

  setMicOff(off) {
    this.micOff = off;
    this.micBadge.hidden = !off || this.kind === "screen";
  }

  setCamOff(off) {
    this.camOff = off;
    this.camBadge.hidden = !off || this.kind === "screen";
    this.#refreshVideo();
  }

  /**
   * The server paused this tile's video: "bandwidth" (our downlink has no room for it; it comes
   * back by itself) or "hidden" (we are not showing it). Not the same as the camera being off.
   */
  setVideoPaused(reason) {
    this.videoPaused = reason ?? null;
    const bandwidth = this.videoPaused === "bandwidth";
    this.pausedNote.hidden = !bandwidth;
    this.pausedNote.textContent = bandwidth ? "Video paused: low bandwidth" : "";
    this.el.classList.toggle("video-paused", bandwidth);
  }

  /**
   * Media stopped arriving although the participant has not muted it (its mute state comes
   * from the server): a network problem, not a mute.
   */
  setStalled(stalled) {
    this.stalled = stalled;
    this.stallNote.hidden = !stalled;
  }

  /** Feeds an audio level (0..1); the tile glows while someone is talking, with a short tail. */
  setLevel(level) {
    const now = performance.now();
    if (level > 0.05 && !this.micOff) this.#speakUntil = now + 400;
    this.el.classList.toggle("speaking", now < this.#speakUntil);
  }

  get speaking() {
    return this.el.classList.contains("speaking");
  }

  /** Renders the stats overlay from a snapshot made by stats.js. */
  setStats(stats, text) {
    this.stats = stats;
    this.statsEl.textContent = text;
  }

  hasLiveVideo() {
    return !!this.stream?.getVideoTracks().some((t) => t.readyState === "live") && !this.camOff;
  }

  #refreshVideo() {
    this.el.classList.toggle("no-video", !this.hasLiveVideo());
  }

  /** Called when the stream's track set changed. */
  refresh() {
    this.#refreshVideo();
  }
}

export class UI {
  tiles = new Map(); // tile id -> Tile

  constructor() {
    this.grid = $("grid");
    this.chatLog = $("chat-log");
    this.unread = 0;
    $("banner-close").addEventListener("click", () => this.hideBanner());
    $("btn-chat").addEventListener("click", () => this.toggleChat());
    $("chat-close").addEventListener("click", () => this.toggleChat(false));
    $("btn-stats").addEventListener("click", () => {
      const on = document.body.classList.toggle("show-stats");
      $("btn-stats").setAttribute("aria-pressed", String(on));
    });
    new ResizeObserver(() => this.#layout()).observe(this.grid);
  }

  // ---- lobby ------------------------------------------------------------------------------

  showLobby() {
    $("lobby").hidden = false;
    $("call").hidden = true;
    $("controls").hidden = true;
    document.body.dataset.phase = "lobby";
  }

  showCall() {
    $("lobby").hidden = true;
    $("call").hidden = false;
    $("controls").hidden = false;
    document.body.dataset.phase = "call";
    // The chat panel starts open where there is room for it.
    this.toggleChat(window.matchMedia("(min-width: 900px)").matches);
  }

  setRoom(room, mode) {
    $("room-label").textContent = room ? `# ${room}${mode === "mesh" ? " · mesh" : ""}` : "";
    $("lobby-room").textContent = room || "a room";
    document.title = room ? `${room} · Switchboard` : "Switchboard";
  }

  setPreview(stream, { camOn, micOn }) {
    const video = $("preview-video");
    if (video.srcObject !== stream) video.srcObject = stream;
    const hasVideo = camOn && stream.getVideoTracks().length > 0;
    $("preview-placeholder").hidden = hasVideo;
    $("preview-placeholder").textContent = camOn ? "No camera" : "Camera is off";
    video.hidden = !hasVideo;
    this.#setToggle($("lobby-mic"), micOn, "Microphone on", "Microphone off");
    this.#setToggle($("lobby-cam"), camOn, "Camera on", "Camera off");
  }

  setMicMeter(level) {
    $("mic-meter").style.transform = `scaleX(${Math.min(1, level * 1.5).toFixed(3)})`;
  }

  setDevices(select, devices, currentId) {
    const el = $(select);
    el.replaceChildren(
      ...devices.map((d) => {
        const o = document.createElement("option");
        o.value = d.id;
        o.textContent = d.label;
        o.selected = d.id === currentId;
        return o;
      }),
    );
    el.disabled = devices.length === 0;
    if (devices.length === 0) {
      const o = document.createElement("option");
      o.textContent = "None available";
      el.append(o);
    }
  }

  setLobbyError(text) {
    const el = $("lobby-error");
    el.textContent = text ?? "";
    el.hidden = !text;
  }

  setJoinBusy(busy) {
    $("join-button").disabled = busy;
    $("join-button").textContent = busy ? "Joining…" : "Join";
  }

  // ---- status and messages ----------------------------------------------------------------

  /** state: idle | connecting | connected | reconnecting | failed */
  setStatus(state, text) {
    const labels = {
      idle: "Not connected",
      connecting: "Connecting…",
      connected: "Connected",
      reconnecting: "Reconnecting…",
      failed: "Connection failed",
    };
    $("status").dataset.state = state;
    $("status-text").textContent = text ?? labels[state] ?? state;
  }

  /** kind: error | warn | info. Info banners fade by themselves. */
  showBanner(kind, text) {
    const el = $("banner");
    el.dataset.kind = kind;
    $("banner-text").textContent = text;
    el.hidden = false;
    clearTimeout(this.bannerTimer);
    if (kind === "info") this.bannerTimer = setTimeout(() => this.hideBanner(), 5000);
  }

  hideBanner() {
    $("banner").hidden = true;
  }

  // ---- tiles ------------------------------------------------------------------------------

  addTile(opts) {
    let tile = this.tiles.get(opts.id);
    if (tile) return tile;
    tile = new Tile(opts);
    this.tiles.set(tile.id, tile);
    // Own tile first, then people in join order, each person's screen right after them.
    if (opts.local && opts.kind === "camera") this.grid.prepend(tile.el);
    else if (opts.kind === "screen") {
      const owner = [...this.grid.querySelectorAll(`.tile[data-participant-id="${CSS.escape(opts.participantId)}"]`)].pop();
      if (owner) owner.after(tile.el);
      else this.grid.append(tile.el);
    } else this.grid.append(tile.el);
    this.#layout();
    this.setActiveSpeakers(this.#speakers);
    return tile;
  }

  removeTile(id) {
    const tile = this.tiles.get(id);
    if (!tile) return;
    tile.video.srcObject = null;
    tile.el.remove();
    this.tiles.delete(id);
    this.#layout();
  }

  /**
   * The server's active speakers, loudest first: their camera tiles are marked and come first
   * after ours. In a crowded grid (more than CROWDED remote cameras) they are also shown large
   * and everyone else small, so the server sends the others on low layers.
   */
  setActiveSpeakers(ids) {
    this.#speakers = ids;
    for (const tile of this.tiles.values()) {
      const rank = !tile.local && tile.kind === "camera" ? ids.indexOf(tile.participantId) : -1;
      tile.el.classList.toggle("active-speaker", rank >= 0);
      // CSS order, not DOM moves: a video element keeps playing untouched.
      tile.el.style.order = tile.local && tile.kind === "camera" ? "-10" : rank >= 0 ? String(rank - 5) : "";
    }
    this.#layout();
  }

  #speakers = [];

  clearTiles() {
    for (const id of [...this.tiles.keys()]) this.removeTile(id);
  }

  tilesOf(participantId) {
    return [...this.tiles.values()].filter((t) => t.participantId === participantId);
  }

  /** Picks a column count so that n 16:9 tiles fill the grid's box as well as possible. */
  #layout() {
    const cameras = [...this.tiles.values()].filter((t) => !t.local && t.kind === "camera").length;
    const crowded = cameras > CROWDED;
    this.grid.classList.toggle("crowded", crowded);
    // A large speaker tile takes 2 x 2 cells.
    const large = crowded ? this.grid.querySelectorAll(".tile.active-speaker").length : 0;
    const n = Math.max(1, this.tiles.size + 3 * large);
    const { width, height } = this.grid.getBoundingClientRect();
    let best = { cols: 1, size: 0 };
    for (let cols = 1; cols <= n; cols++) {
      const rows = Math.ceil(n / cols);
      const w = Math.min(width / cols, ((height / rows) * 16) / 9);
      if (w > best.size) best = { cols, size: w };
    }
    this.grid.style.setProperty("--cols", best.cols);
    this.grid.style.setProperty("--rows", Math.ceil(n / best.cols));
    this.grid.dataset.count = n;
  }

  // ---- controls ---------------------------------------------------------------------------

  setControls({ micOn, camOn, sharing, canShare }) {
    this.#setToggle($("btn-mic"), micOn, "Mute", "Unmute");
    this.#setToggle($("btn-cam"), camOn, "Stop video", "Start video");
    const screen = $("btn-screen");
    screen.setAttribute("aria-pressed", String(sharing));
    screen.classList.toggle("active", sharing);
    screen.querySelector(".label").textContent = sharing ? "Stop sharing" : "Share screen";
    screen.disabled = !canShare;
  }

  #setToggle(button, on, onLabel, offLabel) {
    button.classList.toggle("off", !on);
    button.setAttribute("aria-pressed", String(!on));
    const label = button.querySelector(".label") ?? button;
    label.textContent = on ? onLabel : offLabel;
  }

  // ---- chat -------------------------------------------------------------------------------

  toggleChat(open = $("chat").hidden) {
    $("chat").hidden = !open;
    $("btn-chat").setAttribute("aria-pressed", String(open));
    document.body.classList.toggle("chat-open", open);
    if (open) {
      this.unread = 0;
      this.#renderUnread();
      $("chat-input").focus({ preventScroll: true });
    }
    this.#layout();
  }

  /** Appends a chat line. `entry`: {name, text, self, system} */
  addChat(entry) {
    const li = document.createElement("li");
    li.className = entry.system ? "msg system" : entry.self ? "msg self" : "msg";
    const head = document.createElement("div");
    head.className = "head";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = entry.system ? "" : entry.self ? "You" : entry.name;
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    head.append(who, time);
    const text = document.createElement("p");
    text.className = "text";
    text.textContent = entry.text;
    li.append(head, text);
    const atBottom = this.chatLog.scrollHeight - this.chatLog.scrollTop - this.chatLog.clientHeight < 40;
    this.chatLog.append(li);
    if (atBottom || entry.self) this.chatLog.scrollTop = this.chatLog.scrollHeight;
    if ($("chat").hidden && !entry.system) {
      this.unread++;
      this.#renderUnread();
    }
  }

  clearChat() {
    this.chatLog.replaceChildren();
  }

  setChatEnabled(enabled) {
    $("chat-input").disabled = !enabled;
    $("chat-send").disabled = !enabled;
    $("chat-input").placeholder = enabled ? "Message everyone…" : "Chat connects with the call…";
  }

  #renderUnread() {
    const badge = $("btn-chat").querySelector(".unread");
    badge.textContent = String(this.unread);
    badge.hidden = this.unread === 0;
  }
}
