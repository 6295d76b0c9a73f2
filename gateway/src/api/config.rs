//! A tenant's check files through the API (role `admin`), for `outpost config diff/push`:
//! `GET /api/v1/config/checks` answers them (name → TOML text), `PUT` makes the tenant's
//! check files exactly the ones given (files not given are removed) after validating all
//! of them together, and with `dry_run=true` only says what it would change. On NATS they
//! are the fleet's (`outpost_config`, what `outpost-gateway config push` writes, mirrored
//! by every gateway); on the embedded bus, the tenant's checks directory, rescanned at
//! once. Plugins are not part of it: they stay as they are.
//!
//! A tenant's admin is not the gateway's operator: files pushed here may not name files
//! on the gateway (a receiver's `password_file`, `secret_file`, `routing_key_file`,
//! `ca_file`; a metric export's `bearer_token_file`, `password_file`, `token_file`),
//! which the gateway would read and send wherever the receiver or sink points. Those
//! stay for check files the operator installs. Files are written 0600, one push at a
//! time per gateway.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Admin, Tenant};
use super::openapi::ErrorBody;
use super::{ApiError, Gw};
use crate::errors::ErrorKind;
use crate::nats::fleet_config::{self, Snapshot};

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new().routes(routes!(get_checks, put_checks))
}

/// Check files by name (`<letters, digits, '-', '_'>.toml`) with their TOML text.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckFiles {
    checks: BTreeMap<String, String>,
}

#[derive(Serialize, ToSchema)]
struct Pushed {
    /// What changes (or would), file by file; empty when nothing does.
    diff: String,
    /// Files added, changed or removed.
    changes: usize,
    /// Whether the change was made (not with `dry_run`, nor when nothing changes).
    applied: bool,
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PushParams {
    /// Only say what would change.
    dry_run: Option<bool>,
}

/// The most bytes of one check file, and of all of a push's: a NATS message holds 1 MiB.
const MAX_FILE_BYTES: usize = 512 * 1024;
const MAX_PUSH_BYTES: usize = 4 << 20;

/// What a push through the API may not hold beyond what every check file may not: files
/// named on the gateway, sizes over the limits, nothing at all.
fn api_problems(checks: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    if checks.is_empty() {
        problems.push(
            "no check files: a push of none would remove every check of the tenant (give at least one file)"
                .to_string(),
        );
    }
    let total: usize = checks.values().map(String::len).sum();
    if total > MAX_PUSH_BYTES {
        problems.push(format!(
            "{total} bytes of check files: at most {MAX_PUSH_BYTES} in one push"
        ));
    }
    for (name, text) in checks {
        if text.len() > MAX_FILE_BYTES {
            problems.push(format!(
                "{name}: {} bytes, over {MAX_FILE_BYTES} for one check file",
                text.len()
            ));
            continue;
        }
        let Ok(doc) = text.parse::<toml::Table>() else {
            continue; // said by the file's own validation
        };
        for (table, what) in [("receiver", "receiver"), ("export", "metric export")] {
            let entries = doc.get(table).and_then(|r| r.as_array());
            for r in entries.into_iter().flatten() {
                let rname = r.get("name").and_then(|n| n.as_str()).unwrap_or("?");
                let mut found = Vec::new();
                gateway_files(r, &mut found);
                for key in found {
                    problems.push(format!(
                        "{name}: {what} {rname:?} names a file on the gateway ({key}): not through the API; give the secret itself, or have the operator install this file on the gateway"
                    ));
                }
            }
        }
    }
    problems
}

/// Every key ending in `_file` within `v`.
fn gateway_files(v: &toml::Value, found: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if k.ends_with("_file") {
                    found.push(k.clone());
                }
                gateway_files(v, found);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| gateway_files(v, found)),
        _ => {}
    }
}

/// One push at a time: a push reads, compares and writes, and two at once would leave
/// a mix of both.
static PUSHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        format!("cannot reach the check files: {e:#}; retry"),
    )
}

/// The tenant's check files in its checks directory (embedded bus).
fn local_checks(dir: &std::path::Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut checks = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(checks),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if path.is_file() && name.ends_with(".toml") && !name.starts_with('.') {
            checks.insert(name, std::fs::read_to_string(&path)?);
        }
    }
    Ok(checks)
}

async fn current(gw: &Gw, tenant: &str) -> Result<BTreeMap<String, String>, ApiError> {
    match &gw.nats {
        Some(nats) => fleet_config::fleet_checks(nats, tenant)
            .await
            .map_err(unavailable),
        None => {
            let (dir, _) = gw.sessions.checks.dirs_of(tenant);
            local_checks(&dir).map_err(unavailable)
        }
    }
}

