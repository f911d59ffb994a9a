//! A participant whose client speaks HTTP (WHIP, WHEP) instead of the WebSocket protocol: the
//! same session state machine (join, offer, candidates, leave; admission, grants, timeouts and
//! clean-up all as for any participant), fed by request handlers. Each request is one client
//! message that waits for the session's reply to it (an answer, `joined`, or an error);
//! whatever else the session says (room events) has no one to go to and is dropped.
//!
//! The session lives as long as its media connection and its resource: a `DELETE` sends
//! `leave`; a failed or timed-out connection ends it like any other, and the handle then sees
//! it closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::ServerContext;
use super::protocol::{ClientMessage, ServerMessage};
use super::session::run_session_on;
use super::socket::SignalSocket;
use crate::auth::Grants;
use crate::media::Subscribing;
use crate::metrics::GaugeGuard;
use crate::room::Registry;
use crate::types::ParticipantId;

/// Requests queued for one session (a client sends one at a time).
const REQUEST_QUEUE: usize = 8;
/// The longest a request waits for the session's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP clients a session can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpClient {
    /// WHIP: publishes, receives nothing.
    Whip,
    /// WHEP: receives into the m-lines it offered, publishes nothing.
    Whep,
}

impl HttpClient {
    /// What the client may do at most, whatever its token grants.
    pub fn grants(self) -> Grants {
        Grants {
            can_publish: self == HttpClient::Whip,
            can_subscribe: self == HttpClient::Whep,
            can_publish_data: false,
        }
    }

    pub fn subscribing(self) -> Subscribing {
        match self {
            HttpClient::Whip => Subscribing::ServerOffers,
            HttpClient::Whep => Subscribing::IntoClientOffer,
        }
    }
}

/// An HTTP client's kind and, for a WHEP player of one participant, whose tracks it plays
/// (that participant's id or display name).
#[derive(Debug, Clone)]
pub struct HttpPeer {
    pub client: HttpClient,
    pub source: Option<String>,
}

impl HttpPeer {
    pub fn whip() -> Self {
        HttpPeer {
            client: HttpClient::Whip,
            source: None,
        }
    }

    /// A player of the room (`None`: it follows the active speaker) or of one participant.
    pub fn whep(source: Option<String>) -> Self {
        HttpPeer {
            client: HttpClient::Whep,
            source,
        }
    }
}

/// The member of `room` whose id, or else whose display name, is `who`.
pub fn find_participant(registry: &Registry, room: &str, who: &str) -> Option<ParticipantId> {
    let room = registry.room_snapshot(room)?;
    let by_id = room.participants.iter().find(|p| p.id == who);
    by_id
        .or_else(|| room.participants.iter().find(|p| p.name == who))
        .map(|p| ParticipantId::from(p.id.as_str()))
}

/// Which replies a request waits for (an error always ends the wait).
pub type Wants = fn(&ServerMessage) -> bool;

#[derive(Debug)]
struct Request {
    message: ClientMessage,
    reply: oneshot::Sender<ServerMessage>,
    wants: Wants,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpSessionError {
    #[error("the session has ended")]
    Gone,
    #[error("the session did not reply in time")]
    Timeout,
    #[error("the session is busy with another request")]
    Busy,
}

/// The session's end of the link: requests in, their replies out.
#[derive(Debug)]
pub struct HttpLink {
    requests: mpsc::Receiver<Request>,
    waiting: Option<(oneshot::Sender<ServerMessage>, Wants)>,
}

impl HttpLink {
    /// The next client message (None: the handle is gone, as a socket that closed).
    pub async fn recv(&mut self) -> Option<ClientMessage> {
        let request = self.requests.recv().await?;
        self.waiting = Some((request.reply, request.wants));
        Some(request.message)
    }

