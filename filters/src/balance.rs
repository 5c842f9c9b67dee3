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
}

impl BalancePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            BalancePolicy::RoundRobin => "round_robin",
            BalancePolicy::LeastInflight => "least_inflight",
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
}

/// Pick an instance. `ticket` is a per-pool counter that advances on every
/// decision: it drives round robin and breaks least-inflight ties fairly.
pub fn choose(policy: BalancePolicy, candidates: &[Candidate], ticket: u64) -> Option<usize> {
    match policy {
        BalancePolicy::RoundRobin => weighted_round_robin(candidates, ticket),
        BalancePolicy::LeastInflight => least_inflight(candidates, ticket),
    }
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
        }
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
