//! `outpost-agent`: parse the command line, load the configuration, run until signalled.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outpost-agent",
    version = outpost_agent::AGENT_VERSION,
    about = "Outpost agent: runs checks, dials out to its gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT (then say bye to the gateway and exit).
    Run {
        /// The agent configuration file (TOML).
        #[arg(long, short, env = "OUTPOST_CONFIG", default_value_os_t = outpost_agent::settings::defaults::config_file())]
        config: PathBuf,
    },
    /// Run as the Windows service `Outpost` (started by the Service Control Manager).
    Service {
        /// The agent configuration file (TOML).
        #[arg(long, short, env = "OUTPOST_CONFIG", default_value_os_t = outpost_agent::settings::defaults::config_file())]
        config: PathBuf,
    },
}

/// sysexits.h EX_CONFIG: the configuration is wrong; retrying will not help.
const EX_CONFIG: u8 = 78;

/// `service`: handed to the Service Control Manager on Windows; refused elsewhere.
fn service(config: PathBuf) -> ExitCode {
    #[cfg(windows)]
    let result = outpost_agent::service::run(config);
    #[cfg(not(windows))]
    let result: anyhow::Result<()> = Err(anyhow::anyhow!(
        "`service` is for Windows; here run `outpost-agent run --config {}` under systemd, OpenRC or SysV init",
        config.display()
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if cfg!(windows) { 1 } else { 64 })
        }
    }
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    if !matches!(command, Command::Service { .. }) {
        // The service logs to a file; it sets that up itself.
        outpost_sys::init_logging();
    }
    let config = match command {
        Command::Run { config } => config,
        Command::Service { config } => return service(config),
    };
    let settings = match outpost_agent::Settings::load(&config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Remember where this binary is now: after a self-update swap /proc/self/exe moves.
    let _ = outpost_agent::update::exe_path();
    loop {
        let runtime = match outpost_agent::runtime() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::from(70);
            }
        };
        let shutdown = CancellationToken::new();
        let result = runtime.block_on(async {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                outpost_sys::shutdown_signal().await;
                tracing::info!("stopping");
                stop.cancel();
            });
            outpost_agent::run_updating(settings.clone(), shutdown).await
        });
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        // A staged update: try the new binary (exec'd when good), or roll back and rerun.
        let result = match result {
            Ok(Some(staged)) => match outpost_agent::update::after_run(staged) {
                outpost_agent::update::AfterRun::RunAgain => continue,
                outpost_agent::update::AfterRun::Exit => Ok(()),
            },
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
}
