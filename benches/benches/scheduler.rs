//! Time the scheduler filter adds to a request: parse a realistic chat body, take out
//! the CacheRoute fields, BM25 retrieval over 10,000 and 100,000 blocks (top 3), and
//! `decide()` over 4 pools and 2 KDNs. Criterion reports mean/median; since the
//! target is a p99, each size is also timed per call (N calls, sorted) and p50/p99
//! printed.
//!
//! `cargo bench -p cacheroute-benches --bench scheduler`

use std::hint::black_box;
use std::time::{Duration, Instant};

use cacheroute_benches::{corpus, Block};
use cacheroute_decisions::bm25::Bm25Index;
use cacheroute_decisions::openai::{CompletionBody, Route};
use cacheroute_decisions::scheduler::{
    decide, requirement, take_extensions, KdnView, PoolView, SchedulerConfig, SchedulingDecision,
};
use criterion::{criterion_group, criterion_main, Criterion};

const MODEL: &str = "llama3-8b";

struct World {
    index: Bm25Index,
    bodies: Vec<Vec<u8>>,
    kdns: Vec<KdnView>,
    pools: Vec<PoolView>,
    cfg: SchedulerConfig,
}

fn chat_body(question: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer from the provided knowledge; say so when it is not there."},
            {"role": "user", "content": "Hello, I have a few questions about our records."},
            {"role": "assistant", "content": "Of course. What would you like to know?"},
            {"role": "user", "content": question}
        ],
        "max_tokens": 256,
        "temperature": 0.2,
        "stream": true,
        "stream_options": {"include_usage": true},
        "RAG": true,
        "injection": "auto"
    }))
    .unwrap()
}

fn world(n: usize) -> World {
    let blocks: Vec<Block> = corpus(n, 42);
    let mut index = Bm25Index::new();
    for b in &blocks {
        index.insert(&b.id, &b.text);
    }
    let bodies = blocks
        .iter()
        .step_by((n / 512).max(1))
        .map(|b| chat_body(&b.question))
        .collect();
    let pools: Vec<PoolView> = (0..4)
        .map(|p| PoolView {
            name: format!("pool-{p}"),
            models: vec![MODEL.into()],
            queue_len: p as u64,
            inflight: 8 + p as u64,
            capacity: 64,
            // each pool's stores hold a slice of the corpus
            resident: blocks
                .iter()
                .skip(p)
                .step_by(4)
                .take(2_000)
                .map(|b| b.id.clone())
                .collect(),
        })
        .collect();
    let kdns: Vec<KdnView> = (0..2)
        .map(|k| KdnView {
            id: format!("kdn-{k}"),
            // KDN k holds KV of every block whose index is ≢ k (mod 3): overlap, gaps
            covers: blocks
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 3 != k)
                .map(|(_, b)| (b.id.clone(), MODEL.to_string()))
                .collect(),
            pending: k as u64,
            active: 1,
            queue_ms: 5.0 * k as f64,
            overloaded: false,
            link_cost_to: pools
                .iter()
                .enumerate()
                .map(|(i, p)| (p.name.clone(), 1.0 + ((i + k) % 4) as f64))
                .collect(),
        })
        .collect();
    let cfg = SchedulerConfig {
        retrieval_top_k: 3,
        kdn_pending_overload_th: 8,
        kdn_active_overload_th: 4,
        kdn_queue_ms_overload_th: 30.0,
        ..SchedulerConfig::default()
    };
    World {
        index,
        bodies,
        kdns,
        pools,
        cfg,
    }
}

/// The scheduler filter's whole work for one request body.
fn schedule(w: &World, body: &[u8]) -> SchedulingDecision {
    let mut parsed = CompletionBody::parse(Route::Chat, body).expect("valid body");
    let extra = match &mut parsed {
        CompletionBody::Chat(c) => &mut c.extra,
        CompletionBody::Completions(c) => &mut c.extra,
    };
    let ext = take_extensions(extra).expect("valid extensions");
    let req = requirement(&w.cfg, &ext, &w.index, &parsed).expect("known ids");
    decide(&w.cfg, &req, parsed.model(), &w.kdns, &w.pools)
}

fn percentiles(w: &World, calls: usize) -> (Duration, Duration, Duration) {
    let mut times: Vec<Duration> = Vec::with_capacity(calls);
    for i in 0..calls {
        let body = &w.bodies[i % w.bodies.len()];
        let t = Instant::now();
        black_box(schedule(w, black_box(body)));
        times.push(t.elapsed());
    }
    times.sort_unstable();
    let at = |q: f64| times[((calls as f64 * q) as usize).min(calls - 1)];
    (at(0.5), at(0.99), times[calls - 1])
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler_filter");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [10_000usize, 100_000] {
        let t = Instant::now();
        let w = world(n);
        let built = t.elapsed();
        // sanity: the decision retrieves and routes
        let d = schedule(&w, &w.bodies[0]);
        assert!(d.pool.is_some() && !d.knowledge.ids().is_empty());
        let mut i = 0usize;
        group.bench_function(format!("parse+bm25+decide/{n}_blocks"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                black_box(schedule(&w, black_box(&w.bodies[i % w.bodies.len()])))
            })
        });
        let calls = 2_000;
        let (p50, p99, max) = percentiles(&w, calls);
        println!(
            "scheduler_filter blocks={n} calls={calls} p50={:.1}us p99={:.1}us max={:.1}us (index built in {:.2}s)",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6,
            built.as_secs_f64()
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
