//! The browser tests' glue around `fantoccini`, which speaks the W3C WebDriver protocol. Here is
//! only what it does not do: finding the executables, running chromedriver on a loopback port
//! (and killing it with every browser it started), the session's capabilities, chromedriver's
//! browser-log endpoint, a bound on how long one command may take, and the few helpers the
//! tests call.

use std::fmt::Display;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// How long one WebDriver command may take before chromedriver is given up on.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Where a chromedriver runs in another network namespace.
#[derive(Debug, Clone, Copy)]
pub struct NetnsDriver {
    /// A process in that namespace.
    pub pid: u32,
    /// The namespace's address this process reaches it at.
    pub address: Ipv4Addr,
    /// This process's address as the namespace sees it.
    pub client: Ipv4Addr,
}

/// A chromedriver process; killed (with every browser it started) when dropped.
pub struct Driver {
    url: String,
    child: Child,
}

impl Driver {
    /// Starts `chromedriver` on a free loopback port and waits until it accepts connections.
    pub async fn start(chromedriver: &Path, log_file: &Path) -> Result<Driver> {
        Self::start_in(chromedriver, log_file, None).await
    }

    /// As [`Driver::start`]; with `netns`, chromedriver (and the browsers it starts) run in the
    /// network namespace of that process, listening on `address` for this process at `client`.
    pub async fn start_in(
        chromedriver: &Path,
        log_file: &Path,
        netns: Option<NetnsDriver>,
    ) -> Result<Driver> {
        let port = {
            let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            probe.local_addr()?.port()
        };
        let log = std::fs::File::create(log_file)
            .with_context(|| format!("creating {}", log_file.display()))?;
        let (mut command, addr) = match netns {
            None => (
                Command::new(chromedriver),
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            ),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.args(["-t", &ns.pid.to_string(), "-n", "--"])
                    .arg(chromedriver);
                (c, SocketAddr::from((ns.address, port)))
            }
        };
        let allowed = netns.map_or(Ipv4Addr::LOCALHOST, |ns| ns.client);
        let child = command
            .arg(format!("--port={port}"))
            .arg(format!("--allowed-ips={allowed}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", chromedriver.display()))?;
        let mut driver = Driver {
            url: format!("http://{addr}/"),
            child,
        };
        // chromedriver listens once it is ready for sessions (its /status then says ready).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let error = match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => return Ok(driver),
                Err(e) => e,
            };
            if let Some(status) = driver.child.try_wait()? {
                bail!("chromedriver exited ({status}); see {}", log_file.display());
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not become ready on {addr}: {error}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens a browser with the given `goog:chromeOptions`, keeping its console log.
    pub async fn session(&self, chrome_options: Value) -> Result<Session> {
        let Value::Object(capabilities) = json!({
            "browserName": "chrome",
            "goog:chromeOptions": chrome_options,
            "goog:loggingPrefs": { "browser": "ALL" },
            "timeouts": { "script": 30000, "pageLoad": 30000 },
        }) else {
            unreachable!("a JSON object literal");
        };
        // Plain http on loopback: no TLS.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(capabilities);
        let client = bounded("opening a session", builder.connect(&self.url)).await?;
        Ok(Session { client })
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

/// One browser (one WebDriver session). Clones share it; it ends with [`Session::quit`], or
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    client: Client,
}

impl Session {
    pub async fn goto(&self, url: &str) -> Result<()> {
        bounded(&format!("navigating to {url}"), self.client.goto(url)).await
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        bounded("running a script", self.client.execute(script, args)).await
    }

    async fn find(&self, css: &str) -> Result<Element> {
        bounded(
            &format!("finding `{css}`"),
            self.client.find(Locator::Css(css)),
        )
        .await
    }

    /// Clicks the element matching `css`.
    pub async fn click_css(&self, css: &str) -> Result<()> {
        let element = self.find(css).await?;
        bounded(&format!("clicking `{css}`"), element.click()).await
    }

    /// Replaces the text of the input matching `css` by typing `text`.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let element = self.find(css).await?;
        bounded(&format!("clearing `{css}`"), element.clear()).await?;
        bounded(&format!("typing into `{css}`"), element.send_keys(text)).await
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        bounded("taking a screenshot", self.client.screenshot()).await
    }

    /// The browser console since the last call.
    pub async fn console_log(&self) -> Result<Vec<String>> {
        let value = bounded("reading the browser log", self.client.issue_cmd(BrowserLog)).await?;
        Ok(value
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} {}",
                    e["level"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect())
    }

    /// Ends the session, which closes the browser.
    pub async fn quit(self) -> Result<()> {
        bounded("closing the browser", self.client.close()).await
    }
}

/// chromedriver's legacy log endpoint, for the console kept by `goog:loggingPrefs`; W3C
/// WebDriver has no command for it.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        let body = json!({ "type": "browser" }).to_string();
        (http::Method::POST, Some(body))
    }
}

/// Waits at most [`COMMAND_TIMEOUT`] for one WebDriver command. An error says what was being
/// done, with the first line of chromedriver's message (the rest is its session info).
async fn bounded<T, E: Display>(
    what: &str,
    command: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => bail!("{what}: {}", e.to_string().lines().next().unwrap_or("")),
        Err(_) => bail!(
            "{what}: no answer from chromedriver in {} s",
            COMMAND_TIMEOUT.as_secs()
        ),
    }
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
