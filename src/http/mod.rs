//! HTTP: the browser client (embedded into the binary), the signaling WebSocket, health,
//! metrics and the admin API (`admin.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use include_dir::{Dir, include_dir};

mod admin;
mod whip;

use crate::metrics::Metrics;
use crate::signal::connections::Refused;
use crate::signal::{ServerContext, run_session};
use crate::types::RoomName;

static WEB: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/web");

pub fn router(ctx: Arc<ServerContext>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/room/{name}", get(room_page))
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(
            "/api/rooms",
            get(admin::list_rooms).post(admin::create_room),
        )
        .route(
            "/api/rooms/{name}",
            get(admin::get_room).delete(admin::close_room),
        )
        .route(
            "/api/rooms/{name}/participants/{id}",
            delete(admin::remove_participant),
        )
        .route("/api/rooms/{name}/data", post(admin::send_data))
        .route("/api/cluster/nodes", get(admin::list_nodes))
        .route(
            "/api/rooms/{name}/tracks/{track_id}/mute",
            post(admin::mute_track),
        )
        .route("/whip/{room}", post(whip::publish).options(whip::preflight))
        .route(
            "/whip/{room}/{id}",
            patch(whip::patch)
                .delete(whip::delete)
                .options(whip::preflight),
        )
        .route("/whep/{room}", post(whip::play).options(whip::preflight))
        // One participant's tracks (POST), or a resource (PATCH, DELETE).
        .route(
            "/whep/{room}/{id}",
            post(whip::play_participant)
                .patch(whip::patch)
                .delete(whip::delete)
                .options(whip::preflight),
        )
        .route("/{*path}", get(static_file))
        .with_state(ctx)
}

/// Bytes read from a signaling socket at a time (messages may be larger; they are assembled).
const SOCKET_BUFFER: usize = 8 * 1024;

async fn websocket(
    State(ctx): State<Arc<ServerContext>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let limits = &ctx.limits;
    // Browsers always send Origin on a WebSocket upgrade; a page from another site must not
    // open sockets with its visitors' cookies and network position. Clients that are not
    // browsers send none (and could send any): they are not what this guards against.
    if let Some(origin) = headers.get(header::ORIGIN)
        && !limits.allowed_origins.is_empty()
    {
        let origin = origin.to_str().unwrap_or("");
        if !limits
            .allowed_origins
            .iter()
            .any(|allowed| allowed == origin)
        {
            ctx.metrics.connections_refused_origin.inc();
            tracing::info!(%peer, origin, "signaling socket refused: origin not allowed");
            return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
        }
    }
    let guard = match ctx.connections.admit(
        peer.ip(),
        limits.max_connections,
        limits.max_connections_per_ip,
    ) {
        Ok(guard) => guard,
        Err(refused) => {
            ctx.metrics.connections_refused.inc();
            tracing::info!(%peer, "signaling socket refused: {refused}");
            let status = match refused {
                Refused::Total(_) => StatusCode::SERVICE_UNAVAILABLE,
                Refused::PerIp(_) => StatusCode::TOO_MANY_REQUESTS,
            };
            return (status, format!("{refused}\n")).into_response();
        }
    };
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
        .on_upgrade(move |socket| async move {
            run_session(socket, ctx).await;
            drop(guard);
        })
}

/// `ok`, or 503 while the server drains (a load balancer sends new clients elsewhere).
async fn healthz(State(ctx): State<Arc<ServerContext>>) -> Response {
    if ctx.draining.borrow().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ok\n".into_response()
    }
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
