//! KDN injection throughput vs a raw pipelined GET/SET copy, between two local Redis
//! servers, in the same run.
//!
//! ```sh
//! cargo run --release -p cacheroute-kdn --example inject_bench -- \
//!     [--blob-mib 32] [--chunks 64] [--rounds 3] [--batch 4] [--link-gbps 10]
//! ```
//!
//! It starts two `redis-server`s (PATH or `CACHEROUTE_REDIS_SERVER`), starts a KDN
//! in-process (registry in memory, store = the first Redis, target = the second),
//! registers one knowledge block (Llama-3 layout, chunk 256, approximation tokenizer,
//! enough text for `--chunks` chunks), fills the first Redis with that block's chunks
//! (`--blob-mib` of kv_bytes each + the 28-byte metadata), and then, per round, copies
//! the same chunks to the emptied second Redis three ways:
//!
//! * `raw-seq`: per batch of `--batch` keys, one pipeline of GETs, then one of SETs;
//! * `raw-overlap`: the same, reading batch n+1 while writing batch n;
//! * `kdn`: `POST /v1/inject {"wait": true}` (timed at the client: HTTP, presence checks
//!   and the copy).
//!
//! The order of the three rotates from round to round.
//!
//! MB/s are stored bytes (kv_bytes + metadata) per second, 10^6 bytes per MB.
//!
//! Then it checks link shaping: the same keys with blobs 1024× smaller, injected into a
//! target with `link_gbps = --link-gbps` (default 10): the logical rate should be the
//! link's.

use std::time::Instant;

use bytes::Bytes;
use cacheroute_kdn::config::{KdnConfig, ModelConfig, TargetConfig};
use cacheroute_kdn::keys::{redis_kv_bytes_key, redis_metadata_key, RemoteMetadata};
use cacheroute_kdn::spawn_kdn;
use cacheroute_kdn::store::{Chunk, KvStore, RedisStore};
use serde_json::{json, Value};

use cacheroute_kdn::local_redis::LocalRedis as Redis;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v}: not a number"))
        })
        .unwrap_or(default)
}

fn text(words: usize) -> String {
    const W: &[&str] = &[
        "river",
        "bridge",
        "library",
        "engine",
        "harbor",
        "garden",
        "market",
        "tower",
        "theorem",
        "protein",
        "glacier",
        "satellite",
        "orchestra",
        "province",
        "castle",
        "connects",
        "supports",
        "describes",
        "contains",
        "overlooks",
        "predates",
    ];
    let mut x: u64 = 12345;
    let mut s = String::new();
    for i in 0..words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(W[(x >> 33) as usize % W.len()]);
        s.push(if i % 12 == 11 { '.' } else { ' ' });
        if i % 12 == 11 {
            s.push(' ');
        }
    }
    s
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn flush(url: &str) {
    let mut c = conn(url).await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
}

