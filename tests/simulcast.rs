//! Simulcast with synthetic clients on 127.0.0.1: a publisher sends its video as three layers
//! (rids q, h, f); each subscriber gets the layer its tile needs, continuous across switches;
//! a hidden tile gets nothing; layers nobody receives are switched off at the publisher
//! (dynacast) and back on when someone wants them.
//!
//! Checks are on what was received and on the server's messages, never on timing: the timeouts
//! are generous limits, not expectations.

mod common;

use std::time::Duration;

use common::{
    assert_all_clean, close_all, eventually, join, serial, start_server_with, summary, wait_all,
};
use switchboard::client::relay::ShapedRelay;
use switchboard::client::{Client, ClientOptions, MediaProfile, VideoCodec};
use switchboard::server::ServerHandle;
use switchboard::signal::protocol::{ClientMessage, MediaKind, PauseReason, ServerMessage};

const MEDIA: Duration = Duration::from_secs(20);

fn simulcast_publisher() -> ClientOptions {
    simulcast_publisher_of(VideoCodec::Vp8)
}

fn simulcast_publisher_of(video_codec: VideoCodec) -> ClientOptions {
    ClientOptions {
        media: MediaProfile {
            simulcast: true,
            video_codec,
            ..MediaProfile::default()
        },
        ..ClientOptions::default()
    }
}

/// The id of `publisher`'s video track as `client` was told of it.
fn video_track_of(client: &Client, publisher: &str) -> Option<String> {
    client
        .snapshot()
        .announced_tracks
        .iter()
        .find(|t| t.participant_id == publisher && t.kind == MediaKind::Video)
        .map(|t| t.track_id.clone())
}

fn tile(track_id: &str, width: u32, height: u32) -> ClientMessage {
    ClientMessage::TrackSettings {
        track_id: track_id.to_owned(),
        visible: true,
        width: Some(width),
        height: Some(height),
    }
}

/// Packets of `publisher`'s video `client` received on each layer.
fn layers_from(client: &Client, publisher: &str) -> [u64; 4] {
    client
        .snapshot()
        .tracks_from(publisher, MediaKind::Video)
        .fold([0; 4], |mut sum, t| {
            for (s, n) in sum.iter_mut().zip(t.layer_packets) {
                *s += n;
            }
            sum
        })
}

/// Waits until `client` receives `publisher`'s video on `layer` only: `packets` more on it
/// and none on any other layer meanwhile.
async fn wait_on_layer(client: &Client, publisher: &str, layer: usize, packets: u64) {
    let what = format!("{packets} packets on layer {layer} only");
    let mut before = layers_from(client, publisher);
    let result = eventually(&what, MEDIA, || {
        let now = layers_from(client, publisher);
        let others = (0..4).any(|l| l != layer && now[l] > before[l]);
        if others {
            before = now;
        }
        async move { !others && now[layer] >= before[layer] + packets }
    })
    .await;
    if let Err(e) = result {
        panic!("{e:#}\n{}", summary(&client.snapshot()));
    }
}

