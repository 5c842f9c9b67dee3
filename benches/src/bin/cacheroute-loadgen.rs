//! `cacheroute-loadgen`: an open-loop HTTP load generator for OpenAI chat/completions
//! endpoints, for the RAG benchmark (`benches/rag/rag_bench.py`).
//!
//! It reads a JSONL schedule (`{"at_ms", "body", "tag"?, "path"?}` per line), sends
//! every request at its scheduled time whatever earlier ones are doing (open loop: a
//! slow server gets queued requests, not fewer), streams each answer and writes one
//! JSONL record per request: send lag (actual − scheduled send), TTFT (first SSE chunk
//! with content), end-to-end time, status, the `x-cacheroute-*` and `x-sim-*` response
//! headers and the final usage chunk's `prompt_tokens` / `cached_tokens`.
//!
//! Why Rust and one thread: a thread-per-request Python client saturates a 2-core host
//! long before the gateway does, and then measures itself. Here every request is a task
//! on a single-threaded tokio runtime, bodies are serialised before the clock starts,
//! and the run reports its own CPU time and the host's CPU utilisation (`/proc/stat`),
//! so a run that saturated the host can be flagged instead of trusted.
//!
//! ```text
//! cacheroute-loadgen --url http://127.0.0.1:7001 --schedule sched.jsonl --out res.jsonl
//! ```
//! The summary (one JSON object) goes to stdout and, with `--summary FILE`, to a file;
//! with `--progress`, `progress <sent> <done> <total>` lines go to stderr.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "cacheroute-loadgen",
    about = "Open-loop load generator (JSONL schedule in, JSONL results out)"
)]
struct Args {
    /// Base URL of the server (e.g. http://127.0.0.1:7001).
    #[arg(long)]
    url: String,
    /// JSONL schedule: {"at_ms": ms after start, "body": {...}, "tag": any, "path"?: "/v1/..."}.
    #[arg(long)]
    schedule: PathBuf,
    /// JSONL results, one line per request, in schedule order.
    #[arg(long)]
    out: PathBuf,
    /// Also write the run summary (JSON) here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Path for entries without their own "path".
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Limit of one request, first byte to last, in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// Delay between reading the schedule and time 0, in ms (connections are not
    /// pre-opened: the first requests pay their connect like every other).
    #[arg(long, default_value_t = 100.0)]
    start_delay_ms: f64,
    /// Most schedule entries accepted (the schedule is held in memory).
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: usize,
    /// Largest response body kept for parsing, in bytes (streams are parsed as they
    /// come; a non-streamed body or an error body beyond this is cut).
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Print `progress <sent> <done> <total>` lines to stderr every 200 ms.
    #[arg(long)]
    progress: bool,
}

/// One schedule entry, its body serialised ahead of time.
struct Entry {
    at: Duration,
    path: String,
    body: bytes::Bytes,
    tag: Value,
    stream: bool,
}

fn read_schedule(args: &Args) -> Result<Vec<Entry>> {
    let f = std::fs::File::open(&args.schedule)
        .with_context(|| format!("opening the schedule {}", args.schedule.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading schedule line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if out.len() >= args.max_requests {
            bail!(
                "the schedule has more than --max-requests {} entries",
                args.max_requests
            );
        }
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("schedule line {}: not JSON", i + 1))?;
        let at_ms = v
            .get("at_ms")
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite() && *x >= 0.0 && *x < 1e10)
            .with_context(|| {
                format!(
                    "schedule line {}: \"at_ms\" must be a number of ms ≥ 0",
                    i + 1
                )
            })?;
        let body = v
            .get("body")
            .filter(|b| b.is_object())
            .with_context(|| format!("schedule line {}: \"body\" must be a JSON object", i + 1))?;
        let path = match v.get("path") {
            None | Some(Value::Null) => args.path.clone(),
            Some(Value::String(p)) if p.starts_with('/') => p.clone(),
            Some(_) => bail!(
                "schedule line {}: \"path\" must be a string starting with /",
                i + 1
            ),
        };
        out.push(Entry {
            at: Duration::from_secs_f64(at_ms / 1e3),
            path,
            stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            body: bytes::Bytes::from(serde_json::to_vec(body)?),
            tag: v.get("tag").cloned().unwrap_or(Value::Null),
        });
    }
    Ok(out)
}

/// Aggregate CPU jiffies from /proc/stat: (busy, total).
fn host_cpu() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

/// This process's user + system CPU seconds (/proc/self/stat, USER_HZ = 100 on Linux).
fn self_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the line).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn util(a: (u64, u64), b: (u64, u64)) -> Option<f64> {
    let total = b.1.checked_sub(a.1)?;
    (total > 0).then(|| (b.0.saturating_sub(a.0)) as f64 / total as f64)
}

/// What one request gave.
#[derive(Default)]
struct Outcome {
    lag_ms: f64,
    status: u16,
    ttft_ms: Option<f64>,
    e2e_ms: Option<f64>,
    headers: Map<String, Value>,
    usage: Option<Value>,
    error: Option<String>,
    chunks: u64,
}

