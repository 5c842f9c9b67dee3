//! `cacheroute demo`: the embedded default. A gateway and two simulated H100
//! Llama-3-8B instances in one process on loopback; nothing to install.

use crate::reload::{ConfigSource, Overrides};
use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::net::SocketAddr;

#[derive(Args)]
pub struct DemoArgs {
    /// Service plane address.
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Control plane address.
    #[arg(long, default_value = "127.0.0.1:7002")]
    control: SocketAddr,
    /// First port of the two sim instances (they take this one and the next).
    #[arg(long, default_value_t = 8100)]
    sim_port: u16,
    /// Model name the sims serve.
    #[arg(long, default_value = "llama3-8b")]
    model: String,
    /// Run the sims this many times faster than an H100 would.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let sims: Vec<SocketAddr> = (0..2)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], args.sim_port + i)))
        .collect();
    // The sims get a runtime of their own on a side thread; the gateway
    // (Pingora) owns the main thread.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let sim_args: Vec<cacheroute_sim::SimArgs> = sims
        .iter()
        .map(|addr| demo_sim_args(*addr, &args.model, args.time_scale))
        .collect();
    std::thread::Builder::new()
        .name("demo-sims".into())
        .spawn(move || {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let mut handles = Vec::new();
                for a in sim_args {
                    let addr = a.listen;
                    match cacheroute_sim::spawn(a).await {
                        Ok(h) => handles.push(h),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.context(format!("sim on {addr}"))));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                std::future::pending::<()>().await;
                drop(handles);
            });
        })?;
    ready_rx.recv().context("the sims' thread ended early")??;

    let config_path =
        std::env::temp_dir().join(format!("cacheroute-demo-{}.toml", std::process::id()));
    let mut f = std::fs::File::create(&config_path)?;
    write!(
        f,
        "[gateway]\nlisten = \"{}\"\ncontrol = \"{}\"\n\n[upstream]\nhealth_check_interval_ms = 1000\n\n[[pools]]\nname = \"demo\"\nmodels = [\"{}\"]\n{}",
        args.listen,
        args.control,
        args.model,
        sims.iter()
            .map(|a| format!("  [[pools.instances]]\n  url = \"http://{a}\"\n"))
            .collect::<String>()
    )?;
    print_banner(&args, &sims, &config_path);
    crate::server::run(ConfigSource::File(config_path), Overrides::default())
}

fn demo_sim_args(listen: SocketAddr, model: &str, time_scale: f64) -> cacheroute_sim::SimArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        sim: cacheroute_sim::SimArgs,
    }
    let mut sim = Wrapper::parse_from(["sim"]).sim;
    sim.listen = listen;
    sim.model = model.to_string();
    sim.time_scale = time_scale;
    sim
}

fn print_banner(args: &DemoArgs, sims: &[SocketAddr], config: &std::path::Path) {
    let url = format!("http://{}", args.listen);
    println!(
        r#"
CacheRoute demo is up (Ctrl-C to stop).

  gateway        {url}   (OpenAI API)
  control plane  http://{control}   (/metrics, /debug/status, /admin/reload)
  instances      {sims}   (sim, H100 Llama-3-8B profile)
  config         {config}   (edit it: the gateway reloads on change)

Try it:

  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"{model}","messages":[{{"role":"user","content":"What is a KV cache?"}}],"max_tokens":32}}'

  python3 -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="none")
for ch in c.chat.completions.create(model="{model}", stream=True,
        messages=[{{"role":"user","content":"Hello"}}], max_tokens=16):
    print(ch.choices[0].delta.content or "", end="", flush=True)
print()'

  curl -s http://{control}/debug/status
"#,
        control = args.control,
        sims = sims
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(", "),
        config = config.display(),
        model = args.model,
    );
}
