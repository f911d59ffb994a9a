//! The server under test: where it is (from the WebSocket URL, loopback only), its `/metrics`
//! counters, and its process's CPU and memory.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::system::{self, ProcSample};
use super::target::Target;

/// `host:port` of a `ws://` or `http://` URL, refused unless every address it resolves to is
/// loopback: load traffic must never leave the machine.
pub fn loopback_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .with_context(|| format!("{url}: only ws:// and http:// URLs are supported"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let has_port = match authority.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => authority.contains(':'),
    };
    let with_port = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("{authority} resolves to no address");
    };
    if addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!("{authority} is not a loopback address; the load generator only targets 127.0.0.1");
    }
    Ok(first)
}

/// One reading of the server: `/metrics` counters (if reachable) and its process (if known).
#[derive(Debug, Clone, Default)]
pub struct ServerSample {
    pub metrics: BTreeMap<String, f64>,
    pub process: Option<ProcSample>,
}

impl ServerSample {
    /// A counter or gauge by its name without the `switchboard_` prefix (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics
            .get(&format!("switchboard_{name}"))
            .copied()
            .unwrap_or(0.0)
    }
}

/// Knows how to read the server.
#[derive(Debug, Clone)]
pub struct Server {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    /// It serves Switchboard's `/metrics`.
    pub has_metrics: bool,
}

impl Server {
    /// The server behind `target`'s URL; every URL the target uses must be loopback.
    pub fn new(target: &Target, pid: Option<u32>) -> anyhow::Result<Self> {
        let addr = loopback_addr(target.server_url())?;
        if let Target::Whip { whep_url, .. } = target {
            loopback_addr(whep_url)?;
        }
        let pid = pid.or_else(|| system::find_listener_pid(addr.port()));
        Ok(Self {
            addr,
            pid,
            has_metrics: target.has_metrics(),
        })
    }

    pub async fn sample(&self) -> ServerSample {
        let metrics = if !self.has_metrics {
            BTreeMap::new()
        } else {
            match fetch_metrics(self.addr).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("reading {}/metrics: {e:#}", self.addr);
                    BTreeMap::new()
                }
            }
        };
        let process = self.pid.and_then(system::sample_pid);
        ServerSample { metrics, process }
    }
}

/// GET /metrics over a plain HTTP/1.1 connection, parsed as Prometheus text.
async fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let host = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
    };
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(4 << 20).read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of HTTP headers")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(parse_prometheus(body))
}

fn parse_prometheus(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        let a = loopback_addr("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(a, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(loopback_addr("ws://127.0.0.1/ws").unwrap().port(), 80);
        assert_eq!(loopback_addr("ws://[::1]:9000/ws").unwrap().port(), 9000);
        assert!(loopback_addr("ws://10.1.2.3:8080/ws").is_err());
        assert!(loopback_addr("wss://127.0.0.1:8080/ws").is_err());
        assert_eq!(
            loopback_addr("http://127.0.0.1:8088/janus").unwrap().port(),
            8088
        );
        assert!(loopback_addr("http://192.0.2.1:8088/janus").is_err());
    }

    #[test]
    fn prometheus_text() {
        let m = parse_prometheus(
            "# HELP x y\n# TYPE x counter\nswitchboard_packets_out_total 42\nswitchboard_rooms 1\n",
        );
        assert_eq!(m.get("switchboard_packets_out_total"), Some(&42.0));
        assert_eq!(m.len(), 2);
        let s = ServerSample {
            metrics: m,
            process: None,
        };
        assert_eq!(s.metric("rooms"), 1.0);
        assert_eq!(s.metric("nope"), 0.0);
    }
}
