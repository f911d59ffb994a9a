//! Helpers shared by the integration tests: an in-process server on loopback, logging, and
//! waiting for conditions.

#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use switchboard::client::{Client, ClientOptions, ClientSnapshot};
use switchboard::config::Config;
use switchboard::server::{Server, ServerHandle};

/// How long cleanup may take before a test says it did not happen.
pub const CLEANUP: Duration = Duration::from_secs(10);

/// Held by each media test for its whole run. The tests of one binary run in parallel by
/// default; several calls at once on a 2-core machine starve the webrtc-rs drivers enough to
/// overflow their receive queues, which would make the delivery checks measure the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the calling test alone among the tests that take this guard.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Logs to the test's captured output; `RUST_LOG` overrides the default (`warn`).
pub fn init_tracing() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A server on 127.0.0.1 with ephemeral ports.
pub async fn start_server() -> ServerHandle {
    start_server_with(|_| {}).await
}

/// A test server with some limits changed. Bandwidth estimation is off unless `adjust` turns
/// it on (the tests about bandwidth do, and shape the link for real): the webrtc-rs peers stamp
/// their TWCC feedback after their own scheduling delay, which a loaded box under a debug build
/// turns into congestion the link does not have.
pub async fn start_server_with(adjust: impl FnOnce(&mut Config)) -> ServerHandle {
    init_tracing();
    let mut config = Config::for_tests();
    config.start_bitrate_kbps = 0;
    adjust(&mut config);
    Server::start(config).await.expect("the server starts")
}

/// The signaling URL of `server`.
pub fn ws_url(server: &ServerHandle) -> String {
    format!("ws://{}/ws", server.http_addr)
}

/// Joins `room` as `name` with `opts`, panicking with the reason if it cannot.
pub async fn join(server: &ServerHandle, room: &str, name: &str, opts: ClientOptions) -> Client {
    match Client::connect(&ws_url(server), room, name, opts).await {
        Ok(client) => client,
        Err(e) => panic!("{name} cannot join {room}: {e:#}"),
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `condition(client, snapshot)` holds for every client.
pub async fn wait_all(
    clients: &[&Client],
    what: &str,
    timeout: Duration,
    condition: impl Fn(&Client, &ClientSnapshot) -> bool,
) {
    for client in clients {
        if let Err(e) = client
            .wait_for(what, timeout, |s| condition(client, s))
            .await
        {
            panic!("{e:#}\nlast snapshot: {}", summary(&client.snapshot()));
        }
    }
}

/// A readable digest of a snapshot for failure messages.
pub fn summary(s: &ClientSnapshot) -> String {
    let mut out = format!(
        "participant {} room {} links {:?} participants {:?}\n",
        s.participant_id,
        s.room,
        s.links
            .iter()
            .map(|l| (l.peer.clone(), l.state.to_string(), l.chat_open))
            .collect::<Vec<_>>(),
        s.participants.keys().collect::<Vec<_>>()
    );
    for t in &s.remote_tracks {
        out += &format!(
            "  recv {} {:?} from {} packets {} intact {} corrupt {} mismatched {} markers {} seq {:?}..{:?} layers {:?}\n",
            t.stream_id,
            t.kind,
            t.publisher_id,
            t.packets,
            t.intact,
            t.corrupt,
            t.mismatched,
            t.markers,
            t.first_seq,
            t.max_seq,
            t.layer_packets
        );
    }
    for t in &s.local_tracks {
        out += &format!(
            "  sent {} {:?} packets {} pli {} fir {} write errors {}\n",
            t.track_id, t.kind, t.sent_packets, t.pli, t.fir, t.write_errors
        );
    }
    if !s.errors.is_empty() {
        out += &format!("  errors {:?}\n", s.errors);
    }
    out
}

pub async fn close_all(clients: &[&Client]) {
    for client in clients {
        client.close().await;
    }
}

/// The room is gone and every live gauge is back to zero.
pub async fn assert_all_clean(server: &ServerHandle, room: &str) {
    let result = eventually("room gone and live gauges at zero", CLEANUP, || async {
        let m = server.metrics.snapshot();
        !server.registry.room_names().iter().any(|r| r == room)
            && m.participants == 0
            && m.sessions_detached == 0
            && m.peer_connections == 0
            && m.forwarders == 0
            && m.downtracks == 0
            && m.downtracks_paused_hidden == 0
            && m.downtracks_paused_bandwidth == 0
    })
    .await;
    if let Err(e) = result {
        panic!(
            "{e:#}: rooms {:?}, metrics {:?}",
            server.registry.room_names(),
            server.metrics.snapshot()
        );
    }
}

/// The number in environment variable `var` (a long run's size), or `default`.
pub fn env_number<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A real SDP offer (one data channel) from a throwaway webrtc-rs connection on loopback, for a
/// raw-socket client that speaks the protocol but never completes the media side; the
/// connection never gets the answer, so the offer's ICE credentials are the caller's to use.
pub async fn throwaway_offer() -> (Box<dyn webrtc::peer_connection::PeerConnection>, String) {
    use rtc::ice::mdns::MulticastDnsMode;
    use webrtc::peer_connection::{
        MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
        SettingEngineBuilder,
    };
    struct Ignore;
    impl PeerConnectionEventHandler for Ignore {}
    let mut media_engine = MediaEngine::default();
    media_engine
        .register_default_codecs()
        .expect("default codecs");
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(true)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_media_engine(media_engine)
        .with_setting_engine(settings)
        .with_handler(std::sync::Arc::new(Ignore))
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await
        .expect("a loopback peer connection");
    pc.create_data_channel("chat", None)
        .await
        .expect("data channel");
    let offer = pc.create_offer(None).await.expect("offer");
    pc.set_local_description(offer).await.expect("local offer");
    let sdp = pc.local_description().await.expect("local description").sdp;
    (Box::new(pc), sdp)
}