fn subscription_states(
    client: &Client,
    track_id: &str,
) -> Vec<(Option<String>, Option<PauseReason>)> {
    client
        .snapshot()
        .events
        .iter()
        .filter_map(|e| match e {
            ServerMessage::SubscriptionState {
                track_id: t,
                layer,
                paused,
            } if t == track_id => Some((layer.clone(), *paused)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_subscriber_gets_the_layer_its_tile_needs() {
    each_subscriber_gets_its_layer(VideoCodec::Vp8).await;
}

/// The same with H.264: keyframes (IDR) found in its payload gate the switches, and the
/// payload type is rewritten to each subscriber's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h264_simulcast_gets_each_subscriber_its_layer() {
    each_subscriber_gets_its_layer(VideoCodec::H264).await;
}

async fn each_subscriber_gets_its_layer(codec: VideoCodec) {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(1)).await;
    let publisher = join(&server, "sim", "pub", simulcast_publisher_of(codec)).await;
    let small = join(&server, "sim", "small", ClientOptions::silent()).await;
    let large = join(&server, "sim", "large", ClientOptions::silent()).await;
    let pid = publisher.id().to_owned();
    wait_all(
        &[&small, &large],
        "the video track announced",
        MEDIA,
        |c, _| video_track_of(c, &pid).is_some(),
    )
    .await;
    let track = video_track_of(&small, &pid).unwrap_or_default();
    let announced = small.snapshot().announced_tracks;
    let info = announced.iter().find(|t| t.track_id == track);
    assert_eq!(
        info.map(|t| t.layers.clone()),
        Some(vec!["q".to_owned(), "h".to_owned(), "f".to_owned()]),
        "announced once, with its layers lowest first"
    );

    // No report: the top layer. A thumbnail: the lowest.
    small.send_message(&tile(&track, 320, 180)).expect("send");
    wait_on_layer(&large, &pid, 2, 100).await;
    wait_on_layer(&small, &pid, 0, 100).await;
    // The tile grows: up to the middle layer, without a gap or a jump back in what arrives.
    small.send_message(&tile(&track, 640, 360)).expect("send");
    wait_on_layer(&small, &pid, 1, 100).await;
    let snap = small.snapshot();
    let received: Vec<_> = snap.tracks_from(&pid, MediaKind::Video).collect();
    assert_eq!(received.len(), 1, "one track, whatever the layer");
    assert_eq!(received[0].corrupt + received[0].mismatched, 0);
    let states = subscription_states(&small, &track);
    assert_eq!(
        states.last(),
        Some(&(Some("h".to_owned()), None)),
        "told of each switch: {states:?}"
    );
    assert!(states.contains(&(Some("q".to_owned()), None)), "{states:?}");

    // Hidden: nothing arrives, and the subscriber is told why.
    small
        .send_message(&ClientMessage::TrackSettings {
            track_id: track.clone(),
            visible: false,
            width: None,
            height: None,
        })
        .expect("send");
    let result = eventually("told the track is paused", MEDIA, || async {
        subscription_states(&small, &track).last() == Some(&(None, Some(PauseReason::Hidden)))
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}: {:?}", subscription_states(&small, &track)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paused_at = layers_from(&small, &pid).iter().sum::<u64>();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        layers_from(&small, &pid).iter().sum::<u64>(),
        paused_at,
        "nothing forwarded to a hidden tile"
    );
    assert!(
        small.snapshot().intact_from(&pid, MediaKind::Audio) > 0,
        "audio goes on"
    );
    assert_eq!(
        server.metrics.snapshot().downtracks_paused_hidden,
        1,
        "the saving shows in the metrics"
    );
    let text = server.metrics.render();
    for layer in 0..3 {
        let series = format!("switchboard_video_packets_out_by_layer_total{{layer=\"{layer}\"}}");
        assert!(text.contains(&series), "{series} missing");
    }

    close_all(&[&publisher, &small, &large]).await;
    assert_all_clean(&server, "sim").await;
}

/// The `publisher-layers` messages `client` received, as their active rid lists.
fn dynacast_messages(client: &Client) -> Vec<Vec<String>> {
    client
        .snapshot()
        .events
        .iter()
        .filter_map(|e| match e {
            ServerMessage::PublisherLayers { active, .. } => Some(active.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn layers_nobody_receives_are_switched_off_at_the_publisher() {
    let _serial = serial().await;
    // Two workers: the subscribers may live on another worker than the publisher, whose
    // relays then report what they want.
    let server = start_server_with(|c| c.workers = Some(2)).await;
    let publisher = join(&server, "dyn", "pub", simulcast_publisher()).await;
    let a = join(&server, "dyn", "a", ClientOptions::silent()).await;
    let b = join(&server, "dyn", "b", ClientOptions::silent()).await;
    let pid = publisher.id().to_owned();
    wait_all(&[&a, &b], "the video track announced", MEDIA, |c, _| {
        video_track_of(c, &pid).is_some()
    })
    .await;
    let track = video_track_of(&a, &pid).unwrap_or_default();
    for s in [&a, &b] {
        s.send_message(&tile(&track, 320, 180)).expect("send");
    }
    wait_on_layer(&a, &pid, 0, 50).await;
    wait_on_layer(&b, &pid, 0, 50).await;
    let result = eventually("the publisher told to send only q", MEDIA, || async {
        dynacast_messages(&publisher).last() == Some(&vec!["q".to_owned()])
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}: {:?}", dynacast_messages(&publisher)));
    // The publisher's client stopped encoding h and f: it sends a third as many video packets
    // per frame (one layer of three).
    let sent = |c: &Client| {
        c.snapshot()
            .local(MediaKind::Video)
            .map_or((0, 0), |t| (t.sent_packets, t.frames))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (p0, f0) = sent(&publisher);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p1, f1) = sent(&publisher);
    let per_frame = (p1 - p0) as f64 / (f1 - f0).max(1) as f64;
    let one_layer = f64::from(MediaProfile::default().video_packets_per_frame);
    assert!(
        (per_frame - one_layer).abs() < 0.5,
        "{per_frame} video packets per frame, one layer sends {one_layer}"
    );

    // Someone wants the top layer: it is switched back on and reaches them.
    b.send_message(&tile(&track, 1280, 720)).expect("send");
    wait_on_layer(&b, &pid, 2, 100).await;
    let messages = dynacast_messages(&publisher);
    assert!(
        messages.last().is_some_and(|m| m.contains(&"f".to_owned())),
        "{messages:?}"
    );
    wait_on_layer(&a, &pid, 0, 50).await;

    close_all(&[&publisher, &a, &b]).await;
    assert_all_clean(&server, "dyn").await;
}

/// Joins `name` and returns it with the media worker it landed on (the one whose connection
/// count rose).
async fn join_on_worker(
    server: &ServerHandle,
    room: &str,
    name: &str,
    opts: ClientOptions,
) -> (Client, usize) {
    let before = server.media_worker_connections();
    let client = join(server, room, name, opts).await;
    let after = server.media_worker_connections();
    let worker = (0..after.len()).find(|&w| after[w] > before[w]);
    (
        client,
        worker.unwrap_or_else(|| panic!("{name}: no worker took it: {before:?} -> {after:?}")),
    )
}

/// A track published on one worker reaches another worker's subscribers through a relay that
/// carries only the layers they take: a thumbnail there gets the low layer while a subscriber
/// beside the publisher gets the top one, and the top layer stays on the publisher's worker.
/// When the far tile grows, the relay carries the layer it needs: layer choice there sees the
/// layers as the publisher sends them, not only those it was relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_carries_only_the_layers_its_subscribers_take() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(2)).await;
    let (publisher, home) = join_on_worker(&server, "relay", "pub", simulcast_publisher()).await;
    let pid = publisher.id().to_owned();
    // Subscribers until one shares the publisher's worker and one does not (the least-loaded
    // worker takes each, so this takes two or three); any others look away.
    let (mut near, mut far, mut others) = (None, None, Vec::new());
    for i in 0..6 {
        if near.is_some() && far.is_some() {
            break;
        }
        let (client, worker) = join_on_worker(
            &server,
            "relay",
            &format!("sub{i}"),
            ClientOptions::silent(),
        )
        .await;
        match (worker == home, &near, &far) {
            (true, None, _) => near = Some(client),
            (false, _, None) => far = Some(client),
            _ => others.push(client),
        }
    }
    let (Some(near), Some(far)) = (near, far) else {
        panic!(
            "no subscriber beside the publisher and one away from it: {:?}",
            server.media_worker_connections()
        );
    };
    let everyone: Vec<&Client> = [&near, &far].into_iter().chain(&others).collect();
    wait_all(&everyone, "the video track announced", MEDIA, |c, _| {
        video_track_of(c, &pid).is_some()
    })
    .await;
    let track = video_track_of(&far, &pid).unwrap_or_default();
    for other in &others {
        let hidden = ClientMessage::TrackSettings {
            track_id: track.clone(),
            visible: false,
            width: None,
            height: None,
        };
        other.send_message(&hidden).expect("send");
    }

    far.send_message(&tile(&track, 320, 180)).expect("send");
    wait_on_layer(&near, &pid, 2, 100).await;
    wait_on_layer(&far, &pid, 0, 100).await;
    let skipped = || server.metrics.snapshot().relay_packets_skipped;
    let before = skipped();
    let result = eventually("top-layer packets kept off the relay", MEDIA, || async {
        skipped() >= before + 50
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}: {} skipped", skipped()));

    // The far tile grows: the relay carries the top layer, then the middle one (switched
    // back on at the publisher, as nobody took it).
    far.send_message(&tile(&track, 1280, 720)).expect("send");
    wait_on_layer(&far, &pid, 2, 100).await;
    far.send_message(&tile(&track, 640, 360)).expect("send");
    wait_on_layer(&far, &pid, 1, 100).await;
    let snap = far.snapshot();
    let received: Vec<_> = snap.tracks_from(&pid, MediaKind::Video).collect();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].corrupt + received[0].mismatched, 0);
    wait_on_layer(&near, &pid, 2, 50).await;

    let all: Vec<&Client> = [&publisher].into_iter().chain(everyone).collect();
    close_all(&all).await;
    assert_all_clean(&server, "relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_capped_downlink_gets_the_low_layer_and_moves_up_when_it_recovers() {
    let _serial = serial().await;
    // The bandwidth estimator on (`--start-bitrate-kbps 1000`): layers follow the estimate.
    let server = start_server_with(|c| {
        c.workers = Some(1);
        c.start_bitrate_kbps = 1_000;
    })
    .await;
    let publisher = join(&server, "bwe", "pub", simulcast_publisher()).await;
    let pid = publisher.id().to_owned();
    // The weak subscriber's downlink: 400 kbit/s. The layers: ~200, ~400 and ~800 kbit/s.
    let media = server.media_addrs()[0][0];
    let link = ShapedRelay::start(media.ip(), media, 400_000)
        .await
        .expect("relay");
    let weak = join(
        &server,
        "bwe",
        "weak",
        ClientOptions {
            media_relay: Some(link.route),
            ..ClientOptions::silent()
        },
    )
    .await;
    wait_on_layer(&weak, &pid, 0, 150).await;
    let audio = weak.snapshot().intact_from(&pid, MediaKind::Audio);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        weak.snapshot().intact_from(&pid, MediaKind::Audio) >= audio + 40,
        "audio keeps flowing on the capped link"
    );
    // The cap goes: the estimate grows (the server probes) and the subscriber moves up to the
    // top layer.
    link.set_rate(0);
    let result = eventually(
        "the top layer after the cap is lifted",
        Duration::from_secs(40),
        || async {
            weak.snapshot()
                .tracks_from(&pid, MediaKind::Video)
                .any(|t| t.last_layer == Some(2))
        },
    )
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}\n{}", summary(&weak.snapshot())));
    wait_on_layer(&weak, &pid, 2, 100).await;
    let received: Vec<_> = weak
        .snapshot()
        .tracks_from(&pid, MediaKind::Video)
        .cloned()
        .collect();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].corrupt + received[0].mismatched, 0);

    close_all(&[&publisher, &weak]).await;
    assert_all_clean(&server, "bwe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_participant_who_speaks_is_announced_as_active_speaker() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.workers = Some(2)).await;
    let speaking = |dbov| ClientOptions {
        publish_video: false,
        media: MediaProfile {
            speaking_dbov: Some(dbov),
            ..MediaProfile::default()
        },
        ..ClientOptions::default()
    };
    // -20 dBov is speech; -100 dBov is a quiet room.
    let talker = join(&server, "talk", "talker", speaking(20)).await;
    let quiet = join(&server, "talk", "quiet", speaking(100)).await;
    let listener = join(&server, "talk", "listener", ClientOptions::silent()).await;
    let speakers = |c: &Client| -> Option<Vec<String>> {
        c.snapshot().events.iter().rev().find_map(|e| match e {
            ServerMessage::ActiveSpeakers { participants } => Some(participants.clone()),
            _ => None,
        })
    };
    let expected = vec![talker.id().to_owned()];
    for c in [&talker, &quiet, &listener] {
        let result = eventually(
            "the talker announced as the active speaker",
            MEDIA,
            || async { speakers(c).as_ref() == Some(&expected) },
        )
        .await;
        result.unwrap_or_else(|e| panic!("{e:#}: {:?}", speakers(c)));
    }
    // A late joiner hears who speaks at once, not at the next change.
    let late = join(&server, "talk", "late", ClientOptions::silent()).await;
    let result = eventually("the late joiner told who speaks", MEDIA, || async {
        speakers(&late).as_ref() == Some(&expected)
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}: {:?}", speakers(&late)));
    late.close().await;
    // The talker leaves: nobody speaks.
    talker.close().await;
    let result = eventually("an empty active-speaker list", MEDIA, || async {
        speakers(&listener) == Some(Vec::new())
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}: {:?}", speakers(&listener)));
    close_all(&[&quiet, &listener]).await;
    assert_all_clean(&server, "talk").await;
}
