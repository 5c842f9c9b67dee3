//! `layout`: puts the knowledge first in the prompt, exactly as the KDN registered
//! its prefix (same template, same tokens) so that LMCache's prefix chunks match:
//! the block whose KV is cheapest to have leads, the others follow as text.

use super::{Flow, Incoming, Phases, RequestCtx, RequestFilter, World};
use crate::knowledge::Catalog;
use cacheroute_decisions::layout::{self, Applied};
use cacheroute_decisions::prompt;
use std::collections::BTreeSet;

pub struct KnowledgeLayout;

impl RequestFilter for KnowledgeLayout {
    fn name(&self) -> &str {
        "layout"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, req: &mut Incoming<'_>, world: &dyn World) -> Flow {
        if ctx.ids.is_empty() {
            return Flow::Next;
        }
        let catalog = world.catalog();
        let chosen = ctx.decision.as_ref().and_then(|d| d.pool.as_deref());
        let resident = chosen
            .and_then(|n| ctx.pool_views.iter().find(|v| v.name == n))
            .map(|v| &v.resident);
        let kdn = ctx.decision.as_ref().and_then(|d| d.kdn.as_deref());
        lead_with_cheapest(&mut ctx.ids, &catalog, &ctx.model, resident, kdn);
        let (leading, rest) = knowledge_texts(&catalog, &ctx.ids, &ctx.model, &mut ctx.notes);
        let rest_refs: Vec<&str> = rest.iter().map(String::as_str).collect();
        let template = ctx.fleet.config.proxy.template_of(&ctx.model);
        match layout::apply_knowledge(req.body, template, &leading.content, &rest_refs) {
            Applied::Prefix => {
                ctx.knowledge_tokens = leading.tokens;
                ctx.knowledge_bytes = leading.content.len();
                ctx.leading_applied = leading.registered;
            }
            Applied::Nothing => {}
            Applied::TokenPrompt => ctx
                .notes
                .push("token-id prompt: knowledge not added".to_string()),
        }
        ctx.rewritten = true;
        Flow::Next
    }
}

/// The leading block's registered content for the model (or its bare layout when it
/// was not registered for the model).
struct Leading {
    content: String,
    tokens: u64,
    /// `content` is the registered prefix for the model (not a bare fallback).
    registered: bool,
}

/// Put first the block whose KV is cheapest to have: resident in the chosen pool's
/// stores (as its pool view found them), then held by the chosen KDN; the order is
/// otherwise kept.
fn lead_with_cheapest(
    ids: &mut [String],
    catalog: &Catalog,
    model: &str,
    resident_in_pool: Option<&BTreeSet<String>>,
    kdn: Option<&str>,
) {
    let rank = |id: &String| -> u8 {
        let Some(b) = catalog.blocks.get(id) else {
            return 3;
        };
        if resident_in_pool.is_some_and(|r| r.contains(id)) {
            return 0;
        }
        match kdn {
            Some(k) if b.kv_ready_on(k, model) => 1,
            _ => 2,
        }
    };
    if let Some(best) = (0..ids.len()).min_by_key(|&i| (rank(&ids[i]), i)) {
        ids[..=best].rotate_right(1);
    }
}

/// The leading block's content and the other blocks' texts.
fn knowledge_texts(
    catalog: &Catalog,
    ids: &[String],
    model: &str,
    notes: &mut Vec<String>,
) -> (Leading, Vec<String>) {
    let mut leading = Leading {
        content: String::new(),
        tokens: 0,
        registered: false,
    };
    let mut rest = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let Some(block) = catalog.blocks.get(id) else {
            notes.push(format!(
                "knowledge {id} is not in this gateway's catalog; left out"
            ));
            continue;
        };
        if i == 0 || leading.content.is_empty() {
            match block.model(model) {
                Some(m) if !m.content.is_empty() => {
                    leading.content = m.content.clone();
                    leading.tokens = m.tokens;
                    leading.registered = true;
                }
                _ => {
                    leading.content = prompt::knowledge_message_content(&block.block.text, 0);
                    notes.push(format!(
                        "knowledge {id} has no prefix for model {model}: bare text"
                    ));
                }
            }
        } else {
            rest.push(block.block.text.clone());
        }
    }
    (leading, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knowledge::{BlockModel, KdnSnapshot, SnapshotBlock};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn block(id: &str, status: &str) -> Arc<SnapshotBlock> {
        Arc::new(SnapshotBlock {
            id: id.into(),
            title: None,
            tags: vec![],
            text: format!("text of {id}"),
            models: BTreeMap::from([(
                "m".to_string(),
                BlockModel {
                    status: status.into(),
                    template: "llama3".into(),
                    tokens: 256,
                    chunks: 1,
                    chunk_size: 256,
                    bytes: 0,
                    content: String::new(),
                    resident: vec![],
                },
            )]),
            digest: None,
            text_bytes: 0,
        })
    }

    #[test]
    fn the_cheapest_block_leads_the_rest_keep_their_order() {
        let snap = KdnSnapshot {
            kdn_id: "k".into(),
            version: "1".into(),
            blocks: vec![
                block("a", "registered"),
                block("b", "kv_ready"),
                block("c", "kv_ready"),
            ],
        };
        let catalog = Catalog::build(&[&snap], &Catalog::default());
        let ids = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        // Nothing resident, no KDN: the client's order.
        let mut v = ids();
        lead_with_cheapest(&mut v, &catalog, "m", None, None);
        assert_eq!(v, ["a", "b", "c"]);
        // The KDN holds b and c: b (the first of them) leads.
        let mut v = ids();
        lead_with_cheapest(&mut v, &catalog, "m", None, Some("k"));
        assert_eq!(v, ["b", "a", "c"]);
        // c is already in the pool's stores: it leads, even over a KDN's block.
        let resident = BTreeSet::from(["c".to_string()]);
        let mut v = ids();
        lead_with_cheapest(&mut v, &catalog, "m", Some(&resident), Some("k"));
        assert_eq!(v, ["c", "a", "b"]);
    }
}
