use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idem::config::ServeArgs;
use idem::keys::KeysArgs;
use idem::relay::RelayArgs;
use tracing_subscriber::EnvFilter;

/// Retries without duplicates: an Idempotency-Key gateway in front of any HTTP service.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: a reverse proxy that stores and replays responses per Idempotency-Key
    Serve(Box<ServeArgs>),
    /// Inspect, list and delete stored records (to unstick a key by hand)
    Keys(KeysArgs),
    /// Publish an application's transactional outbox (PostgreSQL) to NATS JetStream
    Relay(RelayArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        Command::Keys(_) => "warn",
        Command::Relay(_) => "info",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("IDEM_LOG").unwrap_or_else(|_| EnvFilter::new(default_log)),
        )
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = match (*args).resolve() {
                Ok(config) => config,
                Err(error) => return fail(&error),
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => return fail(&error),
            };
            runtime
                .block_on(async {
                    let metrics = idem::serve::install_metrics()?;
                    idem::serve::run(config, metrics, idem::serve::shutdown_signal()).await
                })
                .map_or_else(|error| fail(&error), |()| ExitCode::SUCCESS)
        }
        Command::Keys(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => return fail(&error),
            };
            match runtime.block_on(idem::keys::run(args)) {
                Ok((text, found)) => {
                    print!("{text}");
                    if found { ExitCode::SUCCESS } else { ExitCode::from(1) }
                }
                Err(error) => {
                    eprintln!("idem: error: {error}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Relay(args) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => return fail(&error),
            };
            match runtime.block_on(idem::relay::run(args, idem::serve::shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error),
            }
        }
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("idem: error: {error}");
    ExitCode::FAILURE
}
