//! The approximate prefix trees behind `prefix_affinity`, one per pool, kept across
//! requests (and reloads that keep the pool's instance list).

use crate::fleet::Pool;
use cacheroute_filters::prefix_tree::{self, PrefixAffinityConfig, PrefixTree};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Characters of prompt text remembered per instance (LRU beyond it).
const MAX_CHARS_PER_INSTANCE: usize = 4 << 20;

#[derive(Default)]
pub struct PrefixTrees {
    /// Pool name → (its instance URLs when the tree was built, the tree).
    trees: Mutex<HashMap<String, (Vec<String>, PrefixTree)>>,
    tick: AtomicU64,
}

impl PrefixTrees {
    /// Choose an instance of `pool` for `text` and remember the choice.
    pub fn choose(
        &self,
        pool: &Pool,
        text: &str,
        loads: &[u64],
        eligible: &[bool],
    ) -> Option<usize> {
        let urls: Vec<String> = pool.instances.iter().map(|i| i.url.base.clone()).collect();
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        let entry = trees
            .entry(pool.name.clone())
            .or_insert_with(|| (urls.clone(), PrefixTree::new(MAX_CHARS_PER_INSTANCE)));
        if entry.0 != urls {
            // Indices moved with a reload: start over rather than point at the wrong
            // instances.
            *entry = (urls, PrefixTree::new(MAX_CHARS_PER_INSTANCE));
        }
        let c = prefix_tree::choose(
            &entry.1,
            text,
            loads,
            eligible,
            &PrefixAffinityConfig::default(),
        );
        let i = c.instance?;
        entry
            .1
            .insert(text, i, self.tick.fetch_add(1, Ordering::Relaxed));
        Some(i)
    }
}
