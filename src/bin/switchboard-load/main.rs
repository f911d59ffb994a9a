//! `switchboard-load`: a load generator for a running Switchboard server, on loopback only.
//!
//! ```text
//! switchboard-load --server ws://127.0.0.1:8080/ws --rooms 1 --publishers 1 --subscribers 200 --duration 20s
//! switchboard-load --rooms 1 --publishers 10 --all-to-all
//! switchboard-load --rooms 20 --publishers 4 --all-to-all --json
//! switchboard-load --mesh-table
//! switchboard-load --subscribers 200 --subscriber-engine webrtc   # webrtc-rs subscribers
//! switchboard-load --subscribers 600 --decrypt-every 64           # lite subscribers (default)
//! switchboard-load --subscribers 200 --simulcast --subscriber-tile 320x180   # all on layer q
//! switchboard-load --target whip --subscribers 200        # WHIP publisher, WHEP players
//! switchboard-load --target janus --server http://127.0.0.1:8088/janus --subscribers 200
//! ```
//! See `--help` and the README's "Measured figures".

mod load;

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use switchboard::signal::protocol::RoomMode;

use load::report::{self, Outcome};
use load::run::{self, Scenario, SubscriberEngine};
use load::server::Server;
use load::target::Target;

/// Synthetic WebRTC participants (real signaling, ICE, DTLS, SRTP) against a running SFU on
/// this machine (Switchboard, any WHIP/WHEP server, or Janus VideoRoom), measured from both
/// ends.
#[derive(Debug, Parser)]
#[command(name = "switchboard-load", version)]
struct Args {
    /// The protocol the server is spoken to in. `whip` and `janus` run one publisher per room
    /// (a lite str0m publisher) and lite receivers, SFU rooms only.
    #[arg(long, value_enum, default_value_t = TargetKind::Switchboard)]
    target: TargetKind,
    /// The server: Switchboard's signaling WebSocket, or with `--target janus` Janus's HTTP API
    /// (default http://127.0.0.1:8088/janus). Must resolve to a loopback address.
    #[arg(long)]
    server: Option<String>,
    /// `--target whip`: the WHIP endpoint publishers POST to; `{room}` is the room's name.
    #[arg(long, default_value = "http://127.0.0.1:8080/whip/{room}")]
    whip_url: String,
    /// `--target whip`: the WHEP endpoint receivers POST to; `{room}` is the room's name.
    #[arg(long, default_value = "http://127.0.0.1:8080/whep/{room}")]
    whep_url: String,
    /// The server's process id, for its CPU time and RSS. Default: the process listening on the
    /// URL's port (found through /proc/net/tcp and /proc/*/fd).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Rooms, all alike.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Publishers per room: each sends one video and one audio track (and receives the others).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Receive-only participants per room.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Every participant publishes and receives everyone else: the room size is --publishers
    /// (plus --subscribers, which are turned into publishers).
    #[arg(long)]
    all_to_all: bool,
    /// Mesh rooms: participants connect to each other and the server relays signaling only.
    #[arg(long)]
    mesh: bool,
    /// Runs an all-to-all room of n in SFU mode and then in mesh mode for every n from
    /// --mesh-min to --mesh-max, each for --duration (default 5 s here), and prints a table.
    #[arg(long)]
    mesh_table: bool,
    #[arg(long, default_value_t = 2)]
    mesh_min: usize,
    #[arg(long, default_value_t = 8)]
    mesh_max: usize,
    /// Length of the measurement window (20s, 500ms, 2m). Default 20 s, or 5 s per run of
    /// --mesh-table.
    #[arg(long, value_parser = load::parse_duration)]
    duration: Option<Duration>,
    /// Time between everyone receiving and the window's start.
    #[arg(long, value_parser = load::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Video bitrate per publisher (RTP payload).
    #[arg(long, default_value_t = 1200)]
    video_kbps: u32,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Largest video payload: each frame is cut into the fewest equal packets of at most this.
    #[arg(long, default_value_t = 1100)]
    packet_size: usize,
    #[arg(long, default_value_t = 50)]
    audio_pps: u32,
    #[arg(long, default_value_t = 100)]
    audio_size: usize,
    #[arg(long)]
    no_audio: bool,
    #[arg(long)]
    no_video: bool,
    /// Publishers write each video frame's packets back to back instead of pacing them over
    /// 40 % of the frame interval (a browser's pacer sends at 2.5× the bitrate).
    #[arg(long)]
    unpaced: bool,
    /// Publishers send their video as three simulcast layers (rids q, h, f: packets of a
    /// quarter, half and all of the video packet size, the same packets per frame), so the top
    /// layer is --video-kbps. The server switches off layers nobody receives (dynacast).
    #[arg(long)]
    simulcast: bool,
    /// Lite subscribers report this tile size (WxH, device pixels) for every video they
    /// receive (`track-settings`), so the server forwards the smallest layer that covers it
    /// (320x180: layer q). Without it they report nothing and get the top layer.
    #[arg(long, value_parser = load::parse_tile)]
    subscriber_tile: Option<load::Tile>,
    /// What the receive-only subscribers run on: `lite` (str0m receivers on one thread and one
    /// UDP socket, every packet counted from its RTP header, a sample decrypted: cheaper per
    /// packet than the server) or `webrtc` (webrtc-rs clients, like the publishers). Mesh rooms
    /// always use webrtc.
    #[arg(long, value_enum, default_value_t = SubscriberEngine::Lite)]
    subscriber_engine: SubscriberEngine,
    /// Lite subscribers: after the first 8 packets of each stream, decrypt and check one packet
    /// in N (1 = every packet; at most 1024). Latency figures come from these packets.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    decrypt_every: u32,
    /// The network device the lite receivers' socket is tied to. It must carry loopback
    /// addresses only; a Janus started by `scripts/janus-videoroom` sends from its media
    /// interface, `jlo0`, so runs against it need `--receiver-device jlo0`.
    #[arg(long, default_value = "lo")]
    receiver_device: String,
    /// Lite receivers join through these signaling URLs in turn instead of --server (the
    /// nodes of a cascading cluster: `--subscriber-server ws://127.0.0.1:8080/ws
    /// --subscriber-server ws://127.0.0.1:8081/ws` splits them). Switchboard target only.
    #[arg(long)]
    subscriber_server: Vec<String>,
    /// Joins in progress at once.
    #[arg(long, default_value_t = 16)]
    join_concurrency: usize,
    /// Limit for everyone to join and receive every stream. Default: 30 s + 100 ms per
    /// participant.
    #[arg(long, value_parser = load::parse_duration)]
    ready_timeout: Option<Duration>,
    /// Runtime worker threads. Default: the CPUs this process may run on (so `taskset -c 1`
    /// gives one).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the results as JSON on stdout (the progress line stays on stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON results to this file (the table still goes to the terminal).
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// A name for this run in the report.
    #[arg(long)]
    label: Option<String>,
    /// Room-name prefix (default `load-<pid>`); rooms are `<prefix>-<run>-r<i>`.
    #[arg(long)]
    room_prefix: Option<String>,
    /// `tracing` filter for the generator's own logs (webrtc-rs warns about STUN checks that
    /// arrive before the answer and about the DTLS server name; harmless, so hidden by
    /// default).
    #[arg(
        long,
        default_value = "warn,rtc_ice::agent=error,rtc::peer_connection::handler=error,rtc_dtls::config=error"
    )]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    load::set_worker_threads(threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(run_main(args))
}

