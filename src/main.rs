use switchboard::auth::{Claims, Keys};
use switchboard::config::{Command, Config, ConfigError, TokenArgs};
use switchboard::server::Server;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = match Config::load() {
        Ok(config) => config,
        // Usage errors, --help and --version print themselves, with clap's exit codes.
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => anyhow::bail!(e),
    };
    if let Some(Command::Token(args)) = &config.command {
        println!("{}", mint(&config, args)?);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let server = Server::start(config.clone()).await?;
    let port = server.http_addr.port();
    let host = match config.public_ip {
        Some(ip) => ip.to_string(),
        None if server.http_addr.ip().is_unspecified() => "localhost".to_string(),
        None => server.http_addr.ip().to_string(),
    };
    tracing::info!(
        http = %server.http_addr,
        udp = ?server.media_addrs(),
        public_ip = ?config.public_ip,
        "switchboard listening"
    );
    let scheme = match &server.tls_certificate {
        Some(_) => "https",
        None => "http",
    };
    println!(
        "Switchboard is up. Open {scheme}://{host}:{port}/room/standup in a browser (any room name works)."
    );
    if let Some(certificate) = &server.tls_certificate {
        let fingerprint = switchboard::tls::fingerprint(certificate);
        println!("Its TLS certificate's SHA-256 fingerprint: {fingerprint}");
    }
    server.run_until(shutdown_signal).await;
    Ok(())
}

/// `switchboard token`: an access token signed with one of the configured API keys.
fn mint(config: &Config, args: &TokenArgs) -> anyhow::Result<String> {
    let keys = Keys::parse(&config.api_keys)?;
    anyhow::ensure!(
        !keys.is_dev_mode(),
        "no API key to sign with: set SWITCHBOARD_API_KEYS=KEY_ID:SECRET (or --api-key)"
    );
    let mut claims = Claims::new(&args.room, &args.identity, args.ttl);
    claims.name = args.name.clone();
    claims.can_publish = !args.no_publish;
    claims.can_subscribe = !args.no_subscribe;
    claims.can_publish_data = !args.no_data;
    claims.room_admin = args.room_admin;
    Ok(keys.mint(args.key_id.as_deref(), &claims)?)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
