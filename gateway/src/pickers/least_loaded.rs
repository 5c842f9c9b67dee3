//! `least_loaded`: like `least_inflight`, but an instance agent's running + waiting
//! count counts when it is higher (other gateways' traffic on the same engine).

use super::{choose_balanced, Load, PickInput, Picker, Ticket};
use crate::fleet::Pool;
use cacheroute_decisions::balance::BalancePolicy;

#[derive(Default)]
pub struct LeastLoaded {
    ticket: Ticket,
}

impl Picker for LeastLoaded {
    fn name(&self) -> &'static str {
        BalancePolicy::LeastLoaded.as_str()
    }

    fn pick(&self, pool: &Pool, input: &PickInput<'_>) -> Option<usize> {
        let t = self.ticket.next();
        choose_balanced(
            pool,
            input,
            BalancePolicy::LeastLoaded,
            Load::WithAgent,
            false,
            t,
        )
    }
}
