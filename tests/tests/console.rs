//! The console in a real browser: headless Chromium driven over WebDriver opens the page
//! the gateway serves at `/`, and what it renders is checked against what the API says:
//! the token prompt, the agent and its presence, the check rows, "Run now", the overview
//! counts and a check turning CRITICAL (live, within a second), a sparkline from history,
//! a silence and an acknowledgement made in the page, a clean bye; and a page of 10,000
//! agents that renders only what is in view, scrolls, searches and moves by keyboard.
//! The screenshots in the docs are taken here (`OUTPOST_UPDATE_SCREENSHOTS=1` writes them
//! to `docs/img/`; otherwise to `target/screenshots/`).
//!
//! Needs Debian's chromium and chromium-driver (ci/setup installs them).

use std::time::Duration;

use outpost_e2e::webdriver::{try_wait, wait, Browser, Poll};
use outpost_e2e::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

const CHECKS: &str = r#"
[[check]]
name = "disk"
command = ["/bin/sh", "-c", "echo \"DISK OK - fine | used=5%;80;90;0;100\""]
interval = 1

# Prints the time in nanoseconds: every run's output differs, and later runs print more.
[[check]]
name = "clock"
command = ["/bin/sh", "-c", "date +%s%N"]
interval = 1

# OK until the test writes 2 into FLIP.
[[check]]
name = "flip"
command = ["/bin/sh", "-c", "s=$(cat FLIP 2>/dev/null || echo 0); echo \"FLIP state $s\"; exit $s"]
interval = 1

[[receiver]]
name = "nowhere"
webhook = { url = "http://127.0.0.1:9/" }

[[route]]
checks = ["flip"]
receivers = ["nowhere"]
"#;

/// The overview's counts, read in one go.
const COUNTS: &str = r#"
const n = (id) => Number(document.getElementById("count-" + id).textContent);
return { online: n("online"), lost: n("lost"), deregistered: n("deregistered"), revoked: n("revoked"),
  ok: n("ok"), warning: n("warning"), critical: n("critical"), unknown: n("unknown") };
"#;

/// Save a screenshot of the page as `name` (see the module's doc).
async fn screenshot(browser: &Browser, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = if std::env::var_os("OUTPOST_UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/img")
    } else {
        root.join("target/screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

/// The agent row for `arguments[0]`, read in one go (the page re-renders as events come).
const AGENT_ROW: &str = r#"
const row = document.querySelector(`tr.agent[data-fingerprint="${CSS.escape(arguments[0])}"]`);
if (!row) return null;
const pill = row.querySelector(".presence");
return {
  host: row.cells[0].firstChild.textContent,
  fingerprint: row.cells[0].querySelector(".muted").textContent,
  presence: pill.textContent,
  presence_class: pill.className,
  presence_title: pill.title,
  selected: row.classList.contains("selected"),
  last_seen: row.cells[2].textContent,
  rows: document.querySelectorAll("tr.agent").length,
  status: document.getElementById("status").textContent,
};
"#;

/// Every check row, in order, read in one go.
const CHECK_ROWS: &str = r#"
return Array.from(document.querySelectorAll("tr.check")).map(row => {
  const pill = row.querySelector(".status");
  const button = row.querySelector("button.run");
  return {
    check: row.dataset.check,
    name: row.cells[0].textContent,
    status: pill.textContent,
    status_class: pill.className,
    output: row.querySelector(".output").textContent,
    age: row.querySelector(".age").textContent,
    fresh: row.classList.contains("fresh"),
    button: button ? button.textContent : null,
    title: document.getElementById("checks-title").textContent,
  };
});
"#;

async fn check_rows(browser: &Browser) -> anyhow::Result<Vec<Value>> {
    let v = browser.execute(CHECK_ROWS, vec![]).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn row<'a>(rows: &'a [Value], check: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["check"] == check)
}

/// The seconds in an "Ns ago" age cell.
fn age_secs(age: &Value) -> u64 {
    let text = age.as_str().unwrap_or_default();
    text.strip_suffix("s ago")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("age {text:?} is not \"<N>s ago\""))
}

