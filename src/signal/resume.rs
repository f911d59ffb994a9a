//! Sessions waiting for their client to come back. A joined participant (protocol 3) holds a
//! resume token; when its socket drops, its session task keeps running without one (media keeps
//! flowing, room events keep being applied) for the grace period. A client that presents the
//! token in `resume` on a new socket hands that socket to the waiting session, which goes on
//! with it. Tokens rotate at every resume, and are forgotten when their session ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::socket::SignalSocket;
use crate::types::random_token;

/// Characters of a resume token (62 symbols: about 238 bits).
const TOKEN_CHARS: usize = 40;

/// Tokens of the sessions that can be resumed, to the channel their new socket goes through.
#[derive(Debug, Default)]
pub struct Resumables {
    sessions: Mutex<HashMap<String, mpsc::Sender<Box<SignalSocket>>>>,
}

impl Resumables {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, mpsc::Sender<Box<SignalSocket>>>> {
        // Every update is one insert or remove: the map is consistent even after a panic.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new token for a session, and the channel its new sockets arrive on.
    pub fn register(self: &Arc<Self>) -> Resumable {
        let (tx, sockets) = mpsc::channel(1);
        let token = random_token(TOKEN_CHARS);
        self.lock().insert(token.clone(), tx);
        Resumable {
            resumables: self.clone(),
            token,
            sockets,
        }
    }

    /// Hands `socket` to the session `token` belongs to, or gives it back if none waits.
    pub fn hand_over(
        &self,
        token: &str,
        socket: Box<SignalSocket>,
    ) -> Result<(), Box<SignalSocket>> {
        let Some(tx) = self.lock().get(token).cloned() else {
            return Err(socket);
        };
        tx.try_send(socket).map_err(|e| match e {
            mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
        })
    }
}

/// A session's resume token and the sockets handed to it. Dropping it forgets the token.
#[derive(Debug)]
pub struct Resumable {
    resumables: Arc<Resumables>,
    token: String,
    pub sockets: mpsc::Receiver<Box<SignalSocket>>,
}

impl Resumable {
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Replaces the token (after a resume: each token works once).
    pub fn rotate(&mut self) {
        let mut sessions = self.resumables.lock();
        let Some(tx) = sessions.remove(&self.token) else {
            return;
        };
        self.token = random_token(TOKEN_CHARS);
        sessions.insert(self.token.clone(), tx);
    }
}

impl Drop for Resumable {
    fn drop(&mut self) {
        self.resumables.lock().remove(&self.token);
    }
}
