//! Assembles the server from its parts and runs it until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Keys;
use crate::cascade::CascadeConfig;
use crate::cluster::{Cluster, ClusterConfig, LocalState, LocalStateFn};
use crate::config::Config;
use crate::media::MediaPlane;
use crate::metrics::Metrics;
use crate::room::{Notices, Registry};
use crate::signal::ServerContext;
use crate::signal::session::DRAIN_TIMEOUT;
use crate::tls::Certificate;
use crate::turn::{IceServers, TurnConfig, TurnServer, TurnTls};
use crate::types::random_token;
use crate::webhook::{WebhookConfig, Webhooks};

pub struct Server;

/// A running server.
pub struct ServerHandle {
    pub http_addr: SocketAddr,
    /// Serving HTTPS and WSS: the certificate (self-signed or the operator's leaf).
    pub tls_certificate: Option<rustls::pki_types::CertificateDer<'static>>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    media: Arc<MediaPlane>,
    turn: Option<TurnServer>,
    webhooks: Webhooks,
    shutdown: watch::Sender<bool>,
    draining: watch::Sender<Option<Instant>>,
    /// How long draining lets calls go on (`--drain-secs`).
    drain_grace: Duration,
    task: JoinHandle<()>,
    /// The cluster heartbeat, which removes this node's entries from Redis when it ends.
    cluster_task: Option<JoinHandle<()>>,
    /// The cascade's room-state exchange, which tells the other nodes when it ends.
    cascade_task: Option<JoinHandle<()>>,
}

/// How long a starting node waits for Redis before giving up.
const CLUSTER_CONNECT_WAIT: Duration = Duration::from_secs(10);

impl Server {
    /// Binds the HTTP listener and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<ServerHandle> {
        let metrics = Arc::new(Metrics::default());
        metrics.watch_runtime(tokio::runtime::Handle::current());
        let webhooks = Webhooks::start(
            WebhookConfig {
                urls: config.webhook_urls.clone(),
                secret: config.webhook_secret.clone().unwrap_or_default(),
                queue: config.limits.webhook_queue,
            },
            metrics.clone(),
        )
        .context("starting the webhooks")?;
        let mut registry =
            Registry::new(config.limits.clone(), metrics.clone()).with_webhooks(webhooks.clone());
        // Cascading: rooms tell the other nodes what changes in them.
        let mut notices = None;
        if config.cascades() {
            let (queue, receiver) = tokio::sync::mpsc::channel(ROOM_NOTICE_QUEUE);
            notices = Some(receiver);
            registry = registry.with_notices(Notices {
                queue,
                dropped: metrics.cascade_messages_dropped.clone(),
            });
        }
        let registry = Arc::new(registry);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (draining, draining_rx) = watch::channel(None);
        let media = Arc::new(
            MediaPlane::start(&config, metrics.clone()).context("starting the media workers")?,
        );
        let (turn, ice_servers) = start_turn(&config, &media, &metrics, &shutdown_rx).await?;
        let keys = Keys::parse(&config.api_keys).context("reading the API keys")?;
        if keys.is_dev_mode() {
            tracing::warn!(
                "no API keys (--api-key / SWITCHBOARD_API_KEYS): development mode, anyone who reaches this server may join any room"
            );
        }
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("binding HTTP on {}", config.http))?;
        let http_addr = listener.local_addr()?;
        let certificate = certificate(&config)?;
        let (cluster, cluster_task) = match &config.redis_url {
            None => (None, None),
            Some(url) => {
                let local = local_state(&registry, &media, &draining_rx);
                let cluster_config =
                    cluster_config(&config, url, http_addr, certificate.is_some())?;
                let (cluster, task) = Cluster::start(
                    cluster_config,
                    metrics.clone(),
                    local,
                    shutdown_rx.clone(),
                    CLUSTER_CONNECT_WAIT,
                )
                .await
                .context("joining the cluster")?;
                (Some(cluster), Some(task))
            }
        };
        let cascade_task = match (&cluster, notices, media.take_gateway()) {
            (Some(cluster), Some(notices), Some(gateway)) => {
                let cascade_config = cascade_config(&config, cluster.address());
                let task = crate::cascade::start(
                    cascade_config,
                    cluster.clone(),
                    registry.clone(),
                    gateway,
                    notices,
                    metrics.clone(),
                    shutdown_rx.clone(),
                )
                .await
                .context("starting the node link")?;
                Some(task)
            }
            _ => None,
        };
        let ctx = Arc::new(ServerContext {
            registry: registry.clone(),
            media: media.clone(),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            resumables: Default::default(),
            connections: Default::default(),
            http_sessions: Default::default(),
            keys,
            ice_servers,
            shutdown: shutdown_rx.clone(),
            draining: draining_rx,
            cascade: cascade_task.is_some(),
            cluster,
        });
        let tls_certificate = certificate.as_ref().map(|c| c.leaf().clone());
        let app =
            crate::http::router(ctx).into_make_service_with_connect_info::<std::net::SocketAddr>();
        let mut stop = shutdown_rx;
        let task = match certificate {
            None => tokio::spawn(async move {
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
                if let Err(e) = serve.await {
                    tracing::error!("http server: {e}");
                }
            }),
            Some(certificate) => {
                // HTTP/1.1 only: the signaling WebSocket is an HTTP/1.1 upgrade.
                let tls = RustlsConfig::from_config(certificate.server_config(&[b"http/1.1"])?);
                let handle = axum_server::Handle::new();
                let server =
                    axum_server::from_tcp_rustls(listener.into_std()?, tls)?.handle(handle.clone());
                tokio::spawn(async move {
                    let _ = stop.wait_for(|s| *s).await;
                    handle.graceful_shutdown(Some(DRAIN_TIMEOUT));
                });
                tokio::spawn(async move {
                    if let Err(e) = server.serve(app).await {
                        tracing::error!("https server: {e}");
                    }
                })
            }
        };
        tokio::spawn(sample_forward_rate(metrics.clone(), shutdown.subscribe()));
        Ok(ServerHandle {
            http_addr,
            tls_certificate,
            registry,
            metrics,
            media,
            turn,
            webhooks,
            shutdown,
            draining,
            drain_grace: Duration::from_secs(config.limits.drain_secs),
            task,
            cluster_task,
            cascade_task,
        })
    }
}

