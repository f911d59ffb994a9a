//! The cluster: Switchboard nodes sharing one Redis (`--redis-url`).
//!
//! Owns this node's entries in Redis and nothing else: the node's record (its URL, region and
//! load figures), the placement of the rooms it hosts (room → node) and its participants
//! (participant → node and room). A heartbeat rewrites all of them every `ttl / 5` under a TTL,
//! so a node that dies leaves no trace once its TTL has passed (survivors also drop its id from
//! the node set), and the whole state is rebuilt by itself one heartbeat after Redis restarts
//! empty. Each room lives on one node: a join that reaches another node is answered with a
//! `redirect` to it, and a room not open anywhere is placed on the least-loaded live node of
//! the receiving node's region. Redis being down never stops a call: a join then serves its
//! room where it arrived.
//!
//! Knows nothing of rooms or media: the server hands it a function that reports what this node
//! holds ([`LocalState`]). Needs a standalone Redis (or one behind Sentinel): its scripts read
//! keys they are not given, which Redis Cluster does not allow.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::types::unix_time;

/// The set of node ids.
const NODES: &str = "switchboard:nodes";
const NODE_PREFIX: &str = "switchboard:node:";
const ROOM_PREFIX: &str = "switchboard:room:";
const PARTICIPANT_PREFIX: &str = "switchboard:participant:";
/// How long a join waits for Redis to place its room before serving it here.
const PLACE_TIMEOUT: Duration = Duration::from_secs(1);
/// Node loads closer than this (per mille) count as equal when placing a room; participants
/// decide between them.
const LOAD_BAND_PERMILLE: u32 = 100;
/// A node this busy (per mille) gets no new rooms while another has room.
const FULL_PERMILLE: u32 = 850;

/// Returns the node a room is on: the one it is placed on if that node is alive and not
/// draining, else the candidate (ARGV[2]), which it is placed on now.
/// KEYS[1]: the room's key. ARGV: node key prefix, candidate, TTL in ms.
const PLACE: &str = r"
local owner = redis.call('GET', KEYS[1])
if owner and redis.call('HGET', ARGV[1] .. owner, 'draining') == '0' then
  return owner
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return ARGV[2]
";

/// Keeps this node's rooms placed on it: refreshes the TTL of those it holds, takes those
/// placed nowhere or on a dead or draining node, and counts those another live node holds.
/// KEYS: the rooms' keys. ARGV: node key prefix, this node, TTL in ms.
const KEEP: &str = r"
local contested = 0
for _, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[2] then
    redis.call('PEXPIRE', key, ARGV[3])
  elseif owner and redis.call('HGET', ARGV[1] .. owner, 'draining') == '0' then
    contested = contested + 1
  else
    redis.call('SET', key, ARGV[2], 'PX', ARGV[3])
  end
end
return contested
";

/// Drops the placements this node holds of rooms it no longer hosts. KEYS: the rooms' keys.
/// ARGV: this node.
const RELEASE: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
return 0
";

/// Cascading: marks this node as hosting the rooms (a hash of node → last heartbeat, ms) and
/// drops the nodes whose heartbeat there is older than the TTL.
/// KEYS: the rooms' host keys. ARGV: this node, now in ms, TTL in ms.
const HOST: &str = r"
local oldest = tonumber(ARGV[2]) - tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[2])
  local hosts = redis.call('HGETALL', key)
  for i = 1, #hosts, 2 do
    if tonumber(hosts[i + 1]) < oldest then
      redis.call('HDEL', key, hosts[i])
    end
  end
  redis.call('PEXPIRE', key, ARGV[3])
end
return 0
";

/// Cascading: the hosts of a room (hash: node id → its last heartbeat, ms).
const ROOM_HOSTS_PREFIX: &str = "switchboard:room-nodes:";

/// Who this node is in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub redis_url: String,
    pub node_id: String,
    pub region: String,
    /// Where other nodes reach this one (`host:port`).
    pub address: String,
    /// This node's base URL for clients (`http(s)://host:port`): where redirects send them.
    pub url: String,
    /// A node silent this long is dead: its entries expire.
    pub ttl: Duration,
    /// Rooms are cascaded: several nodes host one room (`switchboard:room-nodes:{name}`), none
    /// owns it.
    pub cascade: bool,
}

/// What this node holds, as the heartbeat reports it.
#[derive(Debug, Clone, Default)]
pub struct LocalState {
    /// Open rooms and their participants' ids.
    pub rooms: Vec<(String, Vec<String>)>,
    /// The media plane's load (busy share of the last second of its least-loaded worker).
    pub load_permille: u32,
    pub draining: bool,
}

