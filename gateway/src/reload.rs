//! Configuration loading and hot reload: on file change, on SIGHUP and on
//! `POST /admin/reload`. A new configuration is validated and built into a
//! complete `Fleet` before one atomic swap; on any error the old one stays.

use crate::config::{Config, InstanceUrl};
use crate::state::GatewayState;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How long an instance gets to answer `GET /v1/models`.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// Drop-in mode: instance URLs from the command line.
    Upstreams(Vec<String>),
}

/// Command-line settings that win over the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub control: Option<SocketAddr>,
    pub threads: Option<usize>,
    pub log_decisions: Option<String>,
    /// Serve the control plane without a token on a non-loopback address.
    pub insecure: bool,
}

/// Where the peer token comes from when the file gives none (the control plane's and
/// the KDNs' come from `cacheroute_auth`'s variables).
pub const PEER_TOKEN_ENV: &str = "CACHEROUTE_PEER_TOKEN";

impl ConfigSource {
    /// Read, parse and validate the configuration; `Err` says why not.
    pub fn load(&self, overrides: &Overrides) -> Result<(Config, String)> {
        let (mut config, text) = match self {
            ConfigSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                let config = Config::parse(&text)
                    .with_context(|| format!("config file {}", path.display()))?;
                (config, text)
            }
            ConfigSource::Upstreams(urls) => (Config::drop_in(urls)?, String::new()),
        };
        if let Some(a) = overrides.listen {
            config.gateway.listen = a;
        }
        if let Some(a) = overrides.control {
            config.gateway.control = a;
        }
        if let Some(t) = overrides.threads {
            config.gateway.threads = t;
        }
        if let Some(p) = &overrides.log_decisions {
            config.gateway.log_decisions = p.clone();
        }
        let g = &mut config.gateway;
        g.control_token =
            cacheroute_auth::token_or_env(&g.control_token, cacheroute_auth::CONTROL_TOKEN_ENV);
        g.peer_token = cacheroute_auth::token_or_env(&g.peer_token, PEER_TOKEN_ENV);
        let k = &mut config.knowledge;
        k.kdn_token = cacheroute_auth::token_or_env(&k.kdn_token, cacheroute_auth::KDN_TOKEN_ENV);
        Ok((config, text))
    }
}

/// Why a reload was refused; the configuration in force stays. The message is the
/// whole context chain (file, section, key).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration could not be read, parsed or validated.
    #[error("{0:#}")]
    Invalid(anyhow::Error),
    /// A valid configuration whose fleet could not be built (an instance that does
    /// not resolve, a profile that does not fit, a filter that does not build).
    #[error("{0:#}")]
    Build(anyhow::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub version: u64,
    /// Keys that changed in the file but only take effect after a restart.
    pub restart_required: Vec<&'static str>,
}

#[derive(Default)]
struct Memo {
    /// The file text of the last reload attempt, valid or not: the watcher
    /// reloads only when the file differs from it.
    last_text: String,
    last_error: Option<String>,
    discovered: BTreeMap<String, Vec<String>>,
}

pub struct Reloader {
    source: ConfigSource,
    overrides: Overrides,
    state: Arc<GatewayState>,
    memo: Mutex<Memo>,
    /// Listen, control and threads the process started with: only a restart
    /// changes them, so reloads are compared with these, not with the last file.
    running: (std::net::SocketAddr, std::net::SocketAddr, usize),
}

impl Reloader {
    pub fn new(
        source: ConfigSource,
        overrides: Overrides,
        state: Arc<GatewayState>,
        initial_text: String,
        discovered: BTreeMap<String, Vec<String>>,
    ) -> Reloader {
        let running = {
            let g = &state.fleet.load().config.gateway;
            (g.listen, g.control, g.threads)
        };
        Reloader {
            running,
            source,
            overrides,
            state,
            memo: Mutex::new(Memo {
                last_text: initial_text,
                last_error: None,
                discovered,
            }),
        }
    }

    pub async fn last_error(&self) -> Option<String> {
        self.memo.lock().await.last_error.clone()
    }

    /// Reload now. `trigger` says why, for the log.
    pub async fn reload(&self, trigger: &str) -> std::result::Result<ReloadOutcome, ReloadError> {
        let mut memo = self.memo.lock().await;
        let result = self.reload_locked(&mut memo).await;
        let metrics = &self.state.metrics;
        match result {
            Ok(outcome) => {
                metrics.reloads.with_label_values(&["ok"]).inc();
                memo.last_error = None;
                tracing::info!(trigger, version = outcome.version, restart_required = ?outcome.restart_required, "configuration reloaded");
                Ok(outcome)
            }
            Err(e) => {
                let msg = e.to_string();
                metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(trigger, error = %msg, "configuration rejected; the previous one stays in force");
                memo.last_error = Some(msg);
                Err(e)
            }
        }
    }

