//! `outpost-gateway`: parse the command line, prepare the data directory, serve.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_gateway::settings::ServeArgs;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "outpost-gateway",
    version,
    about = "Outpost gateway: agents dial in, results go out to the bus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the serve options does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Accept agents, serve the API and the console.
    Serve(ServeArgs),
    /// Agent releases for self-update: make a signing key, publish a ci/dist output.
    #[command(subcommand)]
    Release(Release),
    /// A fleet's checks and plugins in NATS (with `--bus nats://…`).
    #[command(subcommand)]
    Config(Config),
}

#[derive(Subcommand)]
enum Config {
    /// Make NATS hold exactly DIR: its *.toml check files and DIR/plugins/*. Validates
    /// everything first, prints the diff, then applies it (additions, changes, removals).
    /// Every gateway of the tenant picks the change up within seconds.
    Push {
        dir: std::path::PathBuf,
        /// Show the diff and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, env = "OUTPOST_TENANT", default_value = outpost_gateway::tenant::DEFAULT_TENANT,
              value_parser = outpost_gateway::tenant::parse_name)]
        tenant: String,
        #[command(flatten)]
        nats: outpost_gateway::settings::bus::BusArgs,
    },
}

async fn config(cmd: Config) -> anyhow::Result<()> {
    let Config::Push {
        dir,
        dry_run,
        tenant,
        nats,
    } = cmd;
    let problems = nats.problems();
    if !problems.is_empty() {
        return Err(outpost_gateway::settings::ConfigError { problems }.into());
    }
    let Some(settings) = nats.settings().map(|n| n.for_tenant(&tenant)) else {
        anyhow::bail!("config push needs the fleet's NATS: pass --bus nats://HOST:PORT");
    };
    let nats =
        outpost_gateway::nats::Nats::connect_once(&settings, "outpost-gateway config push").await?;
    let pushed = outpost_gateway::nats::fleet_config::push(&nats, &tenant, &dir, dry_run).await?;
    print!("{}", pushed.diff);
    match (pushed.changes, dry_run) {
        (0, _) => println!(
            "no changes: tenant {tenant} already holds {}",
            dir.display()
        ),
        (n, true) => println!("dry run: {n} change(s) not pushed"),
        (n, false) => println!("pushed {n} change(s) to tenant {tenant}"),
    }
    Ok(())
}

#[derive(Subcommand)]
enum Release {
    /// Make an ed25519 key pair: PREFIX.key (private, mode 0600) and PREFIX.pub (the
    /// key agents are built with, e.g. installer/release-key.pub).
    Keygen {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Copy DIST_DIR (a ci/dist output) into RELEASES_DIR/<VERSION>/ and sign a new
    /// manifest over every version present there.
    Publish {
        /// The private key made by `release keygen`.
        #[arg(long)]
        key: std::path::PathBuf,
        /// The gateway's releases directory (its --releases-dir).
        #[arg(
            long,
            env = "OUTPOST_RELEASES_DIR",
            default_value = "/var/lib/outpost-gateway/releases"
        )]
        releases_dir: std::path::PathBuf,
        dist_dir: std::path::PathBuf,
    },
}

fn release(cmd: Release) -> anyhow::Result<()> {
    use outpost_gateway::releases_manifest as rm;
    match cmd {
        Release::Keygen { out } => {
            let (private, public) = rm::keygen(&out)?;
            println!(
                "private key {} (mode 0600: keep it off the gateway)\npublic key {}",
                private.display(),
                public.display()
            );
        }
        Release::Publish {
            key,
            releases_dir,
            dist_dir,
        } => {
            let p = rm::publish(&key, &dist_dir, &releases_dir)?;
            println!(
                "published {} ({}) into {}; the manifest lists {} release files",
                p.version,
                p.files.join(", "),
                releases_dir.display(),
                p.manifest.releases.len()
            );
        }
    }
    Ok(())
}

/// sysexits.h codes: the command line cannot be parsed (EX_USAGE), the options or the
/// files they name are wrong and retrying will not help (EX_CONFIG), the data directory is
/// held by another gateway for now (EX_TEMPFAIL), anything else (EX_SOFTWARE; systemd
/// restarts the gateway after it).
const EX_USAGE: u8 = 64;
const EX_SOFTWARE: u8 = 70;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

/// The exit code for `e`: 78 when it is (or wraps) a configuration error, 75 when the data
/// directory is in use.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    let is = |f: fn(&(dyn std::error::Error + 'static)) -> bool| e.chain().any(f);
    if is(|c| c.is::<outpost_gateway::settings::ConfigError>()) {
        ExitCode::from(EX_CONFIG)
    } else if is(|c| c.is::<outpost_gateway::DataDirInUse>()) {
        ExitCode::from(EX_TEMPFAIL)
    } else {
        ExitCode::from(EX_SOFTWARE)
    }
}

fn main() -> ExitCode {
    outpost_sys::init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    if let Command::Release(cmd) = cli.command {
        return match release(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Config(cmd) => runtime.block_on(config(cmd)),
        Command::Release(_) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code(&e)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = outpost_gateway::Settings::from_args(args)?;
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let grace = settings.grace;
    let data_dir = settings.data_dir.clone();
    let prepared = outpost_gateway::prepare(settings, shutdown.clone()).await?;
    let gw = &prepared.gateway;
    // Machine-readable lines first (tests and scripts read them), then the human summary.
    // Written without panicking: a closed stdout must not take the gateway down. No
    // secret is printed (stdout ends up in journald and container logs): the token and
    // the enrollment key are named by their files, readable by the gateway's user only.
    let banner = format!(
        "listening https://{addr}\npin_sha256 {}\ncurl_pin {}\nconsole https://{addr}/\nenroll_key_file {}\napi_token_file {}\nchecks_dir {}\n",
        prepared.tls.pin_sha256,
        prepared.tls.curl_pin,
        data_dir.join("enroll.key").display(),
        data_dir.join("api.token").display(),
        gw.settings.checks_dir.display()
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes()).and_then(|_| out.flush());
    }
    tracing::info!(%addr, pin_sha256 = %prepared.tls.pin_sha256, self_signed = prepared.tls.self_signed, "gateway ready");
    tokio::spawn(async move {
        outpost_sys::shutdown_signal().await;
        tracing::info!("shutdown requested");
        shutdown.cancel();
    });
    outpost_gateway::serve(prepared, listener, grace).await
}
