//! `cacheroute knowledge …`: a client of the KDN's HTTP API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// `cacheroute knowledge [--kdn URL] [--json] <command>`.
#[derive(Debug, Clone, Args)]
pub struct KnowledgeArgs {
    /// Base URL of the KDN.
    #[arg(
        long,
        env = "CACHEROUTE_KDN",
        default_value = "http://127.0.0.1:9101",
        global = true
    )]
    pub kdn: String,
    /// Bearer token for the KDN's write paths (register, delete, inject).
    #[arg(
        long,
        env = crate::auth::KDN_TOKEN_ENV,
        global = true,
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print the KDN's JSON answers unchanged.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KnowledgeCommand,
}

/// The knowledge commands.
#[derive(Debug, Clone, Subcommand)]
pub enum KnowledgeCommand {
    /// Register a knowledge block (--text or --file), or many (--jsonl), for every
    /// configured model (or the --model ones); warm-up starts at once.
    Register(RegisterArgs),
    /// List registered blocks with their status per model.
    List {
        /// Only blocks registered for this model.
        #[arg(long)]
        model: Option<String>,
    },
    /// Show one block (status, tokens, chunks, bytes, residency, padded content).
    Show {
        id: String,
        /// Include the LMCache chunk keys.
        #[arg(long)]
        keys: bool,
    },
    /// Delete a block (and its chunks in the KDN store).
    Delete {
        id: String,
        /// Keep its chunks in the KDN store.
        #[arg(long)]
        keep_kv: bool,
    },
    /// Search the registry (BM25 over title, tags and text).
    Search {
        /// Search text.
        #[arg(required = true)]
        query: Vec<String>,
        /// Most results.
        #[arg(short, long, default_value_t = 5)]
        k: usize,
    },
    /// Inject blocks' KV into a target store and wait for the job.
    Inject(InjectArgs),
}

/// `cacheroute knowledge register`.
#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// The knowledge text.
    #[arg(long, conflicts_with_all = ["file", "jsonl"])]
    pub text: Option<String>,
    /// Read the text from a file (`-`: stdin).
    #[arg(long, conflicts_with = "jsonl")]
    pub file: Option<PathBuf>,
    /// Bulk: a JSONL file, one registration per line (`{"text", "id"?, "title"?,
    /// "tags"?, "models"?, "meta"?}`); all or none are registered.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Block id (default: SHA-256 of the normalised text).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub title: Option<String>,
    /// A tag (repeat for more).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// A served model name to register for (repeat; default: all configured).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Wait for the warm-ups and print their outcome.
    #[arg(long)]
    pub wait: bool,
}

/// `cacheroute knowledge inject`.
#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Block ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Served model name.
    #[arg(long)]
    pub model: String,
    /// A configured target name or a store URL.
    #[arg(long)]
    pub target: String,
    /// Return at once with the queued job instead of waiting.
    #[arg(long)]
    pub no_wait: bool,
}

