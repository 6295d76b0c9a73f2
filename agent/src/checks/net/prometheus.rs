//! Prometheus probe: fetch a text exposition endpoint (the HTTP probe's request, GET,
//! body up to 4 MiB) and turn its samples into metrics.
//!
//! Each sample becomes the metric `name{labels}` (labels sorted, values escaped as in the
//! format), or `name` without labels. Comments, `HELP` and `TYPE` lines are skipped,
//! timestamps ignored, NaN and ±Inf values skipped and counted. With `metrics` given,
//! only samples whose name starts with one of them are kept; at most
//! [`MAX_METRICS`] either way, and the details say how many were left out.
//!
//! CRITICAL when the endpoint cannot be reached or answers other than 2xx; UNKNOWN when
//! the answer is not the text format or nothing matches; WARNING when some lines could
//! not be read.

use std::collections::BTreeMap;

use outpost_protocol::probe::PrometheusProbe;
use outpost_protocol::{Status, MAX_METRICS};

use super::http::{fetch, status_text, Request};
use super::{millis, snippet, Report, TlsOptions};
use crate::checks::outcome::Outcome;

/// Most exposition bytes read.
pub const MAX_SCRAPE_BYTES: usize = 4 * 1024 * 1024;
/// Longest metric name (with its labels) kept.
pub const MAX_NAME_BYTES: usize = 512;
/// Unreadable lines quoted in the details.
const SHOWN_ERRORS: usize = 5;

const ACCEPT_TEXT: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// `name{a="1",b="2"}` with labels sorted, or `name` alone.
    pub fn key(&self) -> String {
        if self.labels.is_empty() {
            return self.name.clone();
        }
        let mut labels: Vec<&(String, String)> = self.labels.iter().collect();
        labels.sort();
        let inner: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        format!("{}{{{}}}", self.name, inner.join(","))
    }
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// What a text exposition holds.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Lines that are not samples (nor comments nor blank), with why: the first few.
    pub errors: Vec<(usize, String)>,
    pub error_count: usize,
}

