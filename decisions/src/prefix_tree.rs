//! Approximate prefix tree for the `prefix_affinity` policy: which instance most
//! recently served the longest prefix of a request's text, without asking the engines.
//!
//! The gateway inserts each routed request's text under the instance it went to; the
//! engines' real caches are never consulted, so the tree is an estimate (an engine may
//! have evicted what the tree remembers). Like SGLang's cache-aware router it works on
//! raw text (no tokenizer), as a radix tree over Unicode scalar values: each node's edge
//! label is a `String`, split only on char boundaries, and lengths are counted in chars.
//!
//! Every node records the instances that inserted a text through it and the tick of their
//! last insert. An instance on a node is also on all the node's ancestors (inserts mark
//! the whole path, evictions peel from the leaves), so an instance's share of the tree is
//! a subtree and its size is the sum of its nodes' edge lengths. Each instance's share is
//! bounded by `max_chars_per_instance`, least recently used leaves going first.

use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// The root's index; the root has an empty edge and is never removed.
const ROOT: usize = 0;

#[derive(Debug, Clone)]
struct Node {
    /// Label of the edge from the parent (empty for the root only).
    edge: String,
    /// `edge.chars().count()`, kept to avoid recounting.
    edge_chars: usize,
    parent: usize,
    /// Keyed by the first char of the child's edge.
    children: HashMap<char, usize>,
    /// (instance, tick of its last insert through this node); fleets are small, so a
    /// vector beats a map here.
    holders: Vec<(usize, u64)>,
}

impl Node {
    fn new(edge: String, parent: usize) -> Node {
        Node {
            edge_chars: edge.chars().count(),
            edge,
            parent,
            children: HashMap::new(),
            holders: Vec::new(),
        }
    }

    fn tick_of(&self, instance: usize) -> Option<u64> {
        self.holders
            .iter()
            .find(|(i, _)| *i == instance)
            .map(|(_, t)| *t)
    }
}

/// Radix tree of request texts, per instance, with LRU eviction.
#[derive(Debug, Clone)]
pub struct PrefixTree {
    nodes: Vec<Node>,
    /// Slots of removed nodes, reused before growing `nodes`.
    free: Vec<usize>,
    max_chars_per_instance: usize,
    /// Chars held per instance (instances absent here hold nothing).
    sizes: BTreeMap<usize, usize>,
}

/// An over-full instance is cut to the bound minus 1/this of it: evicting a little below
/// the bound makes eviction run once per many inserts instead of on every one.
const LOW_WATER_DIV: usize = 8;

/// Chars in the common prefix of `a` and `b`, and its byte length (the same in both).
fn common_prefix(a: &str, b: &str) -> (usize, usize) {
    let mut chars = 0;
    let mut bytes = 0;
    for (x, y) in a.chars().zip(b.chars()) {
        if x != y {
            break;
        }
        chars += 1;
        bytes += x.len_utf8();
    }
    (chars, bytes)
}

impl PrefixTree {
    /// An empty tree holding at most `max_chars_per_instance` chars of text per instance
    /// (at least 1).
    pub fn new(max_chars_per_instance: usize) -> PrefixTree {
        PrefixTree {
            nodes: vec![Node::new(String::new(), ROOT)],
            free: Vec::new(),
            max_chars_per_instance: max_chars_per_instance.max(1),
            sizes: BTreeMap::new(),
        }
    }

    pub fn max_chars_per_instance(&self) -> usize {
        self.max_chars_per_instance
    }

    /// Chars of text the tree attributes to `instance`.
    pub fn instance_chars(&self, instance: usize) -> usize {
        self.sizes.get(&instance).copied().unwrap_or(0)
    }

    /// Instances holding any text, with their sizes in chars.
    pub fn instances(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.sizes.iter().map(|(i, s)| (*i, *s))
    }

    /// Distinct chars stored (shared prefixes counted once).
    pub fn total_chars(&self) -> usize {
        self.live_nodes().map(|n| self.nodes[n].edge_chars).sum()
    }

