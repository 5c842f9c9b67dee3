//! An in-process BM25 index over short documents (knowledge blocks), with no I/O, so
//! that the KDN's search endpoint and the gateway's retrieval share it.
//!
//! Terms: lowercase alphanumeric runs (Unicode), single letters and English stop words
//! dropped, a light plural stemmer (`-ies` → `-y`, `-ches`/`-shes`/`-xes` → drop `es`,
//! a final `s` dropped on longer words). Scoring: Okapi BM25 with `k1 = 1.2`, `b = 0.75`
//! and the non-negative IDF `ln(1 + (N - df + 0.5) / (df + 0.5))`.
//!
//! Layout, for 100k-block registries: terms are interned to `u32` ids, each term has a
//! posting list `(doc slot, tf)`, each document keeps its length and its `(term, tf)`
//! pairs (for removal). A search walks only the postings of the query's terms,
//! accumulates scores per document and keeps the best `k` in a bounded heap.
//! Removal is lazy (document frequencies are updated at once, postings of removed
//! documents are skipped) and postings are compacted when removed documents
//! outnumber live ones, so a registry resync does not go quadratic.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// BM25 `k1`.
pub const K1: f64 = 1.2;
/// BM25 `b`.
pub const B: f64 = 0.75;

const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "he",
    "her", "his", "i", "if", "in", "into", "is", "it", "its", "me", "my", "of", "on", "or", "our",
    "she", "so", "that", "the", "their", "them", "then", "there", "these", "they", "this", "to",
    "was", "we", "were", "what", "when", "where", "which", "who", "whom", "why", "will", "with",
    "you", "your", "how", "do", "does", "did", "can", "about", "give", "tell",
];

fn stem(word: &str) -> String {
    let n = word.chars().count();
    if n > 4 && word.ends_with("ies") {
        format!("{}y", &word[..word.len() - 3])
    } else if n > 4 && (word.ends_with("ches") || word.ends_with("shes") || word.ends_with("xes")) {
        word[..word.len() - 2].to_string()
    } else if n > 3 && word.ends_with('s') && !["ss", "us", "is"].iter().any(|e| word.ends_with(e))
    {
        word[..word.len() - 1].to_string()
    } else {
        word.to_string()
    }
}

/// What the index holds for a knowledge block: its title, tags and text (the KDN's
/// search and the gateway's retrieval index the same document).
pub fn document_text(title: Option<&str>, tags: &[String], text: &str) -> String {
    format!("{}\n{}\n{}", title.unwrap_or(""), tags.join(" "), text)
}

/// The index terms of `text`, in order (repeats kept).
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .filter(|w| w.chars().count() > 1 || w.chars().all(char::is_numeric))
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .map(|w| stem(&w))
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Doc {
    id: String,
    len: u32,
    /// `(term id, tf)`, one entry per distinct term.
    tf: Vec<(u32, u32)>,
}

/// A BM25 index of documents by id.
#[derive(Debug, Clone, Default)]
pub struct Bm25Index {
    term_ids: HashMap<String, u32>,
    /// Per term id: `(doc slot, tf)`. May hold entries of removed documents (their
    /// slot is `None`) until the next compaction.
    postings: Vec<Vec<(u32, u32)>>,
    /// Per term id: the number of live documents holding it.
    df: Vec<u32>,
    /// Document slots; `None` for a removed document. Slots are not reused before a
    /// compaction, so a stale posting never points at another document.
    docs: Vec<Option<Doc>>,
    /// Removed slots not compacted yet.
    dead: usize,
    slot_of: HashMap<String, u32>,
    total_len: u64,
}

/// Compact once this many removed documents are pending (and they outnumber the live).
const COMPACT_MIN_DEAD: usize = 64;

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub score: f64,
}

/// Heap entry ordered so that the heap's top is the *worst* kept hit.
struct Kept<'a> {
    score: f64,
    id: &'a str,
}

impl Kept<'_> {
    /// `Less` = better (higher score, then smaller id).
    fn rank(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then_with(|| self.id.cmp(other.id))
    }
}

impl PartialEq for Kept<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.rank(other) == Ordering::Equal
    }
}
impl Eq for Kept<'_> {}
impl PartialOrd for Kept<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Kept<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank(other)
    }
}

