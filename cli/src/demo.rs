//! `cacheroute demo`: the embedded default. A gateway, two simulated H100
//! Llama-3-8B instances and a KDN in one process on loopback; nothing to install.
//!
//! The KDN and the sims share in-process LMCache stores (`memory://NAME`): sim 0 is
//! the KDN's producer and writes into the KDN's store (`memory://demo-kdn`), sim 1
//! has a store of its own (`memory://demo-sim-1`) that the KDN injects into. After
//! start-up the bundled corpus (`conf/knowledge/demo.jsonl`) is registered (warmed
//! up through sim 0) and injected into sim 1, so a chat request whose first system
//! message is a block's registered content hits the KV cache on either sim.

use anyhow::{Context, Result};
use cacheroute_gateway::reload::{ConfigSource, Overrides};
use cacheroute_kdn::config::KdnConfig;
use cacheroute_kdn::service::{InjectRequest, Kdn, RegisterRequest};
use cacheroute_kdn::tokenizer::TokenizerChoice;
use clap::Args;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The bundled knowledge corpus (one block per line, `cacheroute knowledge register
/// --jsonl` format).
pub const DEMO_CORPUS: &str = include_str!("../../conf/knowledge/demo.jsonl");
/// A question per corpus block (`{"id", "question"}`): the KDN refuses unknown fields in
/// registrations, so they live beside the corpus.
pub const DEMO_QUESTIONS: &str = include_str!("../../conf/knowledge/demo-questions.jsonl");

/// vLLM's `--model` string in the LMCache keys of the demo's sims and KDN.
const LMCACHE_MODEL: &str = "meta-llama/Meta-Llama-3-8B-Instruct";
const LMCACHE_SCHEME: &str = "lmcache-0.3.15";
const CHUNK_SIZE: usize = 256;
const HASH_SEED: &str = "0";
/// The KDN's store; sim 0 (the producer) uses it as its LMCache store.
const KDN_STORE: &str = "memory://demo-kdn";
const KDN_REGISTRY: &str = "memory://demo-registry";
/// Sim 1's LMCache store, filled by injection.
const SIM1_STORE: &str = "memory://demo-sim-1";

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
    /// KDN (knowledge registry and KV injection) API address.
    #[arg(long, default_value = "127.0.0.1:9101")]
    kdn_listen: SocketAddr,
    /// Model name the sims serve.
    #[arg(long, default_value = "llama3-8b")]
    model: String,
    /// Run the sims this many times faster than an H100 would.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// The gateway's injection strategy (`[proxy] injection`); a fixed one lets a
    /// test or a demo show one mode for sure.
    #[arg(long, default_value = "adaptive",
          value_parser = ["adaptive", "text", "kv", "hybrid", "iws"])]
    injection: String,
    /// Token ids of sims, KDN and gateway: `auto` (exact Llama-3 ids, embedded, for a
    /// Llama-3 model name; else the approximation), `approx`, or a tokenizer.json.
    #[arg(long, default_value = "auto", value_name = "FILE|approx|auto")]
    tokenizer: TokenizerChoice,
}

/// One corpus block's question.
struct Question {
    id: String,
    question: String,
}

fn corpus() -> Result<Vec<RegisterRequest>> {
    DEMO_CORPUS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("demo.jsonl line {}", i + 1)))
        .collect()
}

fn questions() -> Result<Vec<Question>> {
    DEMO_QUESTIONS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("demo-questions.jsonl line {}", i + 1))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .with_context(|| format!("demo-questions.jsonl line {}: no {k}", i + 1))
            };
            Ok(Question {
                id: field("id")?,
                question: field("question")?,
            })
        })
        .collect()
}

fn kdn_config(args: &DemoArgs, sims: &[SocketAddr]) -> Result<KdnConfig> {
    let toml = format!(
        r#"[kdn]
listen = "{listen}"
registry = "{KDN_REGISTRY}"
store = "{KDN_STORE}"
warmup_timeout_s = 120.0

[[models]]
name = "{model}"
lmcache_model = "{LMCACHE_MODEL}"
template = "llama3"
scheme = "{LMCACHE_SCHEME}"
chunk_size = {CHUNK_SIZE}
hash_seed = "{HASH_SEED}"
kv_bytes_per_token = 131072
producer = "http://{producer}"

[[targets]]
name = "sim-0"
store = "{KDN_STORE}"

[[targets]]
name = "sim-1"
store = "{SIM1_STORE}"
"#,
        listen = args.kdn_listen,
        model = args.model,
        producer = sims[0],
    );
    let mut cfg = KdnConfig::from_toml(&toml).context("the demo's KDN configuration")?;
    for m in &mut cfg.models {
        m.tokenizer = args.tokenizer.clone();
    }
    Ok(cfg)
}

