//! Choosing an instance among those serving a model: plain data in, an index out.

use serde::{Deserialize, Serialize};

/// How an instance is picked among the available ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalancePolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Fewest requests in flight per unit of weight.
    #[default]
    LeastInflight,
    /// Least loaded: the gateway's in-flight and queued counts, or the instance
    /// agent's running and waiting counts when they are higher (other gateways'
    /// traffic), per unit of weight.
    LeastLoaded,
    /// An instance whose store already holds the request's KV, while it is within
    /// the affinity load window of the least loaded one; otherwise least loaded.
    KnowledgeAffinity,
    /// For requests without knowledge: the instance that served the longest shared
    /// prompt prefix (an approximate prefix tree, with load-balance thresholds);
    /// requests with knowledge use knowledge affinity.
    PrefixAffinity,
}

impl BalancePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            BalancePolicy::RoundRobin => "round_robin",
            BalancePolicy::LeastInflight => "least_inflight",
            BalancePolicy::LeastLoaded => "least_loaded",
            BalancePolicy::KnowledgeAffinity => "knowledge_affinity",
            BalancePolicy::PrefixAffinity => "prefix_affinity",
        }
    }
}

/// What the balancer knows of one instance at decision time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub weight: u32,
    pub inflight: u64,
    /// Healthy and not excluded (e.g. already tried by this request).
    pub available: bool,
    /// Preferred by an affinity policy (holds the KV, or served the prefix).
    pub affinity: bool,
}

/// Requests of extra load an affinity instance may carry over the least loaded one
/// and still be preferred.
pub const AFFINITY_LOAD_WINDOW: u64 = 4;

/// Pick an instance. `ticket` is a per-pool counter that advances on every
/// decision: it drives round robin and breaks least-inflight ties fairly.
pub fn choose(policy: BalancePolicy, candidates: &[Candidate], ticket: u64) -> Option<usize> {
    match policy {
        BalancePolicy::RoundRobin => weighted_round_robin(candidates, ticket),
        BalancePolicy::LeastInflight | BalancePolicy::LeastLoaded => {
            least_inflight(candidates, ticket)
        }
        BalancePolicy::KnowledgeAffinity | BalancePolicy::PrefixAffinity => {
            affinity(candidates, ticket)
        }
    }
}

/// The least loaded affinity instance if it is within [`AFFINITY_LOAD_WINDOW`] of the
/// least loaded instance overall; otherwise the least loaded.
fn affinity(candidates: &[Candidate], ticket: u64) -> Option<usize> {
    let best = least_inflight(candidates, ticket)?;
    let floor = candidates[best].inflight;
    let preferred = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.available && c.affinity)
        .min_by_key(|(_, c)| c.inflight)
        .filter(|(_, c)| c.inflight <= floor + AFFINITY_LOAD_WINDOW);
    Some(preferred.map_or(best, |(i, _)| i))
}

fn weighted_round_robin(candidates: &[Candidate], ticket: u64) -> Option<usize> {
    let total: u64 = candidates
        .iter()
        .filter(|c| c.available)
        .map(|c| u64::from(c.weight.max(1)))
        .sum();
    if total == 0 {
        return None;
    }
    let mut slot = ticket % total;
    for (i, c) in candidates.iter().enumerate().filter(|(_, c)| c.available) {
        let w = u64::from(c.weight.max(1));
        if slot < w {
            return Some(i);
        }
        slot -= w;
    }
    None
}

fn least_inflight(candidates: &[Candidate], ticket: u64) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    // Start the scan at a rotating offset so that ties do not always land on
    // the first instance.
    let start = (ticket % n as u64) as usize;
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        let c = &candidates[i];
        if !c.available {
            continue;
        }
        best = match best {
            None => Some(i),
            Some(b) => {
                let cb = &candidates[b];
                // inflight_i / w_i < inflight_b / w_b, without division.
                let lhs = u128::from(c.inflight) * u128::from(cb.weight.max(1));
                let rhs = u128::from(cb.inflight) * u128::from(c.weight.max(1));
                if lhs < rhs {
                    Some(i)
                } else {
                    Some(b)
                }
            }
        };
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(weight: u32, inflight: u64, available: bool) -> Candidate {
        Candidate {
            weight,
            inflight,
            available,
            affinity: false,
        }
    }

    #[test]
    fn affinity_holds_within_the_load_window_only() {
        let mut cands = [c(1, 0, true), c(1, 3, true)];
        cands[1].affinity = true;
        assert_eq!(choose(BalancePolicy::KnowledgeAffinity, &cands, 0), Some(1));
        cands[1].inflight = AFFINITY_LOAD_WINDOW + 1;
        assert_eq!(choose(BalancePolicy::KnowledgeAffinity, &cands, 0), Some(0));
        // An unavailable affinity instance is never chosen.
        cands[1].inflight = 0;
        cands[1].available = false;
        assert_eq!(choose(BalancePolicy::KnowledgeAffinity, &cands, 0), Some(0));
        // No affinity anywhere: least loaded.
        let cands = [c(1, 2, true), c(1, 1, true)];
        assert_eq!(choose(BalancePolicy::KnowledgeAffinity, &cands, 0), Some(1));
    }

    #[test]
    fn round_robin_respects_weights_and_skips_unavailable() {
        let cands = [c(1, 0, true), c(3, 0, true), c(5, 0, false)];
        let mut counts = [0; 3];
        for t in 0..400 {
            counts[choose(BalancePolicy::RoundRobin, &cands, t).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 300, 0]);
    }

    #[test]
    fn least_inflight_prefers_idle_and_weights() {
        let cands = [c(1, 4, true), c(1, 1, true), c(1, 0, false)];
        assert_eq!(choose(BalancePolicy::LeastInflight, &cands, 0), Some(1));
        // Weight 4 with 3 in flight beats weight 1 with 1 in flight.
        let cands = [c(1, 1, true), c(4, 3, true)];
        assert_eq!(choose(BalancePolicy::LeastInflight, &cands, 0), Some(1));
    }

    #[test]
    fn least_inflight_spreads_ties() {
        let cands = [c(1, 0, true), c(1, 0, true)];
        let picks: Vec<_> = (0..4)
            .map(|t| choose(BalancePolicy::LeastInflight, &cands, t).unwrap())
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1));
    }

    #[test]
    fn nothing_available() {
        let cands = [c(1, 0, false)];
        assert_eq!(choose(BalancePolicy::RoundRobin, &cands, 0), None);
        assert_eq!(choose(BalancePolicy::LeastInflight, &cands, 0), None);
        assert_eq!(choose(BalancePolicy::LeastInflight, &[], 0), None);
    }
}
