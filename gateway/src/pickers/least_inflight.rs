//! `least_inflight` (the default): fewest of the gateway's own requests in flight or
//! queued per unit of weight.

use super::{choose_balanced, Load, PickInput, Picker, Ticket};
use crate::fleet::Pool;
use cacheroute_decisions::balance::BalancePolicy;

#[derive(Default)]
pub struct LeastInflight {
    ticket: Ticket,
}

impl Picker for LeastInflight {
    fn name(&self) -> &'static str {
        BalancePolicy::LeastInflight.as_str()
    }

    fn pick(&self, pool: &Pool, input: &PickInput<'_>) -> Option<usize> {
        let t = self.ticket.next();
        choose_balanced(
            pool,
            input,
            BalancePolicy::LeastInflight,
            Load::Own,
            false,
            t,
        )
    }
}
