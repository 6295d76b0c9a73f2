//! The fuzz targets' seed corpora (fuzz/corpus/<target>/), made here from the real types
//! and files (so they stay inputs the decoders accept as the formats change): each seed
//! made is checked to decode, and every target has its committed seeds. With
//! `OUTPOST_UPDATE_FUZZ_SEEDS=1` the committed corpora are written anew.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query};
use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX, SRV, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use outpost_protocol::update::{
    key_file_text, parse_signing_key, sign_manifest, Manifest, Release,
};
use outpost_protocol::{
    decode_agent_frame, decode_gateway_frame, encode, AgentFrame, CheckResult, CheckSpec, Metric,
    Results, Status,
};
use serde_json::json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A check file with every kind of probe, collectors and alerting tables.
const CHECK_FILE: &str = r#"
[alerting]
fallback = "ops-mail"
watchdog = { receiver = "ops-hook", every = "1m" }

[[receiver]]
name = "ops-hook"
timeout = "10s"
webhook = { url = "https://hooks.example.com/outpost", secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" }

[[receiver]]
name = "ops-mail"
slack = { url = "https://hooks.slack.com/services/T000/B000/XXXX" }

[[route]]
checks = ["disk*", "load"]
labels = { role = "db" }
severity = ["critical"]
receivers = ["ops-hook"]
for = "5m"

[[tuning]]
checks = ["backup*"]
stale_after = "26h"
flapping = { start = 60, end = 50 }

[[dependency]]
checks = ["http-*"]
labels = { site = "dc1" }
on = { agent = "router-1", check = "ping" }
wait = "30s"

[[check]]
name = "hello"
command = ["/bin/echo", "HELLO OK - fine | answer=42;;;0"]
interval = "10s"
timeout = "5s"
attempts = 3
retry_interval = "5s"
target = { labels = { role = "web" }, groups = ["eu", "us"] }

[[check]]
name = "nightly"
command = "/usr/local/bin/backup --check"
cron = "0 3 * * *"

[[check]]
name = "cpu"
cpu = { warn = 90, crit = 98 }
interval = "15s"

[[check]]
name = "tcp-db"
tcp = { host = "127.0.0.1", port = 5432, warn_ms = 500 }
interval = "30s"

[[check]]
name = "http-site"
http = { url = "https://example.test/healthz", expect_status = [200], headers = { accept = "text/plain" }, body_contains = "ok" }
interval = "1m"

[[check]]
name = "dns-mx"
dns = { name = "example.test", record_type = "MX", server = "127.0.0.1:5353", expect = ["mail.example.test"] }
interval = "1m"

[[check]]
name = "node"
prometheus = { url = "http://127.0.0.1:9100/metrics", metrics = ["node_"] }
interval = "1m"

[[check]]
name = "app"
json_socket = { address = "unix:/run/app/health.sock" }
interval = "1m"

[[check]]
name = "poll"
command = ["/opt/poller"]
kind = "request"
request = { host = "10.0.0.1", oids = ["1.3.6.1"], retries = 2 }
interval = "1m"

[[collector]]
name = "collectd"
kind = "collectd"
plugins = ["cpu", "memory", { name = "df", config = 'MountPoint "/"' }]
interval = "10s"

[[collector]]
name = "logs"
kind = "fluentd"
interval = "30s"
config = '''
<source>
  @type tail
</source>
'''
"#;

const AGENT_SETTINGS: &str = r#"
gateway_url = "wss://gateway.example.test:8443"
enroll_key = "KEY"
pin_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
state_dir = "/opt/outpost/state"
checks_dir = "/etc/outpost/checks.d"
plugins_dir = "/opt/outpost/plugins"
hostname = "web-1"
labels = { role = "web", site = "dc1" }
groups = ["eu"]
max_concurrent_checks = 8
outbox_max_mb = 100
reconnect_max_secs = 60
checks_poll_secs = 5
interpreters = { ps1 = ["pwsh", "-File"] }
"#;

fn result(seq: u64, check: &str) -> CheckResult {
    let mut r = CheckResult::new(check, Status::Warning, "LOAD WARNING - load average 4.2");
    r.seq = seq;
    r.long_output = "1 min 4.2\n5 min 3.1".into();
    r.started_at_ms = 1_764_892_800_000 + seq * 10_000;
    r.duration_ms = 12;
    r.exit_code = Some(1);
    r.metrics = vec![Metric {
        name: "load1".into(),
        value: 4.2,
        unit: None,
        warn: Some("4".into()),
        crit: Some("8".into()),
        min: Some(0.0),
        max: None,
    }];
    r
}

fn specs() -> Vec<CheckSpec> {
    outpost_protocol::checkfile::parse_file_with_collectors(Path::new("seeds.toml"), CHECK_FILE)
        .expect("the seeds' check file parses")
        .0
        .into_iter()
        .map(|d| d.spec)
        .collect()
}

fn frames() -> Vec<(String, Vec<u8>)> {
    let specs = specs();
    let agent = [
        json!({"type": "hello", "protocol": 1, "fingerprint": "0f8fad5b-d9cb-469f-a165-70867728950e",
               "credential": {"kind": "enroll_key", "key": "KEY"}, "agent_version": "0.1.0",
               "os": "linux", "arch": "x86_64", "hostname": "web-1",
               "labels": {"role": "web"}, "groups": ["eu"], "config_hash": null}),
        serde_json::to_value(AgentFrame::Results(Results {
            results: vec![result(1, "load"), result(2, "disk_root")],
        }))
        .unwrap(),
        json!({"type": "rpc_reply", "id": 7, "result": result(0, "load")}),
        json!({"type": "rpc_reply", "id": 8, "error": {"code": "busy", "message": "busy"}}),
        json!({"type": "plugin_request", "sha256": "ab".repeat(32)}),
        json!({"type": "bye", "reason": "agent stopping", "back_within_secs": 30}),
    ];
    let gateway = [
        json!({"type": "welcome", "protocol": 1, "gateway_version": "0.1.0", "agent_secret": "s3cret",
               "config_hash": "cd".repeat(32), "heartbeat_secs": 30, "last_seq": 41}),
        json!({"type": "config", "hash": "cd".repeat(32), "checks": specs}),
        json!({"type": "ack", "seq": 41}),
        json!({"type": "rpc_request", "id": 7, "method": "run_check", "check": "load"}),
        json!({"type": "plugin", "name": "check_load", "sha256": "ab".repeat(32), "content_b64": "IyEvYmluL3NoCmVjaG8gT0sK"}),
        json!({"type": "error", "code": "unauthorized", "message": "unknown agent"}),
        json!({"type": "reconnect", "reason": "draining", "min_delay_ms": 100, "max_delay_ms": 5000}),
        json!({"type": "update", "version": "0.2.0"}),
    ];
    let mut out = Vec::new();
    for (i, v) in agent.iter().enumerate() {
        let text = v.to_string();
        decode_agent_frame(&text).unwrap_or_else(|e| panic!("agent seed {i} decodes: {e}: {text}"));
        out.push((format!("agent-{i}.json"), text.into_bytes()));
    }
    for (i, v) in gateway.iter().enumerate() {
        let text = v.to_string();
        let f = decode_gateway_frame(&text)
            .unwrap_or_else(|e| panic!("gateway seed {i} decodes: {e}: {text}"));
        assert!(
            !encode(&f).contains("\"unknown\""),
            "gateway seed {i} is a known frame"
        );
        out.push((format!("gateway-{i}.json"), text.into_bytes()));
    }
    out
}

fn check_specs() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = specs()
        .into_iter()
        .map(|s| {
            (
                format!("spec-{}.json", s.name),
                serde_json::to_vec(&s).unwrap(),
            )
        })
        .collect();
    out.push((
        "result.json".into(),
        serde_json::to_vec(&result(3, "load")).unwrap(),
    ));
    out
}

