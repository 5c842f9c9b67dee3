//! Building the chain from the configuration: `[gateway] filters = [...]` names the
//! filters in order; without it the role's preset is the chain. A name that is
//! neither built in nor added through the library's builder is an error (a reload
//! that names one keeps the previous configuration).

use super::{
    admission, api_keys, decision_record, extensions, hop_limit, injection, layout, learning,
    model_alias, rate_limit, retrieval, scheduling, Chain, RequestFilter,
};
use crate::config::{Config, Role};
use std::sync::Arc;

/// The built-in filters' names.
pub const BUILT_IN: &[&str] = &[
    "hop_limit",
    "api_keys",
    "rate_limit",
    "model_alias",
    "extensions",
    "retrieval",
    "scheduling",
    "layout",
    "injection",
    "admission",
    "learning",
    "decision_record",
];

/// Why a chain could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("gateway.filters: unknown filter `{0}` (built in: {list})", list = BUILT_IN.join(", "))]
    Unknown(String),
    #[error("gateway.filters: `{0}` is listed twice")]
    Twice(String),
    #[error(transparent)]
    Keys(#[from] api_keys::KeysError),
}

/// The chain a role stands for.
pub fn preset(role: Role) -> &'static [&'static str] {
    match role {
        Role::All | Role::Proxy => &[
            "hop_limit",
            "extensions",
            "retrieval",
            "scheduling",
            "layout",
            "injection",
            "admission",
            "learning",
            "decision_record",
        ],
        // The proxy behind lays the knowledge out and decides the injection.
        Role::Scheduler => &[
            "hop_limit",
            "extensions",
            "retrieval",
            "scheduling",
            "admission",
            "decision_record",
        ],
    }
}

/// The chain for `config`. `custom` are filters added through the library's
/// builder: where `filters` names one it goes there; otherwise it runs just
/// before `extensions` (it sees the client's body, before the gateway decides).
pub fn build_chain(
    config: &Config,
    custom: &[Arc<dyn RequestFilter>],
) -> Result<Chain, ChainError> {
    let gw = &config.gateway;
    let named: Vec<String> = if gw.filters.is_empty() {
        let mut v: Vec<String> = Vec::new();
        for n in preset(gw.role) {
            if *n == "extensions" {
                v.extend(custom.iter().map(|f| f.name().to_string()));
            }
            v.push(n.to_string());
        }
        v
    } else {
        gw.filters.clone()
    };
    let mut filters: Vec<Arc<dyn RequestFilter>> = Vec::with_capacity(named.len());
    for (i, name) in named.iter().enumerate() {
        if named[..i].contains(name) {
            return Err(ChainError::Twice(name.clone()));
        }
        let f: Arc<dyn RequestFilter> = match name.as_str() {
            "hop_limit" => Arc::new(hop_limit::HopLimit),
            "api_keys" => Arc::new(api_keys::ApiKeys::from_config(&config.api_keys)?),
            "rate_limit" => Arc::new(rate_limit::RateLimit::new(&config.rate_limit)),
            "model_alias" => Arc::new(model_alias::ModelAlias::new(&config.model_aliases)),
            "extensions" => Arc::new(extensions::RequestExtensions),
            "retrieval" => Arc::new(retrieval::Retrieval),
            "scheduling" => Arc::new(scheduling::Scheduling),
            "layout" => Arc::new(layout::KnowledgeLayout),
            "injection" => Arc::new(injection::Injection),
            "admission" => Arc::new(admission::Admission),
            "learning" => Arc::new(learning::Learning),
            "decision_record" => Arc::new(decision_record::DecisionRecorder),
            other => custom
                .iter()
                .find(|f| f.name() == other)
                .cloned()
                .ok_or_else(|| ChainError::Unknown(other.to_string()))?,
        };
        filters.push(f);
    }
    Ok(Chain::new(filters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_presets_and_names_are_checked() {
        let mut c = Config::default();
        let chain = build_chain(&c, &[]).expect("preset");
        assert_eq!(chain.names(), preset(Role::All));
        c.gateway.role = Role::Scheduler;
        assert!(!build_chain(&c, &[]).expect("preset").contains("injection"));
        c.gateway.filters = vec!["hop_limit".into(), "nope".into()];
        let err = build_chain(&c, &[]).err().expect("unknown name");
        assert!(err.to_string().contains("unknown filter `nope`"), "{err}");
        c.gateway.filters = vec!["hop_limit".into(), "hop_limit".into()];
        assert!(matches!(build_chain(&c, &[]), Err(ChainError::Twice(_))));
    }
}
