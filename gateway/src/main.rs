//! `cacheroute`: one binary, one subcommand per component.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cacheroute", version, about = "A gateway for knowledge-intensive LLM serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulated vLLM + LMCache engine (no GPU needed).
    Sim(cacheroute_sim::SimArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => tokio::runtime::Runtime::new()?.block_on(cacheroute_sim::run(args)),
    }
}
