//! The admin API: JSON over HTTP under `/api/rooms`, for the application's backend and for
//! operators. Every call carries `Authorization: Bearer <token>`, a token with `room_admin`:
//! one for room `*` manages every room, one for a room manages that room only. In development
//! mode (no API keys) the API is open, as joins are.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::room::Room;
use crate::signal::ServerContext;
use crate::signal::protocol::{ChatRelay, RoomMode};
use crate::types::{ParticipantId, RoomName, TrackId};

/// The rooms a caller may manage.
enum Scope {
    All,
    Room(String),
}

impl Scope {
    fn covers(&self, room: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Room(r) => r == room,
        }
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Why a call is not authorized (kept small: it travels in a `Result`).
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        refuse(self.0, &self.1)
    }
}

/// Who the caller may manage, from its bearer token.
fn authorize(ctx: &ServerContext, headers: &HeaderMap) -> Result<Scope, Refusal> {
    if ctx.keys.is_dev_mode() {
        return Ok(Scope::All);
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Refusal(
                StatusCode::UNAUTHORIZED,
                "an admin token is required (Authorization: Bearer ...)".into(),
            )
        })?;
    let claims = ctx.keys.verify(token.trim()).map_err(|e| {
        ctx.metrics.admin_unauthorized.inc();
        Refusal(StatusCode::UNAUTHORIZED, e.to_string())
    })?;
    if !claims.room_admin {
        ctx.metrics.admin_unauthorized.inc();
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "the token has no room_admin right".into(),
        ));
    }
    Ok(if claims.room == "*" {
        Scope::All
    } else {
        Scope::Room(claims.room)
    })
}

/// `authorize`, and the room within the caller's scope.
fn authorize_room(ctx: &ServerContext, headers: &HeaderMap, room: &str) -> Result<(), Refusal> {
    if authorize(ctx, headers)?.covers(room) {
        Ok(())
    } else {
        ctx.metrics.admin_unauthorized.inc();
        Err(Refusal(
            StatusCode::FORBIDDEN,
            "the token does not cover this room".into(),
        ))
    }
}

/// `authorize_room`, and the open room of that name.
fn managed_room(
    ctx: &ServerContext,
    headers: &HeaderMap,
    name: &str,
) -> Result<Arc<Room>, Refusal> {
    authorize_room(ctx, headers, name)?;
    ctx.registry
        .room(name)
        .ok_or_else(|| Refusal(StatusCode::NOT_FOUND, "no such room".into()))
}

/// `managed_room`, for a call that needs the server in the media path: a mesh room is a
/// conflict (`why`).
fn managed_sfu_room(
    ctx: &ServerContext,
    headers: &HeaderMap,
    name: &str,
    why: &str,
) -> Result<Arc<Room>, Refusal> {
    let room = managed_room(ctx, headers, name)?;
    if room.mode() == RoomMode::Mesh {
        return Err(Refusal(StatusCode::CONFLICT, why.into()));
    }
    Ok(room)
}

/// `GET /api/rooms`: the rooms the caller may manage.
pub async fn list_rooms(State(ctx): State<Arc<ServerContext>>, headers: HeaderMap) -> Response {
    let scope = match authorize(&ctx, &headers) {
        Ok(scope) => scope,
        Err(refused) => return refused.into_response(),
    };
    let rooms: Vec<_> = ctx
        .registry
        .snapshots()
        .into_iter()
        .filter(|r| scope.covers(&r.name))
        .collect();
    Json(rooms).into_response()
}