/// Reports this node's state to the heartbeat.
pub type LocalStateFn = Arc<dyn Fn() -> LocalState + Send + Sync>;

/// A live node as its last heartbeat described it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: String,
    pub url: String,
    pub address: String,
    pub region: String,
    pub load_permille: u32,
    pub participants: u32,
    pub rooms: u32,
    pub draining: bool,
}

/// Where a join's room lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On this node (also when Redis cannot be asked).
    Here,
    /// On another live node, reached at its base URL.
    Elsewhere { node: String, url: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// (The URL is left out: it may hold a password.)
    #[error("cannot reach Redis: {0}")]
    Connect(#[source] redis::RedisError),
    #[error("node id `{0}` must be 1-64 characters of A-Z a-z 0-9 _ . -")]
    BadNodeId(String),
}

/// This node's membership of the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.config.node_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ClusterConfig,
    client: redis::Client,
    redis: ConnectionManager,
    metrics: Arc<Metrics>,
    place: Script,
    keep: Script,
    release: Script,
    host: Script,
}

/// What the last successful heartbeat wrote, to drop what is gone at the next one.
#[derive(Default)]
struct Held {
    rooms: HashSet<String>,
    participants: HashSet<String>,
}

impl Cluster {
    /// Connects to Redis (waiting up to `connect_wait` for it) and starts the heartbeat, which
    /// runs until `shutdown` and then removes this node's entries.
    pub async fn start(
        config: ClusterConfig,
        metrics: Arc<Metrics>,
        local: LocalStateFn,
        shutdown: watch::Receiver<bool>,
        connect_wait: Duration,
    ) -> Result<(Cluster, tokio::task::JoinHandle<()>), ClusterError> {
        if !valid_node_id(&config.node_id) {
            return Err(ClusterError::BadNodeId(config.node_id));
        }
        let connect_error = ClusterError::Connect;
        let client = redis::Client::open(config.redis_url.as_str()).map_err(connect_error)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let started = tokio::time::Instant::now();
        let redis = loop {
            match client
                .get_connection_manager_with_config(manager_config.clone())
                .await
            {
                Ok(redis) => break redis,
                Err(e) if started.elapsed() >= connect_wait => return Err(connect_error(e)),
                Err(e) => {
                    tracing::warn!("waiting for Redis: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let cluster = Cluster {
            inner: Arc::new(Inner {
                config,
                client,
                redis,
                metrics,
                place: Script::new(PLACE),
                keep: Script::new(KEEP),
                release: Script::new(RELEASE),
                host: Script::new(HOST),
            }),
        };
        let mut held = Held::default();
        // The first heartbeat before serving: the node is known before its first join.
        if let Err(e) = cluster.beat(&local(), &mut held).await {
            tracing::warn!("first cluster heartbeat: {e}");
        }
        tracing::info!(
            node = %cluster.node_id(),
            region = %cluster.inner.config.region,
            "joined the cluster"
        );
        let task = tokio::spawn(cluster.clone().heartbeat(local, held, shutdown));
        Ok((cluster, task))
    }

    /// Where other nodes reach this one (`host:port`).
    pub fn address(&self) -> &str {
        &self.inner.config.address
    }

    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    fn ttl_ms(&self) -> u64 {
        self.inner.config.ttl.as_millis().max(1) as u64
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.redis.clone()
    }

    /// The heartbeat's period: what the cluster state is refreshed by.
    pub fn beat_interval(&self) -> Duration {
        self.inner.config.ttl / 5
    }

    pub fn ttl(&self) -> Duration {
        self.inner.config.ttl
    }

    /// Publishes a message to every node subscribed to `channel` (Redis pub/sub: at most once,
    /// lost while Redis is down).
    pub async fn publish(&self, channel: &str, message: &str) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        let published: redis::RedisResult<i64> = conn.publish(channel, message).await;
        if published.is_err() {
            self.inner.metrics.cluster_redis_errors.inc();
        }
        published.map(|_| ())
    }

    /// The messages published to `channel`, subscribed again after Redis restarts (what was
    /// published meanwhile is lost), until the receiver is dropped. At most `queue` wait; more
    /// are dropped and counted (`dropped`).
    pub fn subscribe(
        &self,
        channel: &'static str,
        queue: usize,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> tokio::sync::mpsc::Receiver<String> {
        let (tx, rx) = tokio::sync::mpsc::channel(queue);
        let client = self.inner.client.clone();
        let metrics = self.inner.metrics.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while !tx.is_closed() {
                let mut pubsub = match client.get_async_pubsub().await {
                    Ok(p) => p,
                    Err(e) => {
                        metrics.cluster_redis_errors.inc();
                        tracing::debug!("pub/sub connection: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if let Err(e) = pubsub.subscribe(channel).await {
                    metrics.cluster_redis_errors.inc();
                    tracing::debug!("subscribing to {channel}: {e}");
                    continue;
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else { break };
                            let Ok(text) = message.get_payload::<String>() else {
                                continue;
                            };
                            if tx.try_send(text).is_err() {
                                dropped.inc();
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
                tracing::warn!("Redis pub/sub connection lost; subscribing again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        rx
    }

    /// Where the room a client asks to join lives: here, or on another live node. Places it
    /// (on the least-loaded node of this region) if it is open nowhere. Redis failing or slow
    /// places it here.
    pub async fn place(&self, room: &str) -> Placement {
        let failure = match tokio::time::timeout(PLACE_TIMEOUT, self.try_place(room)).await {
            Ok(Ok(placement)) => return placement,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        self.inner.metrics.cluster_redis_errors.inc();
        tracing::warn!("placing a room: Redis: {failure}; serving it here");
        Placement::Here
    }

    async fn try_place(&self, room: &str) -> redis::RedisResult<Placement> {
        let nodes = self.nodes().await?;
        let me = self.node_id();
        let candidate = choose_node(&nodes, me, &self.inner.config.region);
        let owner: String = self
            .inner
            .place
            .key(format!("{ROOM_PREFIX}{room}"))
            .arg(NODE_PREFIX)
            .arg(candidate)
            .arg(self.ttl_ms())
            .invoke_async(&mut self.conn())
            .await?;
        if owner == me {
            return Ok(Placement::Here);
        }
        let url = match nodes.iter().find(|n| n.id == owner) {
            Some(node) => node.url.clone(),
            None => {
                let url: Option<String> = self
                    .conn()
                    .hget(format!("{NODE_PREFIX}{owner}"), "url")
                    .await?;
                match url {
                    Some(url) => url,
                    // Died since: this node takes the room at the next join.
                    None => return Ok(Placement::Here),
                }
            }
        };
        Ok(Placement::Elsewhere { node: owner, url })
    }

    /// The live nodes, as their last heartbeats described them.
    pub async fn nodes(&self) -> redis::RedisResult<Vec<NodeStatus>> {
        let mut conn = self.conn();
        let ids: Vec<String> = conn.smembers(NODES).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(format!("{NODE_PREFIX}{id}"));
        }
        let records: Vec<std::collections::HashMap<String, String>> =
            pipe.query_async(&mut conn).await?;
        Ok(ids
            .into_iter()
            .zip(records)
            .filter(|(_, record)| !record.is_empty())
            .map(|(id, record)| NodeStatus::from_record(id, &record))
            .collect())
    }

    async fn heartbeat(
        self,
        local: LocalStateFn,
        mut held: Held,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let every = self.inner.config.ttl / 5;
        let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            match self.beat(&local(), &mut held).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("Redis answers again: this node's cluster state is rewritten");
                }
                Ok(()) => {}
                Err(e) => {
                    self.inner.metrics.cluster_redis_errors.inc();
                    if !failing {
                        tracing::warn!("cluster heartbeat: Redis: {e}; calls go on, retrying");
                    }
                    failing = true;
                }
            }
        }
        if let Err(e) = self.leave(&held).await {
            tracing::warn!("leaving the cluster: Redis: {e}; this node's entries expire");
        }
        self.inner.metrics.cluster_nodes.set(0);
    }

    /// One heartbeat: rewrites this node's entries, drops what it no longer holds, and removes
    /// dead nodes from the node set.
    async fn beat(&self, state: &LocalState, held: &mut Held) -> redis::RedisResult<()> {
        let me = self.node_id();
        let ttl = self.ttl_ms();
        let config = &self.inner.config;
        let node_key = format!("{NODE_PREFIX}{me}");
        let participants: usize = state.rooms.iter().map(|(_, ids)| ids.len()).sum();
        let beat_ms = unix_time().as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&node_key)
            .arg(&[
                ("url", config.url.clone()),
                ("address", config.address.clone()),
                ("region", config.region.clone()),
                ("load_permille", state.load_permille.to_string()),
                ("participants", participants.to_string()),
                ("rooms", state.rooms.len().to_string()),
                ("draining", u8::from(state.draining).to_string()),
                ("beat_ms", beat_ms.to_string()),
            ])
            .ignore()
            .pexpire(&node_key, ttl as i64)
            .ignore()
            .sadd(NODES, me)
            .ignore();
        let mut now = Held::default();
        for (room, ids) in &state.rooms {
            now.rooms.insert(room.clone());
            for id in ids {
                pipe.cmd("SET")
                    .arg(format!("{PARTICIPANT_PREFIX}{id}"))
                    .arg(format!("{me} {room}"))
                    .arg("PX")
                    .arg(ttl)
                    .ignore();
                now.participants.insert(id.clone());
            }
        }
        for gone in held.participants.difference(&now.participants) {
            pipe.del(format!("{PARTICIPANT_PREFIX}{gone}")).ignore();
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn).await?;

        // A draining node lets its rooms go: their clients come back through other nodes.
        let mut contested = 0;
        if config.cascade && !now.rooms.is_empty() {
            let mut host = self.inner.host.prepare_invoke();
            for room in &now.rooms {
                host.key(format!("{ROOM_HOSTS_PREFIX}{room}"));
            }
            host.arg(me)
                .arg(beat_ms)
                .arg(ttl)
                .invoke_async::<()>(&mut conn)
                .await?;
        } else if !now.rooms.is_empty() && !state.draining {
            let mut keep = self.inner.keep.prepare_invoke();
            for room in &now.rooms {
                keep.key(format!("{ROOM_PREFIX}{room}"));
            }
            contested = keep
                .arg(NODE_PREFIX)
                .arg(me)
                .arg(ttl)
                .invoke_async(&mut conn)
                .await?;
        }
        let metrics = &self.inner.metrics;
        if contested > metrics.cluster_rooms_contested.get() {
            tracing::warn!(
                contested,
                "rooms open here are placed on another live node (joined on both while Redis was unreachable); new joiners go there"
            );
        }
        metrics.cluster_rooms_contested.set(contested);
        let gone_rooms: Vec<&String> = held.rooms.difference(&now.rooms).collect();
        if !gone_rooms.is_empty() {
            self.release(&gone_rooms, &mut conn).await?;
        }
        *held = now;
        self.reap(&mut conn).await
    }

    async fn release(
        &self,
        rooms: &[&String],
        conn: &mut ConnectionManager,
    ) -> redis::RedisResult<()> {
        if self.inner.config.cascade {
            let mut pipe = redis::pipe();
            for room in rooms {
                pipe.hdel(format!("{ROOM_HOSTS_PREFIX}{room}"), self.node_id())
                    .ignore();
            }
            return pipe.query_async(conn).await;
        }
        let mut release = self.inner.release.prepare_invoke();
        for room in rooms {
            release.key(format!("{ROOM_PREFIX}{room}"));
        }
        release.arg(self.node_id()).invoke_async::<()>(conn).await
    }

    /// Drops from the node set the nodes whose record has expired, and counts the live ones.
    async fn reap(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        let ids: Vec<String> = conn.smembers(NODES).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.exists(format!("{NODE_PREFIX}{id}"));
        }
        let alive: Vec<bool> = pipe.query_async(conn).await?;
        let dead: Vec<&String> = ids
            .iter()
            .zip(&alive)
            .filter(|(_, alive)| !**alive)
            .map(|(id, _)| id)
            .collect();
        if !dead.is_empty() {
            let removed: u64 = conn.srem(NODES, &dead).await?;
            if removed > 0 {
                self.inner.metrics.cluster_nodes_reaped.inc_by(removed);
                tracing::info!(
                    ?dead,
                    "removed dead nodes (heartbeat expired) from the cluster"
                );
            }
        }
        let live = alive.iter().filter(|a| **a).count();
        self.inner.metrics.cluster_nodes.set(live as i64);
        Ok(())
    }

    /// Removes every entry of this node (at shutdown).
    async fn leave(&self, held: &Held) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        let rooms: Vec<&String> = held.rooms.iter().collect();
        if !rooms.is_empty() {
            self.release(&rooms, &mut conn).await?;
        }
        let mut pipe = redis::pipe();
        for id in &held.participants {
            pipe.del(format!("{PARTICIPANT_PREFIX}{id}")).ignore();
        }
        pipe.del(format!("{NODE_PREFIX}{}", self.node_id()))
            .ignore()
            .srem(NODES, self.node_id())
            .ignore();
        pipe.query_async::<()>(&mut conn).await?;
        tracing::info!(node = %self.node_id(), "left the cluster");
        Ok(())
    }
}

impl NodeStatus {
    fn from_record(id: String, record: &std::collections::HashMap<String, String>) -> Self {
        let text = |field: &str| record.get(field).cloned().unwrap_or_default();
        let number = |field: &str| {
            record
                .get(field)
                .and_then(|v| v.parse().ok())
                .unwrap_or_default()
        };
        NodeStatus {
            url: text("url"),
            address: text("address"),
            region: text("region"),
            load_permille: number("load_permille"),
            participants: number("participants"),
            rooms: number("rooms"),
            draining: text("draining") != "0",
            id,
        }
    }
}

/// The node a new room goes to: among the live nodes that are not draining and not full, those
/// of this node's region (the load balancer sent the client to a node near it) if any, the
/// least loaded, then the one with the fewest participants; this node on a tie, and when no
/// node has room (its own admission then answers).
fn choose_node<'a>(nodes: &'a [NodeStatus], me: &'a str, region: &str) -> &'a str {
    let open = || {
        nodes
            .iter()
            .filter(|n| !n.draining && n.load_permille < FULL_PERMILLE)
    };
    let in_region = open().any(|n| n.region == region);
    open()
        .filter(|n| !in_region || n.region == region)
        .min_by_key(|n| {
            (
                n.load_permille / LOAD_BAND_PERMILLE,
                n.participants,
                n.id != me,
            )
        })
        .map_or(me, |n| n.id.as_str())
}

/// Node ids go into Redis keys and values: the characters of room names.
fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The signaling WebSocket URL of a node's base URL.
pub fn signaling_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = match base.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}"),
        None => format!("ws://{}", base.strip_prefix("http://").unwrap_or(base)),
    };
    format!("{ws}/ws")
}