fn texts(items: &[&str]) -> Vec<(String, Vec<u8>)> {
    items
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("seed-{i}"), t.as_bytes().to_vec()))
        .collect()
}

fn dns() -> Vec<(String, Vec<u8>)> {
    let name = Name::from_ascii("example.test.").unwrap();
    let answers: Vec<(RecordType, Vec<RData>)> = vec![
        (
            RecordType::A,
            vec![
                RData::A(A::new(192, 0, 2, 1)),
                RData::A(A::new(192, 0, 2, 2)),
            ],
        ),
        (
            RecordType::AAAA,
            vec![RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))],
        ),
        (
            RecordType::MX,
            vec![RData::MX(MX::new(
                10,
                Name::from_ascii("mail.example.test.").unwrap(),
            ))],
        ),
        (
            RecordType::SRV,
            vec![RData::SRV(SRV::new(
                0,
                5,
                5060,
                Name::from_ascii("sip.example.test.").unwrap(),
            ))],
        ),
        (
            RecordType::TXT,
            vec![RData::TXT(TXT::new(vec!["v=spf1 -all".into()]))],
        ),
        (
            RecordType::CNAME,
            vec![RData::CNAME(CNAME(
                Name::from_ascii("www.example.test.").unwrap(),
            ))],
        ),
    ];
    answers
        .into_iter()
        .map(|(rtype, rdatas)| {
            let mut m = Message::new(0x1234, MessageType::Response, OpCode::Query);
            m.add_query(Query::query(name.clone(), rtype));
            for rd in rdatas {
                m.add_answer(Record::from_rdata(name.clone(), 60, rd));
            }
            let bytes = m.to_vec().expect("a DNS message encodes");
            Message::from_vec(&bytes).expect("and decodes");
            (format!("{rtype}.bin"), bytes)
        })
        .collect()
}

