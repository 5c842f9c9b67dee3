//! The simulated engine: a continuous-batching scheduler like vLLM's (v1), driven by a
//! virtual clock, and the tokio task that paces it in (scaled) real time.
//!
//! [`Scheduler`] is plain logic over a virtual clock (milliseconds of simulated GPU time),
//! so it can be tested without sleeping. Each step:
//!
//! 1. every running sequence gets its next tokens in admission order: a decoding sequence 1
//!    token, a sequence still in prefill a chunk of `min(remaining, budget)` tokens, where
//!    the budget starts at `max_num_batched_tokens` (chunked prefill; decode tokens count 1);
//! 2. while budget is left and fewer than `max_num_seqs` run, waiting sequences are admitted
//!    in FIFO order with their first chunk. At admission the sequence's cached prefix is
//!    decided: the GPU prefix cache ([`crate::apc`], vLLM's APC) gives the longest run of
//!    leading cached blocks, LMCache (looked up at submission, [`ExternalHit`]) its
//!    contiguous chunks; the sequence starts with the longer of the two computed. The GPU
//!    part costs nothing extra; what LMCache supplies beyond it costs the step
//!    `h2d_ms(bytes)` (CPU tier) or `h2d_ms(bytes)` plus `bytes` over the store link
//!    (remote store, `--kv-store-gbps`). With LMCache's async loading
//!    (`--lmcache-async-loading`) the remote chunks are prefetched over the link from
//!    submission on, one prefetch after another, while the engine keeps stepping; a
//!    sequence that needs them (remote tokens beyond its GPU hit) is skipped in the queue
//!    until they are in, and its step then pays host-to-device only;
//! 3. KV blocks (16 tokens) come from the [`BlockPool`](crate::apc::BlockPool) for every
//!    computed token (full prompt blocks are cached as they are allocated); when a running
//!    sequence cannot grow, the most recently admitted one is preempted (recompute: its
//!    blocks are freed, staying cached, and it goes back to the front of the queue), as
//!    vLLM does;
//! 4. the step lasts `CostModel::step_cost(shape) + load time`; at its end a sequence whose
//!    computed tokens reach its length samples one token (the first one at the end of the
//!    step that finishes its prefill: its TTFT).
//!
//! `spec` holds the scheduler's configuration, inputs and outputs, `scheduler` the
//! [`Scheduler`] itself, and `task` the tokio task and its handle ([`EngineHandle`]).

mod scheduler;
mod spec;
mod task;

