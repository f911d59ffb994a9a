use clap::Parser;
use switchboard::config::Config;
use switchboard::server::Server;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
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
    println!(
        "Switchboard is up. Open http://{host}:{port}/room/standup in a browser (any room name works)."
    );
    server.run_until(shutdown_signal()).await;
    Ok(())
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
