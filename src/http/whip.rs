//! WHIP (RFC 9725) and WHEP: a broadcaster (OBS, GStreamer, a hardware encoder, a web page)
//! publishes into a room, and a player plays one, each with one HTTP request.
//!
//! - `POST /whip/{room}[?name=N]`, an SDP offer (`application/sdp`), with `Authorization:
//!   Bearer <token>` when the server has API keys: the publisher joins the room as a
//!   participant that may only publish (whatever its token grants), and gets `201 Created`
//!   with the SDP answer, `Location` (its resource), `ETag` (its ICE session) and the ICE
//!   servers as `Link` headers.
//! - `PATCH` on the resource, `application/trickle-ice-sdpfrag`: trickled candidates (`204`),
//!   or new ICE credentials, an ICE restart (`200` with the server's new credentials and
//!   candidates, and a new `ETag`). An `If-Match` that names another ICE session gets `412`.
//! - `DELETE` on the resource: the publisher leaves.
//! - CORS on all of it, so a web page on another origin can publish.
//!
//! WHEP (playback) is the same exchange on `/whep/{room}` with a `recvonly` offer: the player
//! may only receive, and gets the room's tracks in the m-lines it offered
//! (`media::Subscribing::IntoClientOffer`), since it cannot take an offer from the server.
//!
//! The participant behind a resource is a session like any other (`signal::http_session`):
//! admission, grants, timeouts and clean-up are the WebSocket protocol's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::cluster::base_url;
use crate::metrics::GaugeGuard;
use crate::signal::ServerContext;
use crate::signal::http_session::{
    HttpClient, HttpPeer, HttpSession, HttpSessionError, Resource, new_id,
};
use crate::signal::protocol::{ClientMessage, ErrorCode, IceServer, ServerMessage};
use crate::types::IceCandidate;

const SDP: &str = "application/sdp";
const SDP_FRAGMENT: &str = "application/trickle-ice-sdpfrag";

#[derive(Debug, Deserialize)]
pub struct PublishQuery {
    /// The publisher's (player's) display name (a token's name wins).
    name: Option<String>,
}

/// `POST /whip/{room}`: joins the room as a publisher and answers the offer.
pub async fn publish(
    State(ctx): State<Arc<ServerContext>>,
    Path(room): Path<String>,
    Query(query): Query<PublishQuery>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Request { uri, headers, body };
    create(ctx, room, query, request, HttpPeer::whip()).await
}

/// `POST /whep/{room}`: joins the room as a player and answers its offer; the active
/// speaker's audio and video go into the m-lines it offered.
pub async fn play(
    State(ctx): State<Arc<ServerContext>>,
    Path(room): Path<String>,
    Query(query): Query<PublishQuery>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Request { uri, headers, body };
    create(ctx, room, query, request, HttpPeer::whep(None)).await
}

/// `POST /whep/{room}/{participant}`: plays one participant's tracks (its id or name).
pub async fn play_participant(
    State(ctx): State<Arc<ServerContext>>,
    Path((room, participant)): Path<(String, String)>,
    Query(query): Query<PublishQuery>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer = HttpPeer::whep(Some(participant));
    let request = Request { uri, headers, body };
    create(ctx, room, query, request, peer).await
}

