//! Metric export to real time-series databases: the perfdata of real Nagios plugins, run
//! by a real agent, read back from a real Prometheus (remote-write) and a real
//! VictoriaMetrics (InfluxDB line protocol) with PromQL, and compared with what the
//! plugins printed; a sink down for a while gets every sample of the gap, once.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_e2e::tsdb::{PromQl, Prometheus, VictoriaMetrics};
use outpost_e2e::{eventually, tempdir, Agent, Gateway, Value};

const LOAD: &str = "/usr/lib/nagios/plugins/check_load";
const DISK: &str = "/usr/lib/nagios/plugins/check_disk";

/// Two real Nagios plugins every second, and `export` (an `[[export]]` table).
fn checks(export: &str) -> String {
    format!(
        "[[check]]\nname = \"load\"\ncommand = [\"{LOAD}\", \"-w\", \"90,80,70\", \"-c\", \"100,90,80\"]\ninterval = \"1s\"\n\
         [[check]]\nname = \"disk\"\ncommand = [\"{DISK}\", \"-w\", \"1%\", \"-c\", \"1%\", \"-p\", \"/\"]\ninterval = \"1s\"\n\
         {export}"
    )
}

fn now_secs() -> f64 {
    outpost_e2e::now_ms() as f64 / 1000.0 + 1.0
}

/// Every (ms, value) of `metric` in the results of `check` on the bus.
fn printed(gw: &Gateway, fp: &str, check: &str, metric: &str) -> BTreeMap<i64, (f64, Value)> {
    gw.bus_results(fp, check)
        .into_iter()
        .filter_map(|r| {
            let m = r["metrics"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == metric)?
                .clone();
            Some((r["started_at_ms"].as_i64()?, (m["value"].as_f64()?, m)))
        })
        .collect()
}

/// The perfdata of `load` and `disk` in `db` (one series each, under `name`) is what the
/// plugins printed, sample for sample, with its unit and labels; `warn` names the
/// warning threshold's series.
async fn compare(db: &impl PromQl, name: &str, warn: &str, gw: &Gateway, fp: &str) {
    for (check, metric) in [("load", "load1"), ("disk", "/")] {
        let selector = format!("{name}{{check=\"{check}\",metric=\"{metric}\"}}");
        // Compared up to 5 s before the newest sample (a database may make the newest
        // searchable out of order), and polled until equal.
        let (labels, samples, want) = eventually(
            Duration::from_secs(60),
            &format!("{selector} in the database, as on the bus"),
            || async {
                let s = db.samples(&selector, 600, now_secs())?;
                let [(labels, samples)] = s.as_slice() else {
                    return None;
                };
                let newest = samples.last()?.0;
                let samples: Vec<(i64, f64)> = samples
                    .iter()
                    .copied()
                    .filter(|(ts, _)| *ts <= newest - 5_000)
                    .collect();
                let (first, last) = (samples.first()?.0, samples.last()?.0);
                let want: Vec<(i64, f64)> = printed(gw, fp, check, metric)
                    .range(first..=last)
                    .map(|(ts, (v, _))| (*ts, *v))
                    .collect();
                (samples.len() >= 3 && samples == want).then(|| (labels.clone(), samples, want))
            },
        )
        .await;
        assert_eq!(samples, want);
        let on_bus = printed(gw, fp, check, metric);
        let (_, m) = on_bus.values().next().unwrap();
        assert_eq!(
            labels["unit"].as_str().unwrap_or(""),
            m["unit"].as_str().unwrap_or(""),
            "{selector}: unit"
        );
        assert_eq!(labels["agent"], fp);
        assert_eq!(labels["hostname"], "a1");
        assert_eq!(labels["dc"], "lab", "the agent's own labels");
        assert!(labels["tenant"].as_str().is_some_and(|t| !t.is_empty()));
    }
    // A plain-number threshold is a series of its own.
    let warn = format!("{warn}{{check=\"load\",metric=\"load1\"}}");
    let warn = eventually(Duration::from_secs(30), "the warning threshold", || async {
        db.query(&warn, now_secs()).filter(|r| !r.is_empty())
    })
    .await;
    assert_eq!(
        warn[0]["value"][1], "90",
        "check_load -w 90,… printed load1's warn as 90.000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nagios_perfdata_reaches_a_real_prometheus_by_remote_write_with_its_units_and_labels() {
    let dir = tempdir();
    let prom = Prometheus::start(dir.path());
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "checks.toml",
        &checks(&format!(
            "[[export]]\nname = \"prom\"\nremote_write = {{ url = \"{}\" }}\nfrom = \"start\"\n",
            prom.write_url()
        )),
    );
    let agent = Agent::start(dir.path(), "a1", &gw, "[labels]\ndc = \"lab\"\n");
    compare(
        &prom,
        "outpost_check_metric",
        "outpost_check_metric_warn",
        &gw,
        &agent.fingerprint,
    )
    .await;
    // The state: load is OK (0); the agent is online (1).
    let status = prom
        .query("outpost_check_status{check=\"load\"}", now_secs())
        .unwrap();
    assert_eq!(status[0]["value"][1], "0");
    let online = eventually(Duration::from_secs(30), "the agent's presence", || async {
        prom.query("outpost_agent_online{hostname=\"a1\"}", now_secs())
            .filter(|r| !r.is_empty())
    })
    .await;
    assert_eq!(online[0]["value"][1], "1");
    assert_eq!(online[0]["metric"]["agent"], agent.fingerprint.as_str());
    let sent = gw.metric("outpost_export_samples_sent_total ").await;
    assert!(sent > 0, "the gateway counts what it sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nagios_perfdata_reaches_a_real_victoriametrics_by_influx_line_protocol() {
    let dir = tempdir();
    let vm = VictoriaMetrics::start(dir.path());
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "checks.toml",
        &checks(&format!(
            "[[export]]\nname = \"vm\"\ninflux = {{ url = \"{}\", database = \"outpost\" }}\nfrom = \"start\"\n",
            vm.url()
        )),
    );
    let agent = Agent::start(dir.path(), "a1", &gw, "[labels]\ndc = \"lab\"\n");
    // (VictoriaMetrics names a line protocol field `<measurement>_<field>`.)
    compare(
        &vm,
        "outpost_check_metric_value",
        "outpost_check_metric_warn_value",
        &gw,
        &agent.fingerprint,
    )
    .await;
}

