//! The media plane's door to the other nodes of a cluster (cascading rooms): one slot beside
//! the workers that no worker thread runs. To the workers it is one more worker: a worker
//! whose local track has subscribers on other nodes relays that track's packets to it, and a
//! worker whose subscribers take a track published on another node attaches to it as to the
//! publisher's worker. The node link (`crate::cascade`) drives the slot: it takes what the
//! workers send it ([`GatewayEvent`]) to the other nodes, and hands what they send to the
//! workers here.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::worker::{Command, RelayBatch, WorkerShared};
use crate::forward::{LayerView, MediaPacket, TrackKey};

/// What the workers ask of the other nodes, or hand them.
#[derive(Debug)]
pub enum GatewayEvent {
    /// `worker` has subscribers of this track now (a track published elsewhere, under its key
    /// here), or no longer.
    Attach {
        key: TrackKey,
        worker: usize,
    },
    Detach {
        key: TrackKey,
        worker: usize,
    },
    /// Subscribers on `worker` wait for keyframes of these layers (bit i: layer i).
    KeyframeRequest {
        key: TrackKey,
        worker: usize,
        layers: u32,
    },
    /// The layers subscribers on `worker` receive.
    Wants {
        key: TrackKey,
        worker: usize,
        layers: u32,
    },
    /// A local track's layers as its publisher sends them, for the nodes it is relayed to.
    LayerViews {
        key: TrackKey,
        views: Arc<[LayerView]>,
    },
    /// Packets of local tracks, for the nodes they are relayed to.
    Packets(Vec<(TrackKey, MediaPacket)>),
}

#[derive(Debug)]
pub struct Gateway {
    index: usize,
    workers: Arc<[WorkerShared]>,
    commands: mpsc::UnboundedReceiver<Command>,
    relay: mpsc::Receiver<RelayBatch>,
}

impl Gateway {
    pub(super) fn new(
        index: usize,
        workers: Arc<[WorkerShared]>,
        commands: mpsc::UnboundedReceiver<Command>,
        relay: mpsc::Receiver<RelayBatch>,
    ) -> Self {
        Gateway {
            index,
            workers,
            commands,
            relay,
        }
    }

    /// The slot's index: relayed tracks' routes name it as their worker.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The next thing the workers ask; None once the media plane is shut down.
    pub async fn next(&mut self) -> Option<GatewayEvent> {
        loop {
            let command = tokio::select! {
                command = self.commands.recv() => command?,
                batch = self.relay.recv() => return batch.map(GatewayEvent::Packets),
            };
            let event = match command {
                Command::AttachRelay { key, worker } => GatewayEvent::Attach { key, worker },
                Command::DetachRelay { key, worker } => GatewayEvent::Detach { key, worker },
                Command::KeyframeRequest {
                    key,
                    worker,
                    layers,
                } => GatewayEvent::KeyframeRequest {
                    key,
                    worker,
                    layers,
                },
                Command::RelayWants {
                    key,
                    worker,
                    layers,
                } => GatewayEvent::Wants {
                    key,
                    worker,
                    layers,
                },
                Command::LayerViews { key, views } => GatewayEvent::LayerViews { key, views },
                Command::Shutdown => return None,
                // Meant for a worker with connections (an admin mute of a relayed track): the
                // publisher's own node acts on it.
                _ => continue,
            };
            return Some(event);
        }
    }

    fn command(&self, worker: usize, command: Command) {
        if worker == self.index {
            return;
        }
        if let Some(w) = self.workers.get(worker) {
            let _ = w.commands.send(command);
        }
    }

    /// Another node has subscribers of a local track published on `worker` (or no longer).
    pub fn attach(&self, worker: usize, key: TrackKey) {
        let gateway = self.index;
        self.command(
            worker,
            Command::AttachRelay {
                key,
                worker: gateway,
            },
        );
    }

    pub fn detach(&self, worker: usize, key: TrackKey) {
        let gateway = self.index;
        self.command(
            worker,
            Command::DetachRelay {
                key,
                worker: gateway,
            },
        );
    }

    /// Subscribers on other nodes wait for keyframes of these layers of a local track.
    pub fn request_keyframe(&self, worker: usize, key: TrackKey, layers: u32) {
        let gateway = self.index;
        self.command(
            worker,
            Command::KeyframeRequest {
                key,
                worker: gateway,
                layers,
            },
        );
    }

    /// The layers the other nodes' subscribers of a local track receive.
    pub fn want(&self, worker: usize, key: TrackKey, layers: u32) {
        let gateway = self.index;
        self.command(
            worker,
            Command::RelayWants {
                key,
                worker: gateway,
                layers,
            },
        );
    }

    /// A relayed track's layers as its publisher sends them, for the copy on `worker`.
    pub fn layer_views(&self, worker: usize, key: TrackKey, views: Arc<[LayerView]>) {
        self.command(worker, Command::LayerViews { key, views });
    }

    /// Hands relayed packets to `worker`; false (and dropped) if its queue is full.
    pub fn deliver(&self, worker: usize, batch: Vec<(TrackKey, MediaPacket)>) -> bool {
        match self.workers.get(worker) {
            Some(w) if worker != self.index => w.relay.try_send(batch).is_ok(),
            _ => false,
        }
    }
}