    /// A message from the session: the reply the current request waits for, or dropped.
    pub fn deliver(&mut self, message: &ServerMessage) {
        let wanted = self.waiting.as_ref().is_some_and(|(_, wants)| {
            wants(message) || matches!(message, ServerMessage::Error { .. })
        });
        if wanted && let Some((reply, _)) = self.waiting.take() {
            let _ = reply.send(message.clone());
        }
    }
}

/// The request handlers' end: what a WHIP or WHEP resource keeps.
#[derive(Debug, Clone)]
pub struct HttpSession {
    requests: mpsc::Sender<Request>,
}

impl HttpSession {
    /// Starts a session for an HTTP client.
    pub fn spawn(ctx: Arc<ServerContext>, peer: HttpPeer) -> Self {
        let (requests, inbox) = mpsc::channel(REQUEST_QUEUE);
        let link = HttpLink {
            requests: inbox,
            waiting: None,
        };
        tokio::spawn(run_session_on(SignalSocket::http(link), ctx, Some(peer)));
        HttpSession { requests }
    }

    /// Sends `message` and waits for the session's reply that `wants` picks, or its error.
    pub async fn request(
        &self,
        message: ClientMessage,
        wants: Wants,
    ) -> Result<ServerMessage, HttpSessionError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(Request {
                message,
                reply,
                wants,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => HttpSessionError::Busy,
                mpsc::error::TrySendError::Closed(_) => HttpSessionError::Gone,
            })?;
        match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(_)) => Err(HttpSessionError::Gone),
            Err(_) => Err(HttpSessionError::Timeout),
        }
    }

    /// Sends `message` without waiting for a reply (`leave`).
    pub fn tell(&self, message: ClientMessage) {
        let (reply, _) = oneshot::channel();
        let _ = self.requests.try_send(Request {
            message,
            reply,
            wants: |_| false,
        });
    }

    /// The session has ended (its media failed or timed out, or it left).
    pub fn is_closed(&self) -> bool {
        self.requests.is_closed()
    }

    /// Waits until the session has ended.
    pub async fn closed(&self) {
        self.requests.closed().await;
    }
}

/// One HTTP client's session as its resource URL names it.
#[derive(Debug)]
pub struct Resource {
    pub session: HttpSession,
    pub room: String,
    pub participant_id: String,
    /// The client's last offer and the entity tag of the ICE session it started: a PATCH
    /// with another `If-Match` is refused, an ICE restart makes a new one.
    pub ice: Mutex<IceSession>,
    _gauge: GaugeGuard,
}

#[derive(Debug, Clone)]
pub struct IceSession {
    pub offer: String,
    pub etag: String,
}

impl Resource {
    pub fn new(
        session: HttpSession,
        room: String,
        participant_id: String,
        offer: String,
        gauge: GaugeGuard,
    ) -> Self {
        Resource {
            session,
            room,
            participant_id,
            ice: Mutex::new(IceSession {
                offer,
                etag: new_id(),
            }),
            _gauge: gauge,
        }
    }

    pub fn ice(&self) -> MutexGuard<'_, IceSession> {
        self.ice.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The HTTP clients' sessions by resource id. An entry goes when its session ends, whatever
/// ended it.
#[derive(Debug, Default)]
pub struct Resources {
    map: Mutex<HashMap<String, Arc<Resource>>>,
}

impl Resources {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Resource>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `resource` under a new id until its session ends; returns the id.
    pub fn insert(self: &Arc<Self>, resource: Resource) -> String {
        let id = new_id();
        let resource = Arc::new(resource);
        self.lock().insert(id.clone(), resource.clone());
        let resources = Arc::clone(self);
        let key = id.clone();
        tokio::spawn(async move {
            resource.session.closed().await;
            resources.lock().remove(&key);
        });
        id
    }

    /// The resource `id` of `room`, while its session lives.
    pub fn get(&self, room: &str, id: &str) -> Option<Arc<Resource>> {
        self.lock()
            .get(id)
            .filter(|r| r.room == room && !r.session.is_closed())
            .cloned()
    }

    pub fn remove(&self, id: &str) -> Option<Arc<Resource>> {
        self.lock().remove(id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// 128 random bits, hex: resource ids and entity tags, not guessable.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