const KEPT_HEADERS: [&str; 6] = [
    "x-cacheroute-injection",
    "x-cacheroute-instance",
    "x-cacheroute-decision",
    "x-cacheroute-knowledge",
    "x-cacheroute-pool",
    "x-cacheroute-kdn",
];

/// Whether an SSE payload (or a whole completion) carries generated text.
fn has_content(v: &Value) -> bool {
    let Some(c) = v.get("choices").and_then(|c| c.get(0)) else {
        return false;
    };
    let s = c
        .get("delta")
        .and_then(|d| d.get("content"))
        .or_else(|| c.get("message").and_then(|m| m.get("content")))
        .or_else(|| c.get("text"));
    matches!(s, Some(Value::String(s)) if !s.is_empty())
}

async fn one(
    client: reqwest::Client,
    url: String,
    body: bytes::Bytes,
    stream: bool,
    scheduled: Instant,
    max_body: usize,
) -> Outcome {
    let mut o = Outcome::default();
    let start = Instant::now();
    o.lag_ms = start.saturating_duration_since(scheduled).as_secs_f64() * 1e3;
    let resp = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            o.error = Some(format!("send: {e}"));
            return o;
        }
    };
    o.status = resp.status().as_u16();
    for (k, v) in resp.headers() {
        let k = k.as_str();
        if KEPT_HEADERS.contains(&k) || k.starts_with("x-sim-") {
            o.headers.insert(
                k.to_string(),
                Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            );
        }
    }
    let sse = stream
        && resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if !sse {
                    let room = max_body.saturating_sub(buf.len());
                    buf.extend_from_slice(&c[..c.len().min(room)]);
                    continue;
                }
                buf.extend_from_slice(&c);
                // Whole lines only; a partial one waits for the next chunk.
                let mut consumed = 0;
                while let Some(nl) = buf[consumed..].iter().position(|b| *b == b'\n') {
                    let line = &buf[consumed..consumed + nl];
                    consumed += nl + 1;
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let Some(data) = line.strip_prefix(b"data:") else {
                        continue;
                    };
                    let data = data.trim_ascii();
                    if data == b"[DONE]" || data.is_empty() {
                        continue;
                    }
                    o.chunks += 1;
                    if let Ok(v) = serde_json::from_slice::<Value>(data) {
                        if o.ttft_ms.is_none() && has_content(&v) {
                            o.ttft_ms = Some(start.elapsed().as_secs_f64() * 1e3);
                        }
                        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                            o.usage = Some(u.clone());
                        }
                    }
                }
                buf.drain(..consumed);
                if buf.len() > max_body {
                    o.error = Some("an SSE line longer than --max-body-bytes".into());
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                o.error = Some(format!("body: {e}"));
                break;
            }
        }
    }
    if o.error.is_none() {
        o.e2e_ms = Some(start.elapsed().as_secs_f64() * 1e3);
    }
    if !sse {
        if o.status == 200 {
            if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                if has_content(&v) {
                    o.ttft_ms = o.e2e_ms;
                }
                o.usage = v.get("usage").filter(|u| u.is_object()).cloned();
            }
        } else if o.error.is_none() {
            let cut = &buf[..buf.len().min(2048)];
            o.error = Some(String::from_utf8_lossy(cut).into_owned());
        }
    }
    o
}

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        bail!("--timeout-s must be a positive number of seconds");
    }
    if !(args.start_delay_ms.is_finite() && args.start_delay_ms >= 0.0) {
        bail!("--start-delay-ms must be ≥ 0");
    }
    let base = args.url.trim_end_matches('/').to_string();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        bail!(
            "--url must start with http:// or https://, got {:?}",
            args.url
        );
    }
    let mut entries = read_schedule(&args)?;
    // Send order is time order; results keep schedule order through the index.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|a, b| entries[*a].at.cmp(&entries[*b].at));
    let total = entries.len();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .timeout(Duration::from_secs_f64(args.timeout_s))
        .build()?;

    let results: Rc<RefCell<Vec<Option<Outcome>>>> =
        Rc::new(RefCell::new((0..total).map(|_| None).collect()));
    let done = Rc::new(std::cell::Cell::new(0usize));
    let cpu0 = host_cpu();
    let self0 = self_cpu_s();
    let t0 = Instant::now() + Duration::from_secs_f64(args.start_delay_ms / 1e3);

    // Host CPU sampled every 500 ms for the busiest window (one core pegged by something
    // else shows there even when the run's mean looks fine).
    let peak = Rc::new(std::cell::Cell::new(0.0f64));
    let sampling = Rc::new(std::cell::Cell::new(true));
    let local = tokio::task::LocalSet::new();
    {
        let (peak, sampling, done) = (peak.clone(), sampling.clone(), done.clone());
        let progress = args.progress;
        local.spawn_local(async move {
            let mut last = host_cpu();
            let mut tick = 0u32;
            while sampling.get() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tick += 1;
                if progress && tick.is_multiple_of(2) {
                    eprintln!("progress {} {} {}", sent_count(), done.get(), total);
                }
                if tick.is_multiple_of(5) {
                    let now = host_cpu();
                    if let (Some(a), Some(b)) = (last, now) {
                        if let Some(u) = util(a, b) {
                            peak.set(peak.get().max(u));
                        }
                    }
                    last = now;
                }
            }
        });
    }
    local
        .run_until(async {
            let mut handles = Vec::with_capacity(total);
            for &i in &order {
                let e = &mut entries[i];
                let scheduled = t0 + e.at;
                tokio::time::sleep_until(scheduled.into()).await;
                SENT.with(|s| s.set(s.get() + 1));
                let url = format!("{base}{}", e.path);
                let body = std::mem::take(&mut e.body);
                let (client, results, done) = (client.clone(), results.clone(), done.clone());
                let (stream, max_body) = (e.stream, args.max_body_bytes);
                handles.push(tokio::task::spawn_local(async move {
                    let o = one(client, url, body, stream, scheduled, max_body).await;
                    results.borrow_mut()[i] = Some(o);
                    done.set(done.get() + 1);
                }));
            }
            for h in handles {
                let _ = h.await;
            }
        })
        .await;
    sampling.set(false);
    let wall_s = t0.elapsed().as_secs_f64();
    let cpu1 = host_cpu();
    let self1 = self_cpu_s();

    let results = std::mem::take(&mut *results.borrow_mut());
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?,
    );
    let mut lags = Vec::with_capacity(total);
    let mut ok = 0usize;
    for (i, (e, o)) in entries.iter().zip(results).enumerate() {
        let o = o.unwrap_or_default();
        lags.push(o.lag_ms);
        if o.status == 200 && o.error.is_none() {
            ok += 1;
        }
        let usage = o.usage.unwrap_or(Value::Null);
        let rec = json!({
            "i": i,
            "tag": e.tag,
            "at_ms": e.at.as_secs_f64() * 1e3,
            "lag_ms": o.lag_ms,
            "status": o.status,
            "ttft_ms": o.ttft_ms,
            "e2e_ms": o.e2e_ms,
            "chunks": o.chunks,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": usage.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens")),
            "headers": o.headers,
            "error": o.error,
        });
        serde_json::to_writer(&mut out, &rec)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    lags.sort_by(|a, b| a.total_cmp(b));
    let summary = json!({
        "requests": total,
        "ok": ok,
        "wall_s": wall_s,
        "loadgen_cpu_s": match (self0, self1) { (Some(a), Some(b)) => Some(b - a), _ => None },
        "host_cpu_util": match (cpu0, cpu1) { (Some(a), Some(b)) => util(a, b), _ => None },
        "host_cpu_util_peak": peak.get(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "send_lag_p50_ms": percentile(&lags, 0.5),
        "send_lag_p99_ms": percentile(&lags, 0.99),
        "send_lag_max_ms": lags.last().copied(),
    });
    if let Some(p) = &args.summary {
        std::fs::write(p, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{summary}");
    Ok(())
}

thread_local! {
    /// Requests handed to the runtime so far (for progress lines).
    static SENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn sent_count() -> usize {
    SENT.with(|s| s.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_text_not_a_role_or_usage_chunk() {
        let role_only = json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]});
        let token = json!({"choices": [{"delta": {"content": " the"}}]});
        let completion = json!({"choices": [{"text": "ok"}]});
        let whole = json!({"choices": [{"message": {"content": "hi"}}]});
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 3}});
        assert!(!has_content(&role_only));
        assert!(has_content(&token));
        assert!(has_content(&completion));
        assert!(has_content(&whole));
        assert!(!has_content(&usage));
    }

    #[test]
    fn percentiles_and_utilisation() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), Some(51.0));
        assert_eq!(percentile(&xs, 0.99), Some(99.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(util((10, 100), (60, 200)), Some(0.5));
        assert_eq!(util((10, 100), (10, 100)), None);
    }

    #[test]
    fn schedule_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sched = dir.join("s.jsonl");
        std::fs::write(
            &sched,
            "{\"at_ms\": 1, \"body\": {}}\n{\"at_ms\": -1, \"body\": {}}\n",
        )
        .unwrap();
        let args = Args::parse_from([
            "cacheroute-loadgen",
            "--url",
            "http://127.0.0.1:1",
            "--schedule",
            sched.to_str().unwrap(),
            "--out",
            dir.join("o.jsonl").to_str().unwrap(),
        ]);
        let err = read_schedule(&args)
            .err()
            .expect("a negative at_ms is refused");
        assert!(err.to_string().contains("line 2"), "{err}");
        std::fs::write(
            &sched,
            "{\"at_ms\": 5, \"body\": {\"stream\": true}, \"tag\": 7}\n",
        )
        .unwrap();
        let entries = read_schedule(&args).unwrap();
        assert_eq!(entries.len(), 1);
        assert!(entries[0].stream && entries[0].tag == json!(7));
        assert_eq!(entries[0].at, Duration::from_millis(5));
        std::fs::remove_dir_all(&dir).ok();
    }
}
