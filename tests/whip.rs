//! WHIP and WHEP over plain HTTP: the protocol's edge cases (content types, bad SDP, unknown resources,
//! a second DELETE, a PATCH naming another ICE session, an ICE restart, CORS), tokens, and a
//! publisher whose media never connects. The offer is a real one, taken from Chromium
//! (`tests/fixtures/chromium-whip-offer.sdp`); media with a real peer is in the Chromium test
//! `a_whip_publisher_is_decoded_in_chromium`.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use switchboard::auth::{Claims, Keys};
use switchboard::server::ServerHandle;

const OFFER: &str = include_str!("fixtures/chromium-whip-offer.sdp");
const KEY: &str = "k1:an-api-secret-of-32-characters-at-least";

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

fn url(server: &ServerHandle, path: &str) -> String {
    format!("http://{}{path}", server.http_addr)
}

async fn post_offer(
    server: &ServerHandle,
    room: &str,
    content_type: &str,
    body: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let mut request = http()
        .post(url(server, &format!("/whip/{room}?name=Encoder")))
        .header(header::CONTENT_TYPE, content_type)
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("POST")
}

async fn delete(url: &str) -> StatusCode {
    http().delete(url).send().await.expect("DELETE").status()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn fragment(ufrag: &str, pwd: &str, candidate: &str) -> String {
    format!(
        "a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n\
         a={candidate}\r\na=end-of-candidates\r\n"
    )
}

fn attribute<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("a={name}:");
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
}

/// A PATCH with new ICE credentials answered as an ICE restart: 200, an ETag other than
/// `etag`, and the server's new ufrag (not the one in `answer`). Returns the answer fragment.
async fn assert_ice_restarted(restarted: reqwest::Response, etag: &str, answer: &str) -> String {
    assert_eq!(restarted.status(), StatusCode::OK);
    let new_etag = header(restarted.headers(), "etag").to_owned();
    assert!(
        !new_etag.is_empty() && new_etag != etag,
        "{new_etag} after {etag}"
    );
    let answer_fragment = restarted.text().await.expect("fragment");
    let server_ufrag = attribute(&answer_fragment, "ice-ufrag").expect("server ufrag");
    assert_ne!(
        Some(server_ufrag),
        attribute(answer, "ice-ufrag"),
        "{answer_fragment}"
    );
    answer_fragment
}

