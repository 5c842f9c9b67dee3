//! `round_robin`: weighted round robin over the available instances.

use super::{choose_balanced, Load, PickInput, Picker, Ticket};
use crate::fleet::Pool;
use cacheroute_decisions::balance::BalancePolicy;

#[derive(Default)]
pub struct RoundRobin {
    ticket: Ticket,
}

impl Picker for RoundRobin {
    fn name(&self) -> &'static str {
        BalancePolicy::RoundRobin.as_str()
    }

    fn pick(&self, pool: &Pool, input: &PickInput<'_>) -> Option<usize> {
        let t = self.ticket.next();
        choose_balanced(pool, input, BalancePolicy::RoundRobin, Load::Own, false, t)
    }
}