    /// Nodes in use, the root included.
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn live_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        // a free slot is detached: its parent no longer lists it, so walk from the root
        let mut stack = vec![ROOT];
        std::iter::from_fn(move || {
            let n = stack.pop()?;
            stack.extend(self.nodes[n].children.values().copied());
            Some(n)
        })
    }

    fn alloc(&mut self, node: Node) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// Mark `node` as served by `instance` at `tick`, counting its edge when new.
    fn touch(&mut self, node: usize, instance: usize, tick: u64) {
        let n = &mut self.nodes[node];
        match n.holders.iter_mut().find(|(i, _)| *i == instance) {
            Some(h) => h.1 = h.1.max(tick),
            None => {
                n.holders.push((instance, tick));
                *self.sizes.entry(instance).or_insert(0) += n.edge_chars;
            }
        }
    }

    /// Record that `instance` served `text` at `tick` (ticks should not go backwards: a
    /// node keeps the latest tick it saw). The instance's share is then cut back to the
    /// bound if this insert took it over.
    pub fn insert(&mut self, text: &str, instance: usize, tick: u64) {
        let mut node = ROOT;
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let Some(&child) = self.nodes[node].children.get(&c) else {
                let leaf = self.alloc(Node::new(rest.to_string(), node));
                self.nodes[node].children.insert(c, leaf);
                self.touch(leaf, instance, tick);
                break;
            };
            let (_, bytes) = common_prefix(&self.nodes[child].edge, rest);
            let next = if bytes < self.nodes[child].edge.len() {
                self.split(child, bytes)
            } else {
                child
            };
            self.touch(next, instance, tick);
            node = next;
            rest = &rest[bytes..];
        }
        if self.instance_chars(instance) > self.max_chars_per_instance {
            self.evict_instance(instance, self.low_water());
        }
    }

    /// Split `child`'s edge after `bytes` (a char boundary, > 0): a new middle node takes
    /// the head of the edge and every holder of `child`, so sizes are unchanged.
    fn split(&mut self, child: usize, bytes: usize) -> usize {
        let parent = self.nodes[child].parent;
        let tail = self.nodes[child].edge.split_off(bytes);
        let head = std::mem::replace(&mut self.nodes[child].edge, tail);
        let first = head.chars().next().expect("split inside a non-empty edge");
        let mut mid = Node::new(head, parent);
        mid.holders = self.nodes[child].holders.clone();
        self.nodes[child].edge_chars -= mid.edge_chars;
        let tail_first = self.nodes[child]
            .edge
            .chars()
            .next()
            .expect("split before the edge's end");
        mid.children.insert(tail_first, child);
        let mid = self.alloc(mid);
        self.nodes[child].parent = mid;
        self.nodes[parent].children.insert(first, mid);
        mid
    }

    /// The instance that most recently served the longest prefix of `text`, and how many
    /// chars of `text` matched (0 and None when nothing did).
    pub fn longest_match(&self, text: &str) -> (Option<usize>, usize) {
        self.longest_match_where(text, |_| true)
    }

    /// [`Self::longest_match`] among the instances `allowed` accepts: the walk stops where
    /// no allowed instance went further. A partly matched edge counts its matched chars.
    pub fn longest_match_where(
        &self,
        text: &str,
        allowed: impl Fn(usize) -> bool,
    ) -> (Option<usize>, usize) {
        let best_at = |n: usize| {
            self.nodes[n]
                .holders
                .iter()
                .filter(|(i, _)| allowed(*i))
                // most recent first; equal ticks go to the lower index, deterministically
                .max_by_key(|(i, t)| (*t, Reverse(*i)))
                .map(|(i, _)| *i)
        };
        let mut node = ROOT;
        let mut best = None;
        let mut matched = 0;
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let Some(&child) = self.nodes[node].children.get(&c) else {
                break;
            };
            let Some(inst) = best_at(child) else {
                break;
            };
            let (chars, bytes) = common_prefix(&self.nodes[child].edge, rest);
            best = Some(inst);
            matched += chars;
            if bytes < self.nodes[child].edge.len() {
                break;
            }
            node = child;
            rest = &rest[bytes..];
        }
        (best, matched)
    }

    fn low_water(&self) -> usize {
        self.max_chars_per_instance - self.max_chars_per_instance / LOW_WATER_DIV
    }

    /// Cut every instance over the bound down to 7/8 of it, least recently used leaves
    /// first. Returns the chars evicted. (Inserts already do this for their instance;
    /// this is for a periodic sweep, e.g. after the bound was lowered.)
    pub fn evict(&mut self) -> usize {
        let over: Vec<usize> = self
            .sizes
            .iter()
            .filter(|(_, s)| **s > self.max_chars_per_instance)
            .map(|(i, _)| *i)
            .collect();
        let target = self.low_water();
        over.into_iter()
            .map(|i| self.evict_instance(i, target))
            .sum()
    }

    /// Change the bound (at least 1); takes effect at the next [`Self::evict`] or insert.
    pub fn set_max_chars_per_instance(&mut self, max: usize) {
        self.max_chars_per_instance = max.max(1);
    }

    /// Whether `node` holds `instance` and none of its children does: the only places
    /// eviction may take `instance` from without breaking the ancestor invariant.
    fn is_leaf_for(&self, node: usize, instance: usize) -> bool {
        node != ROOT
            && self.nodes[node].tick_of(instance).is_some()
            && self.nodes[node]
                .children
                .values()
                .all(|c| self.nodes[*c].tick_of(instance).is_none())
    }

    /// Evict `instance`'s least recently used leaves until it holds at most `target`
    /// chars. Returns the chars evicted.
    fn evict_instance(&mut self, instance: usize, target: usize) -> usize {
        let before = self.instance_chars(instance);
        if before <= target {
            return 0;
        }
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = self
            .live_nodes()
            .filter(|n| self.is_leaf_for(*n, instance))
            .map(|n| Reverse((self.nodes[n].tick_of(instance).unwrap_or(0), n)))
            .collect();
        while self.instance_chars(instance) > target {
            let Some(Reverse((_, n))) = heap.pop() else {
                break;
            };
            let parent = self.nodes[n].parent;
            self.drop_holder(n, instance);
            if self.is_leaf_for(parent, instance) {
                let t = self.nodes[parent].tick_of(instance).unwrap_or(0);
                heap.push(Reverse((t, parent)));
            }
        }
        before - self.instance_chars(instance)
    }

    /// Take `instance` off `node`; a node nobody holds any more is removed (it has no
    /// children then: they would be held by someone, who would hold this node too).
    fn drop_holder(&mut self, node: usize, instance: usize) {
        let n = &mut self.nodes[node];
        let Some(pos) = n.holders.iter().position(|(i, _)| *i == instance) else {
            return;
        };
        n.holders.swap_remove(pos);
        let chars = n.edge_chars;
        if let Some(s) = self.sizes.get_mut(&instance) {
            *s -= chars;
            if *s == 0 {
                self.sizes.remove(&instance);
            }
        }
        if self.nodes[node].holders.is_empty() && self.nodes[node].children.is_empty() {
            self.remove_node(node);
        }
    }

    fn remove_node(&mut self, node: usize) {
        let parent = self.nodes[node].parent;
        if let Some(first) = self.nodes[node].edge.chars().next() {
            self.nodes[parent].children.remove(&first);
        }
        // drop the label's memory now; the slot waits in `free`
        self.nodes[node] = Node::new(String::new(), ROOT);
        self.free.push(node);
    }

    /// Forget everything `instance` served (it left the pool or restarted empty).
    pub fn remove_instance(&mut self, instance: usize) {
        // children before parents, so emptied parents are childless when reached
        let mut order: Vec<usize> = self.live_nodes().collect();
        order.reverse();
        for n in order {
            if n != ROOT {
                self.drop_holder(n, instance);
            }
        }
        self.sizes.remove(&instance);
    }
}

