//! Collectors: long-running programs (collectd, fluentd, anything) declared by the gateway,
//! kept alive by the agent, configured from the declaration, their data brought home
//! through the outbox. (Being implemented: see issue 7.)

use std::path::PathBuf;
use std::sync::Arc;

use outpost_protocol::CollectorSpec;

use crate::outbox::Outbox;

/// Runs the declared collectors.
pub struct Collectors {
    _work_dir: PathBuf,
    _hostname: String,
    _outbox: Arc<dyn Outbox>,
}

impl Collectors {
    /// Start the manager: `work_dir` (STATE_DIR/collectors) holds the rendered configuration
    /// files and pid files; health and data results go to `outbox`.
    pub async fn start(
        work_dir: PathBuf,
        hostname: String,
        outbox: Arc<dyn Outbox>,
    ) -> std::io::Result<Arc<Collectors>> {
        Ok(Arc::new(Collectors {
            _work_dir: work_dir,
            _hostname: hostname,
            _outbox: outbox,
        }))
    }

    /// Run exactly `specs`: start new collectors, stop removed ones, and restart a changed
    /// one only when its rendered configuration file, command or environment changed.
    pub async fn apply(&self, specs: Vec<CollectorSpec>) {
        let _ = specs;
    }

    /// Stop every collector: TERM, then KILL after the grace period.
    pub async fn stop_all(&self) {}
}
