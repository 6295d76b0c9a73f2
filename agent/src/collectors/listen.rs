//! The agent's two listeners for collectors' data, on 127.0.0.1 only, one of each per
//! agent: Graphite plaintext over TCP (collectd's `write_graphite`) and HTTP (fluentd's
//! `out_http`). Both hand what they receive to [`Sinks`].
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections per listener (more are closed at once),
//! Graphite lines of at most [`crate::supervise::MAX_LINE`] bytes (longer ones are skipped
//! and counted), HTTP bodies of at most [`MAX_BODY`] bytes (larger ones get 413).

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::data::{parse_records, Sinks};
use crate::supervise::{read_line, Line};

/// Most connections one listener serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest HTTP body taken (the rendered fluentd config cuts chunks at 1 MiB).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// Accept connections on `listener` until `stop`, each served by `serve` in a task of its
/// own, at most [`MAX_CONNECTIONS`] at once.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    stop: CancellationToken,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                listener = what,
                "{MAX_CONNECTIONS} connections already open; closing a new one"
            );
            continue;
        };
        let conn = serve(stream);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Serve Graphite plaintext on `listener` until `stop`.
pub async fn graphite(listener: TcpListener, sinks: Arc<Sinks>, stop: CancellationToken) {
    accept_loop(listener, "graphite", stop, move |stream| {
        let sinks = sinks.clone();
        async move {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                match read_line(&mut r, &mut buf).await {
                    Ok(Line::Text) => sinks.graphite(&String::from_utf8_lossy(&buf)),
                    Ok(Line::TooLong) => sinks.bad_line(),
                    Ok(Line::Eof) | Err(_) => return,
                }
            }
        }
    })
    .await
}

/// Serve fluentd's HTTP posts on `listener` until `stop`.
pub async fn http(listener: TcpListener, sinks: Arc<Sinks>, stop: CancellationToken) {
    accept_loop(listener, "collector http", stop, move |stream| {
        let sinks = sinks.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let sinks = sinks.clone();
                async move { Ok::<_, Infallible>(handle(req, &sinks).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

fn reply(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.into())));
    *r.status_mut() = status;
    r
}

/// `POST /collector/NAME[/TAG]` with a JSON array or NDJSON of records.
async fn handle(req: Request<Incoming>, sinks: &Sinks) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "POST records here\n");
    }
    let Some(rest) = req.uri().path().strip_prefix("/collector/") else {
        return reply(StatusCode::NOT_FOUND, "the path is /collector/NAME/TAG\n");
    };
    let (name, tag) = rest.split_once('/').unwrap_or((rest, ""));
    let (name, tag) = (name.to_string(), percent_decode(tag));
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return if too_big {
                reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("at most {MAX_BODY} bytes\n"),
                )
            } else {
                reply(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}\n"),
                )
            };
        }
    };
    let records = match parse_records(&body) {
        Ok((records, _skipped)) => records,
        Err(e) => {
            sinks.bad_line();
            return reply(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    if sinks.records(&name, &tag, &records) {
        reply(StatusCode::OK, "")
    } else {
        reply(
            StatusCode::NOT_FOUND,
            format!("no collector {name:?} runs here\n"),
        )
    }
}

/// `%XX` sequences decoded (fluentd puts the tag in the path as it is; anything else may
/// encode it); invalid sequences and non-UTF-8 results are kept as they came.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_percent_decoded() {
        assert_eq!(percent_decode("app.access"), "app.access");
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%ff"), "%ff");
    }
}
