//! `[proxy]`: the local step's settings (injection strategy, release policy, admission,
//! cost model).

use cacheroute_decisions::injection::{InjectionStrategy, ReleasePolicy};
use cacheroute_decisions::prompt::ChatTemplate;
use cacheroute_lmcache::tokenizer::TokenizerChoice;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// How knowledge is injected: text, kv, iws (the original's rule) or adaptive.
    pub injection: InjectionStrategy,
    /// KV-mode requests admitted before their KV is resident: ordered, text_bypass, wait.
    pub release: ReleasePolicy,
    /// Longest a KV-mode request waits for its KV once it could go; then text.
    pub kv_deadline_ms: u64,
    /// Limit of one injection job the gateway asks a KDN for.
    pub inject_timeout_ms: u64,
    /// GPU profile of the instances: a shipped profile's short name (`h100-llama3-8b`,
    /// `h100x8-llama3-70b-tp8`, `rtx5090x8-llama3-70b`, `h100-llama3-70b-8layers`) or a
    /// JSON file as in conf/profiles/; "" = `h100-llama3-8b`.
    pub profile: String,
    /// Chat template family of the served models; a block registered for another
    /// template goes as text (counted as a prefix mismatch).
    pub template: ChatTemplate,
    /// Per served model name, a template other than `template`.
    pub templates: std::collections::BTreeMap<String, ChatTemplate>,
    /// The models' tokenizer, to check that a rendered prefix has the registered token
    /// count: "auto" (or ""; the default) = the embedded exact Llama-3 tokenizer for
    /// models whose name looks like Llama-3 and the approximation for others, as the
    /// KDN and sim do by default; "approx"; or the path of a tokenizer.json.
    pub tokenizer: TokenizerChoice,
    /// Also send the KV handle in the body as `kv_transfer_params`.
    pub kv_transfer_params: bool,
    /// Round-trip time of a KDN → instance link, ms (for the predictions).
    pub link_rtt_ms: f64,
    /// Bandwidth from an instance's LMCache store to its GPU host, Gbit/s, paid by every
    /// KV load from a remote store (`sim --kv-store-gbps`); 0: local or not counted.
    pub store_gbps: f64,
    /// The engines' LMCache loads remote-store hits asynchronously (LMCache's
    /// `enable_async_loading`, `sim --lmcache-async-loading`): a request waits for its
    /// store link off the GPU, so the link time is not charged to the step.
    pub store_async_loading: bool,
    /// Adaptive also charges a mode the step time it adds to the requests prefilling
    /// beside it on the instance (off by default; see the README).
    pub weigh_others: bool,
    /// The engines' LMCache stores the KV of prefixes they compute (LMCache's
    /// default): after a text-mode request the knowledge counts as resident there.
    pub engine_stores_prefix: bool,
}

impl ProxySection {
    /// The chat template family of `model`.
    pub fn template_of(&self, model: &str) -> ChatTemplate {
        self.templates.get(model).copied().unwrap_or(self.template)
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            injection: InjectionStrategy::Adaptive,
            release: ReleasePolicy::Ordered,
            kv_deadline_ms: 5_000,
            inject_timeout_ms: 60_000,
            profile: String::new(),
            template: ChatTemplate::Llama3,
            templates: Default::default(),
            tokenizer: TokenizerChoice::Auto,
            kv_transfer_params: false,
            link_rtt_ms: 0.5,
            store_gbps: 0.0,
            store_async_loading: false,
            weigh_others: false,
            engine_stores_prefix: true,
        }
    }
}
