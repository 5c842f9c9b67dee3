//! `knowledge_affinity`: an instance whose store already holds the request's leading
//! knowledge, while it is within the affinity load window of the least loaded one.

use super::{choose_balanced, Load, PickInput, Picker, Ticket};
use crate::fleet::Pool;
use cacheroute_decisions::balance::BalancePolicy;

#[derive(Default)]
pub struct KnowledgeAffinity {
    ticket: Ticket,
}

impl Picker for KnowledgeAffinity {
    fn name(&self) -> &'static str {
        BalancePolicy::KnowledgeAffinity.as_str()
    }

    fn pick(&self, pool: &Pool, input: &PickInput<'_>) -> Option<usize> {
        let t = self.ticket.next();
        choose_balanced(
            pool,
            input,
            BalancePolicy::KnowledgeAffinity,
            Load::WithAgent,
            true,
            t,
        )
    }
}