impl Bm25Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    /// Whether a document with this id is indexed.
    pub fn contains(&self, id: &str) -> bool {
        self.slot_of.contains_key(id)
    }

    /// Add (or replace) a document.
    pub fn insert(&mut self, id: &str, text: &str) {
        self.remove(id);
        let ts = terms(text);
        let mut tf: HashMap<u32, u32> = HashMap::new();
        for t in &ts {
            let next = self.term_ids.len() as u32;
            let tid = *self.term_ids.entry(t.clone()).or_insert(next);
            if tid as usize == self.postings.len() {
                self.postings.push(Vec::new());
                self.df.push(0);
            }
            *tf.entry(tid).or_default() += 1;
        }
        let mut tf: Vec<(u32, u32)> = tf.into_iter().collect();
        tf.sort_unstable();
        self.docs.push(None);
        let slot = (self.docs.len() - 1) as u32;
        for &(tid, f) in &tf {
            self.postings[tid as usize].push((slot, f));
            self.df[tid as usize] += 1;
        }
        self.total_len += ts.len() as u64;
        self.docs[slot as usize] = Some(Doc {
            id: id.to_string(),
            len: ts.len() as u32,
            tf,
        });
        self.slot_of.insert(id.to_string(), slot);
    }

    /// Remove a document; whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(slot) = self.slot_of.remove(id) else {
            return false;
        };
        let Some(doc) = self.docs[slot as usize].take() else {
            return false;
        };
        self.total_len -= u64::from(doc.len);
        for (tid, _) in doc.tf {
            self.df[tid as usize] -= 1;
        }
        self.dead += 1;
        if self.dead >= COMPACT_MIN_DEAD && self.dead > self.slot_of.len() {
            self.compact();
        }
        true
    }

    /// Drop removed documents' postings and renumber the slots. Runs by itself when
    /// removed documents outnumber live ones, so removal stays amortised O(terms).
    pub fn compact(&mut self) {
        if self.dead == 0 {
            return;
        }
        let mut new_slot: Vec<u32> = vec![u32::MAX; self.docs.len()];
        let mut docs = Vec::with_capacity(self.slot_of.len());
        for (old, d) in self.docs.drain(..).enumerate() {
            if let Some(d) = d {
                new_slot[old] = docs.len() as u32;
                self.slot_of.insert(d.id.clone(), docs.len() as u32);
                docs.push(Some(d));
            }
        }
        self.docs = docs;
        for post in &mut self.postings {
            post.retain_mut(|(s, _)| {
                let n = new_slot[*s as usize];
                *s = n;
                n != u32::MAX
            });
        }
        self.dead = 0;
    }

    /// The number of documents holding `term` (an index term, see [`terms`]).
    pub fn doc_freq(&self, term: &str) -> usize {
        self.term_ids
            .get(term)
            .map_or(0, |&t| self.df[t as usize] as usize)
    }

    /// The `k` best documents for `query` with a positive score, best first (ties by id).
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        self.search_min(query, k, 0.0)
    }

    /// The `k` best documents for `query` whose score is positive and at least
    /// `min_score`, best first (ties by id).
    pub fn search_min(&self, query: &str, k: usize, min_score: f64) -> Vec<Hit> {
        if k == 0 || self.is_empty() {
            return Vec::new();
        }
        let mut q: Vec<u32> = terms(query)
            .iter()
            .filter_map(|t| self.term_ids.get(t).copied())
            .collect();
        q.sort_unstable();
        q.dedup();
        if q.is_empty() {
            return Vec::new();
        }
        let n = self.len() as f64;
        let avg = (self.total_len as f64 / n).max(1e-9);
        let mut acc: HashMap<u32, f64> = HashMap::new();
        for &tid in &q {
            let post = &self.postings[tid as usize];
            let df = f64::from(self.df[tid as usize]);
            if df == 0.0 {
                continue;
            }
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(slot, f) in post {
                let Some(doc) = &self.docs[slot as usize] else {
                    continue;
                };
                let f = f64::from(f);
                let norm = 1.0 - B + B * f64::from(doc.len) / avg;
                *acc.entry(slot).or_default() += idf * f * (K1 + 1.0) / (f + K1 * norm);
            }
        }
        let mut heap: BinaryHeap<Kept<'_>> = BinaryHeap::with_capacity(k + 1);
        for (slot, score) in acc {
            if score <= 0.0 || score < min_score {
                continue;
            }
            let Some(doc) = &self.docs[slot as usize] else {
                continue;
            };
            let cand = Kept { score, id: &doc.id };
            if heap.len() < k {
                heap.push(cand);
            } else if let Some(worst) = heap.peek() {
                if cand < *worst {
                    heap.pop();
                    heap.push(cand);
                }
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .map(|h| Hit {
                id: h.id.to_string(),
                score: h.score,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_normalised() {
        assert_eq!(
            terms("The Cities of FRANCE, and Paris's boxes!"),
            vec!["city", "france", "paris", "box"]
        );
        assert_eq!(terms("café Größe"), vec!["café", "größe"]);
        assert!(terms("the of and").is_empty());
    }

    #[test]
    fn ranks_relevant_documents_first() {
        let mut ix = Bm25Index::new();
        ix.insert(
            "eiffel",
            "The Eiffel Tower is a lattice tower in Paris, France.",
        );
        ix.insert(
            "dodgers",
            "The Los Angeles Dodgers are a baseball team in Los Angeles.",
        );
        ix.insert(
            "nba",
            "List of National Basketball Association single-game scoring leaders.",
        );
        let hits = ix.search("Which tower is in Paris?", 3);
        assert_eq!(hits[0].id, "eiffel");
        assert_eq!(hits.len(), 1);
        let hits = ix.search("basketball scoring leader", 5);
        assert_eq!(hits[0].id, "nba");
        assert!(ix.search("", 5).is_empty());
        assert!(ix.search("zebra", 5).is_empty());
        // replace and remove keep the statistics right
        ix.insert("eiffel", "Baseball in Los Angeles");
        assert_eq!(ix.search("tower", 5), vec![]);
        assert!(ix.remove("dodgers"));
        assert!(!ix.remove("dodgers"));
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.search("angeles", 5)[0].id, "eiffel");
        assert!(ix.remove("eiffel") && ix.remove("nba"));
        assert!(ix.is_empty() && ix.total_len == 0);
        assert!(ix.df.iter().all(|&d| d == 0));
        assert_eq!(ix.doc_freq("tower"), 0);
        ix.compact();
        assert!(ix.postings.iter().all(Vec::is_empty) && ix.docs.is_empty());
    }

    /// The inverted index scores exactly like a brute-force BM25 over all documents.
    #[test]
    fn matches_brute_force_scores_and_order() {
        let texts = [
            ("d1", "red apple green apple"),
            ("d2", "green pear"),
            ("d3", "apple pie with red cherry"),
            ("d4", "blue sky"),
            ("d5", "apple"),
            ("d6", "green green green apple"),
        ];
        let mut ix = Bm25Index::new();
        for (id, t) in texts {
            ix.insert(id, t);
        }
        ix.insert("d7", "temporary apple");
        ix.remove("d7"); // a freed slot must not leak into results
        let query = "green apple";
        let n = texts.len() as f64;
        let avg = texts.iter().map(|(_, t)| terms(t).len()).sum::<usize>() as f64 / n;
        let q = ["green", "apple"];
        let mut expect: Vec<(String, f64)> = texts
            .iter()
            .map(|(id, t)| {
                let ts = terms(t);
                let s: f64 = q
                    .iter()
                    .map(|qt| {
                        let f = ts.iter().filter(|x| x == qt).count() as f64;
                        if f == 0.0 {
                            return 0.0;
                        }
                        let df = texts
                            .iter()
                            .filter(|(_, t)| terms(t).iter().any(|x| x == qt))
                            .count() as f64;
                        let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
                        idf * f * (K1 + 1.0) / (f + K1 * (1.0 - B + B * ts.len() as f64 / avg))
                    })
                    .sum();
                (id.to_string(), s)
            })
            .filter(|(_, s)| *s > 0.0)
            .collect();
        expect.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let got = ix.search(query, 10);
        assert_eq!(got.len(), expect.len());
        for (g, e) in got.iter().zip(&expect) {
            assert_eq!(g.id, e.0);
            assert!(
                (g.score - e.1).abs() < 1e-9,
                "{} {} vs {}",
                g.id,
                g.score,
                e.1
            );
        }
        // top-k keeps the best k, min_score drops the weak ones
        let top2 = ix.search(query, 2);
        assert_eq!(top2, got[..2].to_vec());
        let cut = got[1].score;
        let strong = ix.search_min(query, 10, cut);
        assert_eq!(strong, got[..2].to_vec());
        assert!(ix.search(query, 0).is_empty());
    }

    /// Churn far past the compaction threshold: results equal a fresh index's.
    #[test]
    fn churn_compacts_and_keeps_results() {
        let text = |i: usize| format!("topic{} shared words common{}", i % 97, i % 5);
        let mut ix = Bm25Index::new();
        for round in 0..5 {
            for i in 0..300 {
                ix.insert(&format!("d{i}"), &text(i + round));
            }
            for i in (0..300).filter(|i| i % 3 != 0) {
                assert!(ix.remove(&format!("d{i}")));
            }
        }
        let mut fresh = Bm25Index::new();
        for i in (0..300).filter(|i| i % 3 == 0) {
            fresh.insert(&format!("d{i}"), &text(i + 4));
        }
        assert_eq!(ix.len(), fresh.len());
        assert!(
            ix.docs.len() < 2 * 300,
            "compaction ran: {} slots",
            ix.docs.len()
        );
        for q in ["topic5 common2", "shared", "topic96 words"] {
            let (a, b) = (ix.search(q, 10), fresh.search(q, 10));
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.id, y.id);
                assert!((x.score - y.score).abs() < 1e-9);
            }
        }
        ix.compact();
        assert_eq!(ix.docs.len(), ix.len());
        assert_eq!(
            ix.search("topic5 common2", 10),
            fresh.search("topic5 common2", 10)
        );
    }
}
