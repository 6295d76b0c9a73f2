//! One tenant over its result rate next to another, on one gateway (embedded bus): the
//! `quiet` tenant's agents send small batches at a steady pace and one of them answers
//! run-now calls; its ack latency (from sending a batch to its ack) and run-now latency
//! are measured alone, then while the `noisy` tenant's agents offer ten times its
//! `results_per_sec` (the gateway holds their acks, up to 20 s each), then, for contrast,
//! while a tenant with no limit sends the same flood and all of it goes through.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use super::https::Client;
use super::loadgen::{self, Behaviour, Fleet};
use super::FleetPlan;
use crate::harness::{Bins, Gateway};
use crate::sample::{sample_for, Series};
use crate::{percentile, progress};

const QUIET: &str = "quiet";
const NOISY: &str = "noisy";
const UNLIMITED: &str = "noisy-unlimited";

/// A tenant made through the API: its name and first admin token, and an enrollment key.
struct Tenant {
    name: &'static str,
    admin_token: String,
    enroll_key: String,
}

/// The tenant flooding next to the quiet one during a row.
struct Flood {
    tenant: &'static str,
    limit: Option<u64>,
    /// Results per second its agents would send if every ack came at once.
    offered: f64,
    acked_per_sec: f64,
    /// Its ack latencies in the window, sorted, in µs.
    ack_us: Vec<u64>,
    /// `outpost_access_refused_total{tenant=…,reason="results_rate"}` over the window:
    /// its batches whose ack was held for the tenant's rate.
    held: u64,
    failures: u64,
    first_error: Option<String>,
}

/// What one row measured.
struct Row {
    label: String,
    quiet_acked_per_sec: f64,
    /// The quiet tenant's ack latencies in the window, sorted, in µs.
    ack_us: Vec<u64>,
    /// Run-now latencies, sorted, in µs.
    runnow_us: Vec<u64>,
    runnow_non_ok: u64,
    runnow_first_bad: Option<String>,
    quiet_failures: u64,
    quiet_first_error: Option<String>,
    flood: Option<Flood>,
    gateway_cpu: f64,
    own_cpu: f64,
    /// Competing CPU: the machine's busy time less the gateway's and this tool's, in % of
    /// one core.
    other: f64,
}

/// Everything one run on one gateway gave.
struct Run {
    rows: Vec<Row>,
    notes: Vec<String>,
}

