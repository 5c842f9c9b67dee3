//! The gateway's middle as a chain of request filters.
//!
//! A completion request is read and parsed whole by the service plane, then runs
//! through one [`Chain`] of [`RequestFilter`]s, phase by phase, in the order of its
//! life: [`RequestFilter::on_request`] once after the body is parsed,
//! [`RequestFilter::on_attempt`] once per upstream attempt (an instance chosen),
//! [`RequestFilter::on_response`] on the upstream's response header, and
//! [`RequestFilter::on_done`] when the request is over. One [`RequestCtx`] per
//! request carries what earlier filters decided to later ones.
//!
//! Phases are synchronous; a filter that has to wait (retrieval over an
//! embeddings endpoint, a queue slot, a KV injection) returns [`Flow::Wait`] and
//! its `wait_*` method runs. So a filter with nothing to do for a request costs a
//! call that returns [`Flow::Next`]: no allocation, no await. A chain lists, per
//! phase, only the filters that take part in it ([`RequestFilter::phases`]).
//!
//! What a filter reads of the world (catalog, KDN and agent views) comes through
//! [`World`], which a unit test can fake.

pub mod admission;
pub mod api_keys;
pub mod decision_record;
pub mod extensions;
pub mod hop_limit;
pub mod injection;
pub mod layout;
pub mod learning;
pub mod model_alias;
pub mod rate_limit;
mod registry;
pub mod retrieval;
pub mod scheduling;

pub use registry::build_chain;

use crate::admission::Slot;
use crate::config::Role;
use crate::fleet::{Fleet, Pool, PoolInstance};
use crate::knowledge::{AgentLive, Catalog, KdnLive};
use crate::kv_inject::KvInjections;
use crate::kv_plan::KvPlan;
use crate::state::GatewayState;
use async_trait::async_trait;
use cacheroute_decisions::injection::InjectionDecision;
use cacheroute_decisions::openai::{ApiError, CompletionBody, Route};
use cacheroute_decisions::scheduler::{
    Extensions, InjectionPreference, KnowledgeRequirement, PoolView, SchedulingDecision,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession as Session;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a phase tells the chain.
pub enum Flow {
    /// Done here; the next filter runs.
    Next,
    /// This filter has to wait: its `wait_*` method for the phase runs now.
    Wait,
    /// Answer the client with this error; the rest of the chain does not run.
    Reply(Reply),
}

/// An error answer: OpenAI error JSON, with `Retry-After` when it says when to retry.
#[derive(Debug, Clone)]
pub struct Reply {
    pub error: ApiError,
    pub retry_after: Option<u64>,
}

impl From<ApiError> for Reply {
    fn from(error: ApiError) -> Self {
        Reply {
            error,
            retry_after: None,
        }
    }
}

/// Why an attempt stopped.
pub enum Stop {
    /// Answer the client with this error.
    Reply(Reply),
    /// The client went away while the attempt was held.
    Gone(Box<pingora::Error>),
}

impl From<Reply> for Stop {
    fn from(r: Reply) -> Self {
        Stop::Reply(r)
    }
}

/// The phases a filter takes part in (a bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phases(u8);

impl Phases {
    pub const REQUEST: Phases = Phases(1);
    pub const ATTEMPT: Phases = Phases(2);
    pub const RESPONSE: Phases = Phases(4);
    pub const DONE: Phases = Phases(8);

    pub const fn with(self, other: Phases) -> Phases {
        Phases(self.0 | other.0)
    }

    pub const fn has(self, other: Phases) -> bool {
        self.0 & other.0 == other.0
    }
}

/// What filters read of the world beyond the request: the knowledge catalog, the
/// KDNs' and agents' live views, the gateway's injections. [`GatewayState`]
/// implements it; a unit test fakes it.
pub trait World: Send + Sync {
    fn catalog(&self) -> Arc<Catalog>;
    fn kdns(&self) -> Arc<Vec<KdnLive>>;
    /// Instance base URL → its agent.
    fn agents(&self) -> Arc<HashMap<String, AgentLive>>;
    fn injections(&self) -> &KvInjections;
    /// The running gateway, for the built-in filters that act on it (start an
    /// injection, count metrics); `None` in a unit test's fake world.
    fn gateway(&self) -> Option<&GatewayState> {
        None
    }
}

impl World for GatewayState {
    fn catalog(&self) -> Arc<Catalog> {
        self.knowledge.catalog.load_full()
    }

    fn kdns(&self) -> Arc<Vec<KdnLive>> {
        self.knowledge.kdns.load_full()
    }

    fn agents(&self) -> Arc<HashMap<String, AgentLive>> {
        self.knowledge.agents.load_full()
    }

    fn injections(&self) -> &KvInjections {
        &self.injections
    }

    fn gateway(&self) -> Option<&GatewayState> {
        Some(self)
    }
}

/// The client's request as the request phase sees it.
pub struct Incoming<'a> {
    pub header: &'a RequestHeader,
    /// The parsed body; a filter that changes it sets [`RequestCtx::rewritten`].
    pub body: &'a mut CompletionBody,
}

