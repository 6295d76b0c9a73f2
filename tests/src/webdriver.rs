//! A minimal W3C WebDriver client for driving Debian's headless Chromium through
//! chromedriver, for the console test.
//!
//! [`Browser::start`] runs `chromedriver --port=0` (it picks a free loopback port and says
//! which), opens a session on a fresh profile, and talks to it over plain HTTP/1.1 on
//! 127.0.0.1. Dropping the [`Browser`] deletes the session, kills chromedriver (and
//! anything left in its process group) and removes the profile.
//!
//! Every call has a deadline; [`wait`] polls with one.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key under which WebDriver sends an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Deadline of one ordinary WebDriver command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of starting chromedriver and opening a session (Chromium's first start).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A WebDriver error answer: the `error` code and the driver's message.
#[derive(Debug)]
pub struct WebDriverError {
    pub command: String,
    pub http_status: u16,
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WebDriver {} failed (HTTP {}): {}: {}",
            self.command, self.http_status, self.error, self.message
        )
    }
}

impl std::error::Error for WebDriverError {}

/// Whether `e` is a WebDriver error with this `error` code (e.g. "stale element reference").
pub fn is_webdriver_error(e: &anyhow::Error, code: &str) -> bool {
    e.downcast_ref::<WebDriverError>()
        .is_some_and(|w| w.error == code)
}

/// What one poll of [`wait`] saw.
pub enum Poll<T> {
    /// The condition holds.
    Ready(T),
    /// Not yet; the text says what was seen instead (reported if the deadline passes).
    Pending(String),
}

/// Poll `f` every 100 ms until it is [`Poll::Ready`], or panic after `timeout` with `what`
/// and the last thing seen. A "stale element reference" (the page re-rendered under us) is
/// retried; any other error fails at once.
pub async fn wait<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Poll<T>>>,
{
    try_wait(timeout, what, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`wait`], returning the failure (timeout or error) instead of panicking, for checks
/// whose failure is collected and reported at the end of a test.
pub async fn try_wait<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Poll<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(Poll::Ready(v)) => return Ok(v),
            Ok(Poll::Pending(seen)) => seen,
            Err(e) if is_webdriver_error(&e, "stale element reference") => format!("{e:#}"),
            Err(e) => return Err(format!("while waiting for {what}: {e:#}")),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}; last seen: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// chromedriver, in its own process group, killed with that group when dropped.
struct Driver {
    child: Child,
    port: u16,
    log_path: PathBuf,
}

impl Driver {
    fn start(log_path: &Path) -> anyhow::Result<Driver> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own group, so that dropping it also ends any Chromium it left behind.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {CHROMEDRIVER}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after the start line so chromedriver never blocks on the pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut driver = Driver {
            child,
            port: 0,
            log_path: log_path.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(port) = line
                        .strip_prefix("ChromeDriver was started successfully on port ")
                        .and_then(|p| p.trim_end_matches('.').trim().parse().ok())
                    {
                        driver.port = port;
                        return Ok(driver);
                    }
                    seen.push(line);
                }
                Err(_) => bail!(
                    "chromedriver did not report its port within {START_TIMEOUT:?}; it printed:\n{}\nits log:\n{}",
                    seen.join("\n"),
                    std::fs::read_to_string(&driver.log_path).unwrap_or_default()
                ),
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: signalling the process group we created for our own child.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to chromedriver; returns the HTTP status and the JSON body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to chromedriver on 127.0.0.1:{port}"))?;
    let io = hyper_util::rt::TokioIo::new(tcp);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let bytes = match body {
        Some(v) => Bytes::from(serde_json::to_vec(v)?),
        None => Bytes::new(),
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        // chromedriver only answers requests addressed to a local host name.
        .header("host", format!("127.0.0.1:{port}"));
    if body.is_some() {
        req = req.header("content-type", "application/json; charset=utf-8");
    }
    let resp = sender.send_request(req.body(Full::new(bytes))?).await?;
    let status = resp.status().as_u16();
    let raw = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "chromedriver answered {method} {path} with HTTP {status} and a body that is not JSON: {}",
            String::from_utf8_lossy(&raw)
        )
    })?;
    Ok((status, value))
}

/// A command: the request, under a deadline, with WebDriver errors turned into
/// [`WebDriverError`]. Returns the answer's `value`.
async fn command(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let what = format!("{method} {path}");
    let (status, mut answer) = tokio::time::timeout(timeout, http(port, method, path, body))
        .await
        .map_err(|_| anyhow!("WebDriver {what}: no answer within {timeout:?}"))?
        .with_context(|| format!("WebDriver {what}"))?;
    let value = answer
        .get_mut("value")
        .map(Value::take)
        .unwrap_or(Value::Null);
    if let Some(error) = value.get("error").and_then(Value::as_str) {
        return Err(WebDriverError {
            command: what,
            http_status: status,
            error: error.to_string(),
            message: value["message"].as_str().unwrap_or_default().to_string(),
        }
        .into());
    }
    if !(200..300).contains(&status) {
        bail!("WebDriver {what}: HTTP {status}: {answer}");
    }
    Ok(value)
}