pub fn run(mut args: DemoArgs) -> Result<()> {
    // the gateway's config file lives in the temp dir: give it an absolute path
    if let TokenizerChoice::File(p) = &args.tokenizer {
        if p.is_relative() {
            args.tokenizer = TokenizerChoice::File(std::env::current_dir()?.join(p));
        }
    }
    let sims: Vec<SocketAddr> = (0..2)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], args.sim_port + i)))
        .collect();
    let blocks = corpus()?;
    let qs = questions()?;
    let kdn_cfg = kdn_config(&args, &sims)?;
    // The sims and the KDN get a runtime of their own on a side thread; the gateway
    // (Pingora) owns the main thread.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
    let sim_args: Vec<cacheroute_sim::SimArgs> = sims
        .iter()
        .zip([KDN_STORE, SIM1_STORE])
        .map(|(addr, store)| {
            let mut a = demo_sim_args(*addr, &args.model, args.time_scale, store);
            a.tokenizer = args.tokenizer.clone();
            a
        })
        .collect();
    let model = args.model.clone();
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
                let kdn = match cacheroute_kdn::spawn_kdn(kdn_cfg).await {
                    Ok(k) => k,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.context("the demo's KDN")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(kdn.addr));
                if let Err(e) = load_corpus(&kdn.kdn, blocks, &model).await {
                    eprintln!("demo: loading the knowledge corpus failed: {e:#}");
                }
                std::future::pending::<()>().await;
                drop((handles, kdn));
            });
        })?;
    let kdn_addr = ready_rx.recv().context("the sims' thread ended early")??;

    let config_path =
        std::env::temp_dir().join(format!("cacheroute-demo-{}.toml", std::process::id()));
    let mut f = std::fs::File::create(&config_path)?;
    write!(
        f,
        "[gateway]\nlisten = \"{}\"\ncontrol = \"{}\"\n\n[upstream]\nhealth_check_interval_ms = 1000\n\n\
         [knowledge]\nsync_interval_ms = 500\n\n[proxy]\ninjection = \"{}\"\ntokenizer = {}\n\n[[kdns]]\nurl = \"http://{}\"\n\n\
         [[pools]]\nname = \"demo\"\nmodels = [\"{}\"]\n{}",
        args.listen,
        args.control,
        args.injection,
        toml::Value::String(args.tokenizer.describe()),
        kdn_addr,
        args.model,
        sims.iter()
            .enumerate()
            .map(|(i, a)| format!(
                "  [[pools.instances]]\n  url = \"http://{a}\"\n  kv_target = \"sim-{i}\"\n"
            ))
            .collect::<String>()
    )?;
    print_banner(&args, &sims, kdn_addr, &qs, &config_path);
    cacheroute_gateway::server::run(
        ConfigSource::File(config_path),
        Overrides::default(),
        Vec::new(),
    )
}

/// Register the corpus (warm-up through the producer, sim 0) and inject every block into
/// both targets (sim 0's store is the KDN's: nothing to copy there).
async fn load_corpus(kdn: &Arc<Kdn>, blocks: Vec<RegisterRequest>, model: &str) -> Result<()> {
    let n = blocks.len();
    let (records, _) = kdn
        .register(blocks, true)
        .await
        .map_err(|e| anyhow::anyhow!("registering: {}", e.message))?;
    let mut ready = Vec::new();
    for r in &records {
        match r.models.get(model) {
            Some(e) if e.status == cacheroute_kdn::registry::BlockStatus::KvReady => {
                ready.push(r.id.clone())
            }
            Some(e) => eprintln!(
                "demo: knowledge {} is {}: {}",
                r.id,
                e.status.name(),
                e.error.as_deref().unwrap_or("")
            ),
            None => eprintln!("demo: knowledge {} is not registered for {model}", r.id),
        }
    }
    let mut chunks = 0;
    for target in ["sim-0", "sim-1"] {
        let job = kdn
            .inject(&InjectRequest {
                knowledge_ids: ready.clone(),
                model: model.to_string(),
                target: target.into(),
                wait: false,
                timeout_ms: None,
            })
            .map_err(|e| anyhow::anyhow!("injecting into {target}: {}", e.message))?;
        job.wait(Duration::from_secs(300)).await;
        if let Some(e) = job.error() {
            anyhow::bail!("injecting into {target}: {e}");
        }
        if target == "sim-1" {
            chunks = job.view()["chunks_done"].as_u64().unwrap_or(0);
        }
    }
    println!(
        "demo: knowledge ready: {}/{n} blocks kv_ready for {model} (warmed up through sim 0), \
         injected into sim 1 ({chunks} chunks)",
        ready.len()
    );
    let _ = std::io::stdout().flush();
    Ok(())
}