/// Thresholds of the `prefix_affinity` policy (SGLang cache-aware router's meaning).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixAffinityConfig {
    /// Share of the request's text that must match an instance's prefix to follow it.
    pub cache_threshold: f64,
    /// Load spread (max − min) above which the pool counts as imbalanced ...
    pub balance_abs_threshold: u64,
    /// ... when the max is also above this multiple of the min.
    pub balance_rel_threshold: f64,
}

impl Default for PrefixAffinityConfig {
    fn default() -> Self {
        PrefixAffinityConfig {
            cache_threshold: 0.5,
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.0001,
        }
    }
}

/// Why [`choose`] picked its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixReason {
    /// Loads were imbalanced: the least loaded instance, whatever the tree says.
    Imbalanced,
    /// Enough of the text matched: the instance that served that prefix most recently.
    CacheHit,
    /// Too little matched: the least loaded instance, then the one with the least text.
    CacheMiss,
    /// No instance was eligible.
    NoInstance,
}

/// A `prefix_affinity` decision, for the decision log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixChoice {
    /// Index into the `loads`/`eligible` slices (None: nothing eligible).
    pub instance: Option<usize>,
    pub reason: PrefixReason,
    /// Instance holding the longest eligible prefix (even if not followed).
    pub matched_instance: Option<usize>,
    pub matched_chars: usize,
    pub text_chars: usize,
    /// `matched_chars / text_chars` (0 for an empty text).
    pub match_ratio: f64,
    pub min_load: u64,
    pub max_load: u64,
}

