//! Multi-node on a real Redis (`redis-server`, started and stopped by each test): two nodes
//! (in-process servers, or two `switchboard` processes where a node must die by SIGKILL) share
//! one Redis. A join reaching the node that does not host the room is redirected to the one
//! that does; new rooms go to the least-loaded node; a Redis restart drops no call and the
//! cluster state comes back by itself; a killed node's clients are back in their room on the
//! survivor within seconds, and Redis holds no trace of it after its TTL. With
//! `--cluster-policy cascade` one room is served by both nodes: participants on either hear
//! and see each other through one relay per track and node pair, and a killed node's
//! participants leave the survivors' call by themselves.
//!
//! Needs `redis-server` on the PATH: skipped without it, unless `SWITCHBOARD_REQUIRE_REDIS=1`
//! (CI) makes that a failure.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{CLEANUP, close_all, eventually, serial, start_server_with, wait_all, ws_url};
use redis::AsyncCommands;
use switchboard::client::{Client, ClientOptions};
use switchboard::config::ClusterPolicy;
use switchboard::server::ServerHandle;
use switchboard::signal::protocol::MediaKind;

const CONNECT: Duration = Duration::from_secs(20);
const MEDIA: Duration = Duration::from_secs(20);
/// The nodes' TTL in these tests (`--node-ttl-secs`): a heartbeat every 400 ms.
const TTL_SECS: u64 = 2;

/// A `redis-server` of the test's own on a free loopback port, without persistence.
struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts one, or None (the test skips) when `redis-server` is not installed.
    async fn start() -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var("SWITCHBOARD_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
                panic!("redis-server is not installed and SWITCHBOARD_REQUIRE_REDIS=1");
            }
            eprintln!("skipping: redis-server is not installed");
            return None;
        }
        let port = free_port();
        let child = spawn_redis(port).await;
        Some(RedisServer { port, child })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to the test's redis-server")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it and starts an empty one on the same port.
    async fn restart_empty(&mut self) {
        self.stop();
        self.child = spawn_redis(self.port).await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn spawn_redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("starting redis-server");
    wait_for_port(port).await;
    child
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An in-process node of the cluster on `redis`.
async fn start_node(redis: &RedisServer, id: &str) -> ServerHandle {
    let url = redis.url();
    start_server_with(|c| {
        c.redis_url = Some(url);
        c.node_id = Some(id.to_owned());
        c.node_ttl_secs = TTL_SECS;
    })
    .await
}

/// An in-process node of a cascading cluster on `redis`.
async fn start_cascading_node(redis: &RedisServer, id: &str) -> ServerHandle {
    let url = redis.url();
    start_server_with(|c| {
        c.redis_url = Some(url);
        c.node_id = Some(id.to_owned());
        c.node_ttl_secs = TTL_SECS;
        c.cluster_policy = ClusterPolicy::Cascade;
    })
    .await
}

async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    conn.get(key).await.expect("GET")
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut keys: Vec<String> = conn.keys("switchboard:*").await.expect("KEYS");
    keys.sort();
    keys
}

fn video_and_audio_from(client: &Client, from: &str) -> (u64, u64) {
    let s = client.snapshot();
    (
        s.intact_from(from, MediaKind::Video),
        s.intact_from(from, MediaKind::Audio),
    )
}

/// Waits until each client receives at least `n` more intact video and audio packets from
/// each other client than at the start.
async fn media_flows(clients: &[&Client], n: u64) {
    let before: Vec<Vec<(u64, u64)>> = clients
        .iter()
        .map(|c| {
            clients
                .iter()
                .map(|o| video_and_audio_from(c, o.id()))
                .collect()
        })
        .collect();
    for (i, client) in clients.iter().enumerate() {
        for (j, other) in clients.iter().enumerate() {
            if i == j {
                continue;
            }
            let (video, audio) = before[i][j];
            let other_id = other.id().to_owned();
            client
                .wait_for("media from the other", MEDIA, |s| {
                    s.intact_from(&other_id, MediaKind::Video) >= video + n
                        && s.intact_from(&other_id, MediaKind::Audio) >= audio + n
                })
                .await
                .unwrap_or_else(|e| panic!("{e:#}: {}", common::summary(&client.snapshot())));
        }
    }
}