fn manifests() -> Vec<(String, Vec<u8>)> {
    let manifest = Manifest {
        releases: vec![Release {
            version: "0.2.0".into(),
            target: "x86_64-unknown-linux-musl".into(),
            file: "outpost-agent-x86_64-unknown-linux-musl".into(),
            size: 5_000_000,
            sha256: "ab".repeat(32),
        }],
    }
    .to_bytes();
    Manifest::parse(&manifest).expect("the manifest parses");
    // Signed by the fuzz target's key ([7; 32]): manifest, NUL, signature file.
    let key = parse_signing_key(&key_file_text("fuzz", &[7u8; 32])).unwrap();
    let mut signed = manifest.clone();
    signed.push(0);
    signed.extend_from_slice(sign_manifest(&manifest, &key).as_bytes());
    vec![
        ("manifest.json".into(), manifest),
        ("signed.bin".into(), signed),
    ]
}

fn segments() -> Vec<(String, Vec<u8>)> {
    let line = |seq: u64| {
        let mut l = serde_json::to_vec(&json!({
            "tenant": "home",
            "fingerprint": "0f8fad5b-d9cb-469f-a165-70867728950e",
            "result": result(seq, "load"),
        }))
        .unwrap();
        l.push(b'\n');
        l
    };
    let whole: Vec<u8> = (1..=3).flat_map(line).collect();
    let mut torn = whole.clone();
    torn.extend_from_slice(&line(4)[..40]);
    vec![("whole.jsonl".into(), whole), ("torn.jsonl".into(), torn)]
}

/// The outbox target's input is damage done to a real outbox file (see its source), as
/// `arbitrary` reads it from bytes: none, a few bytes, a truncation.
fn outbox() -> Vec<(String, Vec<u8>)> {
    texts(&[
        "",
        "\x01\x00\x10\x00\x00\x00\x7f",
        "\x00\x05\x00\x00\x00\x00",
    ])
}

