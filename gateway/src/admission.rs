//! Per-instance admission: at most `limit` requests in flight, the rest wait in a
//! bounded FIFO queue with a deadline. The engine batches whatever is admitted; the
//! gateway only bounds (it never serialises prefills).
//!
//! A slot is handed directly from a finishing request to the oldest waiter, so the
//! order is kept and no waiter is starved by newcomers. A waiter whose client went
//! away drops its receiver; the hand-over skips it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

#[derive(Debug, Default)]
struct Inner {
    inflight: u64,
    queue: VecDeque<oneshot::Sender<()>>,
}

/// The admission state of one instance (outlives reloads with the instance).
#[derive(Debug, Default)]
pub struct Admission {
    inner: Mutex<Inner>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The waiting queue is full.
    QueueFull,
    /// The wait ran past the queue timeout.
    Timeout,
}

/// A slot held; released on drop (handing it to the next waiter).
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.release();
    }
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn inflight(&self) -> u64 {
        self.lock().inflight
    }

    /// Waiters (some may have given up and not been skipped yet).
    pub fn queued(&self) -> u64 {
        self.lock().queue.iter().filter(|s| !s.is_closed()).count() as u64
    }

    /// Take a slot now if one is free (`limit` 0: unbounded) and nobody waits.
    pub fn try_acquire(self: &Arc<Self>, limit: u64) -> Option<Slot> {
        let mut g = self.lock();
        g.queue.retain(|s| !s.is_closed());
        if (limit == 0 || g.inflight < limit) && g.queue.is_empty() {
            g.inflight += 1;
            return Some(Slot {
                admission: self.clone(),
            });
        }
        None
    }

    /// Take a slot, waiting in FIFO order up to `timeout` behind at most
    /// `queue_size` others.
    pub async fn acquire(
        self: &Arc<Self>,
        limit: u64,
        queue_size: u64,
        timeout: Duration,
    ) -> Result<Slot, Refused> {
        let mut rx = {
            let mut g = self.lock();
            g.queue.retain(|s| !s.is_closed());
            if (limit == 0 || g.inflight < limit) && g.queue.is_empty() {
                g.inflight += 1;
                return Ok(Slot {
                    admission: self.clone(),
                });
            }
            if g.queue.len() as u64 >= queue_size {
                return Err(Refused::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            g.queue.push_back(tx);
            rx
        };
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(())) => Ok(Slot {
                admission: self.clone(),
            }),
            Ok(Err(_)) => Err(Refused::Timeout),
            Err(_) => {
                // A hand-over may have raced the deadline: after `close`, no
                // sender can succeed, and a value already sent is ours.
                rx.close();
                match rx.try_recv() {
                    Ok(()) => Ok(Slot {
                        admission: self.clone(),
                    }),
                    Err(_) => Err(Refused::Timeout),
                }
            }
        }
    }

    /// A held slot ends: give it to the oldest live waiter, or free it.
    fn release(&self) {
        let mut g = self.lock();
        while let Some(tx) = g.queue.pop_front() {
            if tx.send(()).is_ok() {
                // The slot moves to the waiter; inflight is unchanged.
                return;
            }
        }
        g.inflight = g.inflight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_queues_in_order_and_times_out() {
        let a = Arc::new(Admission::default());
        let s1 = a.acquire(1, 2, Duration::from_secs(5)).await.unwrap();
        assert_eq!(a.inflight(), 1);
        // Two waiters fit, a third is refused at once.
        let a2 = a.clone();
        let w1 =
            tokio::spawn(async move { a2.acquire(1, 2, Duration::from_secs(5)).await.map(|_| 1) });
        tokio::task::yield_now().await;
        while a.queued() < 1 {
            tokio::task::yield_now().await;
        }
        let a3 = a.clone();
        let w2 = tokio::spawn(async move {
            let s = a3.acquire(1, 2, Duration::from_secs(5)).await;
            s.map(|_| 2)
        });
        while a.queued() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            a.acquire(1, 2, Duration::from_secs(5)).await.unwrap_err(),
            Refused::QueueFull
        );
        drop(s1);
        assert_eq!(w1.await.unwrap(), Ok(1));
        assert_eq!(w2.await.unwrap(), Ok(2));
        assert_eq!(a.inflight(), 0);
        // A wait past its deadline is refused and leaves nothing behind.
        let held = a.try_acquire(1).unwrap();
        assert_eq!(
            a.acquire(1, 2, Duration::from_millis(10))
                .await
                .unwrap_err(),
            Refused::Timeout
        );
        drop(held);
        assert_eq!((a.inflight(), a.queued()), (0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_waiter_is_skipped() {
        let a = Arc::new(Admission::default());
        let held = a.try_acquire(1).unwrap();
        let a2 = a.clone();
        let gone =
            tokio::spawn(async move { a2.acquire(1, 8, Duration::from_secs(60)).await.is_ok() });
        while a.queued() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(a.queued(), 0);
        drop(held);
        assert_eq!(
            a.inflight(),
            0,
            "the slot is freed, not handed to the dead waiter"
        );
        assert!(a.try_acquire(1).is_some());
    }
}