impl Incoming<'_> {
    /// A request header's value, when it is text.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A scheduler gateway's decision, as a proxy behind it receives it.
#[derive(Debug, Clone)]
pub struct UpstreamDecision {
    pub pool: Option<String>,
    pub kdn: Option<String>,
    pub knowledge: Vec<String>,
    pub injection: InjectionPreference,
}

/// What the filters decided for one completion request, read by the later ones.
pub struct RequestCtx {
    pub start: Instant,
    pub route: Route,
    /// The route's label in logs and metrics (a pass-through route's own).
    pub route_label: &'static str,
    /// The fleet the request started with; it keeps it through reloads.
    pub fleet: Arc<Fleet>,
    pub role: Role,
    /// Gateway hops before this one.
    pub hops: u32,
    /// The model asked for (after any alias).
    pub model: String,
    /// The body must be serialised again (a filter changed it).
    pub rewritten: bool,
    /// The client's extensions (`RAG`, `knowledge_ids`, `injection`).
    pub ext: Extensions,
    /// A trusted scheduler's decision in front of this gateway.
    pub upstream: Option<UpstreamDecision>,
    pub requirement: KnowledgeRequirement,
    /// Pools to try, the chosen one first.
    pub pool_order: Vec<usize>,
    /// The scheduler's views of the pools it weighed (resident knowledge).
    pub pool_views: Vec<PoolView>,
    pub decision: Option<Arc<SchedulingDecision>>,
    /// Required knowledge ids, the leading (prefix) block first.
    pub ids: Vec<String>,
    /// Headers added to every upstream request.
    pub request_headers: Vec<(&'static str, String)>,
    /// The leading block's registered prefix leads the prompt (KV can serve it).
    pub leading_applied: bool,
    /// Tokens and bytes of the leading block's registered prefix.
    pub knowledge_tokens: u64,
    pub knowledge_bytes: usize,
    /// Estimated tokens of the rest of the prompt (set once the body is final).
    pub prompt_tokens: u64,
    /// The tenant an API key named.
    pub tenant: Option<Arc<str>>,
    /// What happened on the way (fallbacks), for the decision record.
    pub notes: Vec<String>,
    /// Decision id (set once the request phase passed).
    pub id: u64,
    /// The parsed body, kept when KV-mode requests carry `kv_transfer_params`.
    pub parsed: Option<CompletionBody>,
    /// The prompt's text, for pickers that ask for it.
    pub prompt_text: Option<String>,
    /// The injection decision of the attempt that answered.
    pub injection: Option<InjectionDecision>,
    /// How the KV got there, or why it did not.
    pub kv_note: Option<String>,
    /// The KV side of the attempt that answered (the learning filter reads it).
    pub kv: Option<KvPlan>,
}

impl RequestCtx {
    pub fn new(fleet: Arc<Fleet>, route: Route, model: String, start: Instant) -> RequestCtx {
        let role = fleet.config.gateway.role;
        RequestCtx {
            start,
            route,
            route_label: route.label(),
            fleet,
            role,
            hops: 0,
            model,
            rewritten: false,
            ext: Extensions::default(),
            upstream: None,
            requirement: KnowledgeRequirement::None,
            pool_order: Vec::new(),
            pool_views: Vec::new(),
            decision: None,
            ids: Vec::new(),
            request_headers: Vec::new(),
            leading_applied: false,
            knowledge_tokens: 0,
            knowledge_bytes: 0,
            prompt_tokens: 0,
            tenant: None,
            notes: Vec::new(),
            id: 0,
            parsed: None,
            prompt_text: None,
            injection: None,
            kv_note: None,
            kv: None,
        }
    }
}

/// One upstream attempt: the instance chosen, and what the attempt's filters
/// decided for it.
pub struct Attempt<'f> {
    pub pool: &'f Pool,
    /// The instance's index in `pool`.
    pub index: usize,
    pub inst: &'f PoolInstance,
    /// The KV side of this attempt (the injection filter's decision).
    pub kv: Option<KvPlan>,
    /// The admission slot held for this attempt.
    pub slot: Option<Slot>,
    /// The attempt already holds its slot (admission skips it).
    pub admitted: bool,
}