#[tokio::test]
async fn whip_answers_patches_and_deletes_by_the_rfc() {
    let server = start_server_with(|_| {}).await;
    let room = "broadcast";

    // Refusals that never start a session.
    let wrong_type = post_offer(&server, room, "text/plain", OFFER, None).await;
    assert_eq!(wrong_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let bad_sdp = post_offer(&server, room, "application/sdp", "v=0\r\nnot sdp", None).await;
    assert_eq!(bad_sdp.status(), StatusCode::BAD_REQUEST);
    assert_all_clean(&server, room).await;

    // A publisher: 201 with the answer, its resource, its ICE session, and PATCH announced.
    let created = post_offer(&server, room, "application/sdp; charset=utf-8", OFFER, None).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let headers = created.headers().clone();
    assert_eq!(header(&headers, "content-type"), "application/sdp");
    assert_eq!(
        header(&headers, "accept-patch"),
        "application/trickle-ice-sdpfrag"
    );
    let location = header(&headers, "location").to_owned();
    assert!(location.starts_with("/whip/broadcast/"), "{location}");
    let etag = header(&headers, "etag").to_owned();
    assert!(etag.starts_with('"') && etag.len() > 2, "{etag}");
    let answer = created.text().await.expect("answer");
    assert!(answer.starts_with("v=0"), "{answer}");
    assert!(
        answer.contains("a=candidate:"),
        "the server's candidates are in the answer"
    );
    let snapshot = server.registry.room_snapshot(room).expect("the room");
    assert_eq!(snapshot.participants.len(), 1);
    assert_eq!(snapshot.participants[0].name, "Encoder");
    assert_eq!(server.metrics.snapshot().http_sessions, 1);

    // PATCH: the wrong type, another ICE session, then trickled candidates.
    let resource = url(&server, &location);
    let candidate = "candidate:1 1 udp 2122260223 127.0.0.1 9 typ host";
    let ufrag = attribute(OFFER, "ice-ufrag").expect("ufrag");
    let pwd = attribute(OFFER, "ice-pwd").expect("pwd");
    let patch = |content_type: &str, if_match: &str, body: String| {
        http()
            .patch(&resource)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::IF_MATCH, if_match)
            .body(body)
            .send()
    };
    let wrong_type = patch("application/sdp", &etag, fragment(ufrag, pwd, candidate))
        .await
        .expect("PATCH");
    assert_eq!(wrong_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let other_session = patch(
        "application/trickle-ice-sdpfrag",
        "\"another\"",
        fragment(ufrag, pwd, candidate),
    )
    .await
    .expect("PATCH");
    assert_eq!(other_session.status(), StatusCode::PRECONDITION_FAILED);
    let trickled = patch(
        "application/trickle-ice-sdpfrag",
        &etag,
        fragment(ufrag, pwd, candidate),
    )
    .await
    .expect("PATCH");
    assert_eq!(trickled.status(), StatusCode::NO_CONTENT);

    // New credentials: an ICE restart, answered with the server's new ones and a new ETag.
    let restarted = patch(
        "application/trickle-ice-sdpfrag",
        "*",
        fragment("newufrag", "a-new-ice-password-of-24ch", candidate),
    )
    .await
    .expect("PATCH");
    let answer_fragment = assert_ice_restarted(restarted, &etag, &answer).await;
    assert!(
        answer_fragment.contains("a=candidate:"),
        "{answer_fragment}"
    );
    let stale = patch(
        "application/trickle-ice-sdpfrag",
        &etag,
        fragment("newufrag", "a-new-ice-password-of-24ch", candidate),
    )
    .await
    .expect("PATCH");
    assert_eq!(
        stale.status(),
        StatusCode::PRECONDITION_FAILED,
        "the old ETag is stale"
    );

    // Unknown resources, in this room or named under another.
    let unknown = url(&server, "/whip/broadcast/0123456789abcdef");
    let status = delete(&unknown).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let elsewhere = resource.replace("/broadcast/", "/other/");
    let status = delete(&elsewhere).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // DELETE: gone from the room; a second DELETE and a PATCH find nothing.
    let status = delete(&resource).await;
    assert_eq!(status, StatusCode::OK);
    let status = delete(&resource).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let status = patch(
        "application/trickle-ice-sdpfrag",
        "*",
        fragment(ufrag, pwd, candidate),
    )
    .await
    .expect("PATCH")
    .status();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_all_clean(&server, room).await;
    eventually("the WHIP gauge back to zero", CLEANUP, || async {
        server.metrics.snapshot().http_sessions == 0
    })
    .await
    .expect("gauge");
}

/// A page on another origin may publish: the preflight and the responses carry CORS headers.
#[tokio::test]
async fn whip_answers_cors_preflights() {
    let server = start_server_with(|_| {}).await;
    let preflight = http()
        .request(reqwest::Method::OPTIONS, url(&server, "/whip/broadcast"))
        .header(header::ORIGIN, "https://studio.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("OPTIONS");
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let headers = preflight.headers();
    assert_eq!(header(headers, "access-control-allow-origin"), "*");
    assert!(header(headers, "access-control-allow-methods").contains("POST"));
    assert!(header(headers, "access-control-allow-headers").contains("Authorization"));
    assert!(header(headers, "access-control-expose-headers").contains("Location"));
    assert_eq!(header(headers, "accept-post"), "application/sdp");

    // With an allow-list, another origin is refused.
    let strict = start_server_with(|c| {
        c.limits.allowed_origins = vec!["https://studio.example".into()];
    })
    .await;
    let refused = http()
        .post(url(&strict, "/whip/broadcast"))
        .header(header::ORIGIN, "https://elsewhere.example")
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(OFFER)
        .send()
        .await
        .expect("POST");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_all_clean(&strict, "broadcast").await;
}

/// With API keys a WHIP publisher needs a token for the room (Bearer); the token's name is
/// its name; it may publish only, and not into a mesh room.
#[tokio::test]
async fn whip_takes_bearer_tokens() {
    let server = start_server_with(|c| c.api_keys = vec![KEY.to_string()]).await;
    let keys = Keys::parse(&[KEY.to_string()]).expect("key");
    let token = |room: &str| {
        let mut claims = Claims::new(room, "encoder-1", Duration::from_secs(600));
        claims.name = Some("Studio A".into());
        keys.mint(Some("k1"), &claims).expect("mint")
    };
    let none = post_offer(&server, "live", "application/sdp", OFFER, None).await;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(none.headers(), "www-authenticate"), "Bearer");
    let other_room = post_offer(
        &server,
        "live",
        "application/sdp",
        OFFER,
        Some(&token("other")),
    )
    .await;
    assert_eq!(other_room.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.metrics.snapshot().joins_unauthorized, 2);

    let created = post_offer(
        &server,
        "live",
        "application/sdp",
        OFFER,
        Some(&token("live")),
    )
    .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let snapshot = server.registry.room_snapshot("live").expect("room");
    assert_eq!(snapshot.participants[0].name, "Studio A");
    let location = header(created.headers(), "location").to_owned();
    assert_eq!(delete(&url(&server, &location)).await, StatusCode::OK);
    assert_all_clean(&server, "live").await;

    // A mesh room: media would go peer to peer, past the server that enforces publish-only.
    let open = start_server_with(|_| {}).await;
    let mesh = switchboard::client::Client::connect(
        &ws_url(&open),
        "huddle",
        "peer",
        switchboard::client::ClientOptions {
            mode: Some(switchboard::signal::protocol::RoomMode::Mesh),
            ..switchboard::client::ClientOptions::silent()
        },
    )
    .await
    .expect("mesh member");
    let refused = post_offer(&open, "huddle", "application/sdp", OFFER, None).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    mesh.close().await;
    assert_all_clean(&open, "huddle").await;
}

/// A publisher that POSTs and never connects its media is removed like any participant whose
/// media never connects: out of the room, its resource gone.
#[tokio::test]
async fn a_whip_publisher_whose_media_never_connects_is_removed() {
    let server = start_server_with(|c| c.limits.media_timeout_secs = 1).await;
    let created = post_offer(&server, "quiet", "application/sdp", OFFER, None).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let resource = url(&server, header(created.headers(), "location"));
    assert_all_clean(&server, "quiet").await;
    let status = delete(&resource).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(server.metrics.snapshot().sessions_media_timeout, 1);
}

/// WHEP: a player's recvonly offer (Chromium's) is answered with the server sending on its
/// m-lines; the player is a participant that publishes nothing, and DELETE ends it.
#[tokio::test]
async fn whep_answers_a_players_offer() {
    let server = start_server_with(|_| {}).await;
    let offer = include_str!("fixtures/chromium-whep-offer.sdp");
    let created = http()
        .post(url(&server, "/whep/show?name=Screen"))
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer)
        .send()
        .await
        .expect("POST");
    assert_eq!(created.status(), StatusCode::CREATED);
    let location = header(created.headers(), "location").to_owned();
    assert!(location.starts_with("/whep/show/"), "{location}");
    let etag = header(created.headers(), "etag").to_owned();
    let answer = created.text().await.expect("answer");
    assert_eq!(answer.matches("a=sendonly").count(), 2, "{answer}");
    let snapshot = server.registry.room_snapshot("show").expect("room");
    assert_eq!(snapshot.participants[0].name, "Screen");
    // An ICE restart over PATCH, as for WHIP: the server's new credentials, a new ETag.
    let restarted = http()
        .patch(url(&server, &location))
        .header(header::CONTENT_TYPE, "application/trickle-ice-sdpfrag")
        .header(header::IF_MATCH, &etag)
        .body(fragment(
            "playerufrag2",
            "a-new-player-password-24ch",
            "candidate:1 1 udp 2122260223 127.0.0.1 9 typ host",
        ))
        .send()
        .await
        .expect("PATCH");
    assert_ice_restarted(restarted, &etag, &answer).await;
    // One participant's tracks: by id or name; someone not in the room is not found.
    let nobody = http()
        .post(url(&server, "/whep/show/Nobody"))
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer)
        .send()
        .await
        .expect("POST");
    assert_eq!(nobody.status(), StatusCode::NOT_FOUND);
    assert_eq!(delete(&url(&server, &location)).await, StatusCode::OK);
    assert_all_clean(&server, "show").await;
}