/// Prometheus stopped under steady load, then started again: the export waits, retries,
/// and once it is back sends the whole backlog, so every result of the gap has its
/// sample, once. (`OUTPOST_EXPORT_GAP_SECS`, 20 s here by default: the documented long
/// run is 300.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_for_a_while_gets_every_sample_of_the_gap_once_when_back() {
    let gap: u64 = std::env::var("OUTPOST_EXPORT_GAP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempdir();
    let mut prom = Prometheus::start(dir.path());
    let gw = Gateway::start(dir.path(), &[]);
    gw.write_checks(
        "checks.toml",
        &checks(&format!(
            "[[export]]\nname = \"prom\"\nremote_write = {{ url = \"{}\" }}\nfrom = \"start\"\n",
            prom.write_url()
        )),
    );
    let agent = Agent::start(dir.path(), "a1", &gw, "[labels]\ndc = \"lab\"\n");
    let fp = agent.fingerprint.clone();
    eventually(Duration::from_secs(60), "samples exported", || async {
        let s = prom.samples("outpost_check_status{check=\"load\"}", 600, now_secs())?;
        (s.len() == 1 && s[0].1.len() >= 3).then_some(())
    })
    .await;
    prom.stop();
    let down_from = outpost_e2e::now_ms() as i64;
    tokio::time::sleep(Duration::from_secs(gap)).await;
    let failed = gw.metric("outpost_export_failed_requests_total ").await;
    assert!(failed > 0, "the export saw the sink down");
    let down_to = outpost_e2e::now_ms() as i64;
    prom.restart();
    let window = gap + 600;
    for check in ["load", "disk"] {
        let selector = format!("outpost_check_status{{check=\"{check}\"}}");
        let (got, made) = eventually(
            Duration::from_secs(60),
            &format!("every result of {check} made until the restart in Prometheus"),
            || async {
                let s = prom.samples(&selector, window, now_secs())?;
                let got: Vec<i64> = s.first()?.1.iter().map(|(ts, _)| *ts).collect();
                let made: Vec<i64> = gw
                    .bus_results(&fp, check)
                    .iter()
                    .filter_map(|r| r["started_at_ms"].as_i64())
                    .filter(|ts| *ts <= down_to)
                    .collect();
                let first = *made.first()?;
                let covered: Vec<i64> = got
                    .iter()
                    .copied()
                    .filter(|t| (first..=down_to).contains(t))
                    .collect();
                (covered == made).then_some((covered, made))
            },
        )
        .await;
        let in_gap = made
            .iter()
            .filter(|t| (down_from..down_to).contains(*t))
            .count();
        assert!(
            in_gap as u64 >= gap / 2,
            "{check}: results were made while the sink was down: {in_gap}"
        );
        assert_eq!(got, made);
    }
    let refused = gw.metric("outpost_export_samples_refused_total ").await;
    assert_eq!(refused, 0, "nothing of the backlog refused");
}

