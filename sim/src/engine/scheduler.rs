//! [`Scheduler`]: vLLM v1's continuous batching over a virtual clock: admission with
//! the GPU prefix cache and LMCache hits, chunked prefill under a token budget, KV block
//! allocation and preemption, and the step's cost.

use std::collections::VecDeque;

use cacheroute_decisions::cost_model::CostModel;

use super::{Admission, CachedSplit, SchedulerConfig, SeqEvent, SeqSpec, StepPlan};
use crate::apc::{ApcStats, BlockId, BlockPool};

#[derive(Debug, Clone)]
struct Seq {
    spec: SeqSpec,
    num_computed: u64,
    generated: u64,
    /// KV blocks held, in token order.
    table: Vec<BlockId>,
    /// Leading blocks of `table` already registered in the prefix cache.
    cached_upto: usize,
    /// Cached prefix as decided at the first admission (what the response reports).
    split: Option<CachedSplit>,
    first_token_ms: Option<f64>,
    scheduled_ms: Option<f64>,
    /// Virtual time its remote-store chunks are in (async loading; else its arrival):
    /// before it the sequence waits without being admitted (vLLM's
    /// WAITING_FOR_REMOTE_KVS).
    ready_ms: f64,
    /// Its remote-store chunks were prefetched off the step (async loading).
    prefetched: bool,
}

impl Seq {
    fn num_tokens(&self) -> u64 {
        self.spec.prompt_tokens + self.generated
    }
}