/// A headless Chromium session.
pub struct Browser {
    // Field order is drop order: the session is deleted in `Drop::drop`, then chromedriver
    // is killed, then the profile removed.
    driver: Driver,
    session: String,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver and open a session in headless Chromium on a fresh profile.
    /// Panics if Chromium or chromedriver is not installed.
    pub async fn start() -> anyhow::Result<Browser> {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the console test needs Debian's {package}; run ci/setup to install it"
            );
        }
        let profile = tempfile::Builder::new()
            .prefix("outpost-chromium-")
            .tempdir()
            .context("creating a Chromium profile directory")?;
        let driver = Driver::start(&profile.path().join("chromedriver.log"))?;
        // The profile itself is a subdirectory, so that the log beside it survives Chromium.
        let user_data = profile.path().join("profile");
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    // The gateway's certificate is self-signed; acceptable in this test only.
                    "acceptInsecureCerts": true,
                    "pageLoadStrategy": "normal",
                    "timeouts": { "implicit": 0, "pageLoad": 20_000, "script": 10_000 },
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-quic",
                            "--no-first-run",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-sync",
                            "--ignore-certificate-errors",
                            format!("--user-data-dir={}", user_data.display()),
                        ],
                    },
                },
            },
        });
        let started = command(driver.port, "POST", "/session", Some(&caps), START_TIMEOUT)
            .await
            .with_context(|| {
                format!(
                    "opening a Chromium session; chromedriver log:\n{}",
                    std::fs::read_to_string(&driver.log_path).unwrap_or_default()
                )
            })?;
        let session = started["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("new session answer has no sessionId: {started}"))?
            .to_string();
        Ok(Browser {
            driver,
            session,
            profile,
        })
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        command(
            self.driver.port,
            method,
            &path,
            body.as_ref(),
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Navigate to `url` and wait for the page to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .await
            .with_context(|| format!("navigating to {url}"))?;
        Ok(())
    }

    /// The current page's URL.
    pub async fn url(&self) -> anyhow::Result<String> {
        let v = self.cmd("GET", "/url", None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Every element matching the CSS selector, in document order.
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element<'_>>> {
        let v = self
            .cmd(
                "POST",
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        v.as_array()
            .ok_or_else(|| anyhow!("find {css:?}: answer is not a list: {v}"))?
            .iter()
            .map(|e| Element::from_value(self, e))
            .collect()
    }

    /// The first element matching the CSS selector, if any.
    pub async fn find(&self, css: &str) -> anyhow::Result<Option<Element<'_>>> {
        Ok(self.find_all(css).await?.into_iter().next())
    }

    /// The first element matching the CSS selector; an error if there is none.
    pub async fn get(&self, css: &str) -> anyhow::Result<Element<'_>> {
        self.find(css)
            .await?
            .ok_or_else(|| anyhow!("no element matches {css:?}"))
    }

    /// Run `script` (a function body; `arguments[i]` are `args`) and return its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Set the window's size in CSS pixels (screenshots are of the window).
    pub async fn window_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await?;
        Ok(())
    }

    /// A PNG of what the window shows.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let v = self.cmd("GET", "/screenshot", None).await?;
        let b64 = v
            .as_str()
            .ok_or_else(|| anyhow!("screenshot: not a string"))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
    }

    /// Where this browser keeps its profile and chromedriver's log.
    pub fn profile_dir(&self) -> &Path {
        self.profile.path()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside the test's runtime: delete the session
        // from a thread with a runtime of its own, bounded by the command deadline.
        let port = self.driver.port;
        let path = format!("/session/{}", self.session);
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(command(
                port,
                "DELETE",
                &path,
                None,
                Duration::from_secs(10),
            ))
            .ok()
        });
        let _ = done.join();
    }
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl<'a> Element<'a> {
    fn from_value(browser: &'a Browser, v: &Value) -> anyhow::Result<Element<'a>> {
        let id = v[ELEMENT_KEY]
            .as_str()
            .ok_or_else(|| anyhow!("not an element reference: {v}"))?
            .to_string();
        Ok(Element { browser, id })
    }

    async fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.browser
            .cmd(method, &format!("/element/{}{what}", self.id), body)
            .await
    }

    /// The rendered text, as the user sees it.
    pub async fn text(&self) -> anyhow::Result<String> {
        let v = self.cmd("GET", "/text", None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// An attribute's value, if it is set.
    pub async fn attr(&self, name: &str) -> anyhow::Result<Option<String>> {
        let v = self.cmd("GET", &format!("/attribute/{name}"), None).await?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Whether the element is displayed.
    pub async fn displayed(&self) -> anyhow::Result<bool> {
        let v = self.cmd("GET", "/displayed", None).await?;
        v.as_bool()
            .ok_or_else(|| anyhow!("displayed: not a boolean: {v}"))
    }

    /// Type `text` into it as a user would, with WebDriver's key codes for special keys
    /// (`\u{E015}` is the down arrow, `\u{E007}` Enter).
    pub async fn send_keys(&self, text: &str) -> anyhow::Result<()> {
        self.cmd("POST", "/value", Some(json!({ "text": text })))
            .await?;
        Ok(())
    }

    /// Click it like a user would (scrolled into view, pointer events).
    pub async fn click(&self) -> anyhow::Result<()> {
        self.cmd("POST", "/click", Some(json!({}))).await?;
        Ok(())
    }

    /// The first descendant matching the CSS selector, if any.
    pub async fn find(&self, css: &str) -> anyhow::Result<Option<Element<'a>>> {
        let v = self
            .cmd(
                "POST",
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        match v.as_array().and_then(|a| a.first()) {
            Some(e) => Ok(Some(Element::from_value(self.browser, e)?)),
            None => Ok(None),
        }
    }

    /// This element as a script argument.
    pub fn as_arg(&self) -> Value {
        json!({ ELEMENT_KEY: self.id })
    }
}