/// On a NATS fleet one gateway exports a sink at a time, under a lease; killed (SIGKILL)
/// mid-export, another gateway takes the lease and goes on from the cursor in NATS:
/// every result has its sample in Prometheus, before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleets_export_moves_to_another_gateway_when_its_holder_is_killed() {
    use outpost_e2e::fleet;
    use outpost_e2e::nats::{config_push, stream_results, NatsServer};

    let dir = tempdir();
    let nats = NatsServer::start(dir.path(), "nats");
    let urls = nats.url();
    let pki = fleet::pki(dir.path());
    let prom = Prometheus::start(dir.path());
    let export = format!(
        "[[export]]\nname = \"prom\"\nremote_write = {{ url = \"{}\" }}\nfrom = \"start\"\n",
        prom.write_url()
    );
    config_push(
        &urls,
        &fleet::write_config(dir.path(), &[("base.toml", &checks(&export))]),
        &[],
    );
    let mut gws = fleet::gateways(dir.path(), 2, &urls, &pki);
    const HOLDS: &str = "what=\"metric export\"";
    let holder = eventually(
        Duration::from_secs(60),
        "a gateway exports the sink",
        || async {
            gws.iter().position(|g| {
                g.proc
                    .log()
                    .lines()
                    .any(|l| l.contains("now holds the tenant's lease") && l.contains(HOLDS))
            })
        },
    )
    .await;
    let other = 1 - holder;
    // The agent on the other gateway, which goes on storing its results throughout.
    let agent = fleet::agent(dir.path(), "a1", &gws[other].addr, &pki, &gws[0].enroll_key);
    let fp = agent.fingerprint.clone();
    // Every result of `load` stored up to `until` (ms) has its sample in Prometheus.
    let all_there = |until: i64| {
        let (prom, fp, urls) = (&prom, &fp, &urls);
        async move {
            let stored: Vec<i64> = stream_results(urls)
                .await?
                .iter()
                .filter(|l| l["fingerprint"] == fp.as_str() && l["result"]["check"] == "load")
                .filter_map(|l| l["result"]["started_at_ms"].as_i64())
                .filter(|t| *t <= until)
                .collect();
            let s = prom.samples("outpost_check_status{check=\"load\"}", 900, now_secs())?;
            let got: Vec<i64> = s.first()?.1.iter().map(|(t, _)| *t).collect();
            let covered: Vec<i64> = got
                .into_iter()
                .filter(|t| stored.first().is_some_and(|f| t >= f) && *t <= until)
                .collect();
            (stored.len() >= 5 && covered == stored).then_some(stored.len())
        }
    };
    eventually(Duration::from_secs(60), "the results exported", || {
        all_there(outpost_e2e::now_ms() as i64 - 2_000)
    })
    .await;
    gws[holder].proc.signal(libc::SIGKILL);
    let _ = gws[holder].proc.wait_exit(Duration::from_secs(10)).await;
    let killed_at = outpost_e2e::now_ms() as i64;
    // The lease runs out (8 s unrenewed) and the other gateway takes the sink over.
    eventually(
        Duration::from_secs(60),
        "the other gateway exports the sink",
        || async {
            gws[other]
                .proc
                .log()
                .lines()
                .any(|l| l.contains("now holds the tenant's lease") && l.contains(HOLDS))
                .then_some(())
        },
    )
    .await;
    let after = killed_at + 15_000;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let n = eventually(
        Duration::from_secs(60),
        "every result, from before and after the kill, exported",
        || all_there(after),
    )
    .await;
    assert!(n >= 20, "{n} results audited");
    drop(gws.remove(other));
}