/// The client's connection while an attempt is held: a filter that waits gives up
/// when the client goes away.
pub struct Client<'a>(pub(crate) &'a mut Session);

impl Client<'_> {
    /// Await `fut`, or fail when the client closes its connection first.
    pub async fn or_gone<F: std::future::Future>(
        &mut self,
        fut: F,
        what: &'static str,
    ) -> Result<F::Output, Box<pingora::Error>> {
        tokio::select! {
            r = fut => Ok(r),
            gone = self.0.read_body_or_idle(true) => Err(match gone {
                Err(e) => e,
                Ok(_) => pingora::Error::explain(pingora::ErrorType::ConnectionClosed, what),
            }),
        }
    }
}

/// How the request ended, for the done phase.
pub struct Done<'a> {
    pub status: u16,
    /// The instance (or downstream gateway) that answered.
    pub instance: Option<&'a str>,
    pub ttft: Option<Duration>,
    /// The upstream exchange completed (the answer streamed to its end).
    pub exchanged: bool,
}

/// A request filter. Every phase has a default that does nothing; a filter
/// implements the phases it needs and lists them in [`RequestFilter::phases`].
#[async_trait]
pub trait RequestFilter: Send + Sync {
    /// The filter's name in `[gateway] filters`.
    fn name(&self) -> &str;

    /// The phases this filter takes part in; the chain calls no others.
    fn phases(&self) -> Phases;

    /// After the body is parsed, once per request, in chain order. May rewrite the
    /// body (then set `ctx.rewritten`), add upstream headers
    /// (`ctx.request_headers`), decide knowledge and pools, or answer with an
    /// OpenAI error ([`Flow::Reply`]).
    fn on_request(
        &self,
        _ctx: &mut RequestCtx,
        _req: &mut Incoming<'_>,
        _world: &dyn World,
    ) -> Flow {
        Flow::Next
    }

    /// Runs after `on_request` returned [`Flow::Wait`]: the same phase, allowed to
    /// wait (e.g. for an embeddings endpoint).
    async fn wait_request(
        &self,
        _ctx: &mut RequestCtx,
        _req: &mut Incoming<'_>,
        _world: &dyn World,
    ) -> Result<(), Reply> {
        Ok(())
    }

    /// Per upstream attempt, the instance chosen, before the request is sent. May
    /// decide the attempt's injection, take a slot, or answer with an error.
    fn on_attempt(&self, _ctx: &mut RequestCtx, _at: &mut Attempt<'_>, _world: &dyn World) -> Flow {
        Flow::Next
    }

    /// Runs after `on_attempt` returned [`Flow::Wait`]: holds the attempt (a queue
    /// slot, KV on its way) and gives up when the client goes away.
    async fn wait_attempt(
        &self,
        _ctx: &mut RequestCtx,
        _at: &mut Attempt<'_>,
        _client: &mut Client<'_>,
        _world: &dyn World,
    ) -> Result<(), Stop> {
        Ok(())
    }

    /// On the upstream's response header, before it goes to the client: may add or
    /// change headers.
    fn on_response(&self, _ctx: &RequestCtx, _resp: &mut ResponseHeader) {}

    /// When the request is over, answered or not: logging, learning.
    fn on_done(&self, _ctx: &mut RequestCtx, _done: &Done<'_>, _world: &dyn World) {}
}

/// An ordered list of filters, with each phase's participants listed once.
pub struct Chain {
    filters: Vec<Arc<dyn RequestFilter>>,
    request: Vec<usize>,
    attempt: Vec<usize>,
    response: Vec<usize>,
    done: Vec<usize>,
}

impl Chain {
    pub fn new(filters: Vec<Arc<dyn RequestFilter>>) -> Chain {
        let of = |p: Phases| -> Vec<usize> {
            (0..filters.len())
                .filter(|&i| filters[i].phases().has(p))
                .collect()
        };
        Chain {
            request: of(Phases::REQUEST),
            attempt: of(Phases::ATTEMPT),
            response: of(Phases::RESPONSE),
            done: of(Phases::DONE),
            filters,
        }
    }

