//! The outbox relay for this example: the same as `idem relay` (it calls the same library).
//!
//! Run with `cargo run -p payments --bin relay -- --database postgres://... --nats nats://...`.

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    relay: idem::relay::RelayArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    match idem::relay::run(Args::parse().relay, idem::serve::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relay: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
