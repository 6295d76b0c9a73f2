//! Read the gateway's embedded bus (`DATA_DIR/bus/results.jsonl` and its sealed segments
//! `results-<n>.jsonl`, one JSON line per durable result) incrementally: each poll parses
//! only what was appended since, following the file across a rotation by its inode.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
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
    /// `DATA_DIR/bus`.
    dir: PathBuf,
    fingerprint: String,
    /// The segment being followed (its inode) and how far it was read.
    following: Option<u64>,
    offset: u64,
    pub results: Vec<Rec>,
    /// The latest `started_at_ms` seen.
    pub max_started_ms: u64,
    /// Lines that were not results of the expected shape (should stay 0).
    pub unparsed: usize,
}

impl Bus {
    pub fn new(dir: PathBuf, fingerprint: &str) -> Bus {
        Bus {
            dir,
            fingerprint: fingerprint.to_string(),
            following: None,
            offset: 0,
            results: Vec::new(),
            max_started_ms: 0,
            unparsed: 0,
        }
    }

    /// The log's segments, oldest first, opened, with their inodes. Listed again after
    /// opening, so a rotation in between is noticed and the listing retried.
    fn segments(&self) -> Result<Vec<(u64, File)>> {
        loop {
            let paths = outpost_gateway::bus::segments::paths(&self.dir, "results")
                .with_context(|| format!("cannot list {}", self.dir.display()))?;
            let mut open = Vec::new();
            for path in &paths {
                match File::open(path) {
                    Ok(f) => open.push((f.metadata()?.ino(), f)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot open {}", path.display()))
                    }
                }
            }
            let again = outpost_gateway::bus::segments::paths(&self.dir, "results")?;
            if open.len() == paths.len() && again == paths {
                return Ok(open);
            }
        }
    }

    /// Parse the complete lines appended since the last poll; returns how many results
    /// of this agent were added.
    pub fn poll(&mut self) -> Result<usize> {
        let before = self.results.len();
        let segments = self.segments()?;
        let start = match self.following {
            None => 0,
            Some(ino) => match segments.iter().position(|(i, _)| *i == ino) {
                Some(k) => k,
                None => anyhow::bail!(
                    "the bus segment being read was deleted (retention) in {}",
                    self.dir.display()
                ),
            },
        };
        for (ino, mut f) in segments.into_iter().skip(start) {
            if self.following != Some(ino) {
                self.following = Some(ino);
                self.offset = 0;
            }
            f.seek(SeekFrom::Start(self.offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            self.parse(&buf[..end]);
            self.offset += end as u64 + 1;
        }
        Ok(self.results.len() - before)
    }

    fn parse(&mut self, lines: &[u8]) {
        for line in lines.split(|b| *b == b'\n') {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(fp: &str, i: u64) -> String {
        format!(
            "{{\"fingerprint\":\"{fp}\",\"result\":{{\"check\":\"c\",\"status\":\"ok\",\"started_at_ms\":{i}}}}}\n"
        )
    }

    fn append(path: &std::path::Path, text: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    #[test]
    fn follows_the_log_across_a_rotation_reading_each_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("results.jsonl");
        append(&dir.path().join("results-000001.jsonl"), &line("a", 1));
        append(&active, &(line("a", 2) + &line("b", 99) + "{\"fingerp"));
        let mut bus = Bus::new(dir.path().to_path_buf(), "a");
        assert_eq!(bus.poll().unwrap(), 2);
        // The torn line is completed, the segment sealed, a new one started.
        append(&active, &("rint\":\"b\"}\n".to_string() + &line("a", 3)));
        std::fs::rename(&active, dir.path().join("results-000002.jsonl")).unwrap();
        append(&active, &line("a", 4));
        assert_eq!(bus.poll().unwrap(), 2);
        append(&active, &line("a", 5));
        assert_eq!(bus.poll().unwrap(), 1);
        let seen: Vec<u64> = bus.results.iter().map(|r| r.started_at_ms).collect();
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        assert_eq!(bus.unparsed, 1, "the line without a result");
    }
}