/// `--target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetKind {
    Switchboard,
    Whip,
    Janus,
}

impl Args {
    fn target(&self) -> Target {
        match self.target {
            TargetKind::Switchboard => Target::Switchboard {
                ws_url: self
                    .server
                    .clone()
                    .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into()),
            },
            TargetKind::Whip => Target::Whip {
                whip_url: self.whip_url.clone(),
                whep_url: self.whep_url.clone(),
            },
            TargetKind::Janus => Target::Janus {
                url: self
                    .server
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:8088/janus".into()),
            },
        }
    }

    /// What the targets other than Switchboard's protocol cannot run.
    fn check_target(&self) -> anyhow::Result<()> {
        if self.target == TargetKind::Switchboard {
            return Ok(());
        }
        anyhow::ensure!(
            self.subscriber_server.is_empty(),
            "--subscriber-server is for --target switchboard"
        );
        anyhow::ensure!(
            !self.mesh && !self.mesh_table && !self.all_to_all,
            "--target {:?}: SFU rooms of one publisher and receivers only (no mesh, no all-to-all)",
            self.target
        );
        anyhow::ensure!(
            self.publishers == 1,
            "--target {:?}: one publisher per room",
            self.target
        );
        anyhow::ensure!(
            !self.simulcast && self.subscriber_tile.is_none(),
            "--target {:?}: no simulcast or tile sizes",
            self.target
        );
        anyhow::ensure!(
            self.subscriber_engine == SubscriberEngine::Lite,
            "--target {:?}: lite receivers only",
            self.target
        );
        Ok(())
    }
}

