//! `prefix_affinity`: for requests without knowledge, the instance that served the
//! longest shared prompt prefix (an approximate prefix tree, with load-balance
//! thresholds); requests with knowledge use knowledge affinity. The picker owns its
//! tree; it starts over when the pool's instance list changes.

use super::{choose_balanced, Load, PickInput, Picker, Ticket};
use crate::fleet::Pool;
use cacheroute_decisions::balance::BalancePolicy;
use cacheroute_decisions::prefix_tree::{self, PrefixAffinityConfig, PrefixTree};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Characters of prompt text remembered per instance (LRU beyond it).
const MAX_CHARS_PER_INSTANCE: usize = 4 << 20;

#[derive(Default)]
pub struct PrefixAffinity {
    /// The pool's instance URLs when the tree was built, and the tree.
    tree: Mutex<Option<(Vec<String>, PrefixTree)>>,
    tick: AtomicU64,
    ticket: Ticket,
}

impl Picker for PrefixAffinity {
    fn name(&self) -> &'static str {
        BalancePolicy::PrefixAffinity.as_str()
    }

    fn wants_prompt_text(&self) -> bool {
        true
    }

    fn pick(&self, pool: &Pool, input: &PickInput<'_>) -> Option<usize> {
        let Some(text) = input.prompt_text else {
            let t = self.ticket.next();
            return choose_balanced(
                pool,
                input,
                BalancePolicy::PrefixAffinity,
                Load::WithAgent,
                true,
                t,
            );
        };
        let loads: Vec<u64> = pool
            .instances
            .iter()
            .map(|inst| (inst.state.inflight() + inst.state.queued()).max((input.agent_load)(inst)))
            .collect();
        let eligible: Vec<bool> = (0..pool.instances.len())
            .map(|i| !(input.tried)(i) && pool.is_healthy(&pool.instances[i]))
            .collect();
        let urls: Vec<String> = pool.instances.iter().map(|i| i.url.base.clone()).collect();
        let mut guard = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        // Indices move when a reload changes the instance list: start over rather
        // than point at the wrong instances.
        if guard.as_ref().is_none_or(|(u, _)| *u != urls) {
            *guard = Some((urls, PrefixTree::new(MAX_CHARS_PER_INSTANCE)));
        }
        let (_, tree) = guard.as_mut()?;
        let c = prefix_tree::choose(
            tree,
            text,
            &loads,
            &eligible,
            &PrefixAffinityConfig::default(),
        );
        let i = c.instance?;
        tree.insert(text, i, self.tick.fetch_add(1, Ordering::Relaxed));
        Some(i)
    }
}
