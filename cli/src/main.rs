//! `outpost`: the operator's command line. It speaks only the gateway's public API
//! (docs/OPERATIONS.md), with contexts (gateway URL, token, CA or pin) kept in a file.
//!
//! Exit codes: 0 done; 1 the gateway refused (a bad argument, a token refused or too
//! weak); 2 a usage or configuration problem; 3 the gateway unreachable or failing;
//! 4 not found. Every error says what to do about it.

mod api;
mod config;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde_json::{json, Value};

use api::{Api, Failure};

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Operate an Outpost gateway through its API"
)]
struct Cli {
    /// The contexts file (default: $XDG_CONFIG_HOME/outpost/config.toml).
    #[arg(long, global = true, env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// The context to use (default: the current one).
    #[arg(long, short = 'c', global = true, env = "OUTPOST_CONTEXT")]
    context: Option<String>,
    /// Tables for people, or JSON for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Gateways to talk to: add, choose, list.
    #[command(subcommand)]
    Context(ContextCmd),
    /// The tenant's agents.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// An agent's checks, their state and last result.
    Checks {
        #[command(subcommand)]
        command: ChecksCmd,
    },
    /// Run an agent's check now and print the fresh result.
    Run { agent: String, check: String },
    /// Proxy entities (what no agent runs on): their checks, where each is placed, and
    /// their state.
    #[command(subcommand)]
    Entities(EntitiesCmd),
    /// A check's recent results, oldest first, from the bus.
    History {
        agent: String,
        check: String,
        /// How far back, e.g. `90m`, `24h`, `7d`.
        #[arg(long, default_value = "24h")]
        since: String,
        /// The newest this many results of the range (1 to 100000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The tenant's alerts that are not OK.
    Alerts,
    /// Silences: add, list, expire.
    #[command(subcommand)]
    Silence(SilenceCmd),
    /// Acknowledge an alert (no repeats until it resolves or `--until` passes).
    Ack {
        agent: String,
        check: String,
        #[arg(long)]
        comment: String,
        /// Who acknowledges.
        #[arg(long)]
        by: String,
        /// How long, e.g. `4h` (default: until it resolves).
        #[arg(long)]
        until: Option<String>,
    },
    /// The event stream: results, presence, alerts and silences as they happen.
    Events {
        /// Keep following, reconnecting (with the last id) when the connection drops.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Start after this event id (`0-0-0`: from the oldest kept).
        #[arg(long)]
        from: Option<String>,
        /// `result,presence,alert,silence` (default: all).
        #[arg(long)]
        types: Option<String>,
        /// Only this agent's events.
        #[arg(long)]
        agent: Option<String>,
        /// Only checks matching this glob.
        #[arg(long)]
        check: Option<String>,
        /// Only non-OK results and lost agents.
        #[arg(long)]
        problems: bool,
        /// Without --follow: stop after this many events (it also stops once it has read
        /// everything there is).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The tenant's check files: compare a directory with them, or make them its.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Shell completions, to be sourced (bash, zsh, fish, …).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ContextCmd {
    /// Add or change a context (and make it current when it is the first).
    Set {
        name: String,
        #[arg(long)]
        url: Option<String>,
        /// The API token (or `OUTPOST_TOKEN`, which keeps it out of the shell's history).
        #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The gateway certificate's SHA-256 (hex, as the gateway prints `pin_sha256`).
        #[arg(long, conflicts_with = "ca")]
        pin: Option<String>,
        /// A CA certificate file (PEM).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Make a context the current one.
    Use { name: String },
    /// The contexts (tokens are not shown).
    List,
}

#[derive(Subcommand)]
enum EntitiesCmd {
    /// Every check about every entity: mode, the agents it is placed on, the entity's
    /// state by it and why.
    List,
    /// Run a check about an entity now, on the agents it is placed on, and print each
    /// fresh result.
    Run { entity: String, check: String },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// Every agent of the tenant.
    List,
    /// One agent.
    Show { agent: String },
    /// Revoke an agent: closed at once, refused ever after.
    Revoke { agent: String },
}

#[derive(Subcommand)]
enum ChecksCmd {
    /// An agent's checks.
    List { agent: String },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// What `push` would change: DIR's `*.toml` against the gateway's (validated there).
    Diff { dir: PathBuf },
    /// Make the tenant's check files exactly DIR's `*.toml` (others are removed).
    Push {
        dir: PathBuf,
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum SilenceCmd {
    /// Silence alerts matching all of the given matchers.
    Add {
        /// Check name globs.
        #[arg(long = "check")]
        checks: Vec<String>,
        /// An agent's hostname or fingerprint.
        #[arg(long)]
        agent: Option<String>,
        /// Labels `key=value` the agent must have.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// How long, e.g. `2h` (default: until expired).
        #[arg(long = "for")]
        duration: Option<String>,
        #[arg(long)]
        comment: String,
        #[arg(long)]
        creator: String,
        /// End when the alerts it silences resolve.
        #[arg(long)]
        expire_on_resolve: bool,
    },
    /// The silences.
    List,
    /// End a silence now.
    Expire { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("outpost: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "outpost",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let path = config::path(cli.config.clone())?;
    let out = cli.output;
    let api = || -> Result<Api, Failure> {
        let cfg = config::load(&path)?;
        let (name, ctx) = cfg.pick(cli.context.as_deref())?;
        Api::new(&name, &ctx)
    };
    match cli.command {
        Command::Context(cmd) => context(&path, cmd, out),
        Command::Completions { .. } => Ok(()),
        Command::Agents(AgentsCmd::List) => {
            let v = api()?.call("GET", "/agents", None).await?;
            print_rows(
                out,
                &v,
                &[
                    "fingerprint",
                    "hostname",
                    "presence",
                    "gateway",
                    "agent_version",
                    "os",
                ],
            );
            Ok(())
        }
        Command::Agents(AgentsCmd::Show { agent }) => {
            let v = api()?
                .call("GET", &format!("/agents/{}", enc(&agent)), None)
                .await?;
            print_object(out, &v);
            Ok(())
        }
        Command::Agents(AgentsCmd::Revoke { agent }) => {
            let v = api()?
                .call("POST", &format!("/agents/{}/revoke", enc(&agent)), None)
                .await?;
            print_object(out, &v);
            Ok(())
        }
        Command::Checks {
            command: ChecksCmd::List { agent },
        } => {
            let v = api()?
                .call("GET", &format!("/agents/{}/checks", enc(&agent)), None)
                .await?;
            if out == Output::Json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            vec![
                                text(&c["check"]),
                                text(&c["latest"]["status"]),
                                text(&c["age_secs"]),
                                first_line(&c["latest"]["output"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["check", "status", "age (s)", "output"], &rows);
            Ok(())
        }
        Command::Run { agent, check } => {
            let v = api()?
                .call(
                    "POST",
                    &format!("/agents/{}/checks/{}/run", enc(&agent), enc(&check)),
                    None,
                )
                .await?;
            if out == Output::Json {
                return print_json(&v);
            }
            let _ = writeln!(
                std::io::stdout().lock(),
                "{} {}: {}",
                text(&v["check"]),
                text(&v["status"]),
                text(&v["output"]).trim_end()
            );
            Ok(())
        }
        Command::Entities(EntitiesCmd::List) => {
            let v = api()?.call("GET", "/entities", None).await?;
            if out == Output::Json {
                return print_json(&v);
            }
            table(
                &["entity", "check", "mode", "placed_on", "status", "summary"],
                &entity_rows(&v),
            );
            Ok(())
        }
        Command::Entities(EntitiesCmd::Run { entity, check }) => {
            let v = api()?
                .call(
                    "POST",
                    &format!("/entities/{}/checks/{}/run", enc(&entity), enc(&check)),
                    None,
                )
                .await?;
            if out == Output::Json {
                return print_json(&v);
            }
            let mut stdout = std::io::stdout().lock();
            let runs = v["runs"].as_array().cloned().unwrap_or_default();
            let mut failed = 0;
            for r in &runs {
                if r["result"].is_object() {
                    let _ = writeln!(
                        stdout,
                        "{} {} from {}: {}",
                        text(&v["check"]),
                        text(&r["result"]["status"]),
                        text(&r["agent"]),
                        text(&r["result"]["output"]).trim_end()
                    );
                } else {
                    failed += 1;
                    eprintln!(
                        "{} could not run on {}: {}",
                        text(&v["check"]),
                        text(&r["agent"]),
                        text(&r["error"])
                    );
                }
            }
            if failed > 0 {
                return Err(Failure::Unreachable(format!(
                    "{failed} of the {} agents it is placed on could not run it",
                    runs.len()
                )));
            }
            Ok(())
        }
        Command::History {
            agent,
            check,
            since,
            limit,
        } => {
            let v = api()?
                .call(
                    "GET",
                    &format!(
                        "/agents/{}/checks/{}/history?since={}&limit={limit}",
                        enc(&agent),
                        enc(&check),
                        enc(&since)
                    ),
                    None,
                )
                .await?;
            if out == Output::Json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["results"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| {
                            let metrics = r["metrics"]
                                .as_array()
                                .map(|m| {
                                    m.iter()
                                        .map(|m| {
                                            format!("{}={}", text(&m["name"]), text(&m["value"]))
                                        })
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .unwrap_or_default();
                            vec![
                                when(r["started_at_ms"].as_u64()),
                                text(&r["status"]),
                                first_line(&r["output"]),
                                metrics,
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["started", "status", "output", "metrics"], &rows);
            if v["truncated"] == true {
                eprintln!(
                    "(the newest {} of the range; older ones left out: raise --limit or shorten --since)",
                    rows.len()
                );
            }
            Ok(())
        }
        Command::Alerts => {
            let v = api()?.call("GET", "/alerts", None).await?;
            let alerts = v.get("alerts").cloned().unwrap_or(v);
            print_rows(
                out,
                &alerts,
                &["hostname", "check", "status", "state", "why"],
            );
            Ok(())
        }
        Command::Silence(cmd) => silence(&api()?, cmd, out).await,
        Command::Config(cmd) => {
            let (dir, dry_run) = match &cmd {
                ConfigCmd::Diff { dir } => (dir, true),
                ConfigCmd::Push { dir, dry_run } => (dir, *dry_run),
            };
            let checks = read_check_dir(dir)?;
            let v = api()?
                .call(
                    "PUT",
                    &format!("/config/checks?dry_run={dry_run}"),
                    Some(&json!({ "checks": checks })),
                )
                .await?;
            if out == Output::Json {
                return print_json(&v);
            }
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "{}", text(&v["diff"]));
            let changes = v["changes"].as_u64().unwrap_or(0);
            let _ = writeln!(
                stdout,
                "{}",
                match (changes, v["applied"] == true) {
                    (0, _) => "no changes".to_string(),
                    (n, true) => format!("{n} change(s) made"),
                    (n, false) => format!("{n} change(s) to push"),
                }
            );
            Ok(())
        }
        Command::Ack {
            agent,
            check,
            comment,
            by,
            until,
        } => {
            let mut body = json!({"by": by, "comment": comment});
            if let Some(u) = until {
                body["until"] = u.into();
            }
            let v = api()?
                .call(
                    "POST",
                    &format!("/alerts/{}/{}/ack", enc(&agent), enc(&check)),
                    Some(&body),
                )
                .await?;
            print_object(out, &v);
            Ok(())
        }
        Command::Events {
            follow,
            from,
            types,
            agent,
            check,
            problems,
            limit,
        } => {
            let mut query = Vec::new();
            for (k, v) in [("types", types), ("agent", agent), ("check", check)] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", enc(&v)));
                }
            }
            if problems {
                query.push("problems=true".into());
            }
            let path = if query.is_empty() {
                "/events".to_string()
            } else {
                format!("/events?{}", query.join("&"))
            };
            events(&api()?, &path, from, follow, limit, out).await
        }
    }
}

/// The `*.toml` files at the top of `dir`, by name.
fn read_check_dir(
    dir: &std::path::Path,
) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    let unreadable = |e: std::io::Error| {
        Failure::Usage(format!(
            "cannot read the check files in {}: {e}",
            dir.display()
        ))
    };
    let mut checks = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_file() && name.ends_with(".toml") && !name.starts_with('.') {
            checks.insert(name, std::fs::read_to_string(&path).map_err(unreadable)?);
        }
    }
    Ok(checks)
}

/// A Unix time in ms as people read it (UTC, to the second).
fn when(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        None => "-".into(),
    }
}

fn context(path: &std::path::Path, cmd: ContextCmd, out: Output) -> Result<(), Failure> {
    let mut cfg = config::load(path)?;
    match cmd {
        ContextCmd::Set {
            name,
            url,
            token,
            pin,
            ca,
        } => {
            let old = cfg.contexts.get(&name).cloned();
            let url = url.or(old.as_ref().map(|c| c.url.clone())).ok_or_else(|| {
                Failure::Usage(format!(
                    "context {name:?} is new: give --url https://GATEWAY:PORT"
                ))
            })?;
            let token = token
                .or(old.as_ref().map(|c| c.token.clone()))
                .ok_or_else(|| {
                    Failure::Usage(format!("context {name:?} is new: give --token TOKEN"))
                })?;
            let token = token.trim().to_string();
            let (pin, ca) = match (pin, ca) {
                (None, None) => old.map(|c| (c.pin, c.ca)).unwrap_or_default(),
                (p, c) => (p.map(|p| normal_pin(&p)).transpose()?, c),
            };
            cfg.contexts.insert(
                name.clone(),
                config::Context {
                    url,
                    token,
                    ca,
                    pin,
                },
            );
            if cfg.current.is_none() {
                cfg.current = Some(name.clone());
            }
            config::save(path, &cfg)?;
            eprintln!("context {name:?} saved in {}", path.display());
            Ok(())
        }
        ContextCmd::Use { name } => {
            if !cfg.contexts.contains_key(&name) {
                return Err(Failure::NotFound(format!(
                    "no context named {name:?}; add it with `outpost context set {name} --url … --token …`"
                )));
            }
            cfg.current = Some(name);
            config::save(path, &cfg)?;
            Ok(())
        }
        ContextCmd::List => {
            let list: Vec<Value> = cfg
                .contexts
                .iter()
                .map(|(n, c)| {
                    json!({
                        "name": n,
                        "current": cfg.current.as_deref() == Some(n),
                        "url": c.url,
                        "trust": match (&c.pin, &c.ca) {
                            (Some(p), _) => format!("pin {p}"),
                            (_, Some(ca)) => format!("ca {}", ca.display()),
                            _ => "system roots".into(),
                        },
                    })
                })
                .collect();
            print_rows(
                out,
                &Value::Array(list),
                &["name", "current", "url", "trust"],
            );
            Ok(())
        }
    }
}

async fn silence(api: &Api, cmd: SilenceCmd, out: Output) -> Result<(), Failure> {
    match cmd {
        SilenceCmd::Add {
            checks,
            agent,
            labels,
            duration,
            comment,
            creator,
            expire_on_resolve,
        } => {
            let mut matchers = json!({});
            if !checks.is_empty() {
                matchers["checks"] = json!(checks);
            }
            if let Some(a) = agent {
                matchers["agent"] = a.into();
            }
            if !labels.is_empty() {
                let mut map = serde_json::Map::new();
                for l in labels {
                    let (k, v) = l.split_once('=').ok_or_else(|| {
                        Failure::Usage(format!(
                            "--label {l:?} is not key=value (e.g. --label role=db)"
                        ))
                    })?;
                    map.insert(k.into(), v.into());
                }
                matchers["labels"] = Value::Object(map);
            }
            let mut body = json!({
                "matchers": matchers,
                "comment": comment,
                "creator": creator,
                "expire_on_resolve": expire_on_resolve,
            });
            if let Some(d) = duration {
                body["ends_at"] = d.into();
            }
            let v = api.call("POST", "/silences", Some(&body)).await?;
            if out == Output::Json {
                return print_json(&v);
            }
            let _ = writeln!(std::io::stdout().lock(), "{}", text(&v["id"]));
            Ok(())
        }
        SilenceCmd::List => {
            let v = api.call("GET", "/silences", None).await?;
            let list = v.get("silences").cloned().unwrap_or(v);
            print_rows(
                out,
                &list,
                &["id", "creator", "comment", "matchers", "ends_ms"],
            );
            Ok(())
        }
        SilenceCmd::Expire { id } => {
            let v = api
                .call("DELETE", &format!("/silences/{}", enc(&id)), None)
                .await?;
            print_object(out, &v);
            Ok(())
        }
    }
}

/// Print the stream's events, one line each. With `follow`, reconnect after a drop from
/// the last id received (nothing missed, nothing twice), waiting longer after each
/// failure. Without, stop after `limit` events or once the stream is idle (everything
/// there is has been read: the first heartbeat, asked for every second); a stream cut or
/// ended by the gateway before that is a failure.
async fn events(
    api: &Api,
    path: &str,
    from: Option<String>,
    follow: bool,
    limit: usize,
    out: Output,
) -> Result<(), Failure> {
    let path = if follow {
        path.to_string()
    } else {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}heartbeat=1")
    };
    let mut last = from;
    let mut printed = 0usize;
    let mut backoff = Duration::from_millis(500);
    if !follow && limit == 0 {
        return Ok(());
    }
    loop {
        let headers: Vec<(&str, String)> = last
            .iter()
            .map(|id| ("last-event-id", id.clone()))
            .collect();
        let answer = match api.send("GET", &path, None, &headers, None).await {
            Ok(resp) if resp.status().as_u16() == 200 => Ok(resp),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let bytes = resp.bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                Err(api.failure(status, &body))
            }
            Err(f) => Err(f),
        };
        let resp = match answer {
            Ok(resp) => resp,
            Err(f) if follow && f.code() == 3 => {
                eprintln!("outpost: {}; reconnecting in {backoff:?}", f.message());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            Err(f) => return Err(f),
        };
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut ended_by_gateway = None;
        'read: while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            while let Some(end) = block_end(&buf) {
                let block: Vec<u8> = buf.drain(..end).collect();
                let block = String::from_utf8_lossy(&block).replace("\r\n", "\n");
                if !follow && block.trim_start().starts_with(':') {
                    // A heartbeat: the stream is idle, everything there is was read.
                    return Ok(());
                }
                let Some((id, kind, data)) = parse_event(&block) else {
                    continue;
                };
                backoff = Duration::from_millis(500);
                if let Some(id) = id {
                    last = Some(id);
                }
                if kind == "error" {
                    ended_by_gateway = Some(data["error"].as_str().unwrap_or_default().to_string());
                    break 'read;
                }
                if kind == "hello" {
                    continue;
                }
                if !print_event(out, last.as_deref(), &kind, &data) {
                    return Ok(());
                }
                printed += 1;
                if !follow && printed >= limit {
                    return Ok(());
                }
            }
        }
        if let Some(why) = ended_by_gateway {
            if why.starts_with("no longer allowed") {
                return Err(Failure::Refused(format!(
                    "the gateway ended the stream: {why}; set a valid token with `outpost context set NAME --token TOKEN`"
                )));
            }
            if !follow {
                return Err(Failure::Refused(format!(
                    "the gateway ended the stream: {why}"
                )));
            }
            eprintln!("outpost: the gateway ended the stream: {why}");
        } else if !follow {
            return Err(Failure::Unreachable(format!(
                "the stream dropped after {printed} events; run again with --from {} to go on",
                last.as_deref().unwrap_or("0-0-0")
            )));
        }
        eprintln!(
            "outpost: the stream dropped; resuming after {}",
            last.as_deref().unwrap_or("the start")
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Where the first whole SSE block in `buf` ends (after its blank line), LF or CRLF.
fn block_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One SSE block: its id, type and data (JSON); `None` for a comment or an empty one.
fn parse_event(block: &str) -> Option<(Option<String>, String, Value)> {
    let (mut id, mut kind, mut data) = (None, "message".to_string(), String::new());
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match name {
            "id" => id = Some(value.to_string()),
            "event" => kind = value.to_string(),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
    Some((id, kind, data))
}

/// Print one event; false once the reader has gone away (`| head`).
fn print_event(out: Output, id: Option<&str>, kind: &str, data: &Value) -> bool {
    let mut stdout = std::io::stdout().lock();
    let line = if out == Output::Json {
        json!({"id": id, "type": kind, "data": data}).to_string()
    } else {
        let who = data["hostname"]
            .as_str()
            .filter(|h| !h.is_empty())
            .or(data["fingerprint"].as_str())
            .unwrap_or("");
        match kind {
            "result" => format!(
                "result    {who} {} {}: {}",
                text(&data["result"]["check"]),
                text(&data["result"]["status"]),
                first_line(&data["result"]["output"])
            ),
            "presence" => format!(
                "presence  {who} {}: {}",
                text(&data["presence"]),
                text(&data["reason"])
            ),
            "alert" => format!(
                "alert     {who} {} {}: {}",
                text(&data["check"]),
                text(&data["state"]),
                text(&data["why"])
            ),
            "silence" => format!("silence   {} {}", text(&data["id"]), text(&data["comment"])),
            other => format!("{other:<9} {data}"),
        }
    };
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_ok()
}

/// A pin as the gateway prints it (`pin_sha256`): 64 hex digits, any case, colons allowed.
fn normal_pin(pin: &str) -> Result<String, Failure> {
    let p = pin.trim().replace(':', "").to_lowercase();
    if p.len() != 64 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Failure::Usage(format!(
            "--pin {pin:?} is not a SHA-256 (64 hex digits, as the gateway prints `pin_sha256`)"
        )));
    }
    Ok(p)
}

/// A path segment, percent-encoded.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn first_line(v: &Value) -> String {
    text(v).lines().next().unwrap_or_default().to_string()
}

fn print_json(v: &Value) -> Result<(), Failure> {
    // A reader that went away (`| head`) is not an error.
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    );
    Ok(())
}

fn print_object(out: Output, v: &Value) {
    if out == Output::Json {
        let _ = print_json(v);
        return;
    }
    match v.as_object() {
        Some(map) => {
            let width = map.keys().map(String::len).max().unwrap_or(0);
            for (k, val) in map {
                let _ = writeln!(std::io::stdout().lock(), "{k:<width$}  {}", text(val));
            }
        }
        None => {
            let _ = writeln!(std::io::stdout().lock(), "{}", text(v));
        }
    }
}

/// One row per check about an entity of `GET /entities`; the agents it is placed on by
/// hostname where a result names them.
fn entity_rows(v: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        for c in e["checks"].as_array().into_iter().flatten() {
            let name_of = |fp: &Value| {
                c["vantage_points"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["agent"] == *fp)
                    .map(|p| text(&p["hostname"]))
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| text(fp))
            };
            let placed: Vec<String> = c["placed_on"]
                .as_array()
                .into_iter()
                .flatten()
                .map(name_of)
                .collect();
            let mode = match c["quorum"].as_u64() {
                Some(q) => format!("{} (quorum {q})", text(&c["mode"])),
                None => text(&c["mode"]),
            };
            rows.push(vec![
                text(&e["name"]),
                text(&c["check"]),
                mode,
                if placed.is_empty() {
                    "-".into()
                } else {
                    placed.join(",")
                },
                match c["status"].is_null() {
                    true => "-".into(),
                    false => text(&c["status"]),
                },
                first_line(&c["summary"]),
            ]);
        }
    }
    rows
}

/// An array of objects as a table of `columns` (or as JSON).
fn print_rows(out: Output, v: &Value, columns: &[&str]) {
    if out == Output::Json {
        let _ = print_json(v);
        return;
    }
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| columns.iter().map(|c| first_line(&r[*c])).collect())
                .collect()
        })
        .unwrap_or_default();
    table(columns, &rows);
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut stdout = std::io::stdout().lock();
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(
        stdout,
        "{}",
        line(header.iter().map(|h| h.to_uppercase()).collect())
    );
    for r in rows {
        let _ = writeln!(stdout, "{}", line(r.clone()));
    }
}