pub use scheduler::Scheduler;
pub use spec::{
    Admission, CachedSplit, ExternalHit, SchedulerConfig, SeqEvent, SeqSpec, StepPlan, Tier,
};
pub use task::{record_admission, EngineHandle, EngineStats, Submit};

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use cacheroute_decisions::cost_model::CostModel;

    use super::*;

    const P8B: &str = include_str!("../../../conf/profiles/h100-llama3-8b.json");

    fn cost() -> CostModel {
        CostModel::from_profile_json(P8B).unwrap()
    }

    fn cfg() -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            num_gpu_blocks: 20000,
            enable_prefix_caching: true,
            kv_store_gbps: 25.0,
            async_loading: false,
        }
    }

    /// Run the scheduler on a virtual clock until `specs` (arriving at their
    /// `arrival_ms`) are done; returns every event and the number of steps.
    fn simulate(mut sched: Scheduler, mut specs: Vec<SeqSpec>) -> (Vec<SeqEvent>, u64) {
        specs.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
        let mut pending: VecDeque<SeqSpec> = specs.into();
        let mut now = 0.0;
        let mut events = Vec::new();
        let mut steps = 0;
        loop {
            while pending.front().is_some_and(|s| s.arrival_ms <= now) {
                sched.add(pending.pop_front().unwrap());
            }
            if sched.is_idle() {
                match pending.front() {
                    Some(s) => {
                        now = s.arrival_ms;
                        continue;
                    }
                    None => break,
                }
            }
            let plan = sched.schedule(now);
            assert!(!plan.scheduled.is_empty());
            now += plan.duration_ms();
            steps += 1;
            events.extend(sched.complete(&plan, now));
            assert!(steps < 1_000_000);
        }
        (events, steps)
    }

    fn spec(id: u64, prompt: u64, max_tokens: u64) -> SeqSpec {
        SeqSpec {
            id,
            prompt_tokens: prompt,
            block_hashes: Arc::from(Vec::new()),
            external: None,
            max_tokens,
            arrival_ms: 0.0,
        }
    }

    /// A request whose prompt is `ids` (hashed for the GPU prefix cache).
    fn spec_ids(id: u64, ids: &[u32], max_tokens: u64) -> SeqSpec {
        SeqSpec {
            block_hashes: crate::apc::block_hashes(ids, 16).into(),
            ..spec(id, ids.len() as u64, max_tokens)
        }
    }

    fn first(events: &[SeqEvent], id: u64) -> SeqEvent {
        *events.iter().find(|e| e.id == id && e.index == 0).unwrap()
    }

    fn last(events: &[SeqEvent], id: u64) -> SeqEvent {
        *events.iter().rfind(|e| e.id == id).unwrap()
    }

    #[test]
    fn single_request_timing_matches_cost_model() {
        let c = cost();
        let (ev, steps) = simulate(Scheduler::new(cfg(), c.clone()), vec![spec(1, 1000, 4)]);
        assert_eq!(ev.len(), 4);
        assert_eq!(steps, 4);
        assert!(ev.last().unwrap().finished);
        let ttft = first(&ev, 1).ttft_ms;
        assert!((ttft - c.prefill_ms(1000)).abs() < 1e-9);
        let e2e = last(&ev, 1).since_arrival_ms;
        let expect = c.prefill_ms(1000)
            + c.decode_step_ms(1, 1000)
            + c.decode_step_ms(1, 1001)
            + c.decode_step_ms(1, 1002);
        assert!((e2e - expect).abs() < 1e-9, "{e2e} vs {expect}");
    }

    #[test]
    fn long_prompt_has_larger_ttft() {
        let (short, _) = simulate(Scheduler::new(cfg(), cost()), vec![spec(1, 200, 1)]);
        let (long, _) = simulate(Scheduler::new(cfg(), cost()), vec![spec(1, 16000, 1)]);
        let (s, l) = (first(&short, 1).ttft_ms, first(&long, 1).ttft_ms);
        assert!(l > 10.0 * s, "short {s} long {l}");
    }

    #[test]
    fn chunked_prefill_respects_budget() {
        let mut sched = Scheduler::new(cfg(), cost());
        sched.add(spec(1, 20000, 2));
        let p1 = sched.schedule(0.0);
        assert_eq!(p1.scheduled, vec![(1, 8192)]);
        assert!(sched.complete(&p1, 1.0).is_empty());
        let p2 = sched.schedule(1.0);
        assert_eq!(p2.scheduled, vec![(1, 8192)]);
        assert_eq!(p2.shape.prefill_context_pairs, 8192.0 * 8192.0);
        sched.complete(&p2, 2.0);
        let p3 = sched.schedule(2.0);
        assert_eq!(p3.scheduled, vec![(1, 20000 - 2 * 8192)]);
        let ev = sched.complete(&p3, 3.0);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].ttft_ms, 3.0);
        // a decode step of 1 token now, and a new request shares the step
        sched.add(spec(2, 100, 1));
        let p4 = sched.schedule(3.0);
        assert_eq!(p4.scheduled, vec![(1, 1), (2, 100)]);
        assert_eq!(p4.shape.decode_batch, 1);
        assert_eq!(p4.shape.decode_context_tokens, 20000);
        assert_eq!(p4.shape.prefill_new_tokens, 100);
        let ev = sched.complete(&p4, 4.0);
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.finished));
        assert!(sched.is_idle());
        assert_eq!(sched.kv_usage(), 0.0);
    }

    #[test]
    fn batching_beats_serial() {
        let one = {
            let (ev, _) = simulate(Scheduler::new(cfg(), cost()), vec![spec(0, 1000, 64)]);
            last(&ev, 0).since_arrival_ms
        };
        let specs: Vec<SeqSpec> = (0..8).map(|i| spec(i, 1000, 64)).collect();
        let (ev, steps) = simulate(Scheduler::new(cfg(), cost()), specs);
        let all = (0..8)
            .map(|i| last(&ev, i).since_arrival_ms)
            .fold(0.0, f64::max);
        assert_eq!(steps, 64, "all 8 prefill in one step, then decode together");
        assert!(all < 2.0 * one, "8 concurrent {all} vs one {one}");
        assert!(all >= one);
    }

    #[test]
    fn max_num_seqs_queues_the_rest() {
        let mut c = cfg();
        c.max_num_seqs = 2;
        let specs: Vec<SeqSpec> = (0..4).map(|i| spec(i, 100, 10)).collect();
        let mut sched = Scheduler::new(c, cost());
        for s in &specs {
            sched.add(s.clone());
        }
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled.len(), 2);
        assert_eq!((sched.num_running(), sched.num_waiting()), (2, 2));
        let (ev, _) = simulate(Scheduler::new(c, cost()), specs);
        // the third request waits for the first two to finish
        assert!(first(&ev, 2).queue_ms >= last(&ev, 0).since_arrival_ms - 1e-9);
        assert!(first(&ev, 2).ttft_ms > first(&ev, 1).ttft_ms);
    }

    #[test]
    fn cached_tokens_skip_prefill_but_pay_load() {
        let c = cost();
        let mut s = spec(1, 8000, 1);
        s.external = Some(Arc::new(ExternalHit::single(7680, Tier::Cpu)));
        let mut sched = Scheduler::new(cfg(), c.clone());
        sched.add(s);
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled, vec![(1, 320)]);
        assert_eq!(p.loaded_tokens, 7680);
        assert!((p.load_ms - c.h2d_ms(7680 * c.kv_bytes_per_token)).abs() < 1e-9);
        assert!((p.compute_ms - c.cached_prefill_ms(7680, 320)).abs() < 1e-9);
        let hit = p.duration_ms();
        let (ev, _) = simulate(Scheduler::new(cfg(), c.clone()), vec![spec(1, 8000, 1)]);
        assert!(hit < first(&ev, 1).ttft_ms / 2.0, "hit {hit} miss {:?}", ev);
        // a full hit still computes one token
        let mut sched = Scheduler::new(cfg(), c);
        let mut s = spec(2, 512, 1);
        s.external = Some(Arc::new(ExternalHit::single(512, Tier::Cpu)));
        sched.add(s);
        assert_eq!(sched.schedule(0.0).scheduled, vec![(2, 1)]);
    }

    #[test]
    fn aborted_sequences_leave_the_batch() {
        let mut sched = Scheduler::new(cfg(), cost());
        sched.add(spec(1, 100, 10));
        sched.add(spec(2, 100, 10));
        let p = sched.schedule(0.0);
        assert!(sched.abort(1));
        let ev = sched.complete(&p, 1.0);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].id, 2);
        assert_eq!(sched.num_running(), 1);
        assert!(!sched.abort(1));
        assert!(sched.abort(2));
        assert!(sched.is_idle());
        assert_eq!(sched.kv_usage(), 0.0);
    }

    #[test]
    fn kv_pressure_preempts_and_still_finishes() {
        let mut c = cfg();
        c.num_gpu_blocks = 20; // 320 tokens
        let specs: Vec<SeqSpec> = (0..3).map(|i| spec(i, 90, 40)).collect();
        let mut sched = Scheduler::new(c, cost());
        for s in &specs {
            sched.add(s.clone());
        }
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled.len(), 3);
        assert!(sched.kv_usage() > 0.8);
        let mut sched2 = Scheduler::new(c, cost());
        for s in &specs {
            sched2.add(s.clone());
        }
        let (ev, _) = simulate(Scheduler::new(c, cost()), specs);
        for i in 0..3 {
            assert_eq!(ev.iter().filter(|e| e.id == i).count(), 40);
            assert!(last(&ev, i).finished);
        }
        // preemption happened along the way
        let mut now = 0.0;
        while !sched2.is_idle() {
            let p = sched2.schedule(now);
            now += p.duration_ms();
            sched2.complete(&p, now);
        }
        assert!(sched2.preemptions > 0);
    }

    /// Run `spec` alone on `sched` (from `now`) to completion; returns its admission, its
    /// first planned step and the end time.
    fn run_one(sched: &mut Scheduler, spec: SeqSpec, now: f64) -> (Admission, StepPlan, f64) {
        sched.add(spec);
        let mut now = now;
        let first = sched.schedule(now);
        let adm = first.admitted[0];
        now += first.duration_ms();
        sched.complete(&first, now);
        while !sched.is_idle() {
            let p = sched.schedule(now);
            now += p.duration_ms();
            sched.complete(&p, now);
        }
        (adm, first, now)
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(7919) ^ salt) % 128000)
            .collect()
    }

    #[test]
    fn a_repeated_prompt_is_a_gpu_hit_decided_at_admission() {
        let c = cost();
        let mut sched = Scheduler::new(cfg(), c.clone());
        let ids = prompt(1000, 0);
        let (a, p, now) = run_one(&mut sched, spec_ids(1, &ids, 2), 0.0);
        assert_eq!(a.split, CachedSplit::default());
        assert!((p.compute_ms - c.prefill_ms(1000)).abs() < 1e-9);
        // the repeat: 62 full blocks cached, capped below the whole prompt
        let (a, p, _) = run_one(&mut sched, spec_ids(2, &ids, 2), now);
        assert_eq!(a.split.gpu, 992);
        assert_eq!((a.split.cpu, a.split.remote), (0, 0));
        assert_eq!(p.scheduled, vec![(2, 8)]);
        assert_eq!(p.load_ms, 0.0, "a GPU hit loads nothing");
        assert!((p.compute_ms - c.cached_prefill_ms(992, 8)).abs() < 1e-9);
        // a prompt of exactly 62 blocks hits 61 of them (the last token is computed)
        let (a, _, _) = run_one(&mut sched, spec_ids(3, &ids[..992], 1), 0.0);
        assert_eq!(a.split.gpu, 976);
        // the events carry the split
        let mut sched = Scheduler::new(cfg(), c);
        let (ev, _) = simulate(sched.clone(), vec![spec_ids(1, &ids, 1)]);
        assert_eq!(ev[0].cached, CachedSplit::default());
        run_one(&mut sched, spec_ids(1, &ids, 1), 0.0);
        sched.add(spec_ids(2, &ids, 1));
        let p = sched.schedule(0.0);
        let ev = sched.complete(&p, 1.0);
        assert_eq!(ev[0].cached.gpu, 992);
        let s = sched.apc_stats();
        assert_eq!((s.cached_blocks, s.used_blocks), (62, 0));
    }

    #[test]
    fn disabled_prefix_caching_never_hits() {
        let mut c = cfg();
        c.enable_prefix_caching = false;
        let mut sched = Scheduler::new(c, cost());
        let ids = prompt(1000, 0);
        run_one(&mut sched, spec_ids(1, &ids, 1), 0.0);
        let (a, p, _) = run_one(&mut sched, spec_ids(2, &ids, 1), 0.0);
        assert_eq!(a.split.total(), 0);
        assert!(!a.apc);
        assert_eq!(p.scheduled, vec![(2, 1000)]);
        assert_eq!(sched.apc_stats().cached_blocks, 0);
    }

    #[test]
    fn a_full_gpu_evicts_the_least_recently_used_prefix() {
        let mut c = cfg();
        c.num_gpu_blocks = 100;
        let mut sched = Scheduler::new(c, cost());
        let a_ids = prompt(1000, 1);
        let b_ids = prompt(1000, 2);
        run_one(&mut sched, spec_ids(1, &a_ids, 1), 0.0);
        // b takes the 37 never-used blocks, then a's 26 freed last: a's tail (freed first)
        run_one(&mut sched, spec_ids(2, &b_ids, 1), 0.0);
        assert_eq!(
            sched.apc_stats().evictions,
            25,
            "a's partial block had no hash"
        );
        let (a, _, _) = run_one(&mut sched, spec_ids(3, &a_ids, 1), 0.0);
        assert_eq!(a.split.gpu, 37 * 16, "a's first 37 blocks survived");
        // running sequences are pinned: a request that needs more than the unpinned blocks
        // waits
        let mut sched = Scheduler::new(c, cost());
        sched.add(spec_ids(1, &a_ids, 1000));
        sched.add(spec_ids(2, &b_ids, 1));
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled, vec![(1, 1000)]);
        assert_eq!(sched.num_waiting(), 1);
    }

    #[test]
    fn requests_sharing_a_prefix_share_its_blocks() {
        let mut sched = Scheduler::new(cfg(), cost());
        let base = prompt(512, 3);
        let mut a = base.clone();
        a.extend(prompt(100, 4));
        let mut b = base.clone();
        b.extend(prompt(100, 5));
        sched.add(spec_ids(1, &a, 50));
        let p = sched.schedule(0.0);
        sched.complete(&p, 1.0);
        let used = sched.apc_stats().used_blocks;
        assert_eq!(used, 39); // 612 tokens
                              // b arrives while a runs: its first 32 blocks are a's, shared
        sched.add(spec_ids(2, &b, 50));
        let p = sched.schedule(1.0);
        assert_eq!(p.admitted[0].split.gpu, 512);
        assert_eq!(
            sched.apc_stats().used_blocks,
            used + 7,
            "only b's own 7 blocks"
        );
        // a leaves: the shared blocks stay pinned by b
        assert!(sched.abort(1));
        assert_eq!(sched.apc_stats().used_blocks, 39);
        assert!(sched.abort(2));
        assert_eq!(sched.apc_stats().used_blocks, 0);
    }

    #[test]
    fn each_tier_costs_what_it_costs() {
        let c = cost();
        let ext = |chunks: Vec<(u64, Tier)>| {
            Some(Arc::new(ExternalHit {
                chunks,
                keys_per_chunk: 1,
            }))
        };
        let kv = |t: u64| c.kv_bytes(t);
        let link = |bytes: u64| bytes as f64 / (25e9 / 8.0) * 1000.0;
        // no GPU hit: 256 tokens from the CPU tier, 256 from the remote store
        let ids = prompt(600, 6);
        let mut sched = Scheduler::new(cfg(), c.clone());
        let mut s = spec_ids(1, &ids, 1);
        s.external = ext(vec![(256, Tier::Cpu), (512, Tier::Remote)]);
        let (a, p, _) = run_one(&mut sched, s, 0.0);
        assert_eq!(
            a.split,
            CachedSplit {
                gpu: 0,
                cpu: 256,
                remote: 256
            }
        );
        assert_eq!(a.keys_loaded, 2);
        assert_eq!((p.loaded_tokens, p.remote_tokens), (512, 256));
        let want = c.h2d_ms(kv(512)) + link(kv(256));
        assert!((p.load_ms - want).abs() < 1e-9, "{} vs {want}", p.load_ms);
        assert!((p.compute_ms - c.cached_prefill_ms(512, 88)).abs() < 1e-9);
        // the same prompt again: the GPU holds 592 tokens, more than LMCache: all GPU
        let mut s = spec_ids(2, &ids, 1);
        s.external = ext(vec![(256, Tier::Cpu), (512, Tier::Remote)]);
        let (a, p, _) = run_one(&mut sched, s, 0.0);
        assert_eq!(a.split.gpu, 592);
        assert_eq!((a.split.total(), a.keys_loaded), (592, 0));
        assert_eq!(p.load_ms, 0.0);
        // a prompt sharing 300 tokens: the GPU has 288, LMCache supplies the rest to 512
        let mut fork = ids.clone();
        fork[300] = (fork[300] + 1) % 128000;
        let mut s = spec_ids(3, &fork, 1);
        s.external = ext(vec![(256, Tier::Cpu), (512, Tier::Remote)]);
        let (a, p, _) = run_one(&mut sched, s, 0.0);
        assert_eq!(
            a.split,
            CachedSplit {
                gpu: 288,
                cpu: 0,
                remote: 224
            }
        );
        assert_eq!(a.keys_loaded, 1);
        let want = c.h2d_ms(kv(224)) + link(kv(224));
        assert!((p.load_ms - want).abs() < 1e-9);
        // a free link: remote costs only the host-to-device copy
        let mut free = cfg();
        free.kv_store_gbps = 0.0;
        let mut sched = Scheduler::new(free, c.clone());
        let mut s = spec_ids(1, &ids, 1);
        s.external = ext(vec![(512, Tier::Remote)]);
        let (_, p, _) = run_one(&mut sched, s, 0.0);
        assert!((p.load_ms - c.h2d_ms(kv(512))).abs() < 1e-9);
    }

    #[test]
    fn async_loading_prefetches_off_the_step() {
        let c = cost();
        let kv = |t: u64| c.kv_bytes(t);
        let link = |bytes: u64| bytes as f64 / (25e9 / 8.0) * 1000.0;
        let mut async_cfg = cfg();
        async_cfg.async_loading = true;
        let mut sched = Scheduler::new(async_cfg, c.clone());
        // request 1 finds 2,048 tokens in the remote store; request 2 finds nothing
        let mut s1 = spec_ids(1, &prompt(2100, 7), 1);
        s1.external = Some(Arc::new(ExternalHit::single(2048, Tier::Remote)));
        sched.add(s1);
        sched.add(spec_ids(2, &prompt(300, 8), 1));
        let ready = link(kv(2048));
        assert_eq!(sched.next_ready_ms(0.0), Some(ready));
        assert_eq!(sched.num_waiting_for_kv(0.0), 1);
        // the first step runs request 2 alone: request 1 keeps its place but is skipped
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled, vec![(2, 300)]);
        assert_eq!(p.load_ms, 0.0);
        sched.complete(&p, 1.0);
        // nothing can run before the prefetch is in
        assert!(sched.schedule(1.0).scheduled.is_empty());
        // once it is in, its step pays host-to-device only; the split still says remote
        let p = sched.schedule(ready);
        assert_eq!(p.scheduled, vec![(1, 52)]);
        assert_eq!(p.admitted[0].split.remote, 2048);
        assert_eq!((p.loaded_tokens, p.remote_tokens), (2048, 0));
        assert!((p.load_ms - c.h2d_ms(kv(2048))).abs() < 1e-9);
        assert!((sched.prefetch_ms - ready).abs() < 1e-9);
        assert_eq!(sched.next_ready_ms(ready), None);

        // prefetches share the link: a second one starts when the first is done
        let mut sched = Scheduler::new(async_cfg, c.clone());
        for id in [1, 2] {
            let mut s = spec_ids(id, &prompt(600, id as u32), 1);
            s.external = Some(Arc::new(ExternalHit::single(512, Tier::Remote)));
            sched.add(s);
        }
        let one = link(kv(512));
        assert_eq!(sched.next_ready_ms(0.0), Some(one));
        assert_eq!(sched.next_ready_ms(one), Some(2.0 * one));
        // a CPU-tier hit is never prefetched
        let mut s = spec_ids(3, &prompt(600, 3), 1);
        s.external = Some(Arc::new(ExternalHit::single(512, Tier::Cpu)));
        sched.add(s);
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled, vec![(3, 88)]);
    }

    /// A prompt the GPU prefix cache already holds needs nothing from its prefetch: it is
    /// admitted at once (LMCache still prefetches it, as its async lookup does not know
    /// the GPU hit, so the link stays busy).
    #[test]
    fn async_loading_does_not_wait_for_what_the_gpu_holds() {
        let c = cost();
        let mut async_cfg = cfg();
        async_cfg.async_loading = true;
        let mut sched = Scheduler::new(async_cfg, c.clone());
        let ids = prompt(600, 9);
        // first run: computed, its blocks now in the GPU prefix cache
        let (_, _, _) = run_one(&mut sched, spec_ids(1, &ids, 1), 0.0);
        let mut again = spec_ids(2, &ids, 1);
        again.external = Some(Arc::new(ExternalHit::single(512, Tier::Remote)));
        again.arrival_ms = 10.0;
        sched.add(again);
        assert!(
            sched.next_ready_ms(10.0).is_some(),
            "the prefetch runs on the link"
        );
        let p = sched.schedule(10.0);
        assert_eq!(p.admitted.len(), 1);
        assert_eq!(p.admitted[0].split.gpu, 592);
        assert_eq!(p.admitted[0].split.remote, 0);
        assert!(sched.prefetch_ms > 0.0);
    }

    #[test]
    fn blocking_loads_hold_the_step() {
        let c = cost();
        let mut sched = Scheduler::new(cfg(), c.clone());
        let mut s1 = spec_ids(1, &prompt(2100, 7), 1);
        s1.external = Some(Arc::new(ExternalHit::single(2048, Tier::Remote)));
        sched.add(s1);
        sched.add(spec_ids(2, &prompt(300, 8), 1));
        assert_eq!(sched.next_ready_ms(0.0), None);
        // both run in the first step, which waits for the link
        let p = sched.schedule(0.0);
        assert_eq!(p.scheduled.len(), 2);
        assert_eq!(p.remote_tokens, 2048);
        assert!(p.load_ms > c.h2d_ms(c.kv_bytes(2048)));
    }

    #[test]
    fn prefill_share_of_a_mixed_step() {
        let mut sched = Scheduler::new(cfg(), cost());
        sched.add(spec(1, 100, 5));
        let p = sched.schedule(0.0);
        assert_eq!(p.prefill_compute_ms(), p.compute_ms);
        sched.complete(&p, 1.0);
        sched.add(spec(2, 99, 1));
        let p = sched.schedule(1.0);
        // one decode token and 99 prefill tokens
        assert!((p.prefill_compute_ms() - p.compute_ms * 0.99).abs() < 1e-9);
        sched.complete(&p, 2.0);
        let p = sched.schedule(2.0);
        assert_eq!(p.prefill_compute_ms(), 0.0, "decode only");
    }
}
