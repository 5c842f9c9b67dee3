//! The remote store behind `--kv-store`, opened lazily: one that cannot be reached
//! yet is retried in the background (at most once a second) while lookups miss.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cacheroute_lmcache::store::{open_store, KvStore, StoreError};

/// Least time between two background attempts to open an unreachable store.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Why the remote store could not answer a lookup (its chunks then count as misses).
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the store is not reachable")]
    Unreachable,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Lazily (re)opened store: a store that cannot be reached yet is retried in the
/// background while requests miss.
pub(super) struct StoreSlot {
    pub(super) url: String,
    pub(super) store: RwLock<Option<Arc<dyn KvStore>>>,
    pub(super) connecting: AtomicBool,
    pub(super) last_attempt: Mutex<Option<Instant>>,
    pub(super) timeout: Duration,
}

impl StoreSlot {
    pub(super) fn current(&self) -> Option<Arc<dyn KvStore>> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The store, or None (and a background attempt to open it) when not open yet.
    pub(super) fn get(self: &Arc<Self>) -> Option<Arc<dyn KvStore>> {
        if let Some(s) = self.current() {
            return Some(s);
        }
        self.reconnect_in_background();
        None
    }

    pub(super) async fn open(&self) -> Result<(), RemoteError> {
        // a connection attempt may retry for a while: bound it
        let limit = self.timeout.max(Duration::from_secs(2));
        match tokio::time::timeout(limit, open_store(&self.url)).await {
            Ok(Ok(b)) => {
                *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(b);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RemoteError::Timeout(limit)),
        }
    }

    fn reconnect_in_background(self: &Arc<Self>) {
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RECONNECT_INTERVAL) {
                return;
            }
            if self.connecting.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let slot = self.clone();
        tokio::spawn(async move {
            match slot.open().await {
                Ok(()) => tracing::info!(url = %slot.url, "LMCache store opened"),
                Err(e) => tracing::warn!(url = %slot.url, "LMCache store still unreachable: {e}"),
            }
            slot.connecting.store(false, Ordering::Release);
        });
    }
}
