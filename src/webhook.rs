//! Webhooks: what happens in rooms (room started/finished, participant joined/left, track
//! published/unpublished), POSTed as JSON to the configured URLs.
//!
//! Each request is signed so a receiver can tell it came from this server and was not
//! replayed: `Switchboard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! (the scheme Stripe and others use). Each URL has its own bounded queue and delivery task:
//! events reach one receiver in order, a slow or dead receiver holds up only its own queue, and
//! an event that finds the queue full is dropped and counted. A failed delivery (network error,
//! timeout, or a status other than 2xx) is retried with exponential backoff; the event's `id`
//! stays the same, so a receiver can ignore a duplicate.
//!
//! Nothing here knows rooms: callers build an [`Event`] and [`Webhooks::notify`] never blocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::types::unix_time;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "switchboard-signature";
/// Attempts per event, the first included.
pub const MAX_ATTEMPTS: u32 = 5;
/// The wait before the first retry; it doubles after each.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for queued events to go out.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    RoomStarted,
    RoomFinished,
    ParticipantJoined,
    ParticipantLeft,
    TrackPublished,
    TrackUnpublished,
}

/// A participant as webhooks describe it.
#[derive(Debug, Clone, Serialize)]
pub struct Participant {
    pub id: String,
    /// The token's identity (`sub`); absent in development mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub name: String,
}

/// A published track as webhooks describe it.
#[derive(Debug, Clone, Serialize)]
pub struct Track {
    pub id: String,
    pub kind: crate::types::MediaKind,
    pub codec: String,
    /// Simulcast layers (rids), lowest first; empty for one stream.
    pub layers: Vec<String>,
}

/// One webhook body.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique per event, the same on every retry of it.
    pub id: String,
    pub event: EventKind,
    /// Unix time in milliseconds.
    pub created_at: u64,
    pub room: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub participant: Option<Participant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track: Option<Track>,
}

impl Event {
    pub fn new(event: EventKind, room: &str) -> Self {
        Event {
            id: crate::types::random_token(16),
            event,
            created_at: unix_time().as_millis() as u64,
            room: room.to_string(),
            participant: None,
            track: None,
        }
    }

    pub fn with_participant(mut self, participant: Participant) -> Self {
        self.participant = Some(participant);
        self
    }

    pub fn with_track(mut self, track: Track) -> Self {
        self.track = Some(track);
        self
    }
}

/// Where webhooks go and how they are signed.
#[derive(Debug, Clone, Default)]
pub struct WebhookConfig {
    pub urls: Vec<String>,
    pub secret: String,
    /// Events waiting per URL before new ones are dropped.
    pub queue: usize,
}

/// The `Switchboard-Signature` value for `body` sent at `unix_secs`.
pub fn sign(secret: &[u8], unix_secs: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(unix_secs.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_secs},v1={hex}")
}

/// The webhook senders of a server; cheap to clone. With no URLs configured every call is a
/// no-op.
#[derive(Debug, Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    queues: Vec<mpsc::Sender<Arc<Event>>>,
    /// Events queued or being delivered, over every URL.
    pending: Arc<AtomicUsize>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL `{0}` is not an http(s) URL")]
    BadUrl(String),
    #[error("webhooks need a secret to sign with (--webhook-secret), 16 characters or more")]
    NoSecret,
    #[error("making the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl Webhooks {
    /// Starts one delivery task per URL (on the current tokio runtime).
    pub fn start(config: WebhookConfig, metrics: Arc<Metrics>) -> Result<Self, WebhookError> {
        if config.urls.is_empty() {
            return Ok(Webhooks::default());
        }
        if config.secret.len() < 16 {
            return Err(WebhookError::NoSecret);
        }
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let secret: Arc<[u8]> = config.secret.as_bytes().into();
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        let pending = Arc::new(AtomicUsize::new(0));
        for url in config.urls {
            let parsed =
                reqwest::Url::parse(&url).map_err(|_| WebhookError::BadUrl(url.clone()))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(WebhookError::BadUrl(url));
            }
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let receiver = Receiver {
                url: parsed,
                client: client.clone(),
                secret: secret.clone(),
                metrics: metrics.clone(),
                pending: pending.clone(),
            };
            queues.push(tx);
            tasks.push(tokio::spawn(receiver.run(rx)));
        }
        Ok(Webhooks {
            inner: Some(Arc::new(Inner {
                queues,
                pending,
                tasks: std::sync::Mutex::new(tasks),
                metrics,
            })),
        })
    }

    /// Queues `event` for every URL; never waits. `make` is only called when webhooks are on.
    pub fn notify(&self, make: impl FnOnce() -> Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let event = Arc::new(make());
        for queue in &inner.queues {
            // Counted before it can be delivered, so the count never goes below zero.
            inner.pending.fetch_add(1, Ordering::Relaxed);
            let Err(refused) = queue.try_send(event.clone()) else {
                continue;
            };
            inner.pending.fetch_sub(1, Ordering::Relaxed);
            if let TrySendError::Full(_) = refused {
                inner.metrics.webhooks_dropped.inc();
                tracing::warn!(event = ?event.event, "webhook queue full: event dropped");
            }
        }
    }

    /// Lets the queued events, and those being delivered, go out (bounded by a few seconds),
    /// then stops the tasks.
    pub async fn close(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        while inner.pending.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for task in tasks {
            task.abort();
        }
    }
}

/// One URL's delivery task.
struct Receiver {
    url: reqwest::Url,
    client: reqwest::Client,
    secret: Arc<[u8]>,
    metrics: Arc<Metrics>,
    pending: Arc<AtomicUsize>,
}

impl Receiver {
    async fn run(self, mut queue: mpsc::Receiver<Arc<Event>>) {
        while let Some(event) = queue.recv().await {
            let body = match serde_json::to_vec(&*event) {
                Ok(body) => body,
                Err(e) => {
                    tracing::error!("webhook body: {e}");
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            self.deliver(&event, body).await;
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    async fn deliver(&self, event: &Event, body: Vec<u8>) {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=MAX_ATTEMPTS {
            let now = unix_time().as_secs();
            let result = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, sign(&self.secret, now, &body))
                .body(body.clone())
                .send()
                .await;
            let failure = match result {
                Ok(response) if response.status().is_success() => {
                    self.metrics.webhooks_delivered.inc();
                    return;
                }
                Ok(response) => format!("status {}", response.status()),
                Err(e) => e.to_string(),
            };
            if attempt == MAX_ATTEMPTS {
                self.metrics.webhooks_failed.inc();
                tracing::warn!(url = %self.url, event = ?event.event, %failure,
                    "webhook not delivered after {MAX_ATTEMPTS} attempts");
                return;
            }
            self.metrics.webhooks_retried.inc();
            tracing::info!(url = %self.url, event = ?event.event, %failure, attempt,
                "webhook failed; retrying in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac key
        let signature = sign(b"key", 1_700_000_000, b"{}");
        assert_eq!(
            signature,
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn an_event_serializes_with_snake_case_names_and_no_empty_parts() {
        let event = Event::new(EventKind::RoomStarted, "standup");
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["event"], "room_started");
        assert_eq!(json["room"], "standup");
        assert!(json.get("participant").is_none());
        assert!(json["id"].as_str().is_some_and(|id| !id.is_empty()));
    }
}