async fn chat_reaches(from: &Client, to: &Client, text: &str) {
    from.send_chat(text).await.expect("chat sent");
    let from_id = from.id().to_owned();
    to.wait_for("the chat line", MEDIA, |s| {
        s.chat_from(&from_id).any(|m| m.text == text)
    })
    .await
    .expect("the chat line arrives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_on_either_node_reaches_the_node_hosting_the_room() {
    let _serial = serial().await;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let a = start_node(&redis, "node-a").await;
    let b = start_node(&redis, "node-b").await;
    let mut conn = redis.connection().await;
    let url_a: Option<String> = conn
        .hget("switchboard:node:node-a", "url")
        .await
        .expect("HGET");
    assert_eq!(url_a, Some(format!("http://{}", a.http_addr)));

    // Every node lists the cluster (admin API; development mode needs no token).
    let nodes = reqwest::get(format!("http://{}/api/cluster/nodes", b.http_addr))
        .await
        .expect("GET /api/cluster/nodes")
        .text()
        .await
        .expect("a body");
    let nodes: serde_json::Value = serde_json::from_str(&nodes).expect("a JSON list");
    let mut ids: Vec<&str> = nodes
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["node-a", "node-b"]);

    // The room is placed on the node its first client reached; a join through the other node
    // is redirected there.
    let alice = Client::connect(&ws_url(&a), "cluster", "alice", ClientOptions::default())
        .await
        .expect("alice joins through a");
    assert_eq!(
        get(&mut conn, "switchboard:room:cluster").await.as_deref(),
        Some("node-a")
    );
    let bob = Client::connect(&ws_url(&b), "cluster", "bob", ClientOptions::default())
        .await
        .expect("bob joins through b");
    assert_eq!(bob.signaling_url(), ws_url(&a), "bob was sent to node a");
    assert_eq!(b.metrics.snapshot().cluster_redirects, 1);
    wait_all(&[&alice, &bob], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    media_flows(&[&alice, &bob], 20).await;
    chat_reaches(&alice, &bob, "hello from alice").await;
    chat_reaches(&bob, &alice, "hello from bob").await;

    // A late joiner through either node gets everything.
    let carol = Client::connect(&ws_url(&b), "cluster", "carol", ClientOptions::default())
        .await
        .expect("carol joins through b");
    wait_all(&[&carol], "connected", CONNECT, |_, s| s.all_connected()).await;
    media_flows(&[&alice, &bob, &carol], 20).await;

    // Participants map to their node and room.
    eventually("participants in Redis", CLEANUP, || {
        let mut conn = conn.clone();
        let ids = [alice.id(), bob.id(), carol.id()].map(str::to_owned);
        async move {
            for id in &ids {
                let key = format!("switchboard:participant:{id}");
                if get(&mut conn, &key).await.as_deref() != Some("node-a cluster") {
                    return false;
                }
            }
            true
        }
    })
    .await
    .expect("each participant maps to node-a");

    // WHIP through the other node is redirected (307) to the same resource on node a.
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
        .post(format!("http://{}/whip/cluster?name=cam", b.http_addr))
        .header("content-type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .expect("POST /whip");
    assert_eq!(response.status(), 307);
    assert_eq!(
        response.headers()["location"],
        format!("http://{}/whip/cluster?name=cam", a.http_addr).as_str()
    );

    // A new room goes to the least-loaded node: b, which holds nobody.
    eventually("a's heartbeat counts its participants", CLEANUP, || {
        let mut conn = conn.clone();
        async move {
            let n: Option<u32> = conn
                .hget("switchboard:node:node-a", "participants")
                .await
                .expect("HGET");
            n == Some(3)
        }
    })
    .await
    .expect("node a reports 3 participants");
    let dave = Client::connect(&ws_url(&a), "elsewhere", "dave", ClientOptions::silent())
        .await
        .expect("dave joins a new room through a");
    assert_eq!(dave.signaling_url(), ws_url(&b), "the new room went to b");

    // Leaving frees the placements and participants; a stopped node removes its record.
    close_all(&[&alice, &bob, &carol, &dave]).await;
    b.shutdown().await;
    eventually("only node a left in Redis", CLEANUP, || {
        let mut conn = conn.clone();
        async move { keys(&mut conn).await == ["switchboard:node:node-a", "switchboard:nodes"] }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", futures_now(keys(&mut conn.clone()))));
    a.shutdown().await;
    assert_eq!(keys(&mut conn).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_room_cascades_across_two_nodes() {
    let _serial = serial().await;
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let a = start_cascading_node(&redis, "node-a").await;
    let b = start_cascading_node(&redis, "node-b").await;
    // Each joins where it arrived: no redirect.
    let alice = Client::connect(&ws_url(&a), "cascade", "alice", ClientOptions::default())
        .await
        .expect("alice joins on a");
    let bob = Client::connect(&ws_url(&b), "cascade", "bob", ClientOptions::default())
        .await
        .expect("bob joins on b");
    assert_eq!(bob.signaling_url(), ws_url(&b), "bob stays on node b");
    assert_eq!(b.metrics.snapshot().cluster_redirects, 0);
    wait_all(&[&alice, &bob], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    media_flows(&[&alice, &bob], 20).await;
    chat_reaches(&alice, &bob, "hello from alice on a").await;
    chat_reaches(&bob, &alice, "hello from bob on b").await;

    // Late joiners on either node get everything; a second subscriber on b of alice's tracks
    // costs no second relay.
    let carol = Client::connect(&ws_url(&a), "cascade", "carol", ClientOptions::default())
        .await
        .expect("carol joins on a");
    let dave = Client::connect(&ws_url(&b), "cascade", "dave", ClientOptions::default())
        .await
        .expect("dave joins on b");
    let everyone = [&alice, &bob, &carol, &dave];
    wait_all(&everyone, "connected", CONNECT, |_, s| s.all_connected()).await;
    media_flows(&everyone, 20).await;
    // Redis names both nodes as the room's hosts.
    let conn = redis.connection().await;
    eventually("both nodes host the room", CLEANUP, || {
        let mut conn = conn.clone();
        async move {
            let mut hosts: Vec<String> = conn
                .hkeys("switchboard:room-nodes:cascade")
                .await
                .expect("HKEYS");
            hosts.sort();
            hosts == ["node-a", "node-b"]
        }
    })
    .await
    .expect("the room's hosts in Redis");
    for client in everyone {
        let names: Vec<String> = client.participants().into_values().collect();
        assert_eq!(names.len(), 3, "{} sees {names:?}", client.id());
    }
    // Both nodes relay the two tracks of each of their two members: one copy each.
    let (ma, mb) = (a.metrics.snapshot(), b.metrics.snapshot());
    assert_eq!((ma.cascade_tracks_in, mb.cascade_tracks_in), (4, 4));
    assert_eq!((ma.cascade_links, mb.cascade_links), (2, 2));
    assert!(ma.cascade_packets_out > 0 && mb.cascade_packets_in > 0);
    eprintln!(
        "relayed a→b {} packets, b→a {}, dropped {} / {}",
        ma.cascade_packets_out,
        mb.cascade_packets_out,
        ma.cascade_packets_dropped,
        mb.cascade_packets_dropped
    );

    // A member leaving one node leaves the room on the other.
    let carol_id = carol.id().to_owned();
    carol.close().await;
    bob.wait_for("carol gone", MEDIA, |s| {
        !s.participants.contains_key(&carol_id)
    })
    .await
    .expect("bob hears that carol left");
    eventually("carol's tracks no longer relayed", CLEANUP, || async {
        b.metrics.snapshot().cascade_tracks_in == 2
    })
    .await
    .expect("b relays only alice's tracks");
    media_flows(&[&alice, &bob, &dave], 20).await;

    // Redis restarts empty mid-call: the media between the nodes goes on, and once the nodes
    // are subscribed again a joiner on either node meets everyone.
    redis.restart_empty().await;
    media_flows(&[&alice, &bob, &dave], 20).await;
    let erin = Client::connect(&ws_url(&a), "cascade", "erin", ClientOptions::default())
        .await
        .expect("erin joins on a after the restart");
    let everyone = [&alice, &bob, &dave, &erin];
    wait_all(&everyone, "connected", CONNECT, |_, s| s.all_connected()).await;
    media_flows(&everyone, 20).await;

    // Everybody gone: nothing relayed any more, on either node.
    close_all(&everyone).await;
    eventually("relays and links gone", CLEANUP, || async {
        let (ma, mb) = (a.metrics.snapshot(), b.metrics.snapshot());
        ma.cascade_tracks_in == 0 && mb.cascade_tracks_in == 0 && ma.rooms == 0 && mb.rooms == 0
    })
    .await
    .expect("no relayed track left");
    b.shutdown().await;
    a.shutdown().await;
    let mut conn = redis.connection().await;
    assert_eq!(keys(&mut conn).await, Vec::<String>::new());
}

/// Blocks on a future (for a failure message).
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_drops_no_call_and_the_state_comes_back() {
    let _serial = serial().await;
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let a = start_node(&redis, "node-a").await;
    let b = start_node(&redis, "node-b").await;
    let alice = Client::connect(&ws_url(&a), "steady", "alice", ClientOptions::default())
        .await
        .expect("alice joins");
    let bob = Client::connect(&ws_url(&b), "steady", "bob", ClientOptions::default())
        .await
        .expect("bob joins");
    wait_all(&[&alice, &bob], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    media_flows(&[&alice, &bob], 20).await;

    // Redis goes away: media goes on, and a join is served where it arrives.
    redis.stop();
    media_flows(&[&alice, &bob], 50).await;
    let carol = Client::connect(&ws_url(&b), "outage", "carol", ClientOptions::silent())
        .await
        .expect("carol joins while Redis is down");
    assert_eq!(carol.signaling_url(), ws_url(&b));
    assert!(b.metrics.snapshot().cluster_redis_errors > 0);

    // Redis comes back empty: the nodes rewrite the cluster state within a few heartbeats.
    redis.restart_empty().await;
    let conn = redis.connection().await;
    let (alice_key, bob_key, carol_key) = (
        format!("switchboard:participant:{}", alice.id()),
        format!("switchboard:participant:{}", bob.id()),
        format!("switchboard:participant:{}", carol.id()),
    );
    eventually("the cluster state rebuilt", Duration::from_secs(15), || {
        let mut conn = conn.clone();
        let (alice_key, bob_key, carol_key) = (&alice_key, &bob_key, &carol_key);
        async move {
            let nodes: Vec<String> = conn.smembers("switchboard:nodes").await.unwrap_or_default();
            nodes.len() == 2
                && get(&mut conn, "switchboard:room:steady").await.as_deref() == Some("node-a")
                && get(&mut conn, "switchboard:room:outage").await.as_deref() == Some("node-b")
                && get(&mut conn, alice_key).await.as_deref() == Some("node-a steady")
                && get(&mut conn, bob_key).await.as_deref() == Some("node-a steady")
                && get(&mut conn, carol_key).await.as_deref() == Some("node-b outage")
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", futures_now(keys(&mut conn.clone()))));
    media_flows(&[&alice, &bob], 20).await;
    // Joins are placed again.
    let dave = Client::connect(&ws_url(&b), "steady", "dave", ClientOptions::silent())
        .await
        .expect("dave joins");
    assert_eq!(dave.signaling_url(), ws_url(&a));
    close_all(&[&alice, &bob, &carol, &dave]).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A `switchboard` process: a node that can be killed outright.
struct NodeProcess {
    http: SocketAddr,
    child: Child,
}

impl NodeProcess {
    async fn start(redis: &RedisServer, id: &str) -> NodeProcess {
        Self::start_with(redis, id, &[]).await
    }

    async fn start_with(redis: &RedisServer, id: &str, args: &[&str]) -> NodeProcess {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--http", &http.to_string(), "--udp-port", "0"])
            .args(["--public-ip", "127.0.0.1", "--no-turn", "--workers", "1"])
            .args(["--redis-url", &redis.url(), "--node-id", id])
            .args(["--node-ttl-secs", &TTL_SECS.to_string()])
            .args(["--start-bitrate-kbps", "0"])
            .args(args)
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("starting switchboard");
        wait_for_port(http.port()).await;
        NodeProcess { http, child }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Joins through `entry` (the load balancer's pick) until it works: what a client does after
/// its node died.
async fn rejoin(entry: &str, room: &str, name: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(entry, room, name, ClientOptions::default()).await {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                tracing::info!("{name} rejoining: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{name} cannot rejoin: {e:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_rejoin_on_the_survivor_and_it_leaves_no_trace() {
    let _serial = serial().await;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut a = NodeProcess::start(&redis, "node-a").await;
    let b = NodeProcess::start(&redis, "node-b").await;
    // One room on each node.
    let alice = Client::connect(&a.ws_url(), "doomed", "alice", ClientOptions::default())
        .await
        .expect("alice joins on a");
    let bob = Client::connect(&a.ws_url(), "doomed", "bob", ClientOptions::default())
        .await
        .expect("bob joins on a");
    let carol = Client::connect(&b.ws_url(), "safe", "carol", ClientOptions::default())
        .await
        .expect("carol joins on b");
    let dave = Client::connect(&a.ws_url(), "safe", "dave", ClientOptions::default())
        .await
        .expect("dave joins through a");
    assert_eq!(dave.signaling_url(), b.ws_url(), "room safe is on b");
    wait_all(
        &[&alice, &bob, &carol, &dave],
        "connected",
        CONNECT,
        |_, s| s.all_connected(),
    )
    .await;
    media_flows(&[&alice, &bob], 20).await;
    media_flows(&[&carol, &dave], 20).await;

    // Node a dies. Its clients come back through the survivor (the load balancer's only
    // choice now), and the survivor's calls never stop.
    a.kill();
    let started = Instant::now();
    // Their connections to the dead node are dropped in the background.
    drop((alice, bob));
    let alice = rejoin(&b.ws_url(), "doomed", "alice").await;
    let bob = rejoin(&b.ws_url(), "doomed", "bob").await;
    let back_in = started.elapsed();
    assert!(
        back_in < Duration::from_secs(5),
        "back in the room after {back_in:?}"
    );
    assert_eq!(alice.signaling_url(), b.ws_url());
    eprintln!(
        "a killed node's clients were back in their room on the survivor {back_in:?} after it died"
    );
    media_flows(&[&carol, &dave], 20).await;
    wait_all(&[&alice, &bob], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    media_flows(&[&alice, &bob], 20).await;

    // After its TTL, Redis holds nothing of the dead node.
    let mut conn = redis.connection().await;
    eventually("no trace of node a", CLEANUP, || {
        let mut conn = conn.clone();
        async move {
            let nodes: Vec<String> = conn.smembers("switchboard:nodes").await.unwrap_or_default();
            let mut trace = false;
            for key in keys(&mut conn).await {
                if key == "switchboard:node:node-a" {
                    trace = true;
                } else if !key.ends_with(":node-b") && key != "switchboard:nodes" {
                    let value: Option<String> = conn.get(&key).await.ok().flatten();
                    trace |= value.is_some_and(|v| v.starts_with("node-a"));
                }
            }
            nodes == ["node-b"] && !trace
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", futures_now(keys(&mut conn.clone()))));
    assert_eq!(
        get(&mut conn, "switchboard:room:doomed").await.as_deref(),
        Some("node-b")
    );
    close_all(&[&alice, &bob, &carol, &dave]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_cascaded_room_and_the_survivors_call_goes_on() {
    let _serial = serial().await;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let cascade = ["--cluster-policy", "cascade", "--node-link-port", "0"];
    let mut a = NodeProcess::start_with(&redis, "node-a", &cascade).await;
    let b = NodeProcess::start_with(&redis, "node-b", &cascade).await;
    let alice = Client::connect(&a.ws_url(), "both", "alice", ClientOptions::default())
        .await
        .expect("alice joins on a");
    let bob = Client::connect(&b.ws_url(), "both", "bob", ClientOptions::default())
        .await
        .expect("bob joins on b");
    let carol = Client::connect(&b.ws_url(), "both", "carol", ClientOptions::default())
        .await
        .expect("carol joins on b");
    wait_all(&[&alice, &bob, &carol], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    media_flows(&[&alice, &bob, &carol], 20).await;

    a.kill();
    let started = Instant::now();
    let old_alice = alice.id().to_owned();
    drop(alice);
    // The survivors' media never stops.
    media_flows(&[&bob, &carol], 20).await;
    let alice = rejoin(&b.ws_url(), "both", "alice").await;
    let back_in = started.elapsed();
    assert!(
        back_in < Duration::from_secs(5),
        "back in the room after {back_in:?}"
    );
    wait_all(&[&alice, &bob, &carol], "connected", CONNECT, |_, s| {
        s.all_connected()
    })
    .await;
    media_flows(&[&alice, &bob, &carol], 20).await;
    // The dead node's member leaves the others' room once the node's TTL has passed.
    bob.wait_for("the dead node's alice gone", MEDIA, |s| {
        !s.participants.contains_key(&old_alice)
    })
    .await
    .expect("bob hears that the old alice left");
    eprintln!("a killed node's member was back in the cascaded room {back_in:?} after it died");
    close_all(&[&alice, &bob, &carol]).await;
}
