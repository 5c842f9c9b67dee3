//! Idle keep-alive connections to one instance.
//!
//! Pingora's connection pool watches every idle connection with a task of its
//! own and checks the peer address on reuse: a task spawn, a wake-up and a
//! syscall per request. Requests to an instance come back-to-back, so a plain
//! stack of idle streams does the job: a stream the instance has closed fails
//! on first use, before the request reached it, and the request is retried on
//! a fresh connection (see `forward::exchange`). Streams idle for longer than
//! `max_idle` are dropped unused, below vLLM's (uvicorn's) 5 s keep-alive.

use pingora::protocols::Stream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct IdlePool {
    idle: Mutex<Vec<(Stream, Instant)>>,
    capacity: usize,
    max_idle: Duration,
}

impl IdlePool {
    pub fn new(capacity: usize, max_idle: Duration) -> Self {
        IdlePool {
            idle: Mutex::new(Vec::new()),
            capacity,
            max_idle,
        }
    }

    /// The most recently used idle stream that is still fresh.
    pub fn take(&self) -> Option<Stream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // The oldest are at the bottom: drop those past their time.
        let fresh_from = idle
            .iter()
            .position(|(_, t)| now.duration_since(*t) < self.max_idle);
        match fresh_from {
            Some(0) => {}
            Some(n) => drop(idle.drain(..n)),
            None => idle.clear(),
        }
        idle.pop().map(|(s, _)| s)
    }

    pub fn put(&self, stream: Stream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.capacity {
            idle.push((stream, Instant::now()));
        }
    }

    /// Drop every idle stream (they are found closed).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool")
            .field("idle", &self.len())
            .finish()
    }
}
