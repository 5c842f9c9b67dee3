//! An in-process BM25 index over short documents (knowledge blocks), with no I/O, so
//! that the KDN's search endpoint and the gateway's retrieval can share it.
//!
//! Terms: lowercase alphanumeric runs (Unicode), single letters and English stop words
//! dropped, a light plural stemmer (`-ies` → `-y`, `-ches`/`-shes`/`-xes` → drop `es`,
//! a final `s` dropped on longer words). Scoring: Okapi BM25 with `k1 = 1.2`, `b = 0.75`
//! and the non-negative IDF `ln(1 + (N - df + 0.5) / (df + 0.5))`.

use std::collections::HashMap;

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
    len: usize,
    tf: HashMap<String, u32>,
}

/// A BM25 index of documents by id.
#[derive(Debug, Clone, Default)]
pub struct Bm25Index {
    docs: HashMap<String, Doc>,
    df: HashMap<String, usize>,
    total_len: usize,
}

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub score: f64,
}

impl Bm25Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Add (or replace) a document.
    pub fn insert(&mut self, id: &str, text: &str) {
        self.remove(id);
        let mut tf: HashMap<String, u32> = HashMap::new();
        let ts = terms(text);
        for t in &ts {
            *tf.entry(t.clone()).or_default() += 1;
        }
        for t in tf.keys() {
            *self.df.entry(t.clone()).or_default() += 1;
        }
        self.total_len += ts.len();
        self.docs.insert(id.to_string(), Doc { len: ts.len(), tf });
    }

    /// Remove a document; whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(doc) = self.docs.remove(id) else {
            return false;
        };
        self.total_len -= doc.len;
        for t in doc.tf.keys() {
            if let Some(n) = self.df.get_mut(t) {
                *n -= 1;
                if *n == 0 {
                    self.df.remove(t);
                }
            }
        }
        true
    }

    fn idf(&self, term: &str) -> f64 {
        let n = self.docs.len() as f64;
        let df = *self.df.get(term).unwrap_or(&0) as f64;
        (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
    }

    /// BM25 score of one document for a query's terms.
    fn score(&self, doc: &Doc, query: &[String], avg_len: f64) -> f64 {
        query
            .iter()
            .map(|t| {
                let f = *doc.tf.get(t).unwrap_or(&0) as f64;
                if f == 0.0 {
                    return 0.0;
                }
                let norm = 1.0 - B + B * doc.len as f64 / avg_len.max(1e-9);
                self.idf(t) * f * (K1 + 1.0) / (f + K1 * norm)
            })
            .sum()
    }

    /// The `k` best documents for `query` with a positive score, best first (ties by id).
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        let mut q = terms(query);
        q.sort();
        q.dedup();
        if q.is_empty() || self.docs.is_empty() || k == 0 {
            return Vec::new();
        }
        let avg = self.total_len as f64 / self.docs.len() as f64;
        let mut hits: Vec<Hit> = self
            .docs
            .iter()
            .map(|(id, d)| Hit {
                id: id.clone(),
                score: self.score(d, &q, avg),
            })
            .filter(|h| h.score > 0.0)
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
        hits.truncate(k);
        hits
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
        assert!(ix.is_empty() && ix.df.is_empty() && ix.total_len == 0);
    }
}
