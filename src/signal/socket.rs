//! A signaling WebSocket as a session uses it: messages are read in the session task, and
//! written by a task of their own from a bounded queue, so a client that does not read cannot
//! stall its session (its timers, its media events, its room's events). A full queue or a write
//! that does not finish in time means the client stopped reading: the socket is cut.
//!
//! It also holds the per-socket message-rate bucket, so a session that moves to a new socket
//! (resume) starts that socket's budget afresh.
//!
//! A session of an HTTP client (WHIP, WHEP) has an [`HttpLink`] in the socket's place: its
//! request handlers send one message at a time and take the reply they wait for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::http_session::HttpLink;
use super::protocol::ServerMessage;
use crate::types::TokenBucket;

/// How long the writer waits for a close frame to go out before it gives up.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue is full, or a write blocked past the send timeout: the client does not read.
    #[error("the client does not read its messages")]
    SlowReader,
    /// The writer stopped because the connection failed; reading says how (a close frame, or
    /// the connection dropped).
    #[error("the connection is gone")]
    Closed,
}

#[derive(Debug)]
pub struct SignalSocket {
    link: Link,
    rate: TokenBucket,
}

#[derive(Debug)]
enum Link {
    WebSocket(WebSocketLink),
    Http(HttpLink),
}

#[derive(Debug)]
struct WebSocketLink {
    stream: SplitStream<WebSocket>,
    queue: mpsc::Sender<Message>,
    writer: Option<JoinHandle<()>>,
    /// Set by the writer when a write blocked past the send timeout.
    stalled: Arc<AtomicBool>,
}

impl SignalSocket {
    /// Takes over `socket`: at most `queue` messages wait to be written, each write may take
    /// `write_timeout`, and the client may send messages as fast as `rate` allows.
    pub fn new(
        socket: WebSocket,
        queue: usize,
        write_timeout: Duration,
        rate: TokenBucket,
    ) -> Self {
        let (sink, stream) = socket.split();
        let (tx, rx) = mpsc::channel(queue.max(1));
        let stalled = Arc::new(AtomicBool::new(false));
        let link = WebSocketLink {
            stream,
            queue: tx,
            writer: Some(tokio::spawn(write_loop(
                sink,
                rx,
                write_timeout,
                stalled.clone(),
            ))),
            stalled,
        };
        SignalSocket {
            link: Link::WebSocket(link),
            rate,
        }
    }

    /// The link of an HTTP client's session. Its requests are not rate-limited here: each is
    /// an HTTP request, under the server's connection limits.
    pub fn http(link: HttpLink) -> Self {
        SignalSocket {
            link: Link::Http(link),
            rate: TokenBucket::new(0, 0, Instant::now()),
        }
    }

    /// Whether an HTTP client's session (WHIP, WHEP) is behind this link, not a WebSocket.
    pub fn is_http(&self) -> bool {
        matches!(self.link, Link::Http(_))
    }

    /// The next message from the client (None: the connection is gone).
    pub async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        match &mut self.link {
            Link::WebSocket(ws) => ws.stream.next().await,
            Link::Http(http) => {
                let message = http.recv().await?;
                match serde_json::to_string(&message) {
                    Ok(text) => Some(Ok(Message::Text(text.into()))),
                    Err(e) => Some(Err(axum::Error::new(e))),
                }
            }
        }
    }

    /// Queues a message for the client. A burst (a session answering many queued client
    /// messages in one go) can fill the queue before the writer task has run at all, so a full
    /// queue first lets the writer drain it to the kernel once; only a queue still full after
    /// that means the client does not read.
    pub async fn send(&mut self, message: &ServerMessage) -> Result<(), SendError> {
        let ws = match &mut self.link {
            Link::WebSocket(ws) => ws,
            Link::Http(http) => {
                http.deliver(message);
                return Ok(());
            }
        };
        let text = match serde_json::to_string(message) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!("serializing {message:?}: {e}");
                return Ok(());
            }
        };
        let message = match ws.queue.try_send(Message::Text(text.into())) {
            Err(mpsc::error::TrySendError::Full(message)) => message,
            other => return other.map_err(|e| ws.why(e)),
        };
        tokio::task::yield_now().await;
        ws.queue.try_send(message).map_err(|e| ws.why(e))
    }

    /// Whether the client may send one more message now (takes it from the budget).
    pub fn take_message_budget(&mut self, now: Instant) -> bool {
        self.is_http() || self.rate.take(1, now)
    }

    /// Sends a close frame after what is queued (if the client reads within a second), then
    /// drops the connection.
    pub async fn close(self, frame: Option<CloseFrame>) {
        if let Link::WebSocket(ws) = self.link {
            ws.close(frame).await;
        }
    }
}

impl WebSocketLink {
    fn why<T>(&self, e: mpsc::error::TrySendError<T>) -> SendError {
        match e {
            mpsc::error::TrySendError::Full(_) => SendError::SlowReader,
            mpsc::error::TrySendError::Closed(_) if self.stalled.load(Ordering::Relaxed) => {
                SendError::SlowReader
            }
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        }
    }

    async fn close(mut self, frame: Option<CloseFrame>) {
        let _ = self.queue.try_send(Message::Close(frame));
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        // Dropping our sender ends the writer once the queue is written.
        drop(self);
        if tokio::time::timeout(CLOSE_FLUSH, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
}

impl Drop for WebSocketLink {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
    timeout: Duration,
    stalled: Arc<AtomicBool>,
) {
    while let Some(message) = queue.recv().await {
        let closing = matches!(message, Message::Close(_));
        match tokio::time::timeout(timeout, sink.send(message)).await {
            Ok(Ok(())) if !closing => {}
            Ok(Ok(())) => break,
            Ok(Err(e)) => {
                tracing::debug!("signaling write failed: {e}");
                break;
            }
            Err(_) => {
                stalled.store(true, Ordering::Relaxed);
                tracing::info!(
                    "signaling write blocked for {timeout:?}: the client does not read, cutting it"
                );
                break;
            }
        }
    }
}