pub fn parse(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(s) => e.samples.push(s),
            Err(why) => {
                e.error_count += 1;
                if e.errors.len() < SHOWN_ERRORS {
                    e.errors.push((i + 1, why));
                }
            }
        }
    }
    e
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A label name (no colons) or metric name at the start of `s`, and the rest.
fn ident(s: &str, colons: bool) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':')))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// A double-quoted string at the start of `s` (escapes `\\`, `\"`, `\n`), and the rest.
fn quoted(s: &str) -> Result<(String, &str), String> {
    let Some(body) = s.strip_prefix('"') else {
        return Err(format!("expected '\"' at {:?}", head(s)));
    };
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &body[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    Err("unterminated quoted string".into())
}

fn head(s: &str) -> String {
    s.chars().take(20).collect()
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let (name, mut rest) = ident(line, true);
    let mut name = name.to_string();
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let (label, was_quoted, r) = if rest.starts_with('"') {
                let (q, r) = quoted(rest)?;
                (q, true, r)
            } else {
                let (l, r) = ident(rest, false);
                if l.is_empty() {
                    return Err(format!("expected a label name at {:?}", head(rest)));
                }
                (l.to_string(), false, r)
            };
            rest = r.trim_start();
            if let Some(r) = rest.strip_prefix('=') {
                let (value, r) = quoted(r.trim_start())?;
                labels.push((label, value));
                rest = r;
            } else if was_quoted && name.is_empty() {
                // A quoted (UTF-8) metric name inside the braces.
                name = label;
            } else {
                return Err(format!("expected '=' after label {label:?}"));
            }
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            } else {
                return Err(format!("expected ',' or '}}' at {:?}", head(rest)));
            }
        }
    }
    if name.is_empty() {
        return Err(format!("no metric name at {:?}", head(line)));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) && name.chars().all(is_name_char) {
        return Err(format!("metric name {name:?} starts with a digit"));
    }
    if !rest.starts_with(|c: char| c.is_whitespace()) {
        return Err(format!(
            "expected a space before the value at {:?}",
            head(rest)
        ));
    }
    // Value, optional timestamp, optional OpenMetrics exemplar (`# {...} ...`).
    let mut fields = rest.split_whitespace().take_while(|f| !f.starts_with('#'));
    let text = fields.next().ok_or("no value")?;
    let value = text
        .parse::<f64>()
        .map_err(|_| format!("value {text:?} is not a number"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("timestamp {ts:?} is not a number"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

pub async fn run(p: &PrometheusProbe) -> Outcome {
    let no_headers = BTreeMap::new();
    let req = Request {
        url: &p.url,
        method: "GET",
        headers: &no_headers,
        accept: Some(ACCEPT_TEXT),
        tls: TlsOptions {
            ca_file: p.ca_file.as_deref(),
            server_name: p.server_name.as_deref(),
            cert_warn_days: p.cert_warn_days,
            cert_crit_days: p.cert_crit_days,
        },
        body_limit: MAX_SCRAPE_BYTES,
    };
    let resp = match fetch(&req).await {
        Ok(r) => r,
        Err(f) => return f.into_outcome("PROMETHEUS"),
    };
    let mut r = Report::new("PROMETHEUS");
    if !resp.status.is_success() {
        r.say(format!("{} from {}", status_text(resp.status), p.url));
        r.problem(Status::Critical, "expected status 2xx");
        if !resp.body.is_empty() {
            r.note(format!("body: {}", snippet(&resp.body, 512)));
        }
        return r.finish();
    }
    let mut text = String::from_utf8_lossy(&resp.body).into_owned();
    if resp.cut {
        // The last line may be cut short: drop it.
        let end = text.rfind('\n').unwrap_or(0);
        text.truncate(end);
        r.note(format!(
            "the exposition is longer than {MAX_SCRAPE_BYTES} bytes; only its beginning was read"
        ));
    }
    let exposition = parse(&text);
    let with_cert = match &resp.cert_days {
        Some(Ok(days)) => {
            r.cert_days(*days, p.cert_warn_days, p.cert_crit_days);
            true
        }
        Some(Err(why)) => {
            r.note(why.clone());
            false
        }
        None => false,
    };
    let room = MAX_METRICS - usize::from(with_cert);

    let (mut matched, mut kept, mut non_finite, mut too_long) = (0usize, 0usize, 0usize, 0usize);
    for s in &exposition.samples {
        if !p.metrics.is_empty() && !p.metrics.iter().any(|pre| s.name.starts_with(pre.as_str())) {
            continue;
        }
        matched += 1;
        if !s.value.is_finite() {
            non_finite += 1;
            continue;
        }
        let key = s.key();
        if key.len() > MAX_NAME_BYTES {
            too_long += 1;
            continue;
        }
        if kept == room {
            continue;
        }
        kept += 1;
        r.metric(&key, s.value, None, None, None);
    }
    let left_out = matched - kept - non_finite - too_long;

    if exposition.samples.is_empty() && exposition.error_count > 0 {
        let (line, why) = exposition.errors.first().cloned().unwrap_or_default();
        r.say(format!("{} from {}", status_text(resp.status), p.url));
        r.problem(
            Status::Unknown,
            format!("the answer is not in the Prometheus text format (line {line}: {why})"),
        );
        r.note(format!("body: {}", snippet(&resp.body, 512)));
        return r.finish();
    }
    r.say(format!(
        "{kept} samples from {} in {} ms",
        p.url,
        millis(resp.elapsed).round()
    ));
    if non_finite > 0 {
        r.say(format!("{non_finite} NaN/Inf skipped"));
        r.note(format!(
            "{non_finite} samples with NaN or infinite values skipped"
        ));
    }
    if left_out > 0 {
        r.say(format!("{left_out} left out"));
        r.note(format!(
            "{left_out} samples beyond the limit of {MAX_METRICS} metrics left out"
        ));
    }
    if too_long > 0 {
        r.note(format!(
            "{too_long} samples with names longer than {MAX_NAME_BYTES} bytes skipped"
        ));
    }
    if matched == 0 {
        let why = if exposition.samples.is_empty() {
            "the exposition holds no samples".to_string()
        } else {
            format!(
                "none of the {} samples starts with {}",
                exposition.samples.len(),
                p.metrics.join(" or ")
            )
        };
        r.problem(Status::Unknown, why);
    }
    if exposition.error_count > 0 {
        r.problem(
            Status::Warning,
            format!("{} lines could not be read", exposition.error_count),
        );
        for (line, why) in &exposition.errors {
            r.note(format!("line {line}: {why}"));
        }
    }
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::net::testutil::{self, HttpReply};
    use std::sync::Arc;

    /// The format's own example, with a few more twists.
    const EXPOSITION: &str = r#"# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
msdos_file_access_time_seconds{path="C:\\DIR\\FILE.TXT",error="Cannot find file:\n\"FILE.TXT\""} 1.458255915e9

# Minimalistic line:
metric_without_timestamp_and_labels 12.47

# A weird metric from before the epoch:
something_weird{problem="division by zero"} +Inf -3982045

# A histogram, which has a pretty complex representation in the text format:
# HELP http_request_duration_seconds A histogram of the request duration.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05"} 24054
http_request_duration_seconds_bucket{le="0.1"} 33444
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320

   # indented comment
go_gc_duration_seconds{quantile="1"} NaN
go_gc_duration_seconds_count 12
process_start_time_seconds 1.7e+09
quoted_label{msg="say \"hi\", then {leave}",trailing="comma",} -0.5
"#;

    fn value(e: &Exposition, key: &str) -> Option<f64> {
        e.samples.iter().find(|s| s.key() == key).map(|s| s.value)
    }

    #[test]
    fn parses_the_text_format() {
        let e = parse(EXPOSITION);
        assert_eq!(e.error_count, 0, "{:?}", e.errors);
        assert_eq!(e.samples.len(), 14);
        assert_eq!(
            value(&e, r#"http_requests_total{code="200",method="post"}"#),
            Some(1027.0)
        );
        assert_eq!(
            value(&e, r#"http_requests_total{code="400",method="post"}"#),
            Some(3.0)
        );
        let msdos = e
            .samples
            .iter()
            .find(|s| s.name == "msdos_file_access_time_seconds")
            .unwrap();
        assert_eq!(
            msdos.labels,
            vec![
                ("path".to_string(), r"C:\DIR\FILE.TXT".to_string()),
                (
                    "error".to_string(),
                    "Cannot find file:\n\"FILE.TXT\"".to_string()
                ),
            ]
        );
        assert_eq!(
            msdos.key(),
            r#"msdos_file_access_time_seconds{error="Cannot find file:\n\"FILE.TXT\"",path="C:\\DIR\\FILE.TXT"}"#
        );
        assert_eq!(
            value(&e, "metric_without_timestamp_and_labels"),
            Some(12.47)
        );
        assert_eq!(
            value(&e, r#"something_weird{problem="division by zero"}"#),
            Some(f64::INFINITY)
        );
        assert_eq!(
            value(&e, r#"http_request_duration_seconds_bucket{le="+Inf"}"#),
            Some(144320.0)
        );
        assert!(value(&e, r#"go_gc_duration_seconds{quantile="1"}"#)
            .unwrap()
            .is_nan());
        assert_eq!(value(&e, "process_start_time_seconds"), Some(1.7e9));
        assert_eq!(
            value(
                &e,
                r#"quoted_label{msg="say \"hi\", then {leave}",trailing="comma"}"#
            ),
            Some(-0.5)
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let e = parse(
            "ok_metric 1\nno_value\nbad{label=unquoted} 1\nbad_value abc\nbad{x=\"1\"} 1 2 3\n{} 4\n9lives 1\nopen{x=\"1\" 2\n",
        );
        assert_eq!(e.samples.len(), 1);
        assert_eq!(e.error_count, 7);
        let whys: Vec<&str> = e.errors.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(e.errors[0].0, 2);
        assert!(whys[0].contains("expected a space"), "{whys:?}");
        assert!(whys[1].contains("expected '\"'"), "{whys:?}");
        assert!(whys[2].contains("not a number"), "{whys:?}");
        assert!(whys[3].contains("unexpected \"3\""), "{whys:?}");
        assert!(whys[4].contains("no metric name"), "{whys:?}");
        // Only the first few are kept.
        assert_eq!(e.errors.len(), SHOWN_ERRORS);
    }

    #[test]
    fn newer_forms() {
        // OpenMetrics exemplars and float timestamps; UTF-8 names in quotes.
        let e = parse(
            "foo_total 17.0 1520879607.789 # {trace_id=\"KOO5S4vxi0o\"} 0.67\n{\"my.dotted.metric\",env=\"prod\"} 3\n",
        );
        assert_eq!(e.error_count, 0, "{:?}", e.errors);
        assert_eq!(value(&e, "foo_total"), Some(17.0));
        assert_eq!(value(&e, "my.dotted.metric{env=\"prod\"}"), Some(3.0));
    }

    fn probe(url: String) -> PrometheusProbe {
        PrometheusProbe {
            url,
            metrics: Vec::new(),
            ca_file: None,
            server_name: None,
            cert_warn_days: None,
            cert_crit_days: None,
        }
    }

    fn exporter() -> testutil::Handler {
        Arc::new(|head: &str| {
            let path = head.split(' ').nth(1).unwrap_or("");
            match path {
                "/metrics" => HttpReply::new(200, "OK", EXPOSITION),
                "/many" => {
                    let text: String = (0..300).map(|i| format!("series_{i} {i}\n")).collect();
                    HttpReply::new(200, "OK", text)
                }
                "/html" => HttpReply::new(200, "OK", "<html><body>hello</body></html>\n"),
                _ => HttpReply::new(404, "Not Found", "404 page not found\n"),
            }
        })
    }

    #[tokio::test]
    async fn scrapes_a_local_endpoint() {
        let (port, heads) = testutil::http_server(None, exporter()).await;
        let mut p = probe(format!("http://127.0.0.1:{port}/metrics"));
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output.starts_with(&format!(
                "PROMETHEUS OK - 12 samples from http://127.0.0.1:{port}/metrics in "
            )),
            "{}",
            o.output
        );
        assert!(o.output.ends_with("ms, 2 NaN/Inf skipped"), "{}", o.output);
        assert_eq!(o.metrics.len(), 12);
        let m = o
            .metrics
            .iter()
            .find(|m| m.name == r#"http_requests_total{code="200",method="post"}"#)
            .unwrap();
        assert_eq!(m.value, 1027.0);
        assert!(heads.lock().unwrap()[0]
            .to_lowercase()
            .contains("accept: text/plain;version=0.0.4"));

        p.metrics = vec!["http_request_".into(), "go_".into()];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        let names: Vec<&str> = o.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                r#"http_request_duration_seconds_bucket{le="0.05"}"#,
                r#"http_request_duration_seconds_bucket{le="0.1"}"#,
                r#"http_request_duration_seconds_bucket{le="+Inf"}"#,
                "http_request_duration_seconds_sum",
                "http_request_duration_seconds_count",
                "go_gc_duration_seconds_count",
            ]
        );
        assert!(o.output.ends_with("1 NaN/Inf skipped"), "{}", o.output);

        p.metrics = vec!["nothing_like_this".into()];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(
            o.output
                .contains("none of the 14 samples starts with nothing_like_this"),
            "{}",
            o.output
        );
    }

    #[tokio::test]
    async fn limits_and_failures() {
        let (port, _) = testutil::http_server(None, exporter()).await;
        let o = run(&probe(format!("http://127.0.0.1:{port}/many"))).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert_eq!(o.metrics.len(), MAX_METRICS);
        assert!(o.output.ends_with(", 44 left out"), "{}", o.output);
        assert!(
            o.long_output
                .contains("44 samples beyond the limit of 256 metrics left out"),
            "{}",
            o.long_output
        );

        let o = run(&probe(format!("http://127.0.0.1:{port}/html"))).await;
        assert_eq!(o.status, Status::Unknown, "{o:?}");
        assert!(
            o.output.contains("not in the Prometheus text format"),
            "{}",
            o.output
        );

        let o = run(&probe(format!("http://127.0.0.1:{port}/nope"))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.contains("404 Not Found"), "{}", o.output);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = listener.local_addr().unwrap().port();
        drop(listener);
        let o = run(&probe(format!("http://127.0.0.1:{closed}/metrics"))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.contains("cannot connect"), "{}", o.output);
    }
}
