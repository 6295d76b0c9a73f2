//! The gateway's background tasks and whether they are healthy: each runs under
//! [`supervise`], which restarts it if it panics or returns before shutdown, and a task
//! that cannot do its job reports why with [`Health::failing`]. Both show in `/metrics`
//! (`outpost_background_task_failing`, `outpost_background_task_restarts_total`) and
//! in the log, so an operator is alerted. They do not make the gateway unready: a task
//! such as the config mirror fails alike on every gateway of a fleet when what NATS holds
//! is bad, and an unready fleet would turn every agent away while the last good copy
//! could still serve them.

use outpost_sys::lock;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause before a task that died is started again.
const RESTART_DELAY: Duration = Duration::from_secs(2);

/// Background tasks that are failing now, by name, with why.
#[derive(Default)]
pub struct Health {
    failing: Mutex<BTreeMap<&'static str, String>>,
    restarts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Health {
    pub fn failing(&self, task: &'static str, why: impl Into<String>) {
        lock(&self.failing).insert(task, why.into());
    }

    pub fn ok(&self, task: &'static str) {
        lock(&self.failing).remove(task);
    }

    fn restarted(&self, task: &'static str) {
        *lock(&self.restarts).entry(task).or_default() += 1;
    }

    /// The Prometheus lines: each task failing now (1) and how often each was restarted.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from(
            "# HELP outpost_background_task_failing Background tasks failing now (the reason is in the log).\n# TYPE outpost_background_task_failing gauge\n",
        );
        for task in lock(&self.failing).keys() {
            let _ = writeln!(out, "outpost_background_task_failing{{task=\"{task}\"}} 1");
        }
        out.push_str("# HELP outpost_background_task_restarts_total Background tasks restarted after a panic or an early end.\n# TYPE outpost_background_task_restarts_total counter\n");
        for (task, n) in lock(&self.restarts).iter() {
            let _ = writeln!(
                out,
                "outpost_background_task_restarts_total{{task=\"{task}\"}} {n}"
            );
        }
        out
    }

    /// `None` when every task is healthy, else one line naming each failing task.
    pub fn problems(&self) -> Option<String> {
        let failing = lock(&self.failing);
        (!failing.is_empty()).then(|| {
            failing
                .iter()
                .map(|(task, why)| format!("{task}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// Run `make()`'s future on `tracker` until `shutdown`, starting a new one whenever it
/// panics or returns early; while it is down, `health` says so.
pub fn supervise<F, Fut>(
    tracker: &TaskTracker,
    health: Arc<Health>,
    shutdown: CancellationToken,
    task: &'static str,
    make: F,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tracker.spawn(async move {
        loop {
            let why = match std::panic::AssertUnwindSafe(make()).catch_unwind().await {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => "stopped before shutdown".to_string(),
                Err(panic) => format!("panicked: {}", panic_message(&*panic)),
            };
            tracing::error!(task, %why, "background task died; restarting it");
            health.failing(task, format!("{why}; restarting"));
            health.restarted(task);
            tokio::select! {
                _ = tokio::time::sleep(RESTART_DELAY) => {}
                _ = shutdown.cancelled() => return,
            }
            health.ok(task);
        }
    });
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A task that panics is started again, and health names it while it is down.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_reported_meanwhile() {
        let tracker = TaskTracker::new();
        let health = Arc::new(Health::default());
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        supervise(
            &tracker,
            health.clone(),
            shutdown.clone(),
            "mirror",
            move || {
                let r = r.clone();
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("size 9223372036854775808");
                    }
                    std::future::pending::<()>().await
                }
            },
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let why = health.problems().expect("reported while down");
        assert!(
            why.contains("mirror: panicked: size 9223372036854775808"),
            "{why}"
        );
        tokio::time::sleep(RESTART_DELAY * 2).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(health.problems(), None);
        let metrics = health.render();
        assert!(
            metrics.contains("outpost_background_task_restarts_total{task=\"mirror\"} 1"),
            "{metrics}"
        );
        shutdown.cancel();
        tracker.close();
        // The second run never ends by itself: the tracker waits for the supervisor only.
        drop(tracker);
    }
}