/// Room changes queued for the cascade before they are dropped (the periodic state repairs).
const ROOM_NOTICE_QUEUE: usize = 1024;

/// Where the node link binds and the host it is announced at: the host of `--node-address`.
fn cascade_config(config: &Config, node_address: &str) -> CascadeConfig {
    let host = match node_address.rsplit_once(':') {
        Some((host, _port)) => host.trim_matches(['[', ']']).to_owned(),
        None => node_address.to_owned(),
    };
    let bind_ip = match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => ip,
        _ => std::net::IpAddr::from([0, 0, 0, 0]),
    };
    CascadeConfig {
        bind: SocketAddr::new(bind_ip, config.node_link_port),
        host,
    }
}

/// What the cluster heartbeat reports of this node.
fn local_state(
    registry: &Arc<Registry>,
    media: &Arc<MediaPlane>,
    draining: &watch::Receiver<Option<Instant>>,
) -> LocalStateFn {
    let (registry, media, draining) = (registry.clone(), media.clone(), draining.clone());
    Arc::new(move || LocalState {
        rooms: registry.membership(),
        load_permille: media.least_load_permille(),
        draining: draining.borrow().is_some(),
    })
}

/// This node's identity in the cluster, from the flags and where it listens.
fn cluster_config(
    config: &Config,
    redis_url: &str,
    http_addr: SocketAddr,
    tls: bool,
) -> anyhow::Result<ClusterConfig> {
    let address = match &config.node_address {
        Some(address) => address.clone(),
        None => {
            let ip = config.public_ip.unwrap_or(http_addr.ip());
            if ip.is_unspecified() {
                anyhow::bail!(
                    "--redis-url needs --node-address (or --public-ip): where other nodes and redirected clients reach this node"
                );
            }
            SocketAddr::new(ip, http_addr.port()).to_string()
        }
    };
    let scheme = if tls { "https" } else { "http" };
    Ok(ClusterConfig {
        redis_url: redis_url.to_owned(),
        node_id: config.node_id.clone().unwrap_or_else(|| random_token(12)),
        region: config.node_region.clone(),
        url: config
            .node_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{address}")),
        address,
        ttl: Duration::from_secs(config.node_ttl_secs),
        cascade: config.cascades(),
    })
}

/// The certificate HTTPS is served with, if any (`--tls-cert`, `--tls-self-signed`).
fn certificate(config: &Config) -> anyhow::Result<Option<Certificate>> {
    let certificate = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Certificate::load(cert, key)?,
        _ if config.tls_self_signed => {
            let addrs: Vec<_> = config
                .public_ip
                .into_iter()
                .chain([config.http.ip()])
                .collect();
            Certificate::self_signed(&config.tls_name, &addrs)?
        }
        _ => return Ok(None),
    };
    Ok(Some(certificate))
}