fn seeds() -> BTreeMap<&'static str, Vec<(String, Vec<u8>)>> {
    let mut all = BTreeMap::new();
    all.insert("frames", frames());
    all.insert("check_spec", check_specs());
    all.insert(
        "nagios",
        texts(&[
            "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968",
            "LOAD WARNING - load average: 4.20, 3.10, 2.00|load1=4.200;4.000;8.000;0; load5=3.100;3.000;6.000;0;\nmore\nlines | 'quoted label'=5s;1:10;@20:30;0;100 time=0.001s",
            "PROCS CRITICAL | procs=900c;~:500;10:;; bytes=1.5e3B;;;;",
            "no perfdata at all\n",
        ]),
    );
    all.insert(
        "json_output",
        texts(&[
            r#"{"status": "warning", "text": "2 of 3 queues slow", "metrics": {"depth": 120, "age_s": {"value": 31, "unit": "s", "warn": "30", "crit": "60"}}, "faults": [{"name": "queue-b", "status": "critical", "text": "stuck for 5m"}]}"#,
            r#"{"status": 0, "output": "fine", "long_output": "a\nb", "metrics": [{"name": "x", "value": 1.5, "min": 0, "max": 10}]}"#,
            r#"{"sub_faults": [{"name": "a", "status": "UNKNOWN"}]}"#,
        ]),
    );
    outpost_protocol::checkfile::parse_file_with_collectors(Path::new("seeds.toml"), CHECK_FILE)
        .expect("the seeds' check file and collectors parse");
    outpost_gateway::alerts::config::parse_file(CHECK_FILE).expect("its alerting tables parse");
    all.insert(
        "checkfile",
        vec![
            ("rich.toml".into(), CHECK_FILE.as_bytes().to_vec()),
            (
                "quickstart.toml".into(),
                std::fs::read(root().join("examples/checks.d/quickstart.toml")).unwrap(),
            ),
        ],
    );
    outpost_agent::settings::Settings::from_toml(AGENT_SETTINGS, &BTreeMap::new())
        .expect("the seeds' agent settings are valid");
    all.insert("agent_settings", texts(&[AGENT_SETTINGS]));
    all.insert(
        "collector_inputs",
        texts(&[
            "c@S.web-1.cpu-0.cpu-user 12.5 1764892800\nc@S.web-1.memory.memory-used 1.2e9 1764892800\r\nc@S.x nan\nd@S.y 1\n",
            r#"[{"message": "hello", "level": "info"}, {"message": "bye"}, 3]"#,
            "{\"a\": 1}\n{\"b\": [1, 2]}\n\n",
        ]),
    );
    let exposition = "# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.42\n\
             # TYPE http_requests_total counter\nhttp_requests_total{method=\"post\",code=\"200\"} 1027 1395066363000\n\
             http_requests_total{method=\"post\",code=\"400\"}    3 1395066363000\n\
             # TYPE rpc_duration_seconds summary\nrpc_duration_seconds{quantile=\"0.5\"} 4773\n\
             rpc_duration_seconds_sum 1.7560473e+07\nrpc_duration_seconds_count 2693\n\
             metric_without_timestamp_and_labels 12.47\nsomething_weird{problem=\"division by zero\"} +Inf -3982045\n\
             escaped{path=\"C:\\\\dir\\\\\",text=\"a \\\"quote\\\"\\nline\"} NaN\n";
    let parsed = outpost_agent::checks::net::prometheus::parse(exposition);
    assert_eq!(
        (parsed.samples.len(), parsed.error_count),
        (9, 0),
        "{:?}",
        parsed.errors
    );
    all.insert("prometheus", texts(&[exposition]));
    all.insert("dns", dns());
    all.insert("manifest", manifests());
    all.insert("segments", segments());
    all.insert("outbox", outbox());
    all.insert(
        "event_id",
        texts(&["12-3-4", "0-0-0", "18446744073709551615-1-1"]),
    );
    all
}

#[test]
fn every_fuzz_target_has_seeds_that_its_decoder_accepts() {
    let corpus = root().join("fuzz/corpus");
    let seeds = seeds();
    let targets: Vec<String> = std::fs::read_dir(root().join("fuzz/fuzz_targets"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            p.file_stem().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    for t in &targets {
        assert!(
            seeds.contains_key(t.as_str()),
            "seeds are made for the fuzz target {t}"
        );
    }
    if std::env::var("OUTPOST_UPDATE_FUZZ_SEEDS").as_deref() == Ok("1") {
        for (target, files) in &seeds {
            let dir = corpus.join(target);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in files {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
    // The committed seeds are exactly the ones made here (so they are inputs the decoders
    // accept today, each checked above as it was made).
    for (target, files) in &seeds {
        let dir = corpus.join(target);
        let mut committed: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (OUTPOST_UPDATE_FUZZ_SEEDS=1 makes it)",
                    dir.display()
                )
            })
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        committed.sort();
        let mut made: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
        made.sort();
        assert_eq!(
            committed, made,
            "{target}: the committed seeds (OUTPOST_UPDATE_FUZZ_SEEDS=1)"
        );
        for (name, bytes) in files {
            let on_disk = std::fs::read(dir.join(name)).unwrap();
            assert!(
                on_disk == *bytes,
                "{target}/{name} is not the seed made now (OUTPOST_UPDATE_FUZZ_SEEDS=1)"
            );
        }
    }
}
