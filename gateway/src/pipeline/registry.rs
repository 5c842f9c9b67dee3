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

/// A built-in filter: its name, the presets it is part of, and how it is built.
struct BuiltIn {
    name: &'static str,
    /// In the chain of `role = "all"` and `role = "proxy"`.
    in_full: bool,
    /// In the chain of `role = "scheduler"` (the proxy behind lays the knowledge out
    /// and decides the injection).
    in_scheduler: bool,
    build: fn(&Config) -> Result<Arc<dyn RequestFilter>, ChainError>,
}

/// Every built-in filter, once, in the order the presets run them.
const BUILT_IN: &[BuiltIn] = &[
    BuiltIn {
        name: "hop_limit",
        in_full: true,
        in_scheduler: true,
        build: |_| Ok(Arc::new(hop_limit::HopLimit)),
    },
    BuiltIn {
        name: "api_keys",
        in_full: false,
        in_scheduler: false,
        build: |c| Ok(Arc::new(api_keys::ApiKeys::from_config(&c.api_keys)?)),
    },
    BuiltIn {
        name: "rate_limit",
        in_full: false,
        in_scheduler: false,
        build: |c| Ok(Arc::new(rate_limit::RateLimit::new(&c.rate_limit))),
    },
    BuiltIn {
        name: "model_alias",
        in_full: false,
        in_scheduler: false,
        build: |c| Ok(Arc::new(model_alias::ModelAlias::new(&c.model_aliases))),
    },
    BuiltIn {
        name: "extensions",
        in_full: true,
        in_scheduler: true,
        build: |_| Ok(Arc::new(extensions::RequestExtensions)),
    },
    BuiltIn {
        name: "retrieval",
        in_full: true,
        in_scheduler: true,
        build: |_| Ok(Arc::new(retrieval::Retrieval)),
    },
    BuiltIn {
        name: "scheduling",
        in_full: true,
        in_scheduler: true,
        build: |_| Ok(Arc::new(scheduling::Scheduling)),
    },
    BuiltIn {
        name: "layout",
        in_full: true,
        in_scheduler: false,
        build: |_| Ok(Arc::new(layout::KnowledgeLayout)),
    },
    BuiltIn {
        name: "injection",
        in_full: true,
        in_scheduler: false,
        build: |_| Ok(Arc::new(injection::Injection)),
    },
    BuiltIn {
        name: "admission",
        in_full: true,
        in_scheduler: true,
        build: |_| Ok(Arc::new(admission::Admission)),
    },
    BuiltIn {
        name: "learning",
        in_full: true,
        in_scheduler: false,
        build: |_| Ok(Arc::new(learning::Learning)),
    },
    BuiltIn {
        name: "decision_record",
        in_full: true,
        in_scheduler: true,
        build: |_| Ok(Arc::new(decision_record::DecisionRecorder)),
    },
];

/// The built-in filters' names.
pub fn built_in() -> impl Iterator<Item = &'static str> {
    BUILT_IN.iter().map(|b| b.name)
}

/// Why a chain could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(
        "gateway.filters: unknown filter `{0}` (built in: {list})",
        list = built_in().collect::<Vec<_>>().join(", ")
    )]
    Unknown(String),
    #[error("gateway.filters: `{0}` is listed twice")]
    Twice(String),
    #[error(transparent)]
    Keys(#[from] api_keys::KeysError),
}

/// The chain a role stands for.
pub fn preset(role: Role) -> Vec<&'static str> {
    BUILT_IN
        .iter()
        .filter(|b| match role {
            Role::All | Role::Proxy => b.in_full,
            Role::Scheduler => b.in_scheduler,
        })
        .map(|b| b.name)
        .collect()
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
            if n == "extensions" {
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
        let f: Arc<dyn RequestFilter> = match BUILT_IN.iter().find(|b| b.name == name) {
            Some(b) => (b.build)(config)?,
            None => custom
                .iter()
                .find(|f| f.name() == name)
                .cloned()
                .ok_or_else(|| ChainError::Unknown(name.clone()))?,
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

    #[test]
    fn every_built_in_builds_under_its_own_name_and_presets_keep_their_order() {
        let mut c = Config::default();
        c.gateway.filters = built_in().map(String::from).collect();
        let chain = build_chain(&c, &[]).expect("every built-in filter");
        assert_eq!(chain.names(), built_in().collect::<Vec<_>>());
        assert_eq!(
            preset(Role::Scheduler),
            [
                "hop_limit",
                "extensions",
                "retrieval",
                "scheduling",
                "admission",
                "decision_record"
            ]
        );
        assert_eq!(preset(Role::Proxy), preset(Role::All));
        assert!(preset(Role::All).ends_with(&[
            "injection",
            "admission",
            "learning",
            "decision_record"
        ]));
    }
}