/// A resource-creating POST as it came.
struct Request {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

async fn create(
    ctx: Arc<ServerContext>,
    room: String,
    query: PublishQuery,
    request: Request,
    peer: HttpPeer,
) -> Response {
    let Request { uri, headers, body } = request;
    let (path, default_name) = match peer.client {
        HttpClient::Whip => ("whip", "WHIP"),
        HttpClient::Whep => ("whep", "WHEP"),
    };
    let cors = Cors::for_request(&ctx, &headers);
    if !cors.allowed {
        return cors.apply(problem(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    let offer = match sdp_body(&ctx, &headers, &body, SDP) {
        Ok(offer) => offer,
        Err((status, why)) => return cors.apply(problem(status, &why)),
    };
    let limit = ctx.limits.max_connections;
    if limit > 0 && ctx.http_sessions.len() >= limit {
        ctx.metrics.connections_refused.inc();
        return cors.apply(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many WHIP and WHEP sessions",
        ));
    }
    let client = peer.client;
    let session = HttpSession::spawn(ctx.clone(), peer);
    let join = ClientMessage::Join {
        room: room.clone(),
        name: query.name.unwrap_or_else(|| default_name.to_owned()),
        mode: None,
        // Protocol 2: no resume (an HTTP client has no socket to come back on).
        protocol: Some(2),
        token: bearer_token(&headers),
    };
    let participant_id = match session
        .request(join, |m| {
            matches!(
                m,
                ServerMessage::Joined { .. } | ServerMessage::Redirect { .. }
            )
        })
        .await
    {
        Ok(ServerMessage::Joined { participant_id, .. }) => participant_id,
        // The room is hosted by another node of the cluster: the client posts there
        // (RFC 9725 allows a redirect on the POST).
        Ok(ServerMessage::Redirect { url, .. }) => {
            return cors.apply(redirect(&url, &uri));
        }
        other => return cors.apply(failure(other)),
    };
    let offered = ClientMessage::Offer {
        sdp: offer.clone(),
        to: None,
    };
    let answer = match session
        .request(offered, |m| matches!(m, ServerMessage::Answer { .. }))
        .await
    {
        Ok(ServerMessage::Answer { sdp, .. }) => sdp,
        other => {
            session.tell(ClientMessage::Leave);
            return cors.apply(failure(other));
        }
    };
    let ice_servers = ctx.ice_servers.for_participant(&participant_id);
    let gauge = GaugeGuard::new(&ctx.metrics, |m| &m.http_sessions);
    let resource = Resource::new(session, room.clone(), participant_id.clone(), offer, gauge);
    let etag = resource.ice().etag.clone();
    let id = ctx.http_sessions.insert(resource);
    tracing::info!(room, participant = %participant_id, ?client, "joined over HTTP");
    let mut response = (StatusCode::CREATED, answer).into_response();
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP));
    set(out, header::LOCATION, &format!("/{path}/{room}/{id}"));
    set(out, header::ETAG, &quoted(&etag));
    out.insert(
        HeaderName::from_static("accept-patch"),
        HeaderValue::from_static(SDP_FRAGMENT),
    );
    for link in ice_server_links(&ice_servers) {
        if let Ok(value) = HeaderValue::from_str(&link) {
            out.append(header::LINK, value);
        }
    }
    cors.apply(response)
}

/// `PATCH /whip/{room}/{id}` (or `/whep/...`): trickled candidates, or an ICE restart.
pub async fn patch(
    State(ctx): State<Arc<ServerContext>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cors = Cors::for_request(&ctx, &headers);
    let Some(resource) = ctx.http_sessions.get(&room, &id) else {
        return cors.apply(problem(StatusCode::NOT_FOUND, "no such session"));
    };
    let fragment = match sdp_body(&ctx, &headers, &body, SDP_FRAGMENT) {
        Ok(text) => SdpFragment::parse(&text),
        Err((status, why)) => return cors.apply(problem(status, &why)),
    };
    let ice = resource.ice().clone();
    if let Some(tag) = headers.get(header::IF_MATCH) {
        let tag = tag.to_str().unwrap_or("");
        if tag != "*" && tag != quoted(&ice.etag) {
            return cors.apply(problem(
                StatusCode::PRECONDITION_FAILED,
                "If-Match names another ICE session",
            ));
        }
    }
    let restart = match (&fragment.ufrag, &fragment.pwd) {
        (Some(ufrag), Some(pwd)) if Some(ufrag.as_str()) != attribute(&ice.offer, "ice-ufrag") => {
            Some((ufrag.clone(), pwd.clone()))
        }
        _ => None,
    };
    let Some((ufrag, pwd)) = restart else {
        for candidate in fragment.candidates {
            resource.session.tell(ClientMessage::Candidate {
                candidate: Some(IceCandidate {
                    candidate,
                    username_fragment: fragment.ufrag.clone(),
                    ..IceCandidate::default()
                }),
                to: None,
            });
        }
        if fragment.end_of_candidates {
            resource.session.tell(ClientMessage::Candidate {
                candidate: None,
                to: None,
            });
        }
        return cors.apply(StatusCode::NO_CONTENT.into_response());
    };
    // An ICE restart: the same offer with the new credentials, answered by the session.
    let offer = with_ice_credentials(&ice.offer, &ufrag, &pwd);
    let answer = match resource
        .session
        .request(
            ClientMessage::Offer {
                sdp: offer.clone(),
                to: None,
            },
            |m| matches!(m, ServerMessage::Answer { .. }),
        )
        .await
    {
        Ok(ServerMessage::Answer { sdp, .. }) => sdp,
        other => return cors.apply(failure(other)),
    };
    let etag = {
        let mut ice = resource.ice();
        ice.offer = offer;
        ice.etag = new_id();
        ice.etag.clone()
    };
    let mut response = (StatusCode::OK, answer_fragment(&answer)).into_response();
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(SDP_FRAGMENT));
    set(out, header::ETAG, &quoted(&etag));
    cors.apply(response)
}

