//! Instance pickers: how one instance of a pool is chosen for an attempt. One trait,
//! one file per policy, built from the config by [`Pickers::build`]; a policy that keeps
//! state (the round-robin ticket, `prefix_affinity`'s prompt tree) owns it. The
//! arithmetic stays in `cacheroute_decisions::balance` (pure, tested there).

mod knowledge_affinity;
mod least_inflight;
mod least_loaded;
mod prefix_affinity;
mod round_robin;

use crate::fleet::{Fleet, Pool, PoolInstance};
use crate::knowledge::{self, AgentLive, Catalog};
use crate::pipeline::RequestCtx;
use crate::state::GatewayState;
use cacheroute_decisions::balance::{self, BalancePolicy, Candidate};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a picker may ask about the request and the instances, for one attempt.
pub struct PickInput<'a> {
    /// Instances this request already tried (excluded).
    pub tried: &'a dyn Fn(usize) -> bool,
    /// Whether an instance's store holds the request's leading knowledge.
    pub holds_kv: &'a dyn Fn(usize) -> bool,
    /// An instance agent's running + waiting count (0 without an agent).
    pub agent_load: &'a dyn Fn(&PoolInstance) -> u64,
    /// The prompt's text, when a picker asked for it and the request has no knowledge.
    pub prompt_text: Option<&'a str>,
}