/// Create `name` with `limits` (as the operator), then an enrollment key (as its admin).
async fn create_tenant(
    gw: &Gateway,
    operator: &mut Client,
    name: &'static str,
    limits: serde_json::Value,
) -> Result<Tenant> {
    let body = json!({ "name": name, "limits": limits });
    let a = operator.call_json("POST", "/api/v1/tenants", &body).await?;
    if a.status != 201 {
        bail!(
            "POST /api/v1/tenants {body} answered {}: {} (a gateway without tenants?)",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let created: serde_json::Value =
        serde_json::from_slice(&a.body).context("the new tenant's answer is not JSON")?;
    let admin_token = created["admin_token"]
        .as_str()
        .ok_or_else(|| anyhow!("no admin_token in the new tenant's answer: {created}"))?
        .to_string();
    let mut admin = Client::connect(super::gateway_addr(gw)?, &gw.pin, &admin_token).await?;
    let a = admin.call_json("POST", "/api/v1/keys", &json!({})).await?;
    if a.status != 201 {
        bail!(
            "POST /api/v1/keys for tenant {name} answered {}: {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let key: serde_json::Value =
        serde_json::from_slice(&a.body).context("the new key's answer is not JSON")?;
    let enroll_key = key["enroll_key"]
        .as_str()
        .ok_or_else(|| anyhow!("no enroll_key in the new key's answer: {key}"))?
        .to_string();
    Ok(Tenant {
        name,
        admin_token,
        enroll_key,
    })
}

/// `n` agents of `tenant`, each sending `batch` results per batch at most every `pace`,
/// connecting from source addresses `offset` on; once they are all online, with their
/// fingerprints.
#[allow(clippy::too_many_arguments)]
fn tenant_fleet(
    rt: &tokio::runtime::Handle,
    gw: &Gateway,
    tenant: &Tenant,
    n: usize,
    offset: usize,
    batch: usize,
    pace: Duration,
    fp: &FleetPlan,
) -> Result<(Fleet, Vec<String>)> {
    let ids = super::agents_enrolling(n, &tenant.enroll_key);
    let fps = ids.iter().map(|i| i.fingerprint.clone()).collect();
    let fleet = Fleet::start(
        rt,
        ids,
        offset,
        Behaviour {
            addrs: vec![super::gateway_addr(gw)?],
            pin: gw.pin.clone(),
            batch,
            pace: Some(pace),
            redial: false,
            redial_jitter: Duration::ZERO,
            dial_concurrency: fp.dial_concurrency,
            groups: Vec::new(),
            features: Vec::new(),
        },
    )?;
    if !fleet.wait_online(n as u64, Duration::from_secs(60)) {
        let why = fleet.stats.first_error().unwrap_or_default();
        let online = fleet.stats.online();
        fleet.stop(rt, Duration::from_secs(5));
        bail!(
            "only {online} of {n} agents of tenant {} came online within 60 s: {why}",
            tenant.name
        );
    }
    Ok((fleet, fps))
}

fn run_path(fp: &str) -> String {
    format!("/api/v1/agents/{fp}/checks/ping/run")
}

/// Call run-now on `fp` until it answers 200 (the tenant's checks are read when its first
/// agent connects), then 10 calls of warm-up (not counted: the first calls on a connection
/// pay for lazy set-up on every side).
async fn runnow_ready(client: &mut Client, fp: &str) -> Result<()> {
    let ready_by = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = client.call("POST", &run_path(fp)).await?;
        if a.status == 200 {
            break;
        }
        if std::time::Instant::now() >= ready_by {
            bail!(
                "run-now for agent {fp} still answered {} after 30 s: {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        client.call("POST", &run_path(fp)).await?;
    }
    Ok(())
}

/// Run-now latencies of `n` calls one at a time, spread evenly over a window.
struct RunNow {
    latencies: Vec<u64>,
    non_ok: u64,
    first_bad: Option<String>,
}

async fn runnow_spread(
    mut client: Client,
    fp: String,
    n: usize,
    window: Duration,
) -> Result<RunNow> {
    let spacing = window / n.max(1) as u32;
    let start = tokio::time::Instant::now();
    let mut latencies = Vec::with_capacity(n);
    let (mut non_ok, mut first_bad) = (0, None);
    for i in 0..n {
        tokio::time::sleep_until(start + spacing * i as u32).await;
        let a = client.call("POST", &run_path(&fp)).await?;
        latencies.push(a.took.as_micros() as u64);
        if a.status != 200 {
            non_ok += 1;
            first_bad.get_or_insert_with(|| {
                format!("{}: {}", a.status, String::from_utf8_lossy(&a.body))
            });
        }
    }
    Ok(RunNow {
        latencies,
        non_ok,
        first_bad,
    })
}

/// `outpost_access_refused_total{tenant="<tenant>",reason="results_rate"}` from the
/// gateway's /metrics (0 while the gateway has counted none). `client` has the operator's
/// token: others see the counts by reason only, which are taken instead (in this part only
/// the flooding tenant has a limit).
async fn held_acks(client: &mut Client, tenant: &str) -> Result<u64> {
    let a = client.call("GET", "/metrics").await?;
    if a.status != 200 {
        bail!("GET /metrics answered {}", a.status);
    }
    let text = String::from_utf8_lossy(&a.body);
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let per_tenant =
        format!("outpost_access_refused_total{{tenant=\"{tenant}\",reason=\"results_rate\"}} ");
    Ok(value(&per_tenant)
        .or_else(|| value("outpost_access_refused_total{reason=\"results_rate\"} "))
        .map_or(0, |v| v as u64))
}

fn sorted(v: Vec<u32>) -> Vec<u64> {
    let mut v: Vec<u64> = v.into_iter().map(u64::from).collect();
    v.sort_unstable();
    v
}

/// How a row reaches the API. Each use opens its own connection: the gateway closes a
/// kept-alive connection idle for 10 s (hyper's header read timeout runs between
/// requests), and rows are further apart than that.
struct Api {
    addr: std::net::SocketAddr,
    pin: String,
    /// For /metrics: the operator sees the refusals by tenant.
    operator_token: String,
    /// The quiet tenant's admin token, for run-now.
    quiet_token: String,
    /// The quiet agent run-now calls.
    fp: String,
}

impl Api {
    async fn held_acks(&self, tenant: &str) -> Result<u64> {
        let mut c = Client::connect(self.addr, &self.pin, &self.operator_token).await?;
        held_acks(&mut c, tenant).await
    }

    /// A run-now connection, warmed up.
    async fn runnow(&self) -> Result<Client> {
        let mut c = Client::connect(self.addr, &self.pin, &self.quiet_token).await?;
        runnow_ready(&mut c, &self.fp).await?;
        Ok(c)
    }
}

/// One row: a warm-up, then the window, with the quiet fleet (and `flood`, already
/// online: its fleet, its tenant and limit, what it offers) running.
#[allow(clippy::too_many_arguments)]
fn measure_row(
    rt: &tokio::runtime::Handle,
    gw: &mut Gateway,
    fp: &FleetPlan,
    label: &str,
    quiet: &Fleet,
    flood: Option<(&Fleet, &'static str, Option<u64>, f64)>,
    api: &Api,
) -> Result<Row> {
    progress(format!(
        "fleet tenants: {label}: {} s warm-up, {} s window",
        fp.tenants_warmup.as_secs(),
        fp.tenants_window.as_secs()
    ));
    std::thread::sleep(fp.tenants_warmup);
    gw.proc.ensure_running()?;
    let client = rt.block_on(api.runnow())?;
    let held0 = match flood {
        Some((_, tenant, ..)) => rt.block_on(api.held_acks(tenant))?,
        None => 0,
    };
    let fleets: Vec<&Fleet> = std::iter::once(quiet).chain(flood.map(|f| f.0)).collect();
    let mut acked0 = Vec::new();
    for f in &fleets {
        f.stats.take_ack_latencies();
        acked0.push(f.stats.acked.load(Ordering::Relaxed));
        f.stats.record_ack_latency.store(true, Ordering::Relaxed);
    }
    let failures0: Vec<u64> = fleets
        .iter()
        .map(|f| f.stats.failures.load(Ordering::Relaxed))
        .collect();
    let mut g = Series::start(gw.proc.pid())?;
    let mut me = Series::start(std::process::id())?;
    let t0 = std::time::Instant::now();
    let calls = rt.spawn(runnow_spread(
        client,
        api.fp.clone(),
        fp.tenants_runnow_calls,
        fp.tenants_window,
    ));
    sample_for(fp.tenants_window, &mut [&mut g, &mut me])?;
    let secs = t0.elapsed().as_secs_f64();
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    for (f, a0) in fleets.iter().zip(&acked0) {
        f.stats.record_ack_latency.store(false, Ordering::Relaxed);
        acked.push(f.stats.acked.load(Ordering::Relaxed) - a0);
        latencies.push(sorted(f.stats.take_ack_latencies()));
    }
    let failures: Vec<u64> = fleets
        .iter()
        .zip(&failures0)
        .map(|(f, f0)| f.stats.failures.load(Ordering::Relaxed) - f0)
        .collect();
    let calls = rt
        .block_on(calls)
        .map_err(|e| anyhow!("the run-now task failed: {e}"))??;
    gw.proc.ensure_running()?;
    let held = match flood {
        Some((_, tenant, ..)) => rt.block_on(api.held_acks(tenant))?.saturating_sub(held0),
        None => 0,
    };
    let (gu, mu) = (g.usage()?, me.usage()?);
    let mut runnow_us = calls.latencies;
    runnow_us.sort_unstable();
    let mut latencies = latencies.into_iter();
    let ack_us = latencies.next().unwrap_or_default();
    let flood = flood.map(|(f, tenant, limit, offered)| Flood {
        tenant,
        limit,
        offered,
        acked_per_sec: acked[1] as f64 / secs,
        ack_us: latencies.next().unwrap_or_default(),
        held,
        failures: failures[1],
        first_error: f.stats.first_error(),
    });
    let row = Row {
        label: label.to_string(),
        quiet_acked_per_sec: acked[0] as f64 / secs,
        ack_us,
        runnow_us,
        runnow_non_ok: calls.non_ok,
        runnow_first_bad: calls.first_bad,
        quiet_failures: failures[0],
        quiet_first_error: quiet.stats.first_error(),
        flood,
        gateway_cpu: gu.cpu_pct,
        own_cpu: mu.cpu_pct,
        other: (gu.machine_pct - gu.cpu_pct - mu.cpu_pct).max(0.0),
    };
    progress(format!(
        "fleet tenants: {label}: quiet ack p50 {} p99 {}, run-now p50 {} p99 {}{}",
        ms(percentile(&row.ack_us, 50.0)),
        ms(percentile(&row.ack_us, 99.0)),
        ms(percentile(&row.runnow_us, 50.0)),
        ms(percentile(&row.runnow_us, 99.0)),
        row.flood
            .as_ref()
            .map(|f| format!(
                "; {} acked {:.0}/s, {} acks held",
                f.tenant, f.acked_per_sec, f.held
            ))
            .unwrap_or_default()
    ));
    Ok(row)
}

/// The three rows on one gateway under `dir`.
fn run_all(bins: &Bins, dir: &Path, rt: &tokio::runtime::Handle, fp: &FleetPlan) -> Result<Run> {
    let n = fp.tenants_agents;
    progress(format!(
        "fleet tenants: one gateway (embedded bus), tenants {QUIET}, {NOISY} (limit {}/s), {UNLIMITED}, {n} agents each",
        fp.tenants_noisy_limit
    ));
    super::write_tenant_rpc_check(dir, QUIET)?;
    let mut gw = Gateway::start(bins, dir)?;
    let addr = super::gateway_addr(&gw)?;
    let operator_token = gw.operator_token()?;
    let (quiet_t, noisy_t, unlimited_t) = rt.block_on(async {
        let mut operator = Client::connect(addr, &gw.pin, &operator_token).await?;
        let q = create_tenant(&gw, &mut operator, QUIET, json!({})).await?;
        let limits = json!({ "results_per_sec": fp.tenants_noisy_limit });
        let noisy = create_tenant(&gw, &mut operator, NOISY, limits).await?;
        let unlimited = create_tenant(&gw, &mut operator, UNLIMITED, json!({})).await?;
        anyhow::Ok((q, noisy, unlimited))
    })?;
    let (quiet, quiet_fps) = tenant_fleet(
        rt,
        &gw,
        &quiet_t,
        n,
        0,
        fp.tenants_quiet_batch,
        fp.tenants_quiet_pace,
        fp,
    )?;
    let mut run = Run {
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let outcome = (|| -> Result<()> {
        // Run-now goes to the first of the quiet agents (any agent of the tenant would do).
        let api = Api {
            addr,
            pin: gw.pin.clone(),
            operator_token,
            quiet_token: quiet_t.admin_token.clone(),
            fp: quiet_fps
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("the quiet tenant has no agent"))?,
        };
        run.rows.push(measure_row(
            rt,
            &mut gw,
            fp,
            "A. quiet tenant alone",
            &quiet,
            None,
            &api,
        )?);
        // The flood: as many agents, each offering its batch every `pace`, so that together
        // they offer `flood_factor` times the limit.
        let offered = (fp.tenants_flood_factor * fp.tenants_noisy_limit) as f64;
        let pace = Duration::from_secs_f64((n * fp.tenants_noisy_batch) as f64 / offered.max(1.0));
        let flood_of = |gw: &Gateway, t: &Tenant, offset: usize| {
            tenant_fleet(rt, gw, t, n, offset, fp.tenants_noisy_batch, pace, fp).map(|f| f.0)
        };
        let noisy = flood_of(&gw, &noisy_t, n)?;
        let row_b = measure_row(
            rt,
            &mut gw,
            fp,
            &format!(
                "B. quiet tenant while {NOISY} floods at {}× its limit",
                fp.tenants_flood_factor
            ),
            &quiet,
            Some((&noisy, NOISY, Some(fp.tenants_noisy_limit), offered)),
            &api,
        );
        noisy.stop(rt, Duration::from_secs(10));
        run.rows.push(row_b?);
        let row_c = flood_of(&gw, &unlimited_t, 2 * n).and_then(|unlimited| {
            let row = measure_row(
                rt,
                &mut gw,
                fp,
                &format!("C. quiet tenant while {UNLIMITED} sends the same flood, no limit"),
                &quiet,
                Some((&unlimited, UNLIMITED, None, offered)),
                &api,
            );
            unlimited.stop(rt, Duration::from_secs(10));
            row
        });
        match row_c {
            Ok(r) => run.rows.push(r),
            Err(e) => run
                .notes
                .push(format!("C (the flood with no limit): **failed:** {e:#}")),
        }
        Ok(())
    })();
    quiet.stop(rt, Duration::from_secs(10));
    let running = gw.proc.ensure_running();
    gw.proc.stop(Duration::from_secs(10));
    outcome?;
    running?;
    Ok(run)
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// The values of sorted `v` between which its p-th percentile lies with 95% confidence
/// (order statistics: ranks n·q ± 1.96·√(n·q·(1−q)), the normal approximation).
fn percentile_ci(v: &[u64], p: f64) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    let n = v.len() as f64;
    let q = p / 100.0;
    let half = 1.96 * (n * q * (1.0 - q)).sqrt();
    let lo = ((n * q - half).floor() as usize).clamp(1, v.len());
    let hi = ((n * q + half).ceil() as usize + 1).clamp(1, v.len());
    (v[lo - 1], v[hi - 1])
}

/// How `with` compares with `alone` at p99: "unchanged within noise" when their 95%
/// intervals overlap or they are within 10% of each other, else the ratio.
fn verdict(alone: &[u64], with: &[u64]) -> String {
    let (a, w) = (percentile(alone, 99.0), percentile(with, 99.0));
    let ratio = w as f64 / a.max(1) as f64;
    let (alo, ahi) = percentile_ci(alone, 99.0);
    let (wlo, whi) = percentile_ci(with, 99.0);
    let same = (wlo <= ahi && alo <= whi) || (ratio - 1.0).abs() <= 0.10;
    if same {
        format!("unchanged within noise (×{ratio:.2})")
    } else {
        format!("×{ratio:.2} of alone")
    }
}

/// Part: one tenant over its result rate next to another.
pub fn tenants(bins: &Bins, work: &Path, plan: &crate::Plan) -> Result<(String, Vec<String>)> {
    let fp = &plan.fleet;
    let rt = loadgen::runtime()?;
    let run = crate::measured(plan, "fleet tenants", |suffix| {
        let run = run_all(
            bins,
            &work.join(format!("fleet-tenants{suffix}")),
            rt.handle(),
            fp,
        )?;
        let other = run.rows.iter().map(|r| r.other).fold(0.0, f64::max);
        Ok((run, other))
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    let run = run?;

    let n = fp.tenants_agents;
    let pace_ms = fp.tenants_quiet_pace.as_millis();
    let offered = fp.tenants_flood_factor * fp.tenants_noisy_limit;
    let mut out = format!(
        "One gateway (embedded bus, fsync per batch), three tenants made through the API \
(`POST /api/v1/tenants` with the operator's token, then an enrollment key each). The \
`{QUIET}` tenant (no limit): {n} simulated agents, each sending a batch of {qb} results \
every {pace_ms} ms (the next one once the previous is acked, and no sooner), about \
{quiet_rate} results/s in all; its ack latency is the time from sending a batch to its \
ack. Run-now: {calls} calls one at a time on one kept-alive HTTPS connection (the \
tenant's admin token) to one of its agents, spread evenly over each window, timed from \
sending the request to the whole answer. Row A is `{QUIET}` alone; in row B `{NOISY}` \
(`results_per_sec` = {limit}) has {n} agents offering {offered} results/s ({factor}× its \
limit: batches of {nb}, each agent's next once acked and no sooner than its pace), so \
the gateway holds their acks (up to 20 s each); row C is the same flood from \
`{UNLIMITED}`, which has no limit, for contrast. Each row: {warm} s warm-up, then {win} \
s measured. p99 in brackets: its 95% confidence interval (order statistics); \"unchanged \
within noise\" when the intervals alone and with the flood overlap or the p99s are within \
10%. CPU is % of one core over the window.\n\n\
| row | `{QUIET}` acked/s | ack p50 | ack p99 | ack max | acks | run-now p50 | run-now p99 | run-now max | calls (not 200) | gateway CPU | this tool's CPU | other CPU on the machine |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        qb = fp.tenants_quiet_batch,
        quiet_rate = (n * fp.tenants_quiet_batch) as u128 * 1000 / pace_ms.max(1),
        calls = fp.tenants_runnow_calls,
        limit = fp.tenants_noisy_limit,
        factor = fp.tenants_flood_factor,
        nb = fp.tenants_noisy_batch,
        warm = fp.tenants_warmup.as_secs(),
        win = fp.tenants_window.as_secs(),
    );
    let with_ci = |v: &[u64]| {
        let (lo, hi) = percentile_ci(v, 99.0);
        format!(
            "**{}** ({:.2}–{:.2})",
            ms(percentile(v, 99.0)),
            lo as f64 / 1000.0,
            hi as f64 / 1000.0
        )
    };
    let mut notes = String::new();
    for r in &run.rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {:.0}% | {:.0}% | {:.0}% |",
            r.label,
            r.quiet_acked_per_sec,
            ms(percentile(&r.ack_us, 50.0)),
            with_ci(&r.ack_us),
            ms(r.ack_us.last().copied().unwrap_or(0)),
            r.ack_us.len(),
            ms(percentile(&r.runnow_us, 50.0)),
            with_ci(&r.runnow_us),
            ms(r.runnow_us.last().copied().unwrap_or(0)),
            r.runnow_us.len(),
            r.runnow_non_ok,
            r.gateway_cpu,
            r.own_cpu,
            r.other,
        );
        crate::busy_note(
            &mut notes,
            &r.label,
            r.other,
            "its latencies may be inflated",
        );
        if r.quiet_failures > 0 {
            let _ = writeln!(
                notes,
                "- {}: {} sessions of `{QUIET}` failed; first: `{}`",
                r.label,
                r.quiet_failures,
                r.quiet_first_error.clone().unwrap_or_default()
            );
        }
        if let Some(bad) = &r.runnow_first_bad {
            let _ = writeln!(
                notes,
                "- {}: first run-now answer that was not 200: `{}`",
                r.label,
                bad.chars().take(200).collect::<String>()
            );
        }
        if let Some(f) = r.flood.as_ref().filter(|f| f.failures > 0) {
            let _ = writeln!(
                notes,
                "- {}: {} sessions of `{}` failed; first: `{}`",
                r.label,
                f.failures,
                f.tenant,
                f.first_error.clone().unwrap_or_default()
            );
        }
    }
    out.push_str(
        "\nThe flooding tenant in the same windows (acks held: its batches whose ack the \
gateway held for the tenant's rate, from `outpost_access_refused_total{tenant=…,reason=\"results_rate\"}` \
on `/metrics`):\n\n\
| row | tenant | `results_per_sec` | offered results/s | acked results/s | of the limit | ack p50 | ack p99 | acks held |\n\
|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &run.rows {
        let Some(f) = &r.flood else { continue };
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {:.0} | **{:.0}** | {} | {} | {} | {} |",
            r.label,
            f.tenant,
            f.limit.map_or("none".into(), |l| l.to_string()),
            f.offered,
            f.acked_per_sec,
            f.limit.map_or("—".into(), |l| format!(
                "{:.0}%",
                f.acked_per_sec / l.max(1) as f64 * 100.0
            )),
            ms(percentile(&f.ack_us, 50.0)),
            ms(percentile(&f.ack_us, 99.0)),
            f.held,
        );
    }
    out.push('\n');
    for note in &run.notes {
        let _ = writeln!(notes, "- {note}");
    }
    if !notes.is_empty() {
        out.push_str(&notes);
        out.push('\n');
    }

    let mut goals = Vec::new();
    let alone = run.rows.first();
    let flooded = run
        .rows
        .iter()
        .find(|r| r.flood.as_ref().is_some_and(|f| f.limit.is_some()));
    match (alone, flooded.and_then(|b| Some((b, b.flood.as_ref()?)))) {
        (Some(a), Some((b, f))) => {
            let ack = verdict(&a.ack_us, &b.ack_us);
            let call = verdict(&a.runnow_us, &b.runnow_us);
            let mut g = format!(
                "A tenant over its result rate next to another: `{QUIET}`'s ack p99 {} alone, {} while `{NOISY}` offered {}× its {}/s — **{ack}**; run-now p99 {} → {} — **{call}**. `{NOISY}` was held to {:.0} results/s ({} acks held).",
                ms(percentile(&a.ack_us, 99.0)),
                ms(percentile(&b.ack_us, 99.0)),
                fp.tenants_flood_factor,
                fp.tenants_noisy_limit,
                ms(percentile(&a.runnow_us, 99.0)),
                ms(percentile(&b.runnow_us, 99.0)),
                f.acked_per_sec,
                f.held,
            );
            if let Some(c) = run
                .rows
                .iter()
                .find(|r| r.flood.as_ref().is_some_and(|f| f.limit.is_none()))
            {
                let ack_c = verdict(&a.ack_us, &c.ack_us);
                let _ = write!(
                    g,
                    " With no limit (row C) the same flood went through at {:.0}/s and `{QUIET}`'s ack p99 was {} ({ack_c}).",
                    c.flood.as_ref().map_or(0.0, |f| f.acked_per_sec),
                    ms(percentile(&c.ack_us, 99.0)),
                );
            }
            goals.push(g);
        }
        _ => goals.push(
            "A tenant over its result rate next to another: not measured (see the part's notes)."
                .into(),
        ),
    }
    Ok((out, goals))
}