async fn run_main(args: Args) -> anyhow::Result<()> {
    args.check_target()?;
    let target = args.target();
    let server = Server::new(&target, args.server_pid)?;
    let mut media = load::video_profile(
        args.video_kbps,
        args.fps,
        args.packet_size,
        args.audio_pps,
        args.audio_size,
    );
    media.paced = !args.unpaced;
    media.simulcast = args.simulcast;
    let prefix = args
        .room_prefix
        .clone()
        .unwrap_or_else(|| format!("load-{}", std::process::id()));
    let base = Scenario {
        label: String::new(),
        target,
        rooms: args.rooms,
        publishers: args.publishers,
        subscribers: args.subscribers,
        mode: if args.mesh {
            RoomMode::Mesh
        } else {
            RoomMode::Sfu
        },
        media,
        audio: !args.no_audio,
        video: !args.no_video,
        warmup: args.warmup,
        duration: args.duration.unwrap_or(Duration::from_secs(20)),
        join_concurrency: args.join_concurrency,
        ready_timeout: Duration::ZERO,
        room_prefix: String::new(),
        progress: !args.quiet,
        subscriber_engine: args.subscriber_engine,
        decrypt_every: args.decrypt_every,
        subscriber_tile: args.subscriber_tile,
        receiver_device: args.receiver_device.clone(),
        subscriber_servers: args.subscriber_server.clone(),
    };
    let ready_timeout = |s: &Scenario| {
        args.ready_timeout.unwrap_or(
            Duration::from_secs(30) + Duration::from_millis(100) * s.participants() as u32,
        )
    };
    if args.subscriber_tile.is_some() {
        anyhow::ensure!(
            !args.mesh && !args.mesh_table && !args.all_to_all,
            "--subscriber-tile is for the receive-only subscribers of SFU rooms"
        );
        anyhow::ensure!(
            base.effective_subscriber_engine() == SubscriberEngine::Lite,
            "--subscriber-tile needs lite subscribers (--subscriber-engine lite, and --subscribers above 0)"
        );
    }
    check_open_files(&{
        let mut s = base.clone();
        if args.all_to_all && !args.mesh_table {
            s.publishers += s.subscribers;
            s.subscribers = 0;
        }
        s
    });

    if args.mesh_table {
        anyhow::ensure!(
            args.mesh_min >= 2 && args.mesh_min <= args.mesh_max,
            "--mesh-min must be at least 2 and at most --mesh-max"
        );
        let mut rows = Vec::new();
        let mut run_index = 0;
        for n in args.mesh_min..=args.mesh_max {
            let mut pair = Vec::new();
            for mode in [RoomMode::Sfu, RoomMode::Mesh] {
                run_index += 1;
                let mut s = base.clone();
                s.rooms = 1;
                s.publishers = n;
                s.subscribers = 0;
                s.mode = mode;
                s.duration = args.duration.unwrap_or(Duration::from_secs(5));
                s.warmup = args.warmup.min(Duration::from_secs(1));
                s.label = format!(
                    "{} n={n}",
                    if mode == RoomMode::Mesh {
                        "mesh"
                    } else {
                        "sfu"
                    }
                );
                s.room_prefix = format!("{prefix}-{run_index}");
                s.ready_timeout = ready_timeout(&s);
                if s.progress {
                    eprintln!("-- {}", s.label);
                }
                let outcome = run::run(&s, &server).await?;
                if !args.json {
                    report::print(&outcome);
                }
                pair.push(outcome);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mesh = pair.pop().expect("two runs");
            let sfu = pair.pop().expect("two runs");
            rows.push((n, sfu, mesh));
        }
        if args.json {
            #[derive(serde::Serialize)]
            struct Row<'a> {
                n: usize,
                sfu: &'a Outcome,
                mesh: &'a Outcome,
            }
            let rows: Vec<Row> = rows
                .iter()
                .map(|(n, sfu, mesh)| Row { n: *n, sfu, mesh })
                .collect();
            let json = serde_json::json!({ "mesh_table": rows });
            write_json(&args, &json)?;
            println!("{}", serde_json::to_string_pretty(&json)?);
        } else {
            let json: Vec<_> = rows
                .iter()
                .map(|(n, sfu, mesh)| serde_json::json!({ "n": n, "sfu": sfu, "mesh": mesh }))
                .collect();
            write_json(&args, &serde_json::json!({ "mesh_table": json }))?;
            report::print_mesh_table(&rows);
        }
        return Ok(());
    }

    let mut s = base;
    if args.all_to_all {
        s.publishers += s.subscribers;
        s.subscribers = 0;
    }
    s.room_prefix = format!("{prefix}-1");
    s.ready_timeout = ready_timeout(&s);
    s.label = args.label.clone().unwrap_or_else(|| {
        let mut label = if s.subscribers == 0 {
            format!("{} room(s) of {} all-to-all", s.rooms, s.publishers)
        } else {
            format!(
                "{} room(s) of {} publisher(s) → {} subscribers",
                s.rooms, s.publishers, s.subscribers
            )
        };
        if s.media.simulcast && s.video {
            label.push_str(", simulcast");
        }
        if let Some(tile) = s.subscriber_tile {
            label.push_str(&format!(", tiles {tile}"));
        }
        if s.target.name() != "switchboard" {
            label = format!("{}: {label}", s.target.name());
        }
        label
    });
    let outcome = run::run(&s, &server).await?;
    write_json(&args, &serde_json::to_value(&outcome)?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        report::print(&outcome);
    }
    Ok(())
}

fn write_json(args: &Args, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Warns when the open-file limit is likely too low for the run (each participant holds a
/// WebSocket and one UDP socket per peer connection, and its connections hold more; a lite
/// subscriber only its WebSocket).
fn check_open_files(s: &Scenario) {
    let per_room = s.publishers + s.subscribers;
    let links = if s.mode == RoomMode::Mesh {
        per_room.saturating_sub(1).max(1)
    } else {
        1
    };
    let webrtc = if s.effective_subscriber_engine() == SubscriberEngine::Lite {
        s.rooms * s.publishers
    } else {
        s.participants()
    };
    let lite = s.participants() - webrtc;
    let needed = (webrtc * (2 + 2 * links) + lite + 64) as u64;
    if let Some(limit) = load::system::open_files_limit()
        && limit < needed
    {
        eprintln!(
            "warning: the open-file limit is {limit}, this run may need about {needed}: raise it with `ulimit -n {}`",
            needed * 2
        );
    }
}