/// Chooses an instance of a pool.
pub trait Picker: Send + Sync {
    /// The policy's name in the config.
    fn name(&self) -> &'static str;
    /// The index of the instance to try, or `None` when none is available.
    fn pick(&self, pool: &Pool, input: &PickInput<'_>) -> Option<usize>;
    /// Whether [`PickInput::prompt_text`] should be filled (it costs a copy of the
    /// prompt, so only pickers that read it ask).
    fn wants_prompt_text(&self) -> bool {
        false
    }
}

/// The next (pool, instance) to try: the first pool, in the request's order, that
/// still has an untried healthy instance, chosen by the pool's picker.
pub fn next_instance(
    fleet: &Fleet,
    pools: &[usize],
    tried: &[(usize, usize)],
    pipe: &RequestCtx,
    catalog: &Catalog,
    state: &GatewayState,
    agents: &HashMap<String, AgentLive>,
) -> Option<(usize, usize)> {
    let leading = pipe.ids.first().and_then(|id| catalog.blocks.get(id));
    pools.iter().find_map(|&p| {
        let pool = &fleet.pools[p];
        let agent_load = |inst: &PoolInstance| {
            agents
                .get(&inst.url.base)
                .filter(|a| a.up)
                .map_or(0, |a| a.load.running + a.load.waiting)
        };
        let holds_kv = |i: usize| {
            pipe.ids.first().is_some_and(|id| {
                knowledge::residency(pool, i, &pipe.model, id, leading, agents, &state.injections)
                    .is_some()
            })
        };
        let tried_here = |i: usize| tried.contains(&(p, i));
        let input = PickInput {
            tried: &tried_here,
            holds_kv: &holds_kv,
            agent_load: &agent_load,
            prompt_text: pipe.prompt_text.as_deref(),
        };
        pool.picker.pick(pool, &input).map(|i| (p, i))
    })
}

/// A new picker for `policy`.
fn make(policy: BalancePolicy) -> Arc<dyn Picker> {
    match policy {
        BalancePolicy::RoundRobin => Arc::new(round_robin::RoundRobin::default()),
        BalancePolicy::LeastInflight => Arc::new(least_inflight::LeastInflight::default()),
        BalancePolicy::LeastLoaded => Arc::new(least_loaded::LeastLoaded::default()),
        BalancePolicy::KnowledgeAffinity => {
            Arc::new(knowledge_affinity::KnowledgeAffinity::default())
        }
        BalancePolicy::PrefixAffinity => Arc::new(prefix_affinity::PrefixAffinity::default()),
    }
}

/// A built picker's pool name and policy name.
type PickerKey = (String, &'static str);

/// Pickers by (pool, policy), kept across reloads so that a policy's state (its
/// ticket, its prompt tree) survives a reload that keeps the pool's policy.
#[derive(Default)]
pub struct Pickers {
    built: Mutex<HashMap<PickerKey, Arc<dyn Picker>>>,
}

impl Pickers {
    /// The factory: the picker of `policy` for the pool named `pool`.
    pub fn build(&self, pool: &str, policy: BalancePolicy) -> Arc<dyn Picker> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built
            .entry((pool.to_string(), policy.as_str()))
            .or_insert_with(|| make(policy))
            .clone()
    }
}

/// A rotating counter: drives round robin and breaks least-loaded ties fairly.
#[derive(Default)]
struct Ticket(AtomicU64);

impl Ticket {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// How a policy counts an instance's load.
#[derive(Clone, Copy)]
enum Load {
    /// The gateway's own in-flight and queued requests.
    Own,
    /// The larger of the gateway's count and the instance agent's.
    WithAgent,
}

/// Run `balance::choose(policy)` over the pool's candidates, built on the stack for
/// pools of up to 16 instances (pools are small: no heap on the request path).
fn choose_balanced(
    pool: &Pool,
    input: &PickInput<'_>,
    policy: BalancePolicy,
    load: Load,
    affinity: bool,
    ticket: u64,
) -> Option<usize> {
    const ON_STACK: usize = 16;
    let candidate = |(i, inst): (usize, &PoolInstance)| {
        let own = inst.state.inflight() + inst.state.queued();
        let load = match load {
            Load::Own => own,
            Load::WithAgent => own.max((input.agent_load)(inst)),
        };
        Candidate {
            weight: inst.weight,
            inflight: load,
            available: !(input.tried)(i) && pool.is_healthy(inst),
            affinity: affinity && (input.holds_kv)(i),
        }
    };
    let n = pool.instances.len();
    if n <= ON_STACK {
        let mut buf = [Candidate {
            weight: 0,
            inflight: 0,
            available: false,
            affinity: false,
        }; ON_STACK];
        for (slot, c) in buf
            .iter_mut()
            .zip(pool.instances.iter().enumerate().map(candidate))
        {
            *slot = c;
        }
        balance::choose(policy, &buf[..n], ticket)
    } else {
        let all: Vec<Candidate> = pool.instances.iter().enumerate().map(candidate).collect();
        balance::choose(policy, &all, ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetBuilder;
    use crate::pipeline::testing::fleet_from;

    fn config(policy: &str) -> String {
        format!(
            r#"
[upstream]
policy = "{policy}"
[[pools]]
name = "p"
models = ["m"]
instances = [{{ url = "http://127.0.0.1:9" }}, {{ url = "http://127.0.0.1:10" }}]
"#
        )
    }

    fn pick(pool: &Pool, text: Option<&str>, tried: &[usize]) -> Option<usize> {
        let input = PickInput {
            tried: &|i| tried.contains(&i),
            holds_kv: &|_| false,
            agent_load: &|_| 0,
            prompt_text: text,
        };
        pool.picker.pick(pool, &input)
    }

    #[tokio::test]
    async fn round_robin_alternates_and_skips_the_tried() {
        let builder = FleetBuilder::new(&Default::default());
        let fleet = fleet_from(&builder, &config("round_robin")).await;
        let pool = &fleet.pools[0];
        assert_eq!(pool.picker.name(), "round_robin");
        let a = pick(pool, None, &[]).expect("an instance");
        let b = pick(pool, None, &[]).expect("an instance");
        assert_ne!(a, b);
        assert_eq!(pick(pool, None, &[0]), Some(1));
        assert_eq!(pick(pool, None, &[0, 1]), None);
    }

    #[tokio::test]
    async fn prefix_affinity_keeps_its_tree_across_a_reload() {
        let builder = FleetBuilder::new(&Default::default());
        let text = "user\nthe same long shared prompt prefix, asked again\n";
        let first = {
            let fleet = fleet_from(&builder, &config("prefix_affinity")).await;
            let pool = &fleet.pools[0];
            assert!(pool.picker.wants_prompt_text());
            pick(pool, Some(text), &[]).expect("an instance")
        };
        // A reload with the same pool and policy gets the same picker, tree included.
        let fleet = fleet_from(&builder, &config("prefix_affinity")).await;
        for _ in 0..3 {
            assert_eq!(pick(&fleet.pools[0], Some(text), &[]), Some(first));
        }
    }
}
