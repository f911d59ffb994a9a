//! HTTP: the browser client (embedded into the binary), the signaling WebSocket, health,
//! metrics and a read-only admin API.

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use include_dir::{Dir, include_dir};

use crate::metrics::Metrics;
use crate::signal::{ServerContext, run_session};
use crate::types::RoomName;

static WEB: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/web");

pub fn router(ctx: Arc<ServerContext>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/room/{name}", get(room_page))
        .route("/ws", get(websocket))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/rooms", get(rooms))
        .route("/api/rooms/{name}", get(room))
        .route("/{*path}", get(static_file))
        .with_state(ctx)
}

/// Bytes read from a signaling socket at a time (messages may be larger; they are assembled).
const SOCKET_BUFFER: usize = 8 * 1024;

async fn websocket(State(ctx): State<Arc<ServerContext>>, upgrade: WebSocketUpgrade) -> Response {
    // The library's own cap sits above ours so that an oversized message reaches the session,
    // which closes with 1009 and logs it; anything bigger still is cut off by the library.
    let cap = ctx.limits.max_message_bytes.saturating_mul(2).max(1024);
    // Signaling is a few small messages a minute: the library's 128 KiB read and write buffers
    // per socket would be most of an idle participant's memory.
    upgrade
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(0)
        .max_message_size(cap)
        .max_frame_size(cap)
        .on_failed_upgrade(|e| tracing::info!("websocket upgrade failed: {e}"))
        .on_upgrade(move |socket| run_session(socket, ctx))
}

async fn index() -> Response {
    static_file(Path("index.html".to_string())).await
}

async fn room_page(Path(name): Path<String>) -> Response {
    if RoomName::parse(&name).is_none() {
        return (
            StatusCode::NOT_FOUND,
            "room names are 1-64 characters of A-Z a-z 0-9 _ . -\n",
        )
            .into_response();
    }
    static_file(Path("index.html".to_string())).await
}

async fn static_file(Path(path): Path<String>) -> Response {
    let Some(file) = WEB.get_file(&path) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    let mime = match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        file.contents(),
    )
        .into_response()
}

async fn metrics(State(ctx): State<Arc<ServerContext>>) -> Response {
    (
        [(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)],
        ctx.metrics.render(),
    )
        .into_response()
}

async fn rooms(State(ctx): State<Arc<ServerContext>>) -> Response {
    Json(ctx.registry.snapshots()).into_response()
}

async fn room(State(ctx): State<Arc<ServerContext>>, Path(name): Path<String>) -> Response {
    match ctx.registry.room_snapshot(&name) {
        Some(snapshot) => Json(snapshot).into_response(),
        None => (StatusCode::NOT_FOUND, "no such room\n").into_response(),
    }
}