fn demo_sim_args(
    listen: SocketAddr,
    model: &str,
    time_scale: f64,
    store: &str,
) -> cacheroute_sim::SimArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        sim: cacheroute_sim::SimArgs,
    }
    let mut sim = Wrapper::parse_from([
        "sim",
        "--kv-store",
        store,
        "--lmcache-model",
        LMCACHE_MODEL,
        "--lmcache-scheme",
        LMCACHE_SCHEME,
        "--chunk-size",
        &CHUNK_SIZE.to_string(),
        "--hash-seed",
        HASH_SEED,
    ])
    .sim;
    sim.listen = listen;
    sim.model = model.to_string();
    sim.time_scale = time_scale;
    sim
}

fn print_banner(
    args: &DemoArgs,
    sims: &[SocketAddr],
    kdn: SocketAddr,
    qs: &[Question],
    config: &std::path::Path,
) {
    let url = format!("http://{}", args.listen);
    let (id, question) = qs
        .first()
        .map(|q| (q.id.as_str(), q.question.as_str()))
        .unwrap_or(("", ""));
    println!(
        r#"
CacheRoute demo is up (Ctrl-C to stop).

  gateway        {url}   (OpenAI API)
  dashboard      http://{control}/ui   (fleet, KDNs, knowledge, live decisions, playground)
  control plane  http://{control}   (/metrics, /debug/status, /admin/reload)
  instances      {sims}   (sim, H100 Llama-3-8B profile)
  KDN            http://{kdn}   (knowledge registry + KV injection: /v1/knowledge, /v1/inject)
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

The KDN registers a bundled corpus of {blocks} knowledge blocks (warm-up through sim 0,
injection into sim 1; "knowledge ready" is printed when done):

  curl -s 'http://{kdn}/v1/knowledge?text=false' | python3 -m json.tool | head -40
  curl -s 'http://{kdn}/v1/knowledge/search?q=paged+attention&k=3'

A RAG request: the gateway retrieves the block that answers the question (synced from
the KDN), lays it out first in the prompt and picks text or KV injection; the headers
say what it chose, usage.prompt_tokens_details.cached_tokens shows the KV hit, and
http://{control}/debug/strategy explains the decision:

  curl -si {url}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"{model}","RAG":true,"max_tokens":16,"messages":[{{"role":"user","content":{question}}}]}}' \
    | grep -iE '^x-cacheroute|cached_tokens'
  (expected block: {id})
"#,
        control = args.control,
        sims = sims
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(", "),
        config = config.display(),
        model = args.model,
        blocks = DEMO_CORPUS.lines().filter(|l| !l.trim().is_empty()).count(),
        question = serde_json::to_string(question).unwrap_or_default(),
    );
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_parses_and_every_block_has_a_question() {
        let blocks = corpus().unwrap();
        let qs = questions().unwrap();
        assert!(blocks.len() >= 24, "{} blocks", blocks.len());
        let ids: Vec<&str> = blocks.iter().map(|b| b.id.as_deref().unwrap()).collect();
        let qids: Vec<&str> = qs.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, qids);
        for b in &blocks {
            let words = b.text.split_whitespace().count();
            assert!((150..=400).contains(&words), "{:?}: {words} words", b.id);
        }
        for q in &qs {
            assert!(q.question.trim().ends_with('?'), "{}", q.id);
        }
    }
}