/// `GET /api/cluster/nodes`: the live nodes of the cluster as their heartbeats describe them
/// (an admin of every room only; 404 without `--redis-url`).
pub async fn list_nodes(State(ctx): State<Arc<ServerContext>>, headers: HeaderMap) -> Response {
    match authorize(&ctx, &headers) {
        Ok(Scope::All) => {}
        Ok(Scope::Room(_)) => {
            ctx.metrics.admin_unauthorized.inc();
            return refuse(
                StatusCode::FORBIDDEN,
                "the token must cover every room (`*`)",
            );
        }
        Err(refused) => return refused.into_response(),
    }
    let Some(cluster) = &ctx.cluster else {
        return refuse(StatusCode::NOT_FOUND, "this server is not in a cluster");
    };
    match cluster.nodes().await {
        Ok(nodes) => Json(nodes).into_response(),
        Err(e) => {
            ctx.metrics.cluster_redis_errors.inc();
            tracing::warn!("listing the cluster's nodes: Redis: {e}");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "Redis did not answer")
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct CreateRoom {
    name: String,
    #[serde(default)]
    mode: RoomMode,
}

/// `POST /api/rooms` `{"name", "mode"}`: opens a room ahead of its participants (or finds it).
pub async fn create_room(
    State(ctx): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Json(body): Json<CreateRoom>,
) -> Response {
    if let Err(refused) = authorize_room(&ctx, &headers, &body.name) {
        return refused.into_response();
    }
    let Some(name) = RoomName::parse(&body.name) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "room names are 1-64 characters of A-Z a-z 0-9 _ . -",
        );
    };
    match ctx.registry.open(&name, body.mode) {
        Ok(room) => (StatusCode::CREATED, Json(room.snapshot())).into_response(),
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `GET /api/rooms/{name}`.
pub async fn get_room(
    State(ctx): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    match managed_room(&ctx, &headers, &name) {
        Ok(room) => Json(room.snapshot()).into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// `DELETE /api/rooms/{name}`: removes everyone; the room closes as the last one leaves.
pub async fn close_room(
    State(ctx): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let room = match managed_room(&ctx, &headers, &name) {
        Ok(room) => room,
        Err(refused) => return refused.into_response(),
    };
    let removed = room.remove_all("the room was closed by an administrator");
    ctx.registry.close_if_empty(&room);
    tracing::info!(room = %name, removed, "room closed by an administrator");
    Json(json!({ "removed": removed })).into_response()
}

/// `DELETE /api/rooms/{name}/participants/{id}`.
pub async fn remove_participant(
    State(ctx): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    if let Err(refused) = authorize_room(&ctx, &headers, &name) {
        return refused.into_response();
    }
    let removed = ctx.registry.room(&name).is_some_and(|room| {
        room.remove(
            &ParticipantId::from(id.as_str()),
            "an administrator removed you from the room",
        )
    });
    if removed {
        tracing::info!(room = %name, participant = %id, "participant removed by an administrator");
        StatusCode::NO_CONTENT.into_response()
    } else {
        refuse(StatusCode::NOT_FOUND, "no such participant in this room")
    }
}

#[derive(Debug, Deserialize)]
pub struct Mute {
    #[serde(default = "yes")]
    muted: bool,
}

fn yes() -> bool {
    true
}

/// `POST /api/rooms/{name}/tracks/{track_id}/mute` `{"muted": true|false}`: stops (or
/// resumes) forwarding a published track to everyone. The publisher's client is told
/// (`muted`); the others see its mute state change. It holds until an administrator unmutes
/// it, whatever the publisher's client does.
pub async fn mute_track(
    State(ctx): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Path((name, track_id)): Path<(String, String)>,
    Json(body): Json<Mute>,
) -> Response {
    let why = "mesh rooms carry media peer to peer; the server cannot mute it";
    let room = match managed_sfu_room(&ctx, &headers, &name, why) {
        Ok(room) => room,
        Err(refused) => return refused.into_response(),
    };
    let track = TrackId::from(track_id.as_str());
    let Some(publication) = room.mute_by_admin(&track, body.muted) else {
        return refuse(StatusCode::NOT_FOUND, "no such track in this room");
    };
    if ctx
        .media
        .set_track_muted(&publication.route, body.muted)
        .is_err()
    {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the media plane is stopping",
        );
    }
    tracing::info!(room = %name, track = %track_id, muted = body.muted, "track muted by an administrator");
    Json(json!({ "track": publication.info, "muted": body.muted })).into_response()
}

#[derive(Debug, Deserialize)]
pub struct DataMessage {
    text: String,
}

/// `POST /api/rooms/{name}/data` `{"text"}`: a chat line from the server to everyone in an SFU
/// room (on their `chat` data channels, from `server`).
pub async fn send_data(
    State(ctx): State<Arc<ServerContext>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<DataMessage>,
) -> Response {
    let why = "mesh rooms chat peer to peer; the server has no data channel into them";
    let room = match managed_sfu_room(&ctx, &headers, &name, why) {
        Ok(room) => room,
        Err(refused) => return refused.into_response(),
    };
    if body.text.len() > ctx.limits.max_chat_bytes {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "longer than --max-chat-bytes",
        );
    }
    let relay = ChatRelay {
        from: "server".into(),
        name: "Server".into(),
        text: body.text,
    };
    let Ok(line) = serde_json::to_string(&relay) else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the message",
        );
    };
    let members = room.snapshot().participants.len();
    let dropped = room.chat(&ParticipantId::from("server"), line.into());
    ctx.metrics.chat_messages.inc();
    Json(json!({ "delivered": members.saturating_sub(dropped), "dropped": dropped }))
        .into_response()
}
