//! WHIP (RFC 9725) publishers and WHEP players, for any server that speaks both: an SDP offer
//! POSTed to the endpoint, `201 Created` with the answer and the resource's `Location`, and
//! `DELETE` on that resource to leave. No trickle: every offer and answer carries its
//! candidates (the lite connections have one host candidate each).

use std::sync::Arc;

use anyhow::{Context as _, bail};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use switchboard::client::MediaProfile;

use super::ExternalPublisher;
use crate::load::lite::publisher::PendingPublisher;
use crate::load::lite::{self, Engine, Hangup, OfferShape, Receiver, ReceiverShared};

/// A WHIP or WHEP session at the server: its resource URL.
struct Resource {
    http: reqwest::Client,
    url: String,
}

#[async_trait::async_trait]
impl Hangup for Resource {
    async fn hangup(&self) -> bool {
        match self.http.delete(&self.url).send().await {
            Ok(response) => response.status().is_success(),
            Err(e) => {
                tracing::debug!("DELETE {}: {e}", self.url);
                false
            }
        }
    }
}

/// POSTs `offer` to `endpoint`; the answer (loopback candidates only) and the resource.
async fn exchange(
    http: &reqwest::Client,
    endpoint: &str,
    offer: String,
) -> anyhow::Result<(String, Resource)> {
    let response = http
        .post(endpoint)
        .header(CONTENT_TYPE, "application/sdp")
        .body(offer)
        .send()
        .await
        .with_context(|| format!("POST {endpoint}"))?;
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    if status != StatusCode::CREATED {
        bail!("POST {endpoint}: {status} {}", body.trim());
    }
    let location = location.with_context(|| format!("POST {endpoint}: 201 without Location"))?;
    let url = reqwest::Url::parse(endpoint)
        .and_then(|base| base.join(&location))
        .with_context(|| format!("POST {endpoint}: Location {location:?}"))?;
    Ok((
        lite::loopback_candidates_only(&body),
        Resource {
            http: http.clone(),
            url: url.to_string(),
        },
    ))
}

/// Publishes over WHIP to `endpoint` as `name`.
pub async fn publish(
    http: &reqwest::Client,
    endpoint: &str,
    name: &str,
    profile: MediaProfile,
    audio: bool,
    video: bool,
) -> anyhow::Result<ExternalPublisher> {
    let pending = PendingPublisher::offer(name, profile, audio, video).await?;
    let offer = pending.offer.clone();
    let (answer, resource) = exchange(http, endpoint, offer).await?;
    let publisher = match pending.accept_answer(&answer) {
        Ok(p) => p,
        Err(e) => {
            resource.hangup().await;
            return Err(e);
        }
    };
    Ok(ExternalPublisher::new(publisher, Box::new(resource)))
}

/// Plays `endpoint` over WHEP on a lite receiver.
pub async fn play(
    http: &reqwest::Client,
    engine: &Arc<Engine>,
    endpoint: &str,
    name: &str,
    audio: bool,
    video: bool,
) -> anyhow::Result<Receiver> {
    let shared = Arc::new(ReceiverShared {
        sender_from_payload: true,
        ..Default::default()
    });
    let opened = engine
        .open(shared.clone(), OfferShape::ReceiveOnly { audio, video })
        .await?;
    let offer = opened.offer.context("the lite engine made no offer")?;
    let (answer, resource) = match exchange(http, endpoint, offer).await {
        Ok(v) => v,
        Err(e) => {
            engine.close(opened.id).await;
            return Err(e);
        }
    };
    if let Err(e) = engine.remote_answer(opened.id, answer).await {
        engine.close(opened.id).await;
        resource.hangup().await;
        return Err(e);
    }
    Ok(Receiver::external(
        engine,
        opened.id,
        shared,
        name.to_owned(),
        Box::new(resource),
    ))
}
