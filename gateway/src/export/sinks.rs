//! The wire formats and one request to a sink: Prometheus remote-write 1.0 and InfluxDB
//! line protocol (1.x and 2.x).
//!
//! What a request's answer means, for every sink alike: 2xx taken; no answer, a timeout,
//! 401, 403, 404, 408, 429 or 5xx: tried again (the caller backs off: a credential or a
//! URL being fixed, a sink busy or down); any other 4xx: refused. Prometheus refuses a
//! whole request (400) for one sample out of order, duplicated or out of bounds, so the
//! caller splits a refused request until what is refused is single samples, which are
//! counted and skipped (retrying what a sink calls malformed would stop the export
//! forever).

use std::collections::HashMap;
use std::fmt::Write as _;

use prost::Message as _;

use super::config::{Influx, Secret, Sink, SinkKind};
use super::mapping::Sample;

/// Generated from `proto/remote_write.proto` (build.rs).
pub mod prompb {
    include!(concat!(env!("OUT_DIR"), "/prometheus.rs"));
}

/// Why a request did not take its samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another try later: no answer, 401, 403, 404, 408, 429, 5xx, a secret file
    /// not readable now.
    Retry(String),
    /// Refused (another 4xx, 413 among them): split, then skipped and counted.
    Refused(String),
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`, other characters `_`, a leading
/// digit prefixed with `_`; names starting `__` are reserved, so get a leading `x`.
pub fn prom_label_name(name: &str) -> String {
    let mut s = crate::alerts::deliver::label_name(name);
    if s.starts_with("__") {
        s.insert(0, 'x');
    }
    s
}

/// The remote-write request for `samples`: one time series per name and labels, its
/// samples in time order, labels sorted with `__name__` among them; metadata once per
/// family (all gauges).
pub fn write_request(samples: &[Sample]) -> prompb::WriteRequest {
    // A series by its name and labels → its place in `series`.
    type SeriesKey<'a> = (&'a str, &'a [(String, String)]);
    let mut index: HashMap<SeriesKey, usize> = HashMap::new();
    let mut series: Vec<prompb::TimeSeries> = Vec::new();
    let mut families: Vec<&'static str> = Vec::new();
    for s in samples {
        let i = *index.entry((s.name, &s.labels)).or_insert_with(|| {
            let mut labels: Vec<prompb::Label> = s
                .labels
                .iter()
                .map(|(k, v)| prompb::Label {
                    name: prom_label_name(k),
                    value: v.clone(),
                })
                .collect();
            labels.push(prompb::Label {
                name: "__name__".into(),
                value: s.name.into(),
            });
            labels.sort_by(|a, b| a.name.cmp(&b.name));
            // Two agent labels may sanitise to one name: the first is kept.
            labels.dedup_by(|b, a| a.name == b.name);
            series.push(prompb::TimeSeries {
                labels,
                samples: Vec::new(),
            });
            series.len() - 1
        });
        series[i].samples.push(prompb::Sample {
            value: s.value,
            timestamp: s.ts_ms,
        });
        if !families.contains(&s.name) {
            families.push(s.name);
        }
    }
    for ts in &mut series {
        // One sample per timestamp (a plugin that printed a label twice): the first.
        ts.samples.sort_by_key(|s| s.timestamp);
        ts.samples.dedup_by_key(|s| s.timestamp);
    }
    let metadata = families
        .into_iter()
        .map(|f| prompb::MetricMetadata {
            r#type: prompb::metric_metadata::MetricType::Gauge as i32,
            metric_family_name: f.into(),
            help: help(f).into(),
            unit: String::new(),
        })
        .collect();
    prompb::WriteRequest {
        timeseries: series,
        metadata,
    }
}

fn help(family: &str) -> &'static str {
    match family {
        "outpost_check_status" => "A check's state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
        "outpost_check_duration_seconds" => "How long a check's run took.",
        "outpost_check_metric" => "A metric a check reported (perfdata), in its unit.",
        "outpost_check_metric_warn" => "A metric's warning threshold, when a plain number.",
        "outpost_check_metric_crit" => "A metric's critical threshold, when a plain number.",
        "outpost_check_metric_min" => "A metric's minimum.",
        "outpost_check_metric_max" => "A metric's maximum.",
        "outpost_agent_online" => "An agent's presence: 1 connected, 0 lost, stopped or revoked.",
        _ => "",
    }
}

/// The request body: the protobuf, compressed with snappy's block format (not framed).
pub fn remote_write_body(samples: &[Sample]) -> Vec<u8> {
    let raw = write_request(samples).encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .expect("snappy compresses any input under 4 GiB")
}

/// An InfluxDB measurement, tag key or tag value: `,`, `=` and space escaped with `\`
/// (`=` need not be in a measurement, but escaping it there is harmless); a newline
/// cannot be escaped, so it becomes an (escaped) space; a trailing backslash is doubled.
fn influx_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            ',' | '=' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push_str("\\ "),
            c => out.push(c),
        }
    }
    // InfluxDB reads a backslash as itself, except before what it escapes: one ending
    // a value would escape the separator after it.
    if s.ends_with('\\') {
        out.push('\\');
    }
}

/// Tag keys InfluxDB 2.x keeps for itself: an agent label so named is left out.
const INFLUX_RESERVED: [&str; 3] = ["time", "_field", "_measurement"];

/// Line protocol, one line per sample, timestamps in milliseconds (`precision=ms`):
/// `<name>,<tag>=<value>,... value=<float> <ms>`.
pub fn line_protocol(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        influx_escape(s.name, &mut out);
        for (k, v) in s
            .labels
            .iter()
            .filter(|(k, _)| !INFLUX_RESERVED.contains(&k.as_str()))
        {
            out.push(',');
            influx_escape(k, &mut out);
            out.push('=');
            influx_escape(v, &mut out);
        }
        // (A number without an `i` is a float to InfluxDB; Rust's `Display` of an f64 is
        // the shortest decimal that reads back exactly, never in exponent form.)
        let _ = writeln!(out, " value={} {}", s.value, s.ts_ms);
    }
    out
}

/// A credential; one whose file cannot be read now is tried again later.
fn read_secret(secret: &Secret) -> Result<String, Failure> {
    secret.read().map_err(Failure::Retry)
}

/// `url` with `query` appended, encoded.
fn with_query(url: &str, query: &[(&str, String)]) -> Result<reqwest::Url, Failure> {
    let mut u =
        reqwest::Url::parse(url).map_err(|e| Failure::Refused(format!("url {url:?}: {e}")))?;
    u.query_pairs_mut()
        .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    Ok(u)
}

/// Send `samples` to `sink` in one request.
pub async fn send(
    client: &reqwest::Client,
    sink: &Sink,
    samples: &[Sample],
) -> Result<(), Failure> {
    let mut req = match &sink.kind {
        SinkKind::RemoteWrite { url, bearer_token } => {
            let req = client
                .post(url)
                .header("content-type", "application/x-protobuf")
                .header("content-encoding", "snappy")
                .header("x-prometheus-remote-write-version", "0.1.0")
                .body(remote_write_body(samples));
            match bearer_token {
                Some(t) => req.bearer_auth(read_secret(t)?),
                None => req,
            }
        }
        SinkKind::Influx(Influx::V1 {
            url,
            database,
            username,
            password,
        }) => {
            let query = [("db", database.clone()), ("precision", "ms".into())];
            let req = client
                .post(with_query(&format!("{url}/write"), &query)?)
                .header("content-type", "text/plain; charset=utf-8")
                .body(line_protocol(samples));
            // (Basic authentication, which InfluxDB 1.x takes like `u` and `p`, keeps the
            // password out of URLs and so out of any error message.)
            match (username, password) {
                (Some(u), Some(p)) => req.basic_auth(u, Some(read_secret(p)?)),
                (Some(u), None) => req.basic_auth(u, None::<&str>),
                _ => req,
            }
        }
        SinkKind::Influx(Influx::V2 {
            url,
            org,
            bucket,
            token,
        }) => {
            let query = [
                ("org", org.clone()),
                ("bucket", bucket.clone()),
                ("precision", "ms".into()),
            ];
            client
                .post(with_query(&format!("{url}/api/v2/write"), &query)?)
                .header("authorization", format!("Token {}", read_secret(token)?))
                .header("content-type", "text/plain; charset=utf-8")
                .body(line_protocol(samples))
        }
    };
    for (k, v) in &sink.headers {
        req = req.header(k, v);
    }
    let resp = req
        .timeout(sink.timeout)
        .send()
        .await
        .map_err(|e| Failure::Retry(format!("no answer: {}", e.without_url())))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = resp
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    let why = format!("{status}: {}", body.trim());
    if matches!(status.as_u16(), 401 | 403 | 404 | 408 | 429) || status.is_server_error() {
        Err(Failure::Retry(why))
    } else {
        Err(Failure::Refused(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &'static str, labels: &[(&str, &str)], value: f64, ts_ms: i64) -> Sample {
        Sample {
            name,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
            ts_ms,
        }
    }

    #[test]
    fn a_write_request_groups_series_sorts_labels_and_samples_and_round_trips() {
        let samples = [
            s(
                "outpost_check_metric",
                &[("Zone", "z"), ("check", "c"), ("metric", "/")],
                2.0,
                20,
            ),
            s("outpost_check_status", &[("check", "c")], 0.0, 10),
            s(
                "outpost_check_metric",
                &[("Zone", "z"), ("check", "c"), ("metric", "/")],
                1.0,
                10,
            ),
        ];
        let body = remote_write_body(&samples);
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let req = prompb::WriteRequest::decode(raw.as_slice()).unwrap();
        assert_eq!(req.timeseries.len(), 2);
        let metric = &req.timeseries[0];
        let names: Vec<&str> = metric.labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["Zone", "__name__", "check", "metric"],
            "sorted bytewise"
        );
        assert_eq!(metric.labels[1].value, "outpost_check_metric");
        let ts: Vec<(i64, f64)> = metric
            .samples
            .iter()
            .map(|s| (s.timestamp, s.value))
            .collect();
        assert_eq!(ts, [(10, 1.0), (20, 2.0)], "in time order");
        assert_eq!(req.metadata.len(), 2);
    }

    fn sink(kind: SinkKind) -> Sink {
        Sink {
            name: "s".into(),
            kind,
            headers: [("X-Scope-OrgID".to_string(), "ops".to_string())].into(),
            batch: 100,
            timeout: std::time::Duration::from_secs(5),
            from_start: false,
        }
    }

    /// A receiver on loopback that answers each path with its status, and hands every
    /// request it took (headers, body) to the test.
    async fn receiver() -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(axum::http::HeaderMap, String, Vec<u8>)>,
    ) {
        use axum::extract::{OriginalUri, State};
        use axum::http::{HeaderMap, StatusCode};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let app = axum::Router::new()
            .fallback(
                |State(tx): State<tokio::sync::mpsc::UnboundedSender<_>>,
                 OriginalUri(uri): OriginalUri,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let status = match uri.path() {
                        "/busy" => StatusCode::TOO_MANY_REQUESTS,
                        "/down" => StatusCode::SERVICE_UNAVAILABLE,
                        "/bad" => StatusCode::BAD_REQUEST,
                        "/auth" => StatusCode::UNAUTHORIZED,
                        "/huge" => StatusCode::PAYLOAD_TOO_LARGE,
                        _ => StatusCode::NO_CONTENT,
                    };
                    let _ = tx.send((headers, uri.to_string(), body.to_vec()));
                    (status, "out of order sample")
                },
            )
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, rx)
    }

    #[tokio::test]
    async fn remote_write_sends_the_documented_headers_and_answers_are_judged() {
        let (addr, mut rx) = receiver().await;
        let client = crate::alerts::deliver::http_client().unwrap();
        let samples = [s("outpost_check_status", &[("check", "c")], 2.0, 10)];
        let rw = |path: &str| {
            sink(SinkKind::RemoteWrite {
                url: format!("http://{addr}{path}"),
                bearer_token: None,
            })
        };
        assert_eq!(send(&client, &rw("/api/v1/write"), &samples).await, Ok(()));
        let (headers, _, body) = rx.recv().await.unwrap();
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert_eq!(headers["content-encoding"], "snappy");
        assert_eq!(headers["x-prometheus-remote-write-version"], "0.1.0");
        assert_eq!(headers["x-scope-orgid"], "ops", "the sink's own headers");
        assert!(headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("outpost-gateway/"));
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let req = prompb::WriteRequest::decode(raw.as_slice()).unwrap();
        assert_eq!(req.timeseries[0].samples[0].value, 2.0);
        for (path, retry) in [
            ("/busy", true),
            ("/down", true),
            ("/auth", true),
            ("/bad", false),
            ("/huge", false),
        ] {
            let got = send(&client, &rw(path), &samples).await;
            match got {
                Err(Failure::Retry(_)) if retry => {}
                Err(Failure::Refused(why)) if !retry => {
                    assert!(
                        why.contains("out of order"),
                        "the sink's answer is kept: {why}"
                    )
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        // Nobody there: tried again later.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let nobody = sink(SinkKind::RemoteWrite {
            url: format!("http://{gone}/api/v1/write"),
            bearer_token: None,
        });
        assert!(matches!(
            send(&client, &nobody, &samples).await,
            Err(Failure::Retry(_))
        ));
    }

    #[tokio::test]
    async fn influx_v1_and_v2_requests_carry_their_database_or_bucket_and_credentials() {
        let (addr, mut rx) = receiver().await;
        let client = crate::alerts::deliver::http_client().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cr&t\n").unwrap();
        let samples = [s("outpost_check_status", &[("check", "c")], 1.0, 10)];
        let v1 = sink(SinkKind::Influx(Influx::V1 {
            url: format!("http://{addr}"),
            database: "outpost".into(),
            username: Some("u1".into()),
            password: Some(Secret::File(secret.clone())),
        }));
        assert_eq!(send(&client, &v1, &samples).await, Ok(()));
        let (headers, uri, body) = rx.recv().await.unwrap();
        assert_eq!(uri, "/write?db=outpost&precision=ms");
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode("u1:s3cr&t");
        assert_eq!(headers["authorization"], format!("Basic {basic}").as_str());
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "outpost_check_status,check=c value=1 10\n"
        );
        let v2 = sink(SinkKind::Influx(Influx::V2 {
            url: format!("http://{addr}"),
            org: "o".into(),
            bucket: "b".into(),
            token: Secret::File(secret.clone()),
        }));
        assert_eq!(send(&client, &v2, &samples).await, Ok(()));
        let (headers, uri, _) = rx.recv().await.unwrap();
        assert_eq!(uri, "/api/v2/write?org=o&bucket=b&precision=ms");
        assert_eq!(headers["authorization"], "Token s3cr&t");
        // A secret that cannot be read is retried, not refused.
        std::fs::remove_file(&secret).unwrap();
        assert!(matches!(
            send(&client, &v2, &samples).await,
            Err(Failure::Retry(_))
        ));
    }

    #[test]
    fn label_names_are_made_valid_for_prometheus() {
        assert_eq!(
            prom_label_name("app.kubernetes.io/name"),
            "app_kubernetes_io_name"
        );
        assert_eq!(prom_label_name("9lives"), "_9lives");
        assert_eq!(prom_label_name("__meta"), "x__meta");
        assert_eq!(prom_label_name(""), "_");
    }

    #[test]
    fn line_protocol_escapes_what_it_must() {
        let text = line_protocol(&[s(
            "outpost_check_metric",
            &[("check", "a b,c=d"), ("metric", "x\ny\\"), ("time", "t")],
            1.0,
            1_700_000_000_000,
        )]);
        assert_eq!(
            text,
            "outpost_check_metric,check=a\\ b\\,c\\=d,metric=x\\ y\\\\ value=1 1700000000000\n",
            "a trailing backslash doubled, `time` left out"
        );
    }
}