    async fn reload_locked(
        &self,
        memo: &mut Memo,
    ) -> std::result::Result<ReloadOutcome, ReloadError> {
        let loaded = self.source.load(&self.overrides);
        if let ConfigSource::File(path) = &self.source {
            // Remember what was tried, so an invalid file is reported once.
            memo.last_text = std::fs::read_to_string(path).unwrap_or_default();
        }
        let (config, _) = loaded.map_err(ReloadError::Invalid)?;
        let current = self.state.fleet.load_full();
        let mut restart_required = Vec::new();
        let ((listen, control, threads), new) = (self.running, &config.gateway);
        if listen != new.listen {
            restart_required.push("gateway.listen");
        }
        if control != new.control {
            restart_required.push("gateway.control");
        }
        if threads != new.threads {
            restart_required.push("gateway.threads");
        }
        let discovered = discover_models(&config, &memo.discovered).await;
        let version = current.version + 1;
        let fleet = self
            .state
            .builder
            .build(config, version, &discovered, &self.state.metrics)
            .await
            .map_err(ReloadError::Build)?;
        memo.discovered = discovered;
        if let Err(e) = self
            .state
            .decisions
            .set_sink(&fleet.config.gateway.log_decisions)
        {
            tracing::warn!(error = %e, "decision log unchanged");
        }
        self.state.fleet.store(Arc::new(fleet));
        self.state.metrics.config_version.set(version as i64);
        self.state.publish_health();
        Ok(ReloadOutcome {
            ok: true,
            version,
            restart_required,
        })
    }

    /// Reload when the file changed on disk (polled every second), and keep
    /// discovered model lists fresh (every 5 s).
    pub async fn watch(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
            let fleet = self.state.fleet.load_full();
            if let (ConfigSource::File(path), true) =
                (&self.source, fleet.config.gateway.watch_config)
            {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let changed = text != self.memo.lock().await.last_text;
                if changed {
                    let _ = self.reload("file change").await;
                    continue;
                }
            }
            if n.is_multiple_of(5) && fleet.pools.iter().any(|p| p.discovered) {
                self.refresh_discovery().await;
            }
        }
    }

    /// Re-ask instances for their models; rebuild the fleet (same version)
    /// when the answer changed, e.g. an instance that was down at start.
    async fn refresh_discovery(&self) {
        let mut memo = self.memo.lock().await;
        let current = self.state.fleet.load_full();
        let discovered = discover_models(&current.config, &memo.discovered).await;
        if discovered == memo.discovered {
            return;
        }
        match self
            .state
            .builder
            .build(
                current.config.clone(),
                current.version,
                &discovered,
                &self.state.metrics,
            )
            .await
        {
            Ok(fleet) => {
                tracing::info!(models = ?fleet.models, "discovered models changed");
                memo.discovered = discovered;
                self.state.fleet.store(Arc::new(fleet));
                self.state.publish_health();
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "rebuilding after discovery failed")
            }
        }
    }
}

/// Ask every instance of the pools without a model list for its models.
/// An instance that does not answer keeps the models it reported last
/// (`previous`): an outage or a restart is then a 503 with Retry-After from
/// the health checks, not a `model_not_found` for the models it served.
pub async fn discover_models(
    config: &Config,
    previous: &BTreeMap<String, Vec<String>>,
) -> BTreeMap<String, Vec<String>> {
    let urls: Vec<String> = config
        .pools
        .iter()
        .filter(|p| p.models.is_empty())
        .flat_map(|p| p.instances.iter())
        .filter_map(|i| InstanceUrl::parse(&i.url).ok().map(|u| u.base))
        .collect();
    let mut out = BTreeMap::new();
    if urls.is_empty() {
        return out;
    }
    // A client per pass: discovery is rare, and a client must not outlive
    // the runtime it was made on.
    let Ok(client) = reqwest::Client::builder()
        .timeout(DISCOVERY_TIMEOUT)
        .build()
    else {
        return previous.clone();
    };
    let answers = futures::future::join_all(urls.iter().map(|u| fetch_models(&client, u))).await;
    for (url, models) in urls.into_iter().zip(answers) {
        match models {
            Ok(m) => {
                out.insert(url, m);
            }
            Err(e) => {
                tracing::warn!(instance = %url, error = %format!("{e:#}"), "model discovery failed");
                if let Some(last) = previous.get(&url) {
                    out.insert(url, last.clone());
                }
            }
        }
    }
    out
}

async fn fetch_models(client: &reqwest::Client, base: &str) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
    }
    let list: List = client
        .get(format!("{base}/v1/models"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await
        .context("unexpected /v1/models answer")?;
    Ok(list.data.into_iter().map(|e| e.id).collect())
}
