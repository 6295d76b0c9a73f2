//! Read the gateway's embedded bus (`DATA_DIR/bus/results.jsonl`, one JSON line per
//! durable result) incrementally: each poll parses only what was appended since.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Deserialize)]
struct Line {
    fingerprint: String,
    result: LineResult,
}

#[derive(Deserialize)]
struct LineResult {
    check: String,
    status: String,
    started_at_ms: u64,
    #[serde(default)]
    duration_ms: u64,
}

/// One result, as much of it as the benchmark needs.
#[derive(Debug, Clone)]
pub struct Rec {
    pub check: String,
    pub ok: bool,
    pub started_at_ms: u64,
    pub duration_ms: u64,
}

pub struct Bus {
    path: PathBuf,
    fingerprint: String,
    offset: u64,
    pub results: Vec<Rec>,
    /// The latest `started_at_ms` seen.
    pub max_started_ms: u64,
    /// Lines that were not results of the expected shape (should stay 0).
    pub unparsed: usize,
}

impl Bus {
    pub fn new(path: PathBuf, fingerprint: &str) -> Bus {
        Bus {
            path,
            fingerprint: fingerprint.to_string(),
            offset: 0,
            results: Vec::new(),
            max_started_ms: 0,
            unparsed: 0,
        }
    }

    /// Parse the complete lines appended since the last poll; returns how many results
    /// of this agent were added.
    pub fn poll(&mut self) -> Result<usize> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", self.path.display()))
            }
        };
        f.seek(SeekFrom::Start(self.offset))
            .with_context(|| format!("cannot seek in {}", self.path.display()))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return Ok(0);
        };
        let before = self.results.len();
        for line in buf[..end].split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(line) {
                Ok(l) if l.fingerprint == self.fingerprint => {
                    self.max_started_ms = self.max_started_ms.max(l.result.started_at_ms);
                    self.results.push(Rec {
                        ok: l.result.status == "ok",
                        check: l.result.check,
                        started_at_ms: l.result.started_at_ms,
                        duration_ms: l.result.duration_ms,
                    })
                }
                Ok(_) => {}
                Err(_) => self.unparsed += 1,
            }
        }
        self.offset += end as u64 + 1;
        Ok(self.results.len() - before)
    }

    /// Poll until the bus holds a result that started at or after `until_ms` (so every
    /// result started before it was delivered, results arriving in order), or nothing new
    /// arrived for `quiet`, or `limit` passed. Returns whether the bus caught up.
    pub fn drain(&mut self, until_ms: u64, quiet: Duration, limit: Duration) -> Result<bool> {
        let start = Instant::now();
        let mut last_growth = Instant::now();
        loop {
            if self.poll()? > 0 {
                last_growth = Instant::now();
            }
            if self.max_started_ms >= until_ms {
                return Ok(true);
            }
            if last_growth.elapsed() >= quiet {
                return Ok(true);
            }
            if start.elapsed() >= limit {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