/// Continuous-batching scheduler over a virtual clock.
#[derive(Debug, Clone)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    cost: CostModel,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    pool: BlockPool,
    pub preemptions: u64,
    /// Virtual time the store link is free again (async loading serializes prefetches
    /// on it).
    link_free_ms: f64,
    /// Simulated ms the store link spent on prefetches (async loading).
    pub prefetch_ms: f64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, cost: CostModel) -> Scheduler {
        Scheduler {
            cfg,
            cost,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool: BlockPool::new(cfg.num_gpu_blocks, cfg.enable_prefix_caching),
            preemptions: 0,
            link_free_ms: 0.0,
            prefetch_ms: 0.0,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn cost(&self) -> &CostModel {
        &self.cost
    }

    /// Queue a request. Requests that can never fit the KV cache must be refused before.
    /// With async loading its remote-store chunks start over the store link now (after
    /// the prefetches queued before them), and it waits until they are in.
    pub fn add(&mut self, spec: SeqSpec) {
        let mut spec = spec;
        spec.max_tokens = spec.max_tokens.max(1);
        spec.prompt_tokens = spec.prompt_tokens.max(1);
        let remote = spec.external.as_ref().map_or(0, |e| e.remote_tokens());
        let prefetched = self.cfg.async_loading && remote > 0;
        let ready_ms = if prefetched {
            let took = self.link_ms(self.cost.kv_bytes(remote));
            self.link_free_ms = self.link_free_ms.max(spec.arrival_ms) + took;
            self.prefetch_ms += took;
            self.link_free_ms
        } else {
            spec.arrival_ms
        };
        self.waiting.push_back(Seq {
            ready_ms,
            prefetched,
            spec,
            num_computed: 0,
            generated: 0,
            table: Vec::new(),
            cached_upto: 0,
            split: None,
            first_token_ms: None,
            scheduled_ms: None,
        });
    }

    /// Drop a request (client gone). Returns whether it was known.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.running.iter().position(|s| s.spec.id == id) {
            let s = self.running.remove(i);
            self.pool.free(&s.table);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|s| s.spec.id == id) {
            self.waiting.remove(i);
            return true;
        }
        false
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The earliest time after `now_ms` a waiting sequence's prefetch is in (None: no
    /// sequence waits for one).
    pub fn next_ready_ms(&self, now_ms: f64) -> Option<f64> {
        self.waiting
            .iter()
            .map(|s| s.ready_ms)
            .filter(|&t| t > now_ms)
            .min_by(f64::total_cmp)
    }

    /// Sequences waiting for their prefetch at `now_ms`.
    pub fn num_waiting_for_kv(&self, now_ms: f64) -> usize {
        self.waiting.iter().filter(|s| s.ready_ms > now_ms).count()
    }

    /// Fraction of KV blocks in use (vLLM's `gpu_cache_usage_perc`, 0..1).
    pub fn kv_usage(&self) -> f64 {
        if self.pool.num_blocks() == 0 {
            0.0
        } else {
            self.pool.num_used() as f64 / self.pool.num_blocks() as f64
        }
    }

    /// The GPU prefix cache's sizes and counters.
    pub fn apc_stats(&self) -> ApcStats {
        self.pool.stats()
    }

    /// Transfer time of `bytes` over the remote store's link (0 when it is free).
    pub fn link_ms(&self, bytes: u64) -> f64 {
        cacheroute_decisions::cost_model::link_ms(bytes, self.cfg.kv_store_gbps)
    }

    /// Tokens whose KV the running sequences hold.
    pub fn kv_tokens(&self) -> u64 {
        self.running.iter().map(|s| s.num_computed).sum()
    }

    /// Ids of all known sequences (running then waiting).
    pub fn ids(&self) -> Vec<u64> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.spec.id)
            .collect()
    }

    fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Register the full prompt blocks of running sequence `i` within its first `upto`
    /// tokens in the prefix cache.
    fn cache_blocks(&mut self, i: usize, upto: u64) {
        let s = &mut self.running[i];
        let full = (upto.min(s.spec.prompt_tokens) / self.cfg.block_size) as usize;
        let full = full.min(s.spec.block_hashes.len()).min(s.table.len());
        for j in s.cached_upto..full {
            self.pool.cache(s.table[j], s.spec.block_hashes[j]);
        }
        s.cached_upto = s.cached_upto.max(full);
    }

    fn preempt_last(&mut self) -> u64 {
        let mut s = self.running.pop().expect("something to preempt");
        self.pool.free(&s.table);
        s.table.clear();
        s.cached_upto = 0;
        s.num_computed = 0;
        self.preemptions += 1;
        let id = s.spec.id;
        self.waiting.push_front(s);
        id
    }

    /// Plan the next step at virtual time `now_ms`. An empty plan means nothing can run.
    pub fn schedule(&mut self, now_ms: f64) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        // 1. running sequences, in admission order
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let n = (s.num_tokens() - s.num_computed).min(budget);
            let need = self
                .blocks_for(s.num_computed + n)
                .saturating_sub(s.table.len() as u64);
            let mut self_preempted = false;
            while need > self.pool.num_free() {
                let last = self.running.len() - 1;
                plan.preempted.push(self.preempt_last());
                if last == i {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let new = self.pool.allocate(need).expect("checked free blocks");
            let s = &mut self.running[i];
            s.table.extend(new);
            let upto = s.num_computed + n;
            let decoding = s.generated > 0 && n == 1 && s.num_computed + 1 == s.num_tokens();
            if decoding {
                plan.shape.add_decode(s.num_computed);
            } else {
                plan.shape.add_prefill(s.num_computed, n);
            }
            plan.scheduled.push((s.spec.id, n));
            self.cache_blocks(i, upto);
            budget -= n;
            i += 1;
        }
        // 2. admit waiting sequences (FIFO) while there is budget and room; one that still
        // waits for its prefetch and needs it (remote tokens beyond its GPU hit) is skipped
        // and keeps its place, as vLLM skips WAITING_FOR_REMOTE_KVS requests
        let mut at = 0;
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && plan.preempted.is_empty()
        {
            let Some(front) = self.waiting.get(at) else {
                break;
            };
            let prompt = front.spec.prompt_tokens;
            // the cached prefix: GPU blocks first, then LMCache's chunks; at least the last
            // prompt token is always computed (vLLM caps both hits at prompt − 1)
            let max_blocks = ((prompt - 1) / self.cfg.block_size) as usize;
            let hit = self.pool.lookup(&front.spec.block_hashes, max_blocks);
            let gpu = hit.len() as u64 * self.cfg.block_size;
            let ext = front
                .spec
                .external
                .as_ref()
                .map_or(0, |e| e.tokens())
                .min(prompt - 1);
            let start = gpu.max(ext);
            let (split, chunks) = CachedSplit::of(gpu, front.spec.external.as_deref(), start);
            if front.ready_ms > now_ms && split.remote > 0 {
                at += 1;
                continue;
            }
            let n = (front.num_tokens() - start).min(budget);
            let new_blocks = self.blocks_for(start + n) - hit.len() as u64;
            // taking unpinned hit blocks out of the free queue counts against the room
            if new_blocks + self.pool.num_unpinned(&hit) > self.pool.num_free() {
                break;
            }
            let mut s = self.waiting.remove(at).expect("checked above");
            self.pool.touch(&hit);
            s.table = hit;
            s.table
                .extend(self.pool.allocate(new_blocks).expect("checked free blocks"));
            s.cached_upto = 0;
            s.num_computed = start;
            s.split.get_or_insert(split);
            s.scheduled_ms.get_or_insert(now_ms);
            plan.admitted.push(Admission {
                id: s.spec.id,
                prompt_tokens: prompt,
                split,
                apc: self.pool.enabled(),
                external: s.spec.external.is_some(),
                keys_loaded: chunks * s.spec.external.as_ref().map_or(0, |e| e.keys_per_chunk),
            });
            plan.loaded_tokens += split.cpu + split.remote;
            if !s.prefetched {
                plan.remote_tokens += split.remote;
            }
            plan.shape.add_prefill(start, n);
            plan.scheduled.push((s.spec.id, n));
            budget -= n;
            self.running.push(s);
            let last = self.running.len() - 1;
            self.cache_blocks(last, start + n);
        }
        plan.compute_ms = self.cost.step_cost(&plan.shape);
        plan.load_ms = if plan.loaded_tokens > 0 {
            self.cost.h2d_ms(self.cost.kv_bytes(plan.loaded_tokens))
                + self.link_ms(self.cost.kv_bytes(plan.remote_tokens))
        } else {
            0.0
        };
        plan
    }

    /// Apply a planned step that ended at virtual time `end_ms`; returns sampled tokens.
    pub fn complete(&mut self, plan: &StepPlan, end_ms: f64) -> Vec<SeqEvent> {
        let mut events = Vec::new();
        let mut finished = Vec::new();
        for &(id, n) in &plan.scheduled {
            let Some(s) = self.running.iter_mut().find(|s| s.spec.id == id) else {
                continue; // aborted during the step
            };
            s.num_computed += n;
            if s.num_computed < s.num_tokens() {
                continue; // prefill chunk, more to go
            }
            s.generated += 1;
            let first = *s.first_token_ms.get_or_insert(end_ms);
            let done = s.generated >= s.spec.max_tokens;
            events.push(SeqEvent {
                id,
                index: s.generated - 1,
                finished: done,
                since_arrival_ms: end_ms - s.spec.arrival_ms,
                ttft_ms: first - s.spec.arrival_ms,
                queue_ms: s.scheduled_ms.unwrap_or(end_ms) - s.spec.arrival_ms,
                cached: s.split.unwrap_or_default(),
            });
            if done {
                finished.push(id);
            }
        }
        for id in finished {
            self.abort(id);
        }
        events
    }
}
