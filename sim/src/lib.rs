//! sim: the stand-in for vLLM + LMCache on machines without a GPU.

use clap::Args;
use std::net::SocketAddr;

/// `cacheroute sim` arguments.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Model name served (what `/v1/models` lists and requests must name).
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
}

/// Run a sim server until the process is stopped.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sim is not built yet")
}
