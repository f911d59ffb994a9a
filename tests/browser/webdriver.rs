//! A small W3C WebDriver client for the browser tests: chromedriver spawned on a loopback port,
//! spoken to with plain HTTP/1.1 over a TCP socket (one request per connection), JSON via
//! serde_json. Only what the tests use: sessions, navigation, scripts, elements, screenshots.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The key under which W3C WebDriver returns element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process; killed (with every browser it started) when dropped.
pub struct Driver {
    addr: SocketAddr,
    child: Child,
}

impl Driver {
    /// Starts `chromedriver` on a free loopback port and waits until it reports ready.
    pub async fn start(chromedriver: &Path, log_file: &Path) -> Result<Driver> {
        let port = {
            let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            probe.local_addr()?.port()
        };
        let log = std::fs::File::create(log_file)
            .with_context(|| format!("creating {}", log_file.display()))?;
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", chromedriver.display()))?;
        let driver = Driver {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = match request(driver.addr, "GET", "/status", None).await {
                Ok(status) if status["ready"].as_bool() == Some(true) => return Ok(driver),
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "chromedriver did not become ready on {}: {last}",
                    driver.addr
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A handle on a session opened earlier (e.g. to inspect it after a failure).
    pub fn attach(&self, id: &str) -> Session {
        Session {
            addr: self.addr,
            id: id.to_string(),
        }
    }

    /// Opens a browser with the given `goog:chromeOptions`.
    pub async fn session(&self, chrome_options: Value) -> Result<Session> {
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": chrome_options,
                    "goog:loggingPrefs": { "browser": "ALL" },
                    "timeouts": { "script": 30000, "pageLoad": 30000 }
                }
            }
        });
        let value = request(self.addr, "POST", "/session", Some(caps)).await?;
        let id = value["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId in {value}"))?
            .to_string();
        Ok(Session {
            addr: self.addr,
            id,
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Browsers still open (a test failed half-way) go first, by pid: every descendant of
        // our chromedriver process, deepest last found first.
        let mut victims = descendants(self.child.id());
        victims.reverse();
        for pid in victims {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of all descendants of `root`, parents before children.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid) in &parent_of {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// One browser (one WebDriver session).
pub struct Session {
    addr: SocketAddr,
    id: String,
}

/// A reference to a DOM element of a session.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Session {
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{}", self.id, path);
        let value = request(self.addr, method, &path, body).await?;
        Ok(value)
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .await
            .with_context(|| format!("navigating to {url}"))?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    pub async fn find(&self, css: &str) -> Result<Element> {
        let value = self
            .cmd(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
            .with_context(|| format!("finding `{css}`"))?;
        value[ELEMENT_KEY]
            .as_str()
            .map(|s| Element(s.to_string()))
            .ok_or_else(|| anyhow!("no element reference for `{css}` in {value}"))
    }

    pub async fn click(&self, element: &Element) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .await?;
        Ok(())
    }

    pub async fn clear(&self, element: &Element) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/clear", element.0),
            Some(json!({})),
        )
        .await?;
        Ok(())
    }

    pub async fn send_keys(&self, element: &Element, text: &str) -> Result<()> {
        self.cmd(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    /// Clicks the element matching `css`.
    pub async fn click_css(&self, css: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.click(&element)
            .await
            .with_context(|| format!("clicking `{css}`"))
    }

    /// Replaces the text of the input matching `css` by typing `text`.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let element = self.find(css).await?;
        self.clear(&element).await?;
        self.send_keys(&element, text)
            .await
            .with_context(|| format!("typing into `{css}`"))
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self.cmd("GET", "/screenshot", None).await?;
        let b64 = value
            .as_str()
            .ok_or_else(|| anyhow!("screenshot is not a string"))?;
        base64_decode(b64)
    }

    /// The browser console since the last call (chromedriver's legacy log endpoint).
    pub async fn console_log(&self) -> Result<Vec<String>> {
        let value = self
            .cmd("POST", "/se/log", Some(json!({ "type": "browser" })))
            .await?;
        Ok(value
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}",
                            e["level"].as_str().unwrap_or("?"),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Ends the session, which closes the browser.
    pub async fn quit(self) -> Result<()> {
        request(self.addr, "DELETE", &format!("/session/{}", self.id), None).await?;
        Ok(())
    }
}

/// One WebDriver HTTP request; returns the response's `value`, or an error carrying the
/// WebDriver error and message.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        read_response(&mut stream).await
    };
    let (status, bytes) = tokio::time::timeout(Duration::from_secs(90), exchange)
        .await
        .map_err(|_| anyhow!("{method} {path}: no answer from chromedriver in 90 s"))??;
    let json: Value = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{method} {path}: HTTP {status}, not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    let value = json.get("value").cloned().unwrap_or(Value::Null);
    if status != 200 {
        bail!(
            "{method} {path}: HTTP {status}: {} — {}",
            value["error"].as_str().unwrap_or("?"),
            value["message"]
                .as_str()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    Ok(value)
}

/// Reads one HTTP/1.1 response: status and body (Content-Length, chunked, or until close).
async fn read_response(stream: &mut TcpStream) -> Result<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response headers");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let header = |name: &str| {
        head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut body = buf[header_end..].to_vec();
    if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while body.len() < len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed mid-body");
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
        return Ok((status, body));
    }
    // No length: read to the end (we asked for Connection: close).
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunk header"))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Standard base64 (screenshots), without a crate for it.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.as_bytes() {
        if c == b'=' || c.is_ascii_whitespace() {
            continue;
        }
        let v = value(c).ok_or_else(|| anyhow!("bad base64 byte {c}"))?;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Finds an executable: `env` if set, else the first of `names` on PATH.
pub fn find_executable(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trip() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64_decode("").unwrap(), b"");
    }

    #[test]
    fn dechunks() {
        let body = b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n";
        assert_eq!(super::dechunk(body).unwrap(), b"hello!");
    }
}
