//! Assembles the server from its parts and runs it until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::media::MediaPlane;
use crate::metrics::Metrics;
use crate::room::Registry;
use crate::signal::ServerContext;
use crate::signal::session::DRAIN_TIMEOUT;

pub struct Server;

/// A running server.
pub struct ServerHandle {
    pub http_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    media: Arc<MediaPlane>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds the HTTP listener and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<ServerHandle> {
        let metrics = Arc::new(Metrics::default());
        let registry = Arc::new(Registry::new(config.limits.clone(), metrics.clone()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let media = Arc::new(
            MediaPlane::start(&config, metrics.clone()).context("starting the media workers")?,
        );
        let ctx = Arc::new(ServerContext {
            registry: registry.clone(),
            media: media.clone(),
            metrics: metrics.clone(),
            limits: config.limits.clone(),
            resumables: Default::default(),
            shutdown: shutdown_rx.clone(),
        });
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("binding HTTP on {}", config.http))?;
        let http_addr = listener.local_addr()?;
        let app = crate::http::router(ctx);
        let mut stop = shutdown_rx;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("http server: {e}");
            }
        });
        tokio::spawn(sample_forward_rate(metrics.clone(), shutdown.subscribe()));
        Ok(ServerHandle {
            http_addr,
            registry,
            metrics,
            media,
            shutdown,
            task,
        })
    }
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
        let media = self.media.clone();
        let _ = tokio::task::spawn_blocking(move || media.shutdown()).await;
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}
