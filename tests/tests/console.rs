//! The console in a real browser: headless Chromium driven over WebDriver opens the page
//! the gateway serves at `/`, and what it renders is checked against what the API says:
//! the token prompt, the agent and its presence, the check rows, "Run now" and a clean bye.
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
"#;

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
    gw.write_checks("console.toml", CHECKS);
    let mut agent = Agent::start(dir.path(), "web-1", &gw, "");
    let fp = agent.fingerprint.clone();
    for check in ["disk", "clock"] {
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
    assert_eq!(api_names, ["clock", "disk"]);
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