/// `DELETE /whip/{room}/{id}` (or `/whep/...`): the publisher (player) leaves.
pub async fn delete(
    State(ctx): State<Arc<ServerContext>>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let cors = Cors::for_request(&ctx, &headers);
    if ctx.http_sessions.get(&room, &id).is_none() {
        return cors.apply(problem(StatusCode::NOT_FOUND, "no such session"));
    }
    if let Some(resource) = ctx.http_sessions.remove(&id) {
        resource.session.tell(ClientMessage::Leave);
        tracing::info!(room, participant = %resource.participant_id, "left over HTTP");
    }
    cors.apply(StatusCode::OK.into_response())
}

/// `OPTIONS`: a browser's CORS preflight (and what the endpoint takes).
pub async fn preflight(State(ctx): State<Arc<ServerContext>>, headers: HeaderMap) -> Response {
    let cors = Cors::for_request(&ctx, &headers);
    let mut response = StatusCode::NO_CONTENT.into_response();
    let out = response.headers_mut();
    out.insert(
        HeaderName::from_static("accept-post"),
        HeaderValue::from_static(SDP),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    cors.apply(response)
}

/// The CORS answer for a request: which origin may read it (every one, unless the server has
/// an origin allow-list).
struct Cors {
    origin: Option<HeaderValue>,
    allowed: bool,
}

impl Cors {
    fn for_request(ctx: &ServerContext, headers: &HeaderMap) -> Self {
        let allow_list = &ctx.limits.allowed_origins;
        match headers.get(header::ORIGIN) {
            None => Cors {
                origin: None,
                allowed: true,
            },
            Some(_) if allow_list.is_empty() => Cors {
                origin: Some(HeaderValue::from_static("*")),
                allowed: true,
            },
            Some(origin) => {
                let allowed = allow_list.iter().any(|a| a.as_bytes() == origin.as_bytes());
                Cors {
                    origin: allowed.then(|| origin.clone()),
                    allowed,
                }
            }
        }
    }

    fn apply(&self, mut response: Response) -> Response {
        let Some(origin) = &self.origin else {
            return response;
        };
        let out = response.headers_mut();
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, PATCH, DELETE, OPTIONS"),
        );
        out.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, If-Match"),
        );
        out.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Location, ETag, Link, Accept-Patch"),
        );
        response
    }
}

