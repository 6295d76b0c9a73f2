//! A Server-Sent Events client for the gateway's event stream: it reads the stream as it
//! comes (over the same pinned TLS as the other API calls) and keeps every event and
//! heartbeat comment, for a test to look at while it runs and after it is cut off.

use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::Value;

use crate::Gateway;

/// One event as the client parsed it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub kind: String,
    pub data: Value,
}

#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    comments: usize,
    ended: bool,
}

/// A stream being followed; dropping it (or [`Follower::cut`]) closes the connection.
pub struct Follower {
    pub status: u16,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    /// `GET path` (e.g. `/api/v1/events?types=result`) with `token`, and `Last-Event-ID`
    /// when given; the events are read in the background. A status other than 200 is
    /// kept with the body as one `error` event.
    pub async fn start(gw: &Gateway, path: &str, token: &str, last: Option<&str>) -> Follower {
        let io = hyper_util::rt::TokioIo::new(gw.tls().await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut req = hyper::Request::builder()
            .uri(path)
            .header("host", "localhost")
            .header("accept", "text/event-stream")
            .header("authorization", format!("Bearer {token}"));
        if let Some(id) = last {
            req = req.header("last-event-id", id);
        }
        let conn_task = tokio::spawn(conn);
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let kept = seen.clone();
        let task = tokio::spawn(async move {
            let mut body = resp.into_body();
            let mut buf = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.push_str(&String::from_utf8_lossy(&data));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    parse(&block, &kept, status);
                }
            }
            if !buf.trim().is_empty() {
                parse(&buf, &kept, status);
            }
            kept.lock().unwrap().ended = true;
            conn_task.abort();
        });
        Follower { status, seen, task }
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.seen.lock().unwrap().events.clone()
    }

    /// Heartbeat comments so far.
    pub fn comments(&self) -> usize {
        self.seen.lock().unwrap().comments
    }

    /// Whether the gateway ended the stream.
    pub fn ended(&self) -> bool {
        self.seen.lock().unwrap().ended
    }

    /// The id of the last event that had one.
    pub fn last_id(&self) -> Option<String> {
        self.events().iter().rev().find_map(|e| e.id.clone())
    }

    /// Close the connection at once (a client cut off).
    pub fn cut(self) -> Vec<Event> {
        self.task.abort();
        self.events()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse(block: &str, seen: &Mutex<Seen>, status: u16) {
    let mut seen = seen.lock().unwrap();
    if status != 200 {
        seen.events.push(Event {
            id: None,
            kind: "error".into(),
            data: Value::String(block.to_string()),
        });
        return;
    }
    let (mut id, mut kind, mut data) = (None, String::from("message"), String::new());
    let mut fields = 0;
    for line in block.lines() {
        if line.starts_with(':') {
            seen.comments += 1;
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        fields += 1;
        match name {
            "id" => id = Some(value.to_string()),
            "event" => kind = value.to_string(),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value)
            }
            _ => {}
        }
    }
    // As the spec says: an event with no data is not dispatched.
    if fields > 0 && !data.is_empty() {
        let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
        seen.events.push(Event { id, kind, data });
    }
}
