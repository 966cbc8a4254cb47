use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idem::config::ServeArgs;
use idem::dead_letters::DeadLettersArgs;
use idem::keys::KeysArgs;
use idem::outbox::OutboxArgs;
use idem::relay::RelayArgs;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

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
    /// Publish an application's transactional outbox (PostgreSQL) to NATS JetStream,
    /// RabbitMQ or Redis Streams
    Relay(RelayArgs),
    /// Inspect the outbox: keys waiting, failing or parked; retry or discard a parked key
    Outbox(OutboxArgs),
    /// The messages consumers gave up on: list them, put them back on the broker, delete them
    DeadLetters(DeadLettersArgs),
}

/// The setting that keeps the gateway's memory from staying at its high-water mark.
const MMAP_THRESHOLD_TUNABLE: &str = "glibc.malloc.mmap_threshold=131072";

/// glibc's malloc serves blocks of 128 KiB and more with `mmap`, handing them back to the
/// system when freed; but each such free raises that threshold to the block's size, so the
/// next burst of large request bodies comes from heap arenas that are never handed back
/// (measured: 260 MiB kept after the second of two bursts of 40 x 9 MiB bodies, 16 MiB with
/// the threshold fixed). Fixing the threshold turns that adjustment off. glibc reads it only
/// at start, so the gateway starts itself again with it set (same process id and files); on
/// other C libraries this does nothing.
fn fix_malloc_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        // Once only: glibc drops GLIBC_TUNABLES for set-id or file-capability programs, so
        // the tunable alone cannot tell whether this process already restarted itself.
        const RESTARTED: &str = "IDEM_MALLOC_TUNED";
        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if current.contains("glibc.malloc.mmap_threshold") || std::env::var_os(RESTARTED).is_some()
        {
            return;
        }
        let Ok(program) = std::env::current_exe() else { return };
        // Started through the dynamic loader (`ld.so ./idem`): restarting would run the loader.
        if program.file_name().is_some_and(|name| name.to_string_lossy().starts_with("ld-")) {
            return;
        }
        let tunables = if current.is_empty() {
            MMAP_THRESHOLD_TUNABLE.to_owned()
        } else {
            format!("{current}:{MMAP_THRESHOLD_TUNABLE}")
        };
        let error = std::process::Command::new(program)
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", tunables)
            .env(RESTARTED, "1")
            .exec();
        // Only returns on failure: run on with the default behaviour.
        eprintln!(
            "idem: could not restart with a fixed malloc mmap threshold ({error}); continuing"
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        fix_malloc_mmap_threshold();
    }
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        Command::Keys(_) => "warn",
        Command::Relay(_) => "info",
        Command::Outbox(_) | Command::DeadLetters(_) => "warn",
    };
    // The long-running commands get their runtime first: the gateway exports traces when the
    // OTEL_* variables ask for it, and the exporter sends on that runtime. (The relay makes no
    // spans of its own: it carries each event's trace context on as a message header.)
    let runtime = match cli.command {
        Command::Serve(_) | Command::Relay(_) => match tokio::runtime::Runtime::new() {
            Ok(runtime) => Some(runtime),
            Err(error) => return fail(&error),
        },
        Command::Keys(_) | Command::Outbox(_) | Command::DeadLetters(_) => None,
    };
    let telemetry = match (&cli.command, runtime.as_ref()) {
        (Command::Serve(_), Some(runtime)) => match idem::telemetry::start(runtime.handle()) {
            Ok(telemetry) => telemetry,
            Err(error) => return fail(&error),
        },
        _ => None,
    };
    let mut log_filter =
        EnvFilter::try_from_env("IDEM_LOG").unwrap_or_else(|_| EnvFilter::new(default_log));
    // idem's spans are for traces; in the log they would only make every line longer (and
    // when nothing exports them, skipping them costs nothing).
    if !std::env::var("IDEM_LOG").is_ok_and(|filter| filter.contains(idem_trace::TARGET))
        && let Ok(directive) = format!("{}=off", idem_trace::TARGET).parse()
    {
        log_filter = log_filter.add_directive(directive);
    }
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(log_filter))
        .with(telemetry.as_ref().map(idem::telemetry::Telemetry::layer))
        .init();
    let code = match (cli.command, runtime.as_ref()) {
        (Command::Serve(args), Some(runtime)) => {
            let config = match (*args).resolve() {
                Ok(config) => config,
                Err(error) => return fail(&error),
            };
            runtime
                .block_on(async {
                    let metrics = idem::serve::install_metrics()?;
                    idem::serve::run(config, metrics, idem::serve::shutdown_signal()).await
                })
                .map_or_else(|error| fail(&error), |()| ExitCode::SUCCESS)
        }
        (Command::Relay(args), Some(runtime)) => {
            match runtime.block_on(idem::relay::run(args, idem::serve::shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => fail(&error),
            }
        }
        (Command::Keys(args), _) => operator_command(idem::keys::run(args)),
        (Command::Outbox(args), _) => operator_command(idem::outbox::run(args)),
        (Command::DeadLetters(args), _) => operator_command(idem::dead_letters::run(args)),
        (Command::Serve(_) | Command::Relay(_), None) => unreachable!("made above"),
    };
    // The last spans are sent while the runtime (which the exporter sends on) still runs.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    code
}

/// Runs an operator's command (`idem keys`, `idem outbox`): its text on stdout, exit status 0,
/// or 1 when what it named was not found; an error on stderr with status 2.
fn operator_command(run: impl Future<Output = Result<(String, bool), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&error),
    };
    match runtime.block_on(run) {
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

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("idem: error: {error}");
    ExitCode::FAILURE
}