/// Firefox's offers (real ones, `scripts/capture-firefox-offers`: Firefox 153 ESR, fake camera
/// and microphone, sent before ICE gathering as a trickling publisher does) are answered too:
/// its own payload types, no `a=ssrc-group`, `{uuid}` msids.
#[tokio::test]
async fn firefox_offers_are_answered() {
    let server = start_server_with(|_| {}).await;
    let publish = include_str!("fixtures/firefox-whip-offer.sdp");
    let created = post_offer(&server, "fox", "application/sdp", publish, None).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let publisher = header(created.headers(), "location").to_owned();
    let answer = created.text().await.expect("answer");
    assert_eq!(answer.matches("a=recvonly").count(), 2, "{answer}");
    assert!(answer.contains("opus/48000/2"), "{answer}");
    assert!(answer.contains("VP8/90000"), "{answer}");
    let play = include_str!("fixtures/firefox-whep-offer.sdp");
    let created = http()
        .post(url(&server, "/whep/fox?name=Player"))
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(play)
        .send()
        .await
        .expect("POST");
    assert_eq!(created.status(), StatusCode::CREATED);
    let player = header(created.headers(), "location").to_owned();
    let answer = created.text().await.expect("answer");
    assert_eq!(answer.matches("a=sendonly").count(), 2, "{answer}");
    let snapshot = server.registry.room_snapshot("fox").expect("room");
    assert_eq!(snapshot.participants.len(), 2);
    assert_eq!(delete(&url(&server, &player)).await, StatusCode::OK);
    assert_eq!(delete(&url(&server, &publisher)).await, StatusCode::OK);
    assert_all_clean(&server, "fox").await;
}

/// With the embedded TURN server on, the answer carries it as `Link` headers (RFC 9725 §4.6)
/// with credentials for this publisher.
#[tokio::test]
async fn whip_announces_the_turn_server_in_link_headers() {
    let server = start_server_with(|c| {
        c.no_turn = false;
        c.turn_port = 0;
        c.turn_secret = Some("test-secret".into());
    })
    .await;
    let created = post_offer(&server, "relayed", "application/sdp", OFFER, None).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let links: Vec<&str> = created
        .headers()
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(!links.is_empty(), "no Link header");
    for link in &links {
        assert!(link.starts_with("<turn:"), "{link}");
        assert!(link.contains("rel=\"ice-server\""), "{link}");
        assert!(
            link.contains("username=\"") && link.contains("credential=\""),
            "{link}"
        );
        assert!(link.contains("credential-type=\"password\""), "{link}");
    }
    let location = header(created.headers(), "location").to_owned();
    assert_eq!(delete(&url(&server, &location)).await, StatusCode::OK);
    assert_all_clean(&server, "relayed").await;
}