/// The nanosecond time the clock check printed.
fn nanos(output: &Value) -> u128 {
    let text = output.as_str().unwrap_or_default();
    text.parse()
        .unwrap_or_else(|_| panic!("clock output {text:?} is not a nanosecond time"))
}

/// Every result of `check` the gateway put on its embedded bus, in order.
fn bus_results(gw: &Gateway, fp: &str, check: &str) -> Vec<Value> {
    gw.bus_results(fp, check)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser_shows_agents_checks_run_now_and_bye() {
    let browser = Browser::start().await.expect("start headless Chromium");
    let dir = tempdir();
    let gw = Gateway::start(dir.path(), &[]);
    let flip = dir.path().join("flip");
    gw.write_checks(
        "console.toml",
        &CHECKS.replace("FLIP", &flip.display().to_string()),
    );
    let mut agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    for check in ["disk", "clock", "flip"] {
        eventually(T, &format!("a result for {check} in the API"), || {
            gw.latest(&fp, check)
        })
        .await;
    }
    let base = format!("https://{}/", gw.addr);
    // What the console gets wrong beyond the essentials: collected so that one such bug
    // does not hide the checks after it, and reported together at the end.
    let mut console_bugs: Vec<String> = Vec::new();

    // With the token in the fragment, the page takes it and drops it from the address bar.
    browser
        .goto(&format!("{base}#token={}", gw.token))
        .await
        .unwrap();
    let api_agent = gw.agent(&fp).await.expect("agent in the API");
    assert_eq!(api_agent["presence"], "online");
    // (The first render does not highlight the agent it selects; the next one does.)
    let shown = wait(T, "the agent row, online and selected", || async {
        let r = browser.execute(AGENT_ROW, vec![json!(fp)]).await?;
        Ok(if r["presence"] == "online" && r["selected"] == true {
            Poll::Ready(r)
        } else {
            Poll::Pending(r.to_string())
        })
    })
    .await;
    assert_eq!(shown["host"], api_agent["hostname"], "{shown}");
    assert_eq!(shown["host"], "web-1", "{shown}");
    assert_eq!(shown["fingerprint"], fp.as_str(), "{shown}");
    assert_eq!(shown["presence"], api_agent["presence"], "{shown}");
    assert_eq!(shown["presence_class"], "pill presence online", "{shown}");
    assert_eq!(
        shown["presence_title"], api_agent["presence_reason"],
        "{shown}"
    );
    assert_eq!(
        shown["selected"], true,
        "the only agent is selected: {shown}"
    );
    assert_eq!(shown["rows"], 1, "{shown}");
    assert!(
        shown["status"]
            .as_str()
            .unwrap()
            .starts_with("1 agent, 1 online · updated "),
        "{shown}"
    );
    let url = browser.url().await.unwrap();
    assert_eq!(url, base, "the token is dropped from the address bar");
    assert!(!browser
        .get("#login")
        .await
        .unwrap()
        .displayed()
        .await
        .unwrap());
    assert!(browser
        .get("#app")
        .await
        .unwrap()
        .displayed()
        .await
        .unwrap());

    // The check rows say what the API says. The clock changes every second, so poll for a
    // moment when the page and the API agree on it.
    let api_checks = gw.api(&format!("/agents/{fp}/checks")).await;
    let api_names: Vec<&str> = api_checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(api_names, ["clock", "disk", "flip"]);
    let rows = wait(T, "check rows matching the API", || async {
        let rows = check_rows(&browser).await?;
        let mut mismatch = Vec::new();
        for check in ["disk", "clock"] {
            let api = gw.latest(&fp, check).await;
            let ok = match (row(&rows, check), &api) {
                (Some(r), Some(l)) => r["status"] == l["status"] && r["output"] == l["output"],
                _ => false,
            };
            if !ok {
                mismatch.push(format!(
                    "{check}: page {:?}, API {:?}",
                    row(&rows, check),
                    api
                ));
            }
        }
        Ok(if mismatch.is_empty() {
            Poll::Ready(rows)
        } else {
            Poll::Pending(mismatch.join("; "))
        })
    })
    .await;
    let names: Vec<&str> = rows.iter().map(|r| r["check"].as_str().unwrap()).collect();
    assert_eq!(names, api_names, "rows in the API's order");
    let disk = row(&rows, "disk").unwrap();
    assert_eq!(disk["name"], "disk");
    assert_eq!(disk["status"], "ok", "{disk}");
    assert_eq!(disk["status_class"], "pill status ok", "{disk}");
    assert_eq!(
        disk["output"], "DISK OK - fine",
        "perfdata is not output: {disk}"
    );
    assert!(age_secs(&disk["age"]) <= 10, "{disk}");
    assert_eq!(disk["button"], "Run now", "{disk}");
    assert_eq!(disk["fresh"], false, "{disk}");
    assert_eq!(disk["title"], "Checks on web-1", "{disk}");
    let clock = row(&rows, "clock").unwrap();
    assert_eq!(clock["status"], "ok", "{clock}");
    nanos(&clock["output"]);
    assert_eq!(clock["button"], "Run now", "{clock}");
    assert_eq!(clock["fresh"], false, "{clock}");

    // Run now: the row shows the new result, highlighted, newer than anything before.
    let shown_before =
        nanos(&row(&check_rows(&browser).await.unwrap(), "clock").unwrap()["output"]);
    let api_before = nanos(&gw.latest(&fp, "clock").await.unwrap()["output"]);
    assert!(bus_results(&gw, &fp, "clock")
        .iter()
        .all(|r| r["origin"] == "schedule"));
    wait(T, "clicking Run now on clock", || async {
        browser
            .get(r#"tr.check[data-check="clock"] button.run"#)
            .await?
            .click()
            .await?;
        Ok(Poll::Ready(()))
    })
    .await;
    let fresh = wait(T, "the clock row to show the run-now result", || async {
        let rows = check_rows(&browser).await?;
        match row(&rows, "clock") {
            Some(r) if r["fresh"] == true => Ok(Poll::Ready(r.clone())),
            r => Ok(Poll::Pending(format!("{r:?}"))),
        }
    })
    .await;
    let fresh_ns = nanos(&fresh["output"]);
    assert_eq!(fresh["status"], "ok", "{fresh}");
    assert_eq!(fresh["status_class"], "pill status ok", "{fresh}");
    assert_ne!(fresh_ns, shown_before, "the output changed: {fresh}");
    assert!(
        fresh_ns > api_before,
        "the run-now result ({fresh_ns}) is newer than the API's latest before the click ({api_before})"
    );
    assert!(age_secs(&fresh["age"]) <= 2, "{fresh}");
    assert_eq!(fresh["button"], "Run now", "{fresh}");
    let rows = check_rows(&browser).await.unwrap();
    assert_eq!(row(&rows, "disk").unwrap()["fresh"], false, "{rows:?}");

    // It is exactly the result the gateway recorded for that run, which was run once...
    let run_now = eventually(T, "the run-now result on the gateway's bus", || async {
        let all: Vec<Value> = bus_results(&gw, &fp, "clock")
            .into_iter()
            .filter(|r| r["origin"] == "run_now")
            .collect();
        (!all.is_empty()).then_some(all)
    })
    .await;
    assert_eq!(run_now.len(), 1, "one click, one run: {run_now:?}");
    assert_eq!(run_now[0]["output"], fresh["output"], "{run_now:?}");
    assert_eq!(run_now[0]["status"], fresh["status"], "{run_now:?}");
    // ...and the API's latest is now that result or a newer run.
    let run_now_seq = run_now[0]["seq"].as_u64().unwrap();
    let latest = eventually(
        T,
        "the API to report the run-now result or newer",
        || async {
            gw.latest(&fp, "clock")
                .await
                .filter(|l| l["seq"].as_u64().unwrap() >= run_now_seq)
        },
    )
    .await;
    if latest["seq"].as_u64() == Some(run_now_seq) {
        assert_eq!(latest["output"], fresh["output"], "{latest}");
        assert_eq!(latest["origin"], "run_now", "{latest}");
    } else {
        assert!(nanos(&latest["output"]) > fresh_ns, "{latest}");
    }

    // The highlight is for the run-now result: as the schedule brings newer results (every
    // second here, each redrawing the page from its event) the row shows them again, plainly.
    if let Err(e) = try_wait(
        Duration::from_secs(10),
        "the clock row to show newer scheduled results again, not highlighted",
        || async {
            let rows = check_rows(&browser).await?;
            match row(&rows, "clock") {
                Some(r) if r["fresh"] == false && nanos(&r["output"]) > fresh_ns => {
                    Ok(Poll::Ready(()))
                }
                r => Ok(Poll::Pending(format!(
                    "{r:?}; API latest {:?}",
                    gw.latest(&fp, "clock").await
                ))),
            }
        },
    )
    .await
    {
        console_bugs.push(e);
    }

    // The overview counts what the API's agents say.
    wait(T, "the overview: 1 online, 3 checks OK", || async {
        let c = browser.execute(COUNTS, vec![]).await?;
        Ok(if c["online"] == 1 && c["ok"] == 3 && c["critical"] == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending(c.to_string())
        })
    })
    .await;

    // A check turning CRITICAL: within a second of the API having it, its row and the
    // overview say so (pushed by the event stream, applied to the page as it comes).
    std::fs::write(&flip, "2").unwrap();
    let critical = eventually(T, "flip CRITICAL in the API", || async {
        gw.latest(&fp, "flip")
            .await
            .filter(|l| l["status"] == "critical")
    })
    .await;
    let seen_at = std::time::Instant::now();
    wait(
        Duration::from_secs(1),
        "the flip row and the overview to show CRITICAL",
        || async {
            let rows = check_rows(&browser).await?;
            let c = browser.execute(COUNTS, vec![]).await?;
            let row_ok = row(&rows, "flip").is_some_and(|r| r["status"] == "critical");
            Ok(if row_ok && c["critical"] == 1 && c["ok"] == 2 {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{:?} {c}", row(&rows, "flip")))
            })
        },
    )
    .await;
    eprintln!(
        "flip CRITICAL in the page {} ms after the test saw it in the API ({})",
        seen_at.elapsed().as_millis(),
        critical["output"]
    );

    // The sparkline of disk's `used` metric, drawn from the history the API gives.
    let spark = wait(T, "disk's sparkline", || async {
        let v = browser
            .execute(
                r#"const s = document.querySelector('tr.check[data-check="disk"] svg.spark');
                   return s ? { points: Number(s.dataset.points), metric: s.dataset.metric,
                     drawn: s.querySelector("polyline").getAttribute("points").split(" ").length,
                     label: s.getAttribute("aria-label") } : null;"#,
                vec![],
            )
            .await?;
        Ok(if v.is_null() {
            Poll::Pending("no sparkline".into())
        } else {
            Poll::Ready(v)
        })
    })
    .await;
    let history = gw
        .api(&format!(
            "/agents/{fp}/checks/disk/history?since=24h&results=false"
        ))
        .await;
    let api_points = history["series"][0]["points"].as_array().unwrap().len() as u64;
    assert_eq!(spark["metric"], "used", "{spark}");
    assert_eq!(history["series"][0]["metric"], "used", "{history}");
    let points = spark["points"].as_u64().unwrap();
    assert!(
        points >= 1 && points <= api_points,
        "the page drew {points} points, the API's history has {api_points}"
    );
    assert_eq!(spark["drawn"], spark["points"], "{spark}");
    assert!(
        spark["label"].as_str().unwrap().starts_with("used: "),
        "an accessible name: {spark}"
    );

    // A silence made in the page is the API's: who, what, for how long.
    browser
        .execute(
            "const o = document.getElementById('operator'); o.value = 'ops-test'; \
             o.dispatchEvent(new Event('change'));",
            vec![],
        )
        .await
        .unwrap();
    browser
        .get(r#"tr.check[data-check="flip"] button.silence"#)
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let silence = eventually(T, "the console's silence in the API", || async {
        let s = gw.api("/silences").await;
        s["silences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["matchers"]["agent"] == fp.as_str())
            .cloned()
    })
    .await;
    assert_eq!(silence["matchers"]["checks"], json!(["flip"]), "{silence}");
    assert_eq!(silence["creator"], "ops-test", "{silence}");
    let span = silence["ends_ms"].as_u64().unwrap() - silence["starts_ms"].as_u64().unwrap();
    assert_eq!(span, 2 * 3600 * 1000, "two hours: {silence}");
    let id = silence["id"].as_str().unwrap().to_string();
    wait(T, "the silence listed in the page", || async {
        Ok(
            match browser
                .find(&format!(r#"tr.silence-row[data-id="{id}"]"#))
                .await?
            {
                Some(_) => Poll::Ready(()),
                None => Poll::Pending("not listed".into()),
            },
        )
    })
    .await;
    // The alert of flip, acknowledged from the page.
    wait(T, "the flip alert's Acknowledge button", || async {
        match browser
            .find(r#"tr.alert[data-check="flip"] button.ack"#)
            .await?
        {
            Some(b) => {
                b.click().await?;
                Ok(Poll::Ready(()))
            }
            None => Ok(Poll::Pending("no alert row with Acknowledge".into())),
        }
    })
    .await;
    let acked = eventually(T, "the acknowledgement in the API", || async {
        let a = gw.api("/alerts").await;
        a["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["check"] == "flip" && a["acknowledged"].is_object())
            .cloned()
    })
    .await;
    assert_eq!(acked["acknowledged"]["by"], "ops-test", "{acked}");
    browser.window_size(1400, 900).await.unwrap();
    browser
        .execute("window.scrollTo(0, 0);", vec![])
        .await
        .unwrap();
    screenshot(&browser, "console.png").await;

    // SIGTERM: the agent says bye and the console shows it deregistered.
    agent.proc.signal(libc::SIGTERM);
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)).await, Some(0));
    let pill = format!(r#"tr.agent[data-fingerprint="{fp}"] .presence"#);
    wait(T, "the console to show the agent deregistered", || async {
        let text = match browser.find(&pill).await? {
            Some(e) => e.text().await?,
            None => "(no presence pill)".into(),
        };
        Ok(if text == "deregistered" {
            Poll::Ready(())
        } else {
            Poll::Pending(text)
        })
    })
    .await;
    let api_agent = gw.agent(&fp).await.unwrap();
    assert_eq!(api_agent["presence"], "deregistered");
    let shown = browser.execute(AGENT_ROW, vec![json!(fp)]).await.unwrap();
    assert_eq!(shown["presence"], "deregistered", "{shown}");
    assert_eq!(
        shown["presence_class"], "pill presence deregistered",
        "{shown}"
    );
    assert_eq!(
        shown["presence_title"], api_agent["presence_reason"],
        "{shown}"
    );
    assert!(
        shown["presence_title"].as_str().unwrap().starts_with("bye"),
        "{shown}"
    );
    assert!(
        shown["status"]
            .as_str()
            .unwrap()
            .starts_with("1 agent, 0 online · updated "),
        "{shown}"
    );

    // Live from the event stream: the status says so, and an agent that comes online is
    // listed without a reload (its presence event redraws the page).
    let status = "document.getElementById('status').textContent";
    wait(T, "the status line to say the stream is live", || async {
        let text = browser
            .execute(&format!("return {status};"), vec![])
            .await?;
        Ok(if text.as_str().is_some_and(|t| t.ends_with(" · live")) {
            Poll::Ready(())
        } else {
            Poll::Pending(text.to_string())
        })
    })
    .await;
    let second = Agent::start(dir.path(), "web-2", &gw, "");
    let second_row = format!(r#"tr.agent[data-fingerprint="{}"]"#, second.fingerprint);
    wait(T, "the second agent listed without a reload", || async {
        Ok(match browser.find(&second_row).await? {
            Some(_) => Poll::Ready(()),
            None => Poll::Pending("not listed".into()),
        })
    })
    .await;
    drop(second);

    // Without a token (a new page, its session storage cleared) the page asks for one and
    // shows nothing else.
    browser
        .execute("sessionStorage.clear();", vec![])
        .await
        .unwrap();
    browser.goto("about:blank").await.unwrap();
    browser.goto(&base).await.unwrap();
    wait(T, "the token prompt", || async {
        let login = browser.get("#login").await?.displayed().await?;
        Ok(if login {
            Poll::Ready(())
        } else {
            Poll::Pending("#login is not displayed".into())
        })
    })
    .await;
    if let Err(e) = try_wait(
        Duration::from_secs(5),
        "the (empty) agents and checks panes to be hidden without a token",
        || async {
            if !browser.get("#app").await?.displayed().await? {
                return Ok(Poll::Ready(()));
            }
            let style = browser
                .execute(
                    "const app = document.getElementById('app'); \
                     return `hidden=${app.hidden}, computed display ${getComputedStyle(app).display}`;",
                    vec![],
                )
                .await?;
            Ok(Poll::Pending(format!("#app is displayed: {style}")))
        },
    )
    .await
    {
        console_bugs.push(e);
    }
    assert!(
        browser
            .get("#token-input")
            .await
            .unwrap()
            .displayed()
            .await
            .unwrap(),
        "the prompt has a token field"
    );
    assert!(
        browser.find_all("tr.agent").await.unwrap().is_empty(),
        "no agents rendered without a token"
    );
    assert!(
        console_bugs.is_empty(),
        "the console misbehaves:\n{}",
        console_bugs.join("\n")
    );
}

/// The console with 10,000 agents: the registry holds them (written before the gateway
/// starts) and the bus a result of each; the page renders only the rows in view, counts
/// them all, scrolls to the last, searches, and moves by keyboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_renders_and_scrolls_ten_thousand_agents() {
    const N: usize = 10_000;
    let browser = Browser::start().await.expect("start headless Chromium");
    let dir = tempdir();
    let data = dir.path().join("gateway");
    std::fs::create_dir_all(data.join("agents")).unwrap();
    let now = outpost_sys::now_ms();
    let fp = |i: usize| format!("00000000-0000-4000-8000-{i:012}");
    let mut records = serde_json::Map::new();
    for i in 0..N {
        records.insert(
            fp(i),
            json!({
                "fingerprint": fp(i), "tenant": "default", "hostname": format!("host-{i:05}"),
                "os": "linux", "arch": "x86_64", "agent_version": "0.1.0",
                "labels": { "rack": format!("r{}", i % 50) },
                "presence": "lost", "presence_reason": "simulated", "last_seen_ms": now - 60_000,
                "gateway": "sim",
            }),
        );
    }
    std::fs::write(
        data.join("agents/registry.json"),
        serde_json::to_vec(&records).unwrap(),
    )
    .unwrap();
    // Enrolled (the gateway forgets registry records without a credential).
    let credentials: serde_json::Map<String, Value> = (0..N)
        .map(|i| {
            let c = json!({"tenant": "default", "secret_sha256": "0".repeat(64),
                "enrolled_at_ms": now - 86_400_000, "confirmed": true});
            (fp(i), c)
        })
        .collect();
    std::fs::write(
        data.join("agents/credentials.json"),
        serde_json::to_vec(&credentials).unwrap(),
    )
    .unwrap();
    {
        let retention = outpost_gateway::bus::segments::Retention {
            max_age: Duration::from_secs(86_400),
            max_bytes: 0,
        };
        let (bus, _) = outpost_gateway::bus::embedded::EmbeddedBus::open(
            &data.join("bus"),
            retention,
            "default",
        )
        .await
        .unwrap();
        for i in 0..N {
            let status = if i % 100 == 0 { "critical" } else { "ok" };
            let r: outpost_protocol::CheckResult = serde_json::from_value(json!({
                "seq": 1, "check": "load", "status": status, "output": "simulated",
                "started_at_ms": now - 30_000, "duration_ms": 1
            }))
            .unwrap();
            let agent = outpost_gateway::bus::AgentRef::new("default", &fp(i));
            outpost_gateway::bus::Bus::publish_results(&bus, &agent, &[r])
                .await
                .unwrap();
        }
    }
    let gw = Gateway::start(dir.path(), &[]);
    browser.window_size(1400, 900).await.unwrap();
    browser
        .goto(&format!("https://{}/#token={}", gw.addr, gw.token))
        .await
        .unwrap();
    const VIEW: &str = r#"
      const rows = Array.from(document.querySelectorAll("tr.agent"));
      const n = (id) => Number(document.getElementById("count-" + id).textContent);
      return { rendered: rows.length, first: rows.length ? rows[0].cells[0].firstChild.textContent : null,
        last: rows.length ? rows[rows.length - 1].cells[0].firstChild.textContent : null,
        shown: document.getElementById("agents-shown").textContent,
        lost: n("lost"), ok: n("ok"), critical: n("critical"),
        focused: document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.fingerprint || null : null,
        scroll: document.getElementById("agents-scroll").scrollHeight };
    "#;
    let view = wait(T, "10,000 agents counted", || async {
        let v = browser.execute(VIEW, vec![]).await?;
        Ok(if v["shown"] == "10000 agents" && v["lost"] == 10_000 {
            Poll::Ready(v)
        } else {
            Poll::Pending(v.to_string())
        })
    })
    .await;
    assert_eq!(view["ok"], 9_900, "{view}");
    assert_eq!(view["critical"], 100, "{view}");
    assert_eq!(view["first"], "host-00000", "{view}");
    let rendered = view["rendered"].as_u64().unwrap();
    assert!(
        (10..200).contains(&rendered),
        "only the rows in view are in the page: {view}"
    );
    assert!(
        view["scroll"].as_u64().unwrap() >= 44 * N as u64,
        "the scroll height is the whole list's: {view}"
    );
    screenshot(&browser, "console-10000-agents.png").await;
    // Scrolled to the end: the last agents are drawn, still only a few rows.
    browser
        .execute(
            "const s = document.getElementById('agents-scroll'); s.scrollTop = s.scrollHeight;",
            vec![],
        )
        .await
        .unwrap();
    let end = wait(T, "the last agent drawn after scrolling", || async {
        let v = browser.execute(VIEW, vec![]).await?;
        Ok(if v["last"] == "host-09999" {
            Poll::Ready(v)
        } else {
            Poll::Pending(v.to_string())
        })
    })
    .await;
    assert!(end["rendered"].as_u64().unwrap() < 200, "{end}");
    // Search: by host name, then by label.
    let search = browser.get("#search").await.unwrap();
    search.send_keys("host-04242").await.unwrap();
    let found = wait(T, "one agent found by name", || async {
        let v = browser.execute(VIEW, vec![]).await?;
        Ok(if v["shown"] == "1 of 10000 agents" && v["rendered"] == 1 {
            Poll::Ready(v)
        } else {
            Poll::Pending(v.to_string())
        })
    })
    .await;
    assert_eq!(found["first"], "host-04242", "{found}");
    browser
        .execute(
            "const s = document.getElementById('search'); s.value = 'rack=r7'; \
             s.dispatchEvent(new Event('input'));",
            vec![],
        )
        .await
        .unwrap();
    wait(T, "the agents of rack r7", || async {
        let v = browser.execute(VIEW, vec![]).await?;
        Ok(if v["shown"] == "200 of 10000 agents" {
            Poll::Ready(())
        } else {
            Poll::Pending(v.to_string())
        })
    })
    .await;
    // The critical count as a filter, then the keyboard: the first row focused, the down
    // arrow moves to the next, Enter selects it.
    browser
        .execute(
            "const s = document.getElementById('search'); s.value = ''; \
             s.dispatchEvent(new Event('input'));",
            vec![],
        )
        .await
        .unwrap();
    browser
        .get(r#"button.count[data-state="critical"]"#)
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait(T, "the 100 agents with a critical check", || async {
        let v = browser.execute(VIEW, vec![]).await?;
        Ok(if v["shown"] == "100 of 10000 agents" {
            Poll::Ready(())
        } else {
            Poll::Pending(v.to_string())
        })
    })
    .await;
    let first = browser.get("tr.agent").await.unwrap();
    first.send_keys("\u{E015}").await.unwrap();
    let moved = wait(T, "the focus on the second row", || async {
        let v = browser.execute(VIEW, vec![]).await?;
        Ok(if v["focused"] == fp(100).as_str() {
            Poll::Ready(v)
        } else {
            Poll::Pending(v.to_string())
        })
    })
    .await;
    let focused = browser
        .get(&format!(r#"tr.agent[data-fingerprint="{}"]"#, fp(100)))
        .await
        .unwrap();
    focused.send_keys("\u{E007}").await.unwrap();
    wait(T, "Enter selects it", || async {
        let title = browser
            .execute(
                "return document.getElementById('checks-title').textContent;",
                vec![],
            )
            .await?;
        Ok(if title == "Checks on host-00100" {
            Poll::Ready(())
        } else {
            Poll::Pending(format!("{title} ({moved})"))
        })
    })
    .await;
}