/// A node's base URL from its signaling WebSocket URL (the inverse of [`signaling_url`]).
pub fn base_url(signaling_url: &str) -> String {
    let base = signaling_url.strip_suffix("/ws").unwrap_or(signaling_url);
    match base.strip_prefix("wss://") {
        Some(rest) => format!("https://{rest}"),
        None => format!("http://{}", base.strip_prefix("ws://").unwrap_or(base)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, region: &str, load_permille: u32, participants: u32) -> NodeStatus {
        NodeStatus {
            id: id.into(),
            url: format!("http://{id}:8080"),
            address: format!("{id}:8080"),
            region: region.into(),
            load_permille,
            participants,
            rooms: 0,
            draining: false,
        }
    }

    #[test]
    fn a_new_room_goes_to_the_least_loaded_node_of_the_region() {
        let nodes = [
            node("a", "eu", 300, 10),
            node("b", "eu", 120, 50),
            node("c", "us", 0, 0),
        ];
        // Within one load band, fewer participants win.
        assert_eq!(choose_node(&nodes, "a", "eu"), "b");
        let nodes = [node("a", "eu", 150, 10), node("b", "eu", 120, 50)];
        assert_eq!(choose_node(&nodes, "a", "eu"), "a");
        // Another region only when this one has no node with room.
        let nodes = [node("a", "eu", 900, 10), node("c", "us", 0, 0)];
        assert_eq!(choose_node(&nodes, "a", "eu"), "c");
        let nodes = [node("a", "eu", 10, 0), node("c", "us", 0, 0)];
        assert_eq!(choose_node(&nodes, "a", "eu"), "a");
    }

    #[test]
    fn ties_keep_the_room_here_and_no_open_node_means_here() {
        let nodes = [node("a", "eu", 0, 0), node("b", "eu", 0, 0)];
        assert_eq!(choose_node(&nodes, "b", "eu"), "b");
        assert_eq!(choose_node(&nodes, "a", "eu"), "a");
        let mut draining = node("b", "eu", 0, 0);
        draining.draining = true;
        let nodes = [node("a", "eu", 950, 0), draining];
        assert_eq!(choose_node(&nodes, "a", "eu"), "a");
        assert_eq!(choose_node(&[], "a", "eu"), "a");
    }

    #[test]
    fn node_ids_and_urls() {
        assert!(valid_node_id("node-1.eu_west"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("a b"));
        assert!(!valid_node_id(&"x".repeat(65)));
        assert_eq!(
            signaling_url("http://10.0.0.2:8080"),
            "ws://10.0.0.2:8080/ws"
        );
        assert_eq!(
            signaling_url("https://sfu.example.com/"),
            "wss://sfu.example.com/ws"
        );
        assert_eq!(base_url("ws://10.0.0.2:8080/ws"), "http://10.0.0.2:8080");
        assert_eq!(
            base_url("wss://sfu.example.com/ws"),
            "https://sfu.example.com"
        );
    }

    #[test]
    fn a_record_missing_fields_reads_as_defaults() {
        let record = [("url".to_owned(), "http://x".to_owned())].into();
        let status = NodeStatus::from_record("x".into(), &record);
        assert_eq!(status.url, "http://x");
        assert_eq!(status.load_permille, 0);
        assert!(status.draining);
    }
}