/// The embedded TURN server (unless `--no-turn`), and the ICE servers clients are given.
async fn start_turn(
    config: &Config,
    media: &MediaPlane,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<(Option<TurnServer>, IceServers)> {
    if !config.turn_urls.is_empty() && config.turn_secret.is_none() {
        anyhow::bail!(
            "--turn-urls needs --turn-secret: the external TURN server checks credentials made from it"
        );
    }
    let secret = config
        .turn_secret
        .clone()
        .unwrap_or_else(|| random_token(32));
    let media_addrs: Vec<SocketAddr> = media.worker_addrs().into_iter().flatten().collect();
    let turn = match (!config.no_turn).then_some(config.turn_port) {
        Some(port) => {
            let announce = config
                .public_ip
                .or_else(|| media_addrs.first().map(|a| a.ip()))
                .unwrap_or(config.http.ip());
            let tls = match (&config.turn_tls_cert, &config.turn_tls_key) {
                (Some(cert), Some(key)) => Some(TurnTls::load(
                    SocketAddr::new(config.http.ip(), config.turn_tls_port),
                    config
                        .turn_tls_host
                        .clone()
                        .unwrap_or_else(|| announce.to_string()),
                    cert,
                    key,
                )?),
                _ => None,
            };
            let turn_config = TurnConfig {
                listen: SocketAddr::new(config.http.ip(), port),
                announce,
                secret: secret.clone(),
                allow_private: config.turn_allow_private,
                media: media_addrs,
                tls,
                max_allocations: config.turn_max_allocations,
                relay_bytes_per_sec: config.turn_relay_kbps * 1000 / 8,
            };
            Some(
                TurnServer::start(turn_config, metrics.clone(), shutdown.clone())
                    .await
                    .with_context(|| {
                        format!(
                            "starting the TURN server on port {port} (`--no-turn` to do without)"
                        )
                    })?,
            )
        }
        None => None,
    };
    let mut urls = turn.as_ref().map(TurnServer::urls).unwrap_or_default();
    urls.extend(config.turn_urls.iter().cloned());
    let ttl = Duration::from_secs(config.turn_ttl_secs);
    Ok((turn, IceServers::new(urls, secret, ttl)))
}

/// Keeps `metrics.forward_rate` at the packets forwarded over the last second, for admission
/// control and `/metrics`.
async fn sample_forward_rate(metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = metrics.packets_out.get();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = metrics.packets_out.get();
        metrics.forward_rate.set(now.saturating_sub(last) as i64);
        last = now;
    }
}

impl ServerHandle {
    /// The media addresses each worker announces (worker k: `--udp-port` + k).
    pub fn media_addrs(&self) -> Vec<Vec<SocketAddr>> {
        self.media.worker_addrs()
    }

    /// Where the embedded TURN server listens (UDP and TCP), if it runs.
    pub fn turn_addr(&self) -> Option<SocketAddr> {
        self.turn.as_ref().map(|t| t.addr)
    }

    /// Where the embedded TURN server listens for TURN over TLS, if it does.
    pub fn turn_tls_addr(&self) -> Option<SocketAddr> {
        self.turn
            .as_ref()
            .and_then(|t| t.tls.as_ref())
            .map(|(a, _)| *a)
    }

    /// How many participants' connections live on each media worker.
    pub fn media_worker_connections(&self) -> Vec<usize> {
        self.media.worker_connections()
    }

    /// Stops accepting, tells every session to close, waits (bounded) for them to go, then
    /// stops the media workers.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.metrics.snapshot().sessions > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.task).await;
        if let Some(turn) = self.turn {
            turn.stop().await;
        }
        // After the sessions: their leaves and the rooms' ends are the last events.
        self.webhooks.close().await;
        for task in [self.cascade_task, self.cluster_task].into_iter().flatten() {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
        }
        let media = self.media.clone();
        let _ = tokio::task::spawn_blocking(move || media.shutdown()).await;
    }

    /// Drains, then shuts down: new joins are refused and `/healthz` answers 503 (a load
    /// balancer stops sending clients), joined clients are told (`server-draining`), and calls go
    /// on until they end or `grace` passes.
    pub async fn drain(self, grace: Duration) {
        self.drain_unless(grace, std::future::pending()).await
    }

    /// As [`ServerHandle::drain`], cut short (straight to shutdown) when `cut` resolves.
    pub async fn drain_unless(self, grace: Duration, cut: impl std::future::Future<Output = ()>) {
        let deadline = Instant::now() + grace;
        let _ = self.draining.send(Some(deadline));
        self.metrics.draining.set(1);
        tracing::info!(
            ?grace,
            sessions = self.metrics.snapshot().sessions,
            "draining"
        );
        let calls_end = async {
            while self.metrics.snapshot().participants > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            _ = calls_end => {}
            _ = cut => tracing::info!("drain cut short"),
        }
        self.shutdown().await;
    }

    /// Runs until `signal()` resolves, then drains for `--drain-secs` and shuts down; a second
    /// `signal()` during the drain (a second Ctrl-C or SIGTERM) cuts the drain short.
    pub async fn run_until<F, Fut>(self, signal: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        signal().await;
        let grace = self.drain_grace;
        self.drain_unless(grace, signal()).await;
    }
}
