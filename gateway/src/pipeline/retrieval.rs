//! `retrieval`: the knowledge a request needs: a trusted scheduler's list, the
//! client's `knowledge_ids` (checked against the catalog), or retrieval over the
//! catalog when RAG is on (BM25, or an embeddings endpoint). Waits only when it
//! has something to resolve.

use super::{Flow, Incoming, Phases, Reply, RequestCtx, RequestFilter, World};
use crate::retrieval;
use async_trait::async_trait;
use cacheroute_decisions::scheduler::KnowledgeRequirement;

pub struct Retrieval;

#[async_trait]
impl RequestFilter for Retrieval {
    fn name(&self) -> &str {
        "retrieval"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, _: &mut Incoming<'_>, _: &dyn World) -> Flow {
        if let Some(u) = &ctx.upstream {
            ctx.requirement = if u.knowledge.is_empty() {
                KnowledgeRequirement::None
            } else {
                KnowledgeRequirement::Explicit {
                    ids: u.knowledge.clone(),
                }
            };
            return Flow::Next;
        }
        if ctx.ext.knowledge_ids.is_some() || rag_on(ctx) {
            Flow::Wait
        } else {
            Flow::Next
        }
    }

    async fn wait_request(
        &self,
        ctx: &mut RequestCtx,
        req: &mut Incoming<'_>,
        world: &dyn World,
    ) -> Result<(), Reply> {
        let fallback;
        let client = match world.gateway() {
            Some(g) => &g.http,
            None => {
                fallback = reqwest::Client::new();
                &fallback
            }
        };
        let catalog = world.catalog();
        let cfg = &ctx.fleet.config;
        ctx.requirement = retrieval::requirement(
            client,
            &cfg.knowledge,
            &cfg.scheduler,
            rag_always(ctx),
            &ctx.ext,
            &catalog,
            req.body,
        )
        .await?;
        Ok(())
    }
}

fn rag_always(ctx: &RequestCtx) -> bool {
    ctx.pool_order
        .iter()
        .any(|&p| ctx.fleet.pools[p].rag_always)
}

/// Whether this request retrieves: its `RAG`, else the configuration's.
fn rag_on(ctx: &RequestCtx) -> bool {
    ctx.ext
        .rag
        .unwrap_or_else(|| ctx.fleet.config.scheduler.rag_always || rag_always(ctx))
}