/// `Authorization: Bearer <token>` on every request, when there is a token.
fn auth_headers(token: Option<&str>) -> Result<reqwest::header::HeaderMap> {
    let mut h = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the KDN token has characters a header cannot carry")?;
        v.set_sensitive(true);
        h.insert(reqwest::header::AUTHORIZATION, v);
    }
    Ok(h)
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(base: &str, token: Option<&str>) -> Result<Client> {
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .default_headers(auth_headers(token)?)
                .build()?,
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the KDN at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the KDN's answer")?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(v)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// One line per model of a record.
fn describe_models(rec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(models) = rec["models"].as_object() {
        for (name, m) in models {
            let mut line = format!(
                "    {name}: {}, {} tokens, {} chunks, {}",
                m["status"].as_str().unwrap_or("?"),
                m["tokens"],
                m["chunks"],
                human_bytes(m["bytes"].as_u64().unwrap_or(0))
            );
            if let Some(r) = m["resident"].as_array().filter(|r| !r.is_empty()) {
                let names: Vec<&str> = r.iter().filter_map(Value::as_str).collect();
                line.push_str(&format!(", resident in {}", names.join(", ")));
            }
            if let Some(e) = m["error"].as_str() {
                line.push_str(&format!("\n      error: {e}"));
            }
            out.push(line);
        }
    }
    out
}

fn print_record(rec: &Value) {
    let title = rec["title"].as_str().unwrap_or("");
    println!("{}  {}", rec["id"].as_str().unwrap_or("?"), title);
    for l in describe_models(rec) {
        println!("{l}");
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Run a `cacheroute knowledge` command.
pub async fn run_knowledge(args: KnowledgeArgs) -> Result<()> {
    let c = Client::new(&args.kdn, args.token.as_deref().filter(|t| !t.is_empty()))?;
    match args.command {
        KnowledgeCommand::Register(r) => {
            let wait_q = if r.wait { "?wait=true" } else { "" };
            if let Some(path) = &r.jsonl {
                if r.text.is_some() || r.id.is_some() || r.title.is_some() || !r.tags.is_empty() {
                    bail!(
                        "--jsonl takes every field from the file; drop --text/--id/--title/--tag"
                    );
                }
                let mut body = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                if !r.models.is_empty() {
                    // apply --model to lines that do not name models
                    let mut lines = Vec::new();
                    for (i, line) in body.lines().enumerate() {
                        if line.trim().is_empty() {
                            continue;
                        }
                        let mut v: Value = serde_json::from_str(line)
                            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                        if v.get("models").is_none() {
                            v["models"] = json!(r.models);
                        }
                        lines.push(v.to_string());
                    }
                    body = lines.join("\n");
                }
                let v = c
                    .send(
                        c.http
                            .post(c.url(&format!("/v1/knowledge/bulk{wait_q}")))
                            .header("content-type", "application/x-ndjson")
                            .body(body),
                    )
                    .await?;
                if args.json {
                    print_json(&v);
                } else {
                    let data = v["data"].as_array().cloned().unwrap_or_default();
                    println!("registered {} knowledge blocks", data.len());
                    for rec in &data {
                        print_record(rec);
                    }
                }
                return Ok(());
            }
            let text = match (&r.text, &r.file) {
                (Some(t), None) => t.clone(),
                (None, Some(p)) if p.as_os_str() == "-" => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .context("reading stdin")?;
                    s
                }
                (None, Some(p)) => std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?,
                _ => bail!("give the knowledge with --text TEXT, --file PATH or --jsonl PATH"),
            };
            let mut body = json!({"text": text, "tags": r.tags});
            if let Some(id) = &r.id {
                body["id"] = json!(id);
            }
            if let Some(t) = &r.title {
                body["title"] = json!(t);
            }
            if !r.models.is_empty() {
                body["models"] = json!(r.models);
            }
            let v = c
                .send(
                    c.http
                        .post(c.url(&format!("/v1/knowledge{wait_q}")))
                        .json(&body),
                )
                .await?;
            if args.json {
                print_json(&v);
            } else {
                print_record(&v);
            }
        }
        KnowledgeCommand::List { model } => {
            let mut req = c.http.get(c.url("/v1/knowledge?text=false"));
            if let Some(m) = &model {
                req = req.query(&[("model", m)]);
            }
            let v = c.send(req).await?;
            if args.json {
                print_json(&v);
            } else {
                let data = v["data"].as_array().cloned().unwrap_or_default();
                if data.is_empty() {
                    println!("no knowledge registered");
                }
                for rec in &data {
                    print_record(rec);
                }
            }
        }
        KnowledgeCommand::Show { id, keys } => {
            let mut req = c.http.get(c.url(&format!("/v1/knowledge/{id}")));
            if keys {
                req = req.query(&[("keys", "true")]);
            }
            print_json(&c.send(req).await?);
        }
        KnowledgeCommand::Delete { id, keep_kv } => {
            let mut req = c.http.delete(c.url(&format!("/v1/knowledge/{id}")));
            if keep_kv {
                req = req.query(&[("keep_kv", "true")]);
            }
            let v = c.send(req).await?;
            if args.json {
                print_json(&v);
            } else {
                println!(
                    "deleted {id} ({} chunks removed from the KDN store)",
                    v["kv_chunks_deleted"]
                );
                if let Some(e) = v["kv_error"].as_str() {
                    println!("warning: {e}");
                }
            }
        }
        KnowledgeCommand::Search { query, k } => {
            let q = query.join(" ");
            let k = k.to_string();
            let v = c
                .send(
                    c.http
                        .get(c.url("/v1/knowledge/search"))
                        .query(&[("q", q.as_str()), ("k", k.as_str())]),
                )
                .await?;
            if args.json {
                print_json(&v);
            } else {
                let data = v["data"].as_array().cloned().unwrap_or_default();
                if data.is_empty() {
                    println!("no match");
                }
                for hit in &data {
                    println!(
                        "{:7.3}  {}  {}",
                        hit["score"].as_f64().unwrap_or(0.0),
                        hit["id"].as_str().unwrap_or("?"),
                        hit["title"].as_str().unwrap_or("")
                    );
                    let snippet: String = hit["snippet"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(100)
                        .map(|c| if c == '\n' { ' ' } else { c })
                        .collect();
                    println!("         {snippet}");
                }
            }
        }
        KnowledgeCommand::Inject(i) => {
            let body = json!({
                "knowledge_ids": i.ids,
                "model": i.model,
                "target": i.target,
                "wait": !i.no_wait,
            });
            let v = c.send(c.http.post(c.url("/v1/inject")).json(&body)).await?;
            if args.json {
                print_json(&v);
            } else {
                println!(
                    "job {}: {}, {} of {} chunks, {} moved at {}/s{}",
                    v["id"].as_str().unwrap_or("?"),
                    v["status"].as_str().unwrap_or("?"),
                    v["chunks_done"],
                    v["chunks_total"],
                    human_bytes(v["bytes_moved"].as_u64().unwrap_or(0)),
                    human_bytes(v["bandwidth_bytes_per_s"].as_f64().unwrap_or(0.0) as u64),
                    v["error"]
                        .as_str()
                        .map(|e| format!("\nerror: {e}"))
                        .unwrap_or_default()
                );
                if v["status"] == "failed" {
                    bail!("injection failed");
                }
            }
        }
    }
    Ok(())
}
