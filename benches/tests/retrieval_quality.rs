//! Retrieval quality of the in-process BM25 over a generated corpus: each question
//! targets one block; report recall@1 and recall@3 and hold a floor.
//!
//! `cargo test -p cacheroute-benches --test retrieval_quality -- --nocapture`

use cacheroute_benches::corpus;
use cacheroute_decisions::bm25::Bm25Index;

fn recall(n: usize, seed: u64) -> (f64, f64) {
    let blocks = corpus(n, seed);
    let mut ix = Bm25Index::new();
    for b in &blocks {
        ix.insert(&b.id, &b.text);
    }
    let (mut at1, mut at3) = (0usize, 0usize);
    for b in &blocks {
        let hits = ix.search(&b.question, 3);
        if hits.first().is_some_and(|h| h.id == b.id) {
            at1 += 1;
        }
        if hits.iter().any(|h| h.id == b.id) {
            at3 += 1;
        }
    }
    (at1 as f64 / n as f64, at3 as f64 / n as f64)
}

#[test]
fn bm25_recall_on_synthetic_corpus() {
    for (n, seed) in [(1_000, 7), (2_000, 11)] {
        let (r1, r3) = recall(n, seed);
        println!("bm25 synthetic corpus: blocks={n} seed={seed} recall@1={r1:.4} recall@3={r3:.4}");
        assert!(r3 >= 0.9, "recall@3 {r3} below 0.9 at {n} blocks");
        assert!(r1 >= 0.8, "recall@1 {r1} below 0.8 at {n} blocks");
    }
}

#[test]
fn corpus_is_deterministic() {
    let a = corpus(50, 3);
    let b = corpus(50, 3);
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| x.text == y.text && x.question == y.question));
    assert_ne!(corpus(50, 4)[0].text, a[0].text);
}