    /// The filters' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    #[cfg(test)]
    pub fn contains(&self, name: &str) -> bool {
        self.filters.iter().any(|f| f.name() == name)
    }

    pub async fn request(
        &self,
        ctx: &mut RequestCtx,
        req: &mut Incoming<'_>,
        world: &dyn World,
    ) -> Result<(), Reply> {
        for &i in &self.request {
            let f = &self.filters[i];
            match f.on_request(ctx, req, world) {
                Flow::Next => {}
                Flow::Reply(r) => return Err(r),
                Flow::Wait => f.wait_request(ctx, req, world).await?,
            }
        }
        Ok(())
    }

    pub async fn attempt(
        &self,
        ctx: &mut RequestCtx,
        at: &mut Attempt<'_>,
        client: &mut Client<'_>,
        world: &dyn World,
    ) -> Result<(), Stop> {
        for &i in &self.attempt {
            let f = &self.filters[i];
            match f.on_attempt(ctx, at, world) {
                Flow::Next => {}
                Flow::Reply(r) => return Err(Stop::Reply(r)),
                Flow::Wait => f.wait_attempt(ctx, at, client, world).await?,
            }
        }
        Ok(())
    }

    pub fn response(&self, ctx: &RequestCtx, resp: &mut ResponseHeader) {
        for &i in &self.response {
            self.filters[i].on_response(ctx, resp);
        }
    }

    pub fn done(&self, ctx: &mut RequestCtx, done: &Done<'_>, world: &dyn World) {
        for &i in &self.done {
            self.filters[i].on_done(ctx, done, world);
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A world with nothing in it, for the filters' unit tests.

    use super::*;

    #[derive(Default)]
    pub struct FakeWorld {
        pub catalog: Arc<Catalog>,
        pub kdns: Arc<Vec<KdnLive>>,
        pub agents: Arc<HashMap<String, AgentLive>>,
        pub injections: KvInjections,
    }

    impl World for FakeWorld {
        fn catalog(&self) -> Arc<Catalog> {
            self.catalog.clone()
        }
        fn kdns(&self) -> Arc<Vec<KdnLive>> {
            self.kdns.clone()
        }
        fn agents(&self) -> Arc<HashMap<String, AgentLive>> {
            self.agents.clone()
        }
        fn injections(&self) -> &KvInjections {
            &self.injections
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A request context over a one-pool fleet serving model `m`, for unit tests.

    use super::*;
    use crate::config::Config;
    use crate::fleet::FleetBuilder;
    use crate::metrics::Metrics;

    /// One pool `p` serving model `m` on one (unreachable) instance.
    pub const CONFIG: &str = r#"
[[pools]]
name = "p"
models = ["m"]
instances = [{ url = "http://127.0.0.1:9" }]
"#;

    /// A fleet built from TOML by `builder`.
    pub async fn fleet_from(builder: &FleetBuilder, toml_text: &str) -> Fleet {
        let config: Config = toml::from_str(toml_text).expect("test config");
        builder
            .build(config, 1, &Default::default(), &Metrics::new())
            .await
            .expect("test fleet")
    }

    /// A context and a parsed chat body (`body`, or a plain one for model `m`).
    pub async fn ctx_with(body: &str) -> (RequestCtx, CompletionBody) {
        let config: Config = toml::from_str(CONFIG).expect("test config");
        let fleet = fleet_from(&FleetBuilder::new(&config.upstream), CONFIG).await;
        let json = if body.is_empty() {
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
        } else {
            body
        };
        let body = CompletionBody::parse(Route::Chat, json.as_bytes()).expect("test body");
        let ctx = RequestCtx::new(
            Arc::new(fleet),
            Route::Chat,
            body.model().to_string(),
            Instant::now(),
        );
        (ctx, body)
    }

    /// A request header with these fields.
    pub fn request(fields: &[(&'static str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", b"/v1/chat/completions", None).expect("header");
        for (k, v) in fields {
            h.insert_header(*k, *v).expect("header field");
        }
        h
    }
}
