//! The agent as a Windows service: `outpost-agent service --config PATH`, started by the
//! Service Control Manager (the MSI registers it as `Outpost`, automatic start,
//! LocalSystem). It registers a control handler, reports Running, and on Stop or system
//! Shutdown cancels the same [`CancellationToken`] that Ctrl-C cancels in `run`, so the
//! agent says `bye` to its gateway, flushes its outbox and then reports Stopped.
//!
//! A service has no console: the log goes to `agent.log` beside the configuration file
//! (moved to `agent.log.1` at start once it passes [`LOG_ROTATE_BYTES`]).
//! Not here: installing or removing the service (the MSI does that, see
//! `installer/windows/`), anything the agent does once running ([`crate::run`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::{define_windows_service, service_dispatcher};

/// The service's name, as the MSI installs it.
pub const SERVICE_NAME: &str = "Outpost";

/// The log file is moved aside at start beyond this size.
pub const LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;

/// How long the SCM is told a stop may take: the bye, the checks stopping, the outbox
/// flush, with room to spare.
const STOP_WAIT_HINT: Duration = Duration::from_secs(20);

/// sysexits.h EX_CONFIG, reported as the service-specific exit code.
const EX_CONFIG: u32 = 78;

static CONFIG: OnceLock<PathBuf> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// Hand this process to the Service Control Manager; returns when the service has
/// stopped. Fails at once (error 1063) when not started by the SCM, e.g. from a console:
/// use `run` there.
pub fn run(config: PathBuf) -> anyhow::Result<()> {
    let _ = CONFIG.set(config);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main).context(
        "cannot connect to the Service Control Manager (the `service` command is for the \
         Outpost service; run `outpost-agent run --config FILE` from a console)",
    )
}

fn service_main(_args: Vec<OsString>) {
    let config = CONFIG
        .get()
        .cloned()
        .unwrap_or_else(crate::settings::defaults::config_file);
    init_log(&config);
    if let Err(e) = serve(&config) {
        tracing::error!(error = %format!("{e:#}"), "the service failed");
    }
}

/// Log to `agent.log` beside the configuration, or nowhere if it cannot be opened.
fn init_log(config: &std::path::Path) {
    let dir = config.parent().unwrap_or(std::path::Path::new("."));
    let log = dir.join("agent.log");
    if std::fs::metadata(&log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let _ = std::fs::rename(&log, dir.join("agent.log.1"));
    }
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        Ok(f) => outpost_sys::init_logging_to(f),
        Err(_) => outpost_sys::init_logging(),
    }
}

fn status(state: ServiceState, exit: ServiceExitCode) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: exit,
        checkpoint: 0,
        wait_hint: if state == ServiceState::StopPending {
            STOP_WAIT_HINT
        } else {
            Duration::ZERO
        },
        process_id: None,
    }
}

fn serve(config: &std::path::Path) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = service_control_handler::register(SERVICE_NAME, move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            tracing::info!(?control, "stopping");
            stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })
    .context("cannot register the service control handler")?;
    let stopped = |exit| handle.set_service_status(status(ServiceState::Stopped, exit));

    let settings = match crate::Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the agent's configuration is invalid; fix it and start the service again");
            stopped(ServiceExitCode::ServiceSpecific(EX_CONFIG))?;
            return Ok(());
        }
    };
    let runtime = match crate::runtime() {
        Ok(r) => r,
        Err(e) => {
            stopped(ServiceExitCode::ServiceSpecific(70))?;
            return Err(e).context("cannot start the async runtime");
        }
    };
    handle
        .set_service_status(status(ServiceState::Running, ServiceExitCode::Win32(0)))
        .context("cannot report Running")?;
    tracing::info!(config = %config.display(), "service running");
    let waiting = shutdown.clone();
    let result = runtime.block_on(async move {
        let agent = crate::run(settings, shutdown.clone());
        tokio::pin!(agent);
        tokio::select! {
            r = &mut agent => r,
            _ = waiting.cancelled() => {
                // Tell the SCM the stop is under way, then let the agent say bye.
                let _ = handle.set_service_status(status(
                    ServiceState::StopPending,
                    ServiceExitCode::Win32(0),
                ));
                agent.await
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let exit = match &result {
        Ok(()) => ServiceExitCode::Win32(0),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the agent stopped on an error");
            ServiceExitCode::ServiceSpecific(1)
        }
    };
    tracing::info!("service stopped");
    stopped(exit).context("cannot report Stopped")?;
    Ok(())
}
