//! Built-in TLS: with `--tls-self-signed` or `--tls-cert`/`--tls-key` the server speaks only
//! HTTPS and WSS on its HTTP port. Clients that trust the certificate join and exchange media;
//! plain `ws://` and clients that do not trust it get nowhere; resuming over WSS works.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchboard::client::{Client, ClientOptions, tls_client_config};
use switchboard::server::ServerHandle;
use switchboard::types::MediaKind;

const MEDIA: Duration = Duration::from_secs(20);

fn wss_url(server: &ServerHandle) -> String {
    format!("wss://localhost:{}/ws", server.http_addr.port())
}

/// Options whose TLS trusts exactly `server`'s certificate.
fn trusting(server: &ServerHandle) -> ClientOptions {
    let certificate = server.tls_certificate.clone().expect("serving TLS");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate).expect("a usable trust anchor");
    ClientOptions {
        tls: Some(tls_client_config(roots)),
        ..ClientOptions::default()
    }
}

async fn media_both_ways(a: &Client, b: &Client) {
    let pairs = [(a, b.id().to_string()), (b, a.id().to_string())];
    for (me, other) in &pairs {
        let other = other.clone();
        wait_all(&[me], "media from the other", MEDIA, move |_, s| {
            [MediaKind::Audio, MediaKind::Video]
                .iter()
                .all(|kind| s.intact_from(&other, *kind) >= 20)
        })
        .await;
    }
}

#[tokio::test]
async fn a_call_over_wss_with_a_self_signed_certificate() {
    let _serial = serial().await;
    let server = start_server_with(|c| c.tls_self_signed = true).await;
    let url = wss_url(&server);

    // Plain WebSocket to the TLS port: no handshake.
    let plain = Client::connect(
        &format!("ws://{}/ws", server.http_addr),
        "tls",
        "Pat",
        ClientOptions::default(),
    )
    .await;
    assert!(plain.is_err(), "plain ws:// to the TLS port connected");
    // A client trusting only the public web's roots refuses the self-signed certificate.
    let untrusting = Client::connect(&url, "tls", "Una", ClientOptions::default()).await;
    let error = format!("{:#}", untrusting.err().expect("an untrusted certificate"));
    assert!(
        error.to_lowercase().contains("certificate"),
        "not a certificate error: {error}"
    );

    let ann = Client::connect(&url, "tls", "Ann", trusting(&server))
        .await
        .expect("Ann joins over wss");
    let bob = Client::connect(&url, "tls", "Bob", trusting(&server))
        .await
        .expect("Bob joins over wss");
    media_both_ways(&ann, &bob).await;

    // A resume goes over WSS too, with the same trust.
    ann.drop_socket();
    ann.resume(&url).await.expect("Ann resumes over wss");
    bob.send_chat("still there?").await.expect("chat");
    wait_all(&[&ann], "Bob's chat after the resume", MEDIA, |_, s| {
        s.chat.iter().any(|m| m.text == "still there?")
    })
    .await;

    close_all(&[&ann, &bob]).await;
    assert_all_clean(&server, "tls").await;
    server.shutdown().await;
}

#[tokio::test]
async fn pem_files_from_the_operator_are_served() {
    let _serial = serial().await;
    let dir = std::env::temp_dir().join(format!("switchboard-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert_path: PathBuf = dir.join("cert.pem");
    let key_path: PathBuf = dir.join("key.pem");
    std::fs::write(&cert_path, made.cert.pem()).expect("write cert");
    std::fs::write(&key_path, made.signing_key.serialize_pem()).expect("write key");

    let server = start_server_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await;
    assert_eq!(
        server.tls_certificate.as_ref().map(|c| c.as_ref()),
        Some(made.cert.der().as_ref()),
        "the server serves the operator's certificate"
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).expect("trust anchor");
    let opts = ClientOptions {
        tls: Some(Arc::clone(&tls_client_config(roots))),
        ..ClientOptions::default()
    };
    let url = wss_url(&server);
    let ann = Client::connect(&url, "pem", "Ann", opts.clone())
        .await
        .expect("Ann joins");
    let bob = Client::connect(&url, "pem", "Bob", opts)
        .await
        .expect("Bob joins");
    media_both_ways(&ann, &bob).await;
    close_all(&[&ann, &bob]).await;
    assert_all_clean(&server, "pem").await;
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
