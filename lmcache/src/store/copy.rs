//! [`copy_chunks`]: copying chunks between any two stores in order, in pipelined
//! batches, optionally paced to a byte rate.

use std::time::{Duration, Instant};

use super::{Chunk, KvStore, StoreError};

/// How [`copy_chunks_with`] batches and paces a copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Chunks per pipelined read and write. The next batch is read while the
    /// current one is written, so up to two batches are held in memory
    /// (2 × 4 × 80 MiB for Llama-3-70B chunks by default).
    pub batch_chunks: usize,
    /// Pace the copy to at most this many bytes per second (None: as fast as
    /// the stores go). Used to emulate a slower link.
    pub max_bytes_per_sec: Option<u64>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            batch_chunks: 4,
            max_bytes_per_sec: None,
        }
    }
}

/// What a finished copy moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyReport {
    pub chunks: usize,
    /// `kv_bytes` + `metadata` bytes written to the destination.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl CopyReport {
    /// Achieved bytes per second (0 for an empty copy).
    pub fn bytes_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s
        } else {
            0.0
        }
    }
}

/// A copy that stopped part-way. The first `copied_chunks` keys are complete
/// in the destination; no later chunk is visible there.
#[derive(Debug, thiserror::Error)]
#[error(
    "copy stopped after {copied_chunks} of {total_chunks} chunks ({copied_bytes} bytes): {source}"
)]
pub struct CopyError {
    pub copied_chunks: usize,
    pub copied_bytes: u64,
    pub total_chunks: usize,
    #[source]
    pub source: StoreError,
}

/// Copy `keys` from `src` to `dst` in order with default [`CopyOptions`].
pub async fn copy_chunks(
    src: &dyn KvStore,
    dst: &dyn KvStore,
    keys: &[String],
) -> Result<CopyReport, CopyError> {
    copy_chunks_with(src, dst, keys, &CopyOptions::default()).await
}

/// Copy `keys` from `src` to `dst` in order, `kv_bytes` before `metadata` for
/// every chunk, in pipelined batches (reading batch n+1 while writing batch n).
/// Stops at the first chunk missing from `src` or the first store error.
pub async fn copy_chunks_with(
    src: &dyn KvStore,
    dst: &dyn KvStore,
    keys: &[String],
    opts: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let batches: Vec<&[String]> = keys.chunks(opts.batch_chunks.max(1)).collect();
    let mut report = CopyReport::default();
    let fail = |report: &CopyReport, source: StoreError| CopyError {
        copied_chunks: report.chunks,
        copied_bytes: report.bytes,
        total_chunks: keys.len(),
        source,
    };
    let mut prefetched: Option<Result<Vec<Option<Chunk>>, StoreError>> = None;
    for (i, batch) in batches.iter().enumerate() {
        let got = match prefetched.take() {
            Some(r) => r,
            None => src.get_chunks(batch).await,
        };
        let got = got.map_err(|e| fail(&report, e))?;
        // Write the leading complete chunks of the batch, then report the
        // first missing one.
        let mut items = Vec::with_capacity(batch.len());
        let mut missing = None;
        for (key, chunk) in batch.iter().zip(got) {
            match chunk {
                Some(c) => items.push((key.clone(), c)),
                None => {
                    missing = Some(key.clone());
                    break;
                }
            }
        }
        let batch_bytes: u64 = items.iter().map(|(_, c)| c.size()).sum();
        let write = dst.put_chunks(&items);
        match batches.get(i + 1) {
            Some(next) if missing.is_none() => {
                let (w, r) = tokio::join!(write, src.get_chunks(next));
                w.map_err(|e| fail(&report, e))?;
                prefetched = Some(r);
            }
            _ => write.await.map_err(|e| fail(&report, e))?,
        }
        report.chunks += items.len();
        report.bytes += batch_bytes;
        if let Some(key) = missing {
            return Err(fail(&report, StoreError::MissingChunk { key }));
        }
        if let Some(rate) = opts.max_bytes_per_sec.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(report.bytes as f64 / rate as f64);
            let spent = started.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