/// The request's body as SDP text of `content_type`, or why it is refused.
fn sdp_body(
    ctx: &ServerContext,
    headers: &HeaderMap,
    body: &Bytes,
    content_type: &str,
) -> Result<String, (StatusCode, String)> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if !given.is_some_and(|t| t.eq_ignore_ascii_case(content_type)) {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the body must be {content_type}"),
        ));
    }
    if body.len() > ctx.limits.max_message_bytes {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "body too large".into()));
    }
    match std::str::from_utf8(body) {
        Ok(text) if !text.trim().is_empty() => Ok(text.to_owned()),
        _ => Err((StatusCode::BAD_REQUEST, "the body is not SDP text".into())),
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// The response for a request the session refused (its error) or could not answer.
fn failure(outcome: Result<ServerMessage, HttpSessionError>) -> Response {
    match outcome {
        Ok(ServerMessage::Error { code, message }) => {
            let status = match code {
                ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
                ErrorCode::NotAllowed => StatusCode::FORBIDDEN,
                ErrorCode::WrongMode => StatusCode::CONFLICT,
                ErrorCode::UnknownParticipant => StatusCode::NOT_FOUND,
                ErrorCode::RoomFull | ErrorCode::ServerFull | ErrorCode::ServerDraining => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                ErrorCode::Internal
                | ErrorCode::ConnectionFailed
                | ErrorCode::NegotiationTimeout => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            let mut response = problem(status, &message);
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
        Ok(other) => {
            tracing::warn!(?other, "WHIP session replied out of turn");
            problem(StatusCode::INTERNAL_SERVER_ERROR, "unexpected reply")
        }
        Err(HttpSessionError::Busy) => problem(StatusCode::CONFLICT, "another request is running"),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `307 Temporary Redirect` to the same request on the node at `signaling_url` (its `/ws`).
fn redirect(signaling_url: &str, uri: &Uri) -> Response {
    let target = format!("{}{}", base_url(signaling_url), uri);
    match HeaderValue::from_str(&target) {
        Ok(location) => {
            let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        Err(_) => problem(StatusCode::INTERNAL_SERVER_ERROR, "bad redirect target"),
    }
}

fn problem(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

fn quoted(tag: &str) -> String {
    format!("\"{tag}\"")
}

/// `Link` header values for the ICE servers (RFC 9725 §4.6).
fn ice_server_links(servers: &[IceServer]) -> Vec<String> {
    let mut links = Vec::new();
    for server in servers {
        for url in &server.urls {
            let mut link = format!("<{url}>; rel=\"ice-server\"");
            if let (Some(user), Some(credential)) = (&server.username, &server.credential) {
                link.push_str(&format!(
                    "; username=\"{user}\"; credential=\"{credential}\"; credential-type=\"password\""
                ));
            }
            links.push(link);
        }
    }
    links
}

/// What a trickle-ICE SDP fragment (RFC 8840) carries.
#[derive(Debug, Default, PartialEq)]
struct SdpFragment {
    ufrag: Option<String>,
    pwd: Option<String>,
    /// Candidates as `candidate:...` (the `a=` dropped).
    candidates: Vec<String>,
    end_of_candidates: bool,
}

impl SdpFragment {
    fn parse(text: &str) -> Self {
        let mut fragment = SdpFragment::default();
        for line in text.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
                fragment.ufrag = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
                fragment.pwd = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("a=candidate:") {
                fragment.candidates.push(format!("candidate:{}", v.trim()));
            } else if line == "a=end-of-candidates" {
                fragment.end_of_candidates = true;
            }
        }
        fragment
    }
}

/// The first value of `a=<name>:` in `sdp`.
fn attribute<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("a={name}:");
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(str::trim)
}

/// `sdp` with every `a=ice-ufrag` and `a=ice-pwd` line replaced.
fn with_ice_credentials(sdp: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}\r\n"));
        } else if trimmed.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}\r\n"));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The ICE part of an answer, as the fragment a restart's PATCH is answered with.
fn answer_fragment(answer: &str) -> String {
    let mut out = String::new();
    for key in ["ice-ufrag", "ice-pwd"] {
        if let Some(v) = attribute(answer, key) {
            out.push_str(&format!("a={key}:{v}\r\n"));
        }
    }
    // Candidates belong to an m-line: the first (all are bundled).
    let m_line = answer.lines().map(str::trim).find(|l| l.starts_with("m="));
    if let (Some(m_line), Some(mid)) = (m_line, attribute(answer, "mid")) {
        out.push_str(&format!("{m_line}\r\na=mid:{mid}\r\n"));
    }
    for line in answer.lines().map(str::trim) {
        if line.starts_with("a=candidate:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("a=end-of-candidates\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_fragments_are_read() {
        let text = "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
                    m=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
                    a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n\
                    a=end-of-candidates\r\n";
        assert_eq!(
            SdpFragment::parse(text),
            SdpFragment {
                ufrag: Some("EsAw".into()),
                pwd: Some("P2uYro0UCOQ4zxjKXaWCBui1".into()),
                candidates: vec![
                    "candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0"
                        .into()
                ],
                end_of_candidates: true,
            }
        );
        assert_eq!(SdpFragment::parse("garbage\n"), SdpFragment::default());
    }

    #[test]
    fn ice_credentials_are_replaced_everywhere() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=ice-ufrag:old\r\na=ice-pwd:oldpwd\r\n";
        let new = with_ice_credentials(sdp, "new", "newpwd");
        assert!(!new.contains("old"), "{new}");
        assert_eq!(new.matches("a=ice-ufrag:new\r\n").count(), 2);
        assert_eq!(attribute(&new, "ice-pwd"), Some("newpwd"));
    }

    #[test]
    fn ice_servers_become_link_headers() {
        let servers = [IceServer {
            urls: vec!["turn:192.0.2.1:3478?transport=udp".into()],
            username: Some("1700000000:p1".into()),
            credential: Some("c2VjcmV0".into()),
        }];
        assert_eq!(
            ice_server_links(&servers),
            vec![
                "<turn:192.0.2.1:3478?transport=udp>; rel=\"ice-server\"; username=\"1700000000:p1\"; \
                 credential=\"c2VjcmV0\"; credential-type=\"password\""
            ]
        );
    }
}
