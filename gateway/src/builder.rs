//! The public way to run a gateway from Rust with filters of one's own:
//!
//! ```no_run
//! # use cacheroute_gateway::{Gateway, RequestFilter, Phases};
//! # struct MyFilter;
//! # impl RequestFilter for MyFilter {
//! #     fn name(&self) -> &str { "my_filter" }
//! #     fn phases(&self) -> Phases { Phases::REQUEST }
//! # }
//! Gateway::builder()
//!     .config_file("cacheroute.toml")
//!     .add_filter(MyFilter)
//!     .run()
//!     .unwrap();
//! ```
//!
//! An added filter runs where `[gateway] filters` names it; when the list does not
//! (or there is none), just before the built-in `extensions` filter.

use crate::pipeline::RequestFilter;
use crate::reload::{ConfigSource, Overrides};
use anyhow::{bail, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A CacheRoute gateway; see [`Gateway::builder`].
pub struct Gateway;

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }
}

/// Collects a gateway's configuration source, overrides and added filters.
#[derive(Default)]
pub struct GatewayBuilder {
    file: Option<PathBuf>,
    upstreams: Vec<String>,
    overrides: Overrides,
    filters: Vec<Arc<dyn RequestFilter>>,
}

impl GatewayBuilder {
    /// Serve this TOML configuration (hot-reloaded like the CLI's `--config`).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Drop-in mode: an instance base URL (repeat for more).
    pub fn upstream(mut self, url: impl Into<String>) -> Self {
        self.upstreams.push(url.into());
        self
    }

    /// The service plane's address (over the file's).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.overrides.listen = Some(addr);
        self
    }

    /// The control plane's address (over the file's).
    pub fn control(mut self, addr: SocketAddr) -> Self {
        self.overrides.control = Some(addr);
        self
    }

    /// Add a request filter, under its [`RequestFilter::name`].
    pub fn add_filter(mut self, filter: impl RequestFilter + 'static) -> Self {
        self.filters.push(Arc::new(filter));
        self
    }

    /// Load the configuration and serve until the process is stopped. Blocks the
    /// calling thread (Pingora owns its runtimes); call it outside any runtime.
    pub fn run(self) -> Result<()> {
        let source = match (self.file, self.upstreams.is_empty()) {
            (Some(_), false) => bail!("give a config file or upstreams, not both"),
            (Some(path), true) => ConfigSource::File(path),
            (None, false) => ConfigSource::Upstreams(self.upstreams),
            (None, true) => bail!("give a config file or at least one upstream URL"),
        };
        crate::server::run(source, self.overrides, self.filters)
    }
}