async fn read_batch(
    c: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> Vec<(String, Bytes)> {
    let mut p = redis::pipe();
    let mut names = Vec::new();
    for k in keys {
        for n in [redis_kv_bytes_key(k), redis_metadata_key(k)] {
            p.cmd("GET").arg(&n);
            names.push(n);
        }
    }
    let vals: Vec<Bytes> = p.query_async(c).await.unwrap();
    names.into_iter().zip(vals).collect()
}

async fn write_batch(c: &mut redis::aio::MultiplexedConnection, items: &[(String, Bytes)]) {
    let mut p = redis::pipe();
    for (n, v) in items {
        p.cmd("SET").arg(n).arg(v.as_ref()).ignore();
    }
    p.query_async::<()>(c).await.unwrap();
}

/// Raw pipelined copy; returns stored bytes.
async fn raw_copy(src: &str, dst: &str, keys: &[String], batch: usize, overlap: bool) -> u64 {
    let mut s = conn(src).await;
    let mut d = conn(dst).await;
    let batches: Vec<&[String]> = keys.chunks(batch).collect();
    let mut bytes = 0u64;
    let mut next: Option<Vec<(String, Bytes)>> = None;
    for i in 0..batches.len() {
        let items = match next.take() {
            Some(v) => v,
            None => read_batch(&mut s, batches[i]).await,
        };
        bytes += items.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
        if overlap && i + 1 < batches.len() {
            let mut s2 = s.clone();
            let (_, r) = tokio::join!(
                write_batch(&mut d, &items),
                read_batch(&mut s2, batches[i + 1])
            );
            next = Some(r);
        } else {
            write_batch(&mut d, &items).await;
        }
    }
    bytes
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let blob_mib = arg("--blob-mib", 32);
    let want_chunks = arg("--chunks", 64);
    let rounds = arg("--rounds", 3);
    let batch = arg("--batch", 4);
    let src = Redis::start();
    let dst = Redis::start();

    let mut cfg = KdnConfig::default();
    cfg.kdn.listen = "127.0.0.1:0".parse().unwrap();
    cfg.kdn.registry = "memory://bench".into();
    cfg.kdn.store = src.url();
    cfg.kdn.batch_chunks = batch;
    cfg.models.push(ModelConfig {
        name: "llama3-8b".into(),
        lmcache_model: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
        template: Default::default(),
        tokenizer: cacheroute_kdn::tokenizer::TokenizerChoice::Approx,
        vocab_size: 128256,
        scheme: "lmcache-0.3.15".into(),
        hash_algorithm: "sha256_cbor".into(),
        chunk_size: 256,
        dtype: "bfloat16".into(),
        world_size: 1,
        hash_seed: "0".into(),
        kv_bytes_per_token: 131072,
        producer: None,
    });
    cfg.targets.push(TargetConfig {
        name: "dst".into(),
        store: dst.url(),
        link_gbps: None,
    });
    let link_gbps = arg("--link-gbps", 10) as f64;
    cfg.targets.push(TargetConfig {
        name: "dst-shaped".into(),
        store: format!("{}1", dst.url()),
        link_gbps: Some(link_gbps),
    });
    let kdn = spawn_kdn(cfg).await.unwrap();
    let base = kdn.url();
    let http = reqwest::Client::new();

    // a block of (about) the wanted number of chunks: ~2.3 approx tokens per word
    let words = want_chunks * 256 * 10 / 23;
    let reg: Value = http
        .post(format!("{base}/v1/knowledge?wait=true"))
        .json(&json!({"id": "bench", "text": text(words)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let show: Value = http
        .get(format!("{base}/v1/knowledge/bench?keys=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys: Vec<String> = show["models"]["llama3-8b"]["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("{reg}"))
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let blob = blob_mib << 20;
    let store = RedisStore::connect(&src.url()).await.unwrap();
    let meta = RemoteMetadata::kv_2ltd("bfloat16", 32, 256, 1024)
        .unwrap()
        .to_bytes();
    for (i, k) in keys.iter().enumerate() {
        let kv: Vec<u8> = (0..blob).map(|j| (i * 131 + j * 7) as u8).collect();
        store
            .put_chunk(
                k,
                &Chunk {
                    kv_bytes: Bytes::from(kv),
                    metadata: Bytes::copy_from_slice(&meta),
                },
            )
            .await
            .unwrap();
    }
    let warmed: Value = http
        .post(format!("{base}/v1/knowledge/bench/warm?wait=true"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        warmed["models"]["llama3-8b"]["status"], "kv_ready",
        "{warmed}"
    );
    let stored_total = keys.len() as u64 * (blob as u64 + 28);
    println!(
        "KDN injection bench: {} chunks × {} MiB kv_bytes (+28 B metadata) = {:.1} MB per copy, \
         batch {batch}, {rounds} rounds, two local redis-servers",
        keys.len(),
        blob_mib,
        stored_total as f64 / 1e6
    );

    let mut best: [f64; 3] = [0.0; 3];
    let mut sums: [f64; 3] = [0.0; 3];
    for round in 1..=rounds {
        let names = ["raw-seq", "raw-overlap", "kdn"];
        let mut results = [0.0f64; 3];
        // rotate the order so that no method always runs first or last
        for step in 0..3 {
            let i = (round + step) % 3;
            let name = names[i];
            flush(&dst.url()).await;
            let t0 = Instant::now();
            let bytes = match i {
                0 | 1 => {
                    // on a runtime worker, like the KDN's transfer tasks
                    let (s, d, k) = (src.url(), dst.url(), keys.clone());
                    tokio::spawn(async move { raw_copy(&s, &d, &k, batch, i == 1).await })
                        .await
                        .unwrap()
                }
                _ => {
                    let v: Value = http
                        .post(format!("{base}/v1/inject"))
                        .json(&json!({"knowledge_ids": ["bench"], "model": "llama3-8b",
                                      "target": "dst", "wait": true}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    assert_eq!(v["status"], "done", "{v}");
                    v["stored_bytes"].as_u64().unwrap()
                }
            };
            let secs = t0.elapsed().as_secs_f64();
            assert_eq!(bytes, stored_total, "{name} copied everything");
            let mbs = bytes as f64 / secs / 1e6;
            best[i] = best[i].max(mbs);
            sums[i] += mbs;
            results[i] = mbs;
        }
        println!(
            "round {round}:  raw-seq {:5.0} MB/s  raw-overlap {:5.0} MB/s  kdn {:5.0} MB/s",
            results[0], results[1], results[2]
        );
    }
    let mean = |i: usize| sums[i] / rounds as f64;
    let raw = mean(0).max(mean(1));
    println!(
        "mean: raw-seq {:.0} MB/s, raw-overlap {:.0} MB/s, kdn {:.0} MB/s; kdn / best raw = {:.0}%",
        mean(0),
        mean(1),
        mean(2),
        100.0 * mean(2) / raw
    );
    println!(
        "best: raw-seq {:.0} MB/s, raw-overlap {:.0} MB/s, kdn {:.0} MB/s; kdn / best raw = {:.0}%",
        best[0],
        best[1],
        best[2],
        100.0 * best[2] / best[0].max(best[1])
    );
    println!(
        "logical KV (Llama-3-8B bf16, 32 MiB per 256-token chunk): {:.2} GB per copy",
        keys.len() as f64 * 256.0 * 131072.0 / 1e9
    );

    // shaping: the same keys with blobs scaled down 1024× (as sim --kv-scale-down
    // writes them), injected over an emulated link; the logical rate should be the link's
    flush(&dst.url()).await;
    let small = blob / 1024;
    for (i, k) in keys.iter().enumerate() {
        let kv: Vec<u8> = (0..small).map(|j| (i * 131 + j * 7) as u8).collect();
        store
            .put_chunk(
                k,
                &Chunk {
                    kv_bytes: Bytes::from(kv),
                    metadata: Bytes::copy_from_slice(&meta),
                },
            )
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    let v: Value = http
        .post(format!("{base}/v1/inject"))
        .json(&json!({"knowledge_ids": ["bench"], "model": "llama3-8b",
                      "target": "dst-shaped", "wait": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "done", "{v}");
    let secs = t0.elapsed().as_secs_f64();
    let logical = v["bytes_moved"].as_u64().unwrap() as f64;
    println!(
        "shaped: {:.2} GB logical ({:.1} MB stored) over an emulated {link_gbps} Gb/s link in {:.3} s = {:.2} Gb/s logical (job's own figure {:.2} Gb/s)",
        logical / 1e9,
        v["stored_bytes"].as_u64().unwrap() as f64 / 1e6,
        secs,
        logical * 8.0 / secs / 1e9,
        v["bandwidth_bytes_per_s"].as_f64().unwrap() * 8.0 / 1e9
    );
    kdn.stop().await;
}