/// Pick an instance for `text`. `loads[i]` is instance i's in-flight + queued requests;
/// `eligible[i]` says whether it may be chosen (healthy, not already tried; a missing
/// entry is not eligible). The caller then inserts `text` under the chosen instance.
///
/// Imbalanced loads (max − min > abs **and** max > rel × min, over eligible instances)
/// → the least loaded. Otherwise, if matched/len ≥ `cache_threshold`, the instance
/// holding the match; else the least loaded, ties to the least text in the tree (so
/// new prefixes spread over the fleet) and then the lowest index. Load comes first on a
/// miss, unlike SGLang's "smallest tree": the smallest tree may be on an overloaded
/// instance (SGLang's "death spiral" reports).
pub fn choose(
    tree: &PrefixTree,
    text: &str,
    loads: &[u64],
    eligible: &[bool],
    cfg: &PrefixAffinityConfig,
) -> PrefixChoice {
    let ok = |i: usize| i < loads.len() && eligible.get(i).copied().unwrap_or(false);
    let text_chars = text.chars().count();
    let mut out = PrefixChoice {
        instance: None,
        reason: PrefixReason::NoInstance,
        matched_instance: None,
        matched_chars: 0,
        text_chars,
        match_ratio: 0.0,
        min_load: 0,
        max_load: 0,
    };
    let candidates: Vec<usize> = (0..loads.len()).filter(|i| ok(*i)).collect();
    let (Some(min), Some(max)) = (
        candidates.iter().map(|i| loads[*i]).min(),
        candidates.iter().map(|i| loads[*i]).max(),
    ) else {
        return out;
    };
    out.min_load = min;
    out.max_load = max;
    let (matched_instance, matched_chars) = tree.longest_match_where(text, ok);
    out.matched_instance = matched_instance;
    out.matched_chars = matched_chars;
    if text_chars > 0 {
        out.match_ratio = matched_chars as f64 / text_chars as f64;
    }
    let least_loaded = || {
        candidates
            .iter()
            .copied()
            .min_by_key(|i| (loads[*i], tree.instance_chars(*i), *i))
    };
    let imbalanced = max - min > cfg.balance_abs_threshold
        && max as f64 > cfg.balance_rel_threshold * min as f64;
    if imbalanced {
        out.instance = least_loaded();
        out.reason = PrefixReason::Imbalanced;
    } else if let Some(m) =
        matched_instance.filter(|_| text_chars > 0 && out.match_ratio >= cfg.cache_threshold)
    {
        out.instance = Some(m);
        out.reason = PrefixReason::CacheHit;
    } else {
        out.instance = least_loaded();
        out.reason = PrefixReason::CacheMiss;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recount sizes and check the ancestor invariant from scratch.
    fn check(t: &PrefixTree) {
        let mut sizes: BTreeMap<usize, usize> = BTreeMap::new();
        for n in t.live_nodes() {
            let node = &t.nodes[n];
            assert_eq!(node.edge_chars, node.edge.chars().count());
            if n != ROOT {
                assert!(!node.edge.is_empty());
                assert!(!node.holders.is_empty(), "unheld node {n} kept");
                let first = node.edge.chars().next().unwrap();
                assert_eq!(t.nodes[node.parent].children.get(&first), Some(&n));
            }
            for (i, _) in &node.holders {
                *sizes.entry(*i).or_default() += node.edge_chars;
                if node.parent != ROOT {
                    assert!(t.nodes[node.parent].tick_of(*i).is_some());
                }
            }
        }
        assert_eq!(sizes, t.sizes);
    }

    #[test]
    fn longest_match_follows_the_deepest_and_most_recent() {
        let mut t = PrefixTree::new(1 << 20);
        assert_eq!(t.longest_match("anything"), (None, 0));
        t.insert("system: you are helpful. user: hello", 0, 1);
        t.insert("system: you are helpful. user: bye", 1, 2);
        check(&t);
        // shared part "system: you are helpful. user: " — both hold it, 1 is more recent
        let shared = "system: you are helpful. user: ".chars().count();
        assert_eq!(
            t.longest_match("system: you are helpful. user: what"),
            (Some(1), shared)
        );
        assert_eq!(
            t.longest_match("system: you are helpful. user: hello there"),
            (Some(0), shared + 5)
        );
        assert_eq!(
            t.longest_match("system: you are helpful. user: he"),
            (Some(0), shared + 2)
        );
        assert_eq!(t.longest_match("sys"), (Some(1), 3));
        assert_eq!(t.longest_match("xyz"), (None, 0));
        assert_eq!(t.longest_match(""), (None, 0));
        // re-inserting refreshes recency
        t.insert("system: you are helpful. user: hello", 0, 3);
        assert_eq!(
            t.longest_match("system: you are helpful. user: what").0,
            Some(0)
        );
        // restricted to instance 1
        assert_eq!(
            t.longest_match_where("system: you are helpful. user: hello", |i| i == 1),
            (Some(1), shared)
        );
        assert_eq!(t.longest_match_where("system", |i| i == 7), (None, 0));
        check(&t);
    }

    #[test]
    fn sizes_count_each_instance_share() {
        let mut t = PrefixTree::new(1 << 20);
        t.insert("abcdef", 0, 1);
        t.insert("abcxyz", 1, 2);
        t.insert("abcdef", 1, 3);
        assert_eq!(t.instance_chars(0), 6);
        assert_eq!(t.instance_chars(1), 9);
        assert_eq!(t.total_chars(), 9);
        t.insert("abc", 0, 4); // a prefix of what it already holds: nothing new
        assert_eq!(t.instance_chars(0), 6);
        t.insert("", 2, 5); // empty text: nothing at all
        assert_eq!(t.instance_chars(2), 0);
        check(&t);
        t.remove_instance(1);
        assert_eq!(t.instance_chars(1), 0);
        assert_eq!(t.total_chars(), 6);
        assert_eq!(t.longest_match("abcxyz"), (Some(0), 3));
        check(&t);
        t.remove_instance(0);
        assert_eq!((t.total_chars(), t.node_count()), (0, 1));
        assert_eq!(t.instances().count(), 0);
        check(&t);
    }

    #[test]
    fn eviction_bounds_each_instance_and_drops_the_oldest() {
        let mut t = PrefixTree::new(100);
        for k in 0..20u64 {
            // 20 distinct 30-char texts on instance 0: 600 chars asked, 100 allowed
            t.insert(&format!("{k:02}-{}", "x".repeat(27)), 0, k);
            assert!(t.instance_chars(0) <= 100, "{}", t.instance_chars(0));
            check(&t);
        }
        // the newest survive, the oldest went
        assert_eq!(
            t.longest_match(&format!("19-{}", "x".repeat(27))),
            (Some(0), 30)
        );
        assert!(t.longest_match(&format!("00-{}", "x".repeat(27))).1 <= 1);
        // another instance's share is bounded on its own
        t.insert(&"y".repeat(90), 1, 100);
        assert_eq!(t.instance_chars(1), 90);
        assert!(t.instance_chars(0) <= 100);
        // a text longer than the bound goes whole (eviction works on whole nodes)
        t.insert(&"z".repeat(500), 2, 101);
        assert!(t.instance_chars(2) <= 100);
        check(&t);
        // lowering the bound takes effect at the next sweep
        t.set_max_chars_per_instance(40);
        let evicted = t.evict();
        assert!(evicted > 0);
        for (i, s) in t.instances() {
            assert!(s <= 40, "instance {i}: {s}");
        }
        check(&t);
        // freed slots are reused: the node count stays bounded under churn
        let mut t = PrefixTree::new(200);
        for k in 0..5000u64 {
            t.insert(&format!("p{}-{k}", k % 7), (k % 3) as usize, k);
        }
        // every node but the root holds at least one char of some instance
        let held: usize = t.instances().map(|(_, s)| s).sum();
        assert!(
            t.node_count() <= held + 1 && held <= 600,
            "{}",
            t.node_count()
        );
        assert!(t.nodes.len() <= 610, "{}", t.nodes.len());
        check(&t);
    }

    #[test]
    fn lru_eviction_keeps_recently_used_shared_prefix() {
        let mut t = PrefixTree::new(64);
        // a hot prefix refreshed at every tick, cold one-off suffixes
        let hot = "H".repeat(20);
        for k in 0..50u64 {
            t.insert(&format!("{hot}{k:03}"), 0, k);
            t.insert(&hot, 0, k);
        }
        assert_eq!(t.longest_match(&hot), (Some(0), 20));
        assert!(t.instance_chars(0) <= 64);
        check(&t);
    }

    #[test]
    fn unicode_is_matched_by_chars() {
        let mut t = PrefixTree::new(1000);
        t.insert("héllo wörld 你好世界 🦀🦀", 0, 1);
        t.insert("héllo wörld 你好朋友", 1, 2);
        t.insert("héllo", 2, 3);
        check(&t);
        // the split between 世 and 朋 happens on a char boundary (both 3 bytes)
        assert_eq!(t.longest_match("héllo wörld 你好世界"), (Some(0), 16));
        assert_eq!(t.longest_match("héllo wörld 你好朋"), (Some(1), 15));
        assert_eq!(t.longest_match("héllo wörld 你"), (Some(1), 13));
        assert_eq!(t.longest_match("hé"), (Some(2), 2));
        // same first byte, different char: é (C3 A9) vs è (C3 A8)
        assert_eq!(t.longest_match("hè"), (Some(2), 1));
        assert_eq!(
            t.instance_chars(0),
            "héllo wörld 你好世界 🦀🦀".chars().count()
        );
        // eviction through multi-byte edges keeps valid strings
        t.set_max_chars_per_instance(3);
        t.evict();
        check(&t);
        for (_, s) in t.instances() {
            assert!(s <= 3);
        }
    }

    fn cfg() -> PrefixAffinityConfig {
        PrefixAffinityConfig::default()
    }

    fn tree() -> PrefixTree {
        let mut t = PrefixTree::new(1 << 20);
        t.insert(
            "knowledge about rust: ownership, borrowing. question: a",
            1,
            1,
        );
        t.insert("zzz", 2, 2);
        t
    }

    const Q: &str = "knowledge about rust: ownership, borrowing. question: b";

    #[test]
    fn choose_follows_the_cache_when_balanced() {
        let t = tree();
        let c = choose(&t, Q, &[0, 0, 0], &[true, true, true], &cfg());
        assert_eq!((c.instance, c.reason), (Some(1), PrefixReason::CacheHit));
        assert_eq!(c.matched_instance, Some(1));
        assert_eq!(c.matched_chars, Q.len() - 1);
        assert!(c.match_ratio > 0.95);
        // small load differences do not move it
        let c = choose(&t, Q, &[0, 20, 0], &[true, true, true], &cfg());
        assert_eq!(c.instance, Some(1));
        // the choice is plain data for the decision log
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["reason"], "cache_hit");
        assert_eq!(v["instance"], 1);
    }

    #[test]
    fn choose_each_input_moves_the_choice() {
        let t = tree();
        let all = [true, true, true];
        // imbalance beats the cache: abs and rel both exceeded
        let c = choose(&t, Q, &[40, 60, 5], &all, &cfg());
        assert_eq!((c.instance, c.reason), (Some(2), PrefixReason::Imbalanced));
        assert_eq!((c.min_load, c.max_load), (5, 60));
        // spread within the abs threshold: balanced, the cache wins
        let c = choose(&t, Q, &[30, 60, 30], &all, &cfg());
        assert_eq!((c.instance, c.reason), (Some(1), PrefixReason::CacheHit));
        // a larger abs threshold makes the first case balanced too
        let lax = PrefixAffinityConfig {
            balance_abs_threshold: 100,
            ..cfg()
        };
        assert_eq!(choose(&t, Q, &[40, 60, 5], &all, &lax).instance, Some(1));
        // rel threshold: 100 vs 60 is a 40 spread but within 2x
        let rel2 = PrefixAffinityConfig {
            balance_rel_threshold: 2.0,
            ..cfg()
        };
        assert_eq!(choose(&t, Q, &[60, 100, 60], &all, &rel2).instance, Some(1));
        assert_eq!(
            choose(&t, Q, &[60, 100, 60], &all, &cfg()).instance,
            Some(0)
        );
        // an ineligible matched instance cannot be chosen: a miss, least loaded
        let c = choose(&t, Q, &[3, 0, 1], &[true, false, true], &cfg());
        assert_eq!((c.instance, c.reason), (Some(2), PrefixReason::CacheMiss));
        assert_eq!(c.matched_instance, None);
        // a short match under the threshold: a miss
        let short = "knowledge about python and its garbage collector";
        let c = choose(&t, short, &[1, 0, 0], &all, &cfg());
        assert_eq!(c.matched_instance, Some(1));
        assert!(c.match_ratio < 0.5);
        assert_eq!(c.reason, PrefixReason::CacheMiss);
        // ... followed once the threshold is low enough
        let low = PrefixAffinityConfig {
            cache_threshold: 0.3,
            ..cfg()
        };
        let c = choose(&t, short, &[1, 0, 0], &all, &low);
        assert_eq!((c.instance, c.reason), (Some(1), PrefixReason::CacheHit));
        // miss among equal loads: the least text in the tree (0 holds none)
        let c = choose(&t, "fresh text", &[0, 0, 0], &all, &cfg());
        assert_eq!((c.instance, c.reason), (Some(0), PrefixReason::CacheMiss));
        // ... but load first: 0 is busier, and 2 holds less text than 1
        let c = choose(&t, "fresh text", &[2, 1, 1], &all, &cfg());
        assert_eq!(c.instance, Some(2));
        // nothing eligible, or no instances
        let c = choose(&t, Q, &[0, 0, 0], &[false; 3], &cfg());
        assert_eq!((c.instance, c.reason), (None, PrefixReason::NoInstance));
        assert_eq!(choose(&t, Q, &[], &[], &cfg()).instance, None);
        // eligible entries beyond `loads`, or missing, are ignored
        let c = choose(&t, Q, &[0, 0], &[true], &cfg());
        assert_eq!((c.instance, c.reason), (Some(0), PrefixReason::CacheMiss));
        // empty text: never a hit
        let c = choose(&t, "", &[0, 0, 0], &all, &cfg());
        assert_eq!((c.reason, c.match_ratio), (PrefixReason::CacheMiss, 0.0));
    }

    #[test]
    fn zero_min_load_counts_as_imbalanced_past_abs() {
        let t = tree();
        let all = [true, true, true];
        let c = choose(&t, Q, &[0, 33, 0], &all, &cfg());
        assert_eq!((c.instance, c.reason), (Some(0), PrefixReason::Imbalanced));
        let c = choose(&t, Q, &[0, 32, 0], &all, &cfg());
        assert_eq!(c.instance, Some(1));
    }

    #[test]
    fn config_reads_with_defaults_and_refuses_typos() {
        let c: PrefixAffinityConfig = serde_json::from_str(r#"{"cache_threshold": 0.3}"#).unwrap();
        assert_eq!(c.cache_threshold, 0.3);
        assert_eq!(c.balance_abs_threshold, 32);
        assert_eq!(c.balance_rel_threshold, 1.0001);
        assert!(serde_json::from_str::<PrefixAffinityConfig>(r#"{"cache_treshold": 1}"#).is_err());
    }
}