/// The tenant's check files. Role: admin (they may hold receivers' secrets).
#[utoipa::path(get, path = "/config/checks", tag = "admin", security(("bearer" = [])),
    responses(
        (status = 200, description = "The check files", body = CheckFiles),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 503, description = "The check files cannot be read: retry", body = ErrorBody),
))]
async fn get_checks(State(gw): State<Gw>, t: Tenant<Admin>) -> Response {
    match current(&gw, &t.name).await {
        Ok(checks) => Json(CheckFiles { checks }).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Make the tenant's check files exactly these (files not given are removed), after
/// validating them all. Role: admin.
#[utoipa::path(put, path = "/config/checks", tag = "admin", security(("bearer" = [])),
    params(PushParams),
    request_body = CheckFiles,
    responses(
        (status = 200, description = "What changed (or would, with dry_run)", body = Pushed),
        (status = 400, description = "A bad body, or files that do not validate (each problem named)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The token's role is too low, or it is the operator's", body = ErrorBody),
        (status = 503, description = "The check files cannot be written: retry (some may be written already: the retry finishes)", body = ErrorBody),
))]
async fn put_checks(
    State(gw): State<Gw>,
    t: Tenant<Admin>,
    params: Result<Query<PushParams>, axum::extract::rejection::QueryRejection>,
    bytes: axum::body::Bytes,
) -> Response {
    let done = async {
        let Query(p) = params.map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("bad query: {}", e.body_text()),
            )
        })?;
        let files: CheckFiles = super::json_body(&bytes)?;
        let mut problems = api_problems(&files.checks);
        problems.extend(fleet_config::check_problems(&files.checks));
        if !problems.is_empty() {
            return Err(ApiError::new(
                ErrorKind::BadRequest,
                format!(
                    "nothing was changed; fix these first: {}",
                    problems.join("; ")
                ),
            ));
        }
        let dry_run = p.dry_run.unwrap_or(false);
        let _one_at_a_time = PUSHING.lock().await;
        let pushed = match &gw.nats {
            Some(nats) => fleet_config::push_checks(nats, &t.name, &files.checks, dry_run)
                .await
                .map_err(unavailable)?,
            None => {
                let (dir, _) = gw.sessions.checks.dirs_of(&t.name);
                let have = local_checks(&dir).map_err(unavailable)?;
                let snapshot = |checks: &BTreeMap<String, String>| Snapshot {
                    checks: checks.clone(),
                    plugins: BTreeMap::new(),
                };
                let diff = fleet_config::diff(&snapshot(&have), &snapshot(&files.checks));
                let changes = diff.lines().filter(|l| !l.starts_with("    ")).count();
                if !dry_run && changes > 0 {
                    write_local(&dir, &have, &files.checks).map_err(unavailable)?;
                    gw.sessions.checks.of(&t.name).rescan();
                }
                fleet_config::Pushed { diff, changes }
            }
        };
        let applied = !dry_run && pushed.changes > 0;
        if applied {
            tracing::info!(tenant = %t.name, changes = pushed.changes, "check files changed through the API");
        }
        Ok(Pushed {
            diff: pushed.diff,
            changes: pushed.changes,
            applied,
        })
    };
    match done.await {
        Ok(p) => Json(p).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Make `dir` hold `want` (`have` is what it holds): changed files written whole
/// (atomically), absent ones removed.
fn write_local(
    dir: &std::path::Path,
    have: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in want {
        if have.get(name) != Some(text) {
            // Private: they may hold receivers' secrets.
            crate::util::write_atomic(&dir.join(name), text.as_bytes(), 0o600)?;
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant's push may not name a file on the gateway, in a receiver or in a metric
    /// export (the gateway would read it and send it to the tenant's URL); the secret
    /// itself is fine.
    #[test]
    fn a_push_naming_a_gateway_file_in_a_receiver_or_an_export_is_refused() {
        let push = |text: &str| api_problems(&[("a.toml".to_string(), text.to_string())].into());
        for (text, key) in [
            ("[[receiver]]\nname = 'r'\nwebhook = { url = 'http://h/', secret_file = '/etc/shadow' }\n", "secret_file"),
            ("[[export]]\nname = 'p'\nremote_write = { url = 'http://h/', bearer_token_file = '/etc/outpost/operator.token' }\n", "bearer_token_file"),
            ("[[export]]\nname = 'i'\ninflux = { url = 'http://h', database = 'd', username = 'u', password_file = '/etc/shadow' }\n", "password_file"),
            ("[[export]]\nname = 'i'\ninflux = { url = 'http://h', org = 'o', bucket = 'b', token_file = '/etc/shadow' }\n", "token_file"),
        ] {
            let problems = push(text);
            assert!(
                problems.iter().any(|p| p.contains(&format!("names a file on the gateway ({key})"))),
                "{text}: {problems:?}"
            );
        }
        assert!(push(
            "[[export]]\nname = 'p'\nremote_write = { url = 'http://h/', bearer_token = 't' }\n"
        )
        .is_empty());
    }
}
