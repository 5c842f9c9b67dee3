//! `cacheroute`: one binary, one subcommand per component. A thin CLI over the
//! component crates (gateway library, KDN, agent, sim); `demo`, `calibrate` and `doctor`
//! live here because only the CLI uses them.

mod calibrate;
mod demo;
mod doctor;

use anyhow::{bail, Result};
use cacheroute_gateway::reload::{ConfigSource, Overrides};
use cacheroute_gateway::server;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The service plane allocates and frees many small buffers per request;
/// mimalloc cuts that cost by about half compared with glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cacheroute",
    version,
    about = "A gateway for knowledge-intensive LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The gateway: an OpenAI-compatible reverse proxy in front of vLLM instances.
    Gateway(GatewayArgs),
    /// Simulated vLLM + LMCache engine (no GPU needed).
    Sim(cacheroute_sim::SimArgs),
    /// Everything on loopback in one process: a gateway and two sims.
    Demo(demo::DemoArgs),
    /// KDN: knowledge registry, warm-up and KV injection (default 127.0.0.1:9101).
    Kdn(cacheroute_kdn::KdnArgs),
    /// Instance agent: beside a vLLM, reports its load and resident knowledge to gateways
    /// (default 127.0.0.1:9001).
    Agent(cacheroute_agent::AgentArgs),
    /// Client of a KDN: register, list, show, delete, search, inject.
    Knowledge(cacheroute_kdn::client_cli::KnowledgeArgs),
    /// The TTFT cost model: fit it to a GPU profile and report its error.
    Calibrate {
        #[command(subcommand)]
        command: calibrate::CalibrateCommand,
    },
    /// Check that an engine's LMCache keys will match a KDN's (exit 1 on a mismatch).
    Doctor(doctor::DoctorArgs),
    /// LMCache KV keys.
    Kv {
        #[command(subcommand)]
        command: cacheroute_kdn::cli::KvCommand,
    },
}

#[derive(Args)]
struct GatewayArgs {
    /// Configuration file (TOML; see conf/cacheroute.example.toml).
    #[arg(long, conflicts_with = "upstream")]
    config: Option<PathBuf>,
    /// Drop-in mode: an instance base URL (repeat for more); models are
    /// discovered from each instance's /v1/models.
    #[arg(long)]
    upstream: Vec<String>,
    /// Service plane address (overrides the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Control plane address (overrides the file).
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Worker threads of the service plane (overrides the file).
    #[arg(long)]
    threads: Option<usize>,
    /// Write one JSON line per routing decision to this file ("-": stdout).
    #[arg(long, value_name = "PATH")]
    log_decisions: Option<String>,
    /// Serve the control plane's write paths (reload, members) without a token on a
    /// non-loopback address.
    #[arg(long)]
    insecure: bool,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Gateway(args) => {
            let source = match (args.config, args.upstream.is_empty()) {
                (Some(path), _) => ConfigSource::File(path),
                (None, false) => ConfigSource::Upstreams(args.upstream),
                (None, true) => bail!("give --config FILE or at least one --upstream URL"),
            };
            let overrides = Overrides {
                listen: args.listen,
                control: args.control,
                threads: args.threads,
                log_decisions: args.log_decisions,
                insecure: args.insecure,
            };
            server::run(source, overrides, Vec::new())
        }
        Command::Sim(args) => tokio::runtime::Runtime::new()?.block_on(cacheroute_sim::run(args)),
        Command::Demo(args) => demo::run(args),
        Command::Doctor(args) => {
            if !tokio::runtime::Runtime::new()?.block_on(doctor::run(args))? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Kv { command } => cacheroute_kdn::cli::run_kv(command),
        Command::Calibrate { command } => calibrate::run(command),
        Command::Kdn(args) => {
            tokio::runtime::Runtime::new()?.block_on(cacheroute_kdn::run_kdn(args))
        }
        Command::Agent(args) => {
            tokio::runtime::Runtime::new()?.block_on(cacheroute_agent::run(args))
        }
        Command::Knowledge(args) => tokio::runtime::Runtime::new()?
            .block_on(cacheroute_kdn::client_cli::run_knowledge(args)),
    }
}
