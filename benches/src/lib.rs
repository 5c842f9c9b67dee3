//! Benchmarks live in benches/; this library holds what they share: a deterministic
//! synthetic knowledge corpus for retrieval quality and scheduler timing.
//!
//! Each block has three *entity* words drawn from a pool shared by all blocks (so
//! every entity word occurs in many blocks and only the combination is specific),
//! each said once or twice, mixed into 30–50 filler words from a large shared
//! vocabulary (skewed so some filler words are very common). Its question names two
//! of the three entities (chosen at random) and adds filler words of its own, so a
//! retriever must rank on the rare combination, through noise.

/// One synthetic block and the question that targets it.
#[derive(Debug, Clone)]
pub struct Block {
    pub id: String,
    pub text: String,
    pub question: String,
}

/// A small deterministic generator (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Skewed towards 0: the smaller of two uniform draws.
    pub fn skewed(&mut self, n: usize) -> usize {
        self.below(n).min(self.below(n))
    }
}

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "va", "zo", "be", "du", "fa", "go", "hi", "ju",
];

/// The `i`-th made-up word of a vocabulary, with a prefix syllable per vocabulary
/// (so entity and filler words never collide). Words end in a vowel: the stemmer
/// leaves them alone.
pub fn word(prefix: &str, mut i: usize) -> String {
    let mut w = String::from(prefix);
    for _ in 0..4 {
        w.push_str(SYLLABLES[i % SYLLABLES.len()]);
        i /= SYLLABLES.len();
    }
    w
}

/// Entity pool size for a corpus of `n` blocks.
fn entity_pool(n: usize) -> usize {
    (n / 2).clamp(200, 20_000)
}

/// `n` blocks with ids `kb-000000`…, deterministic in `seed`.
pub fn corpus(n: usize, seed: u64) -> Vec<Block> {
    let mut rng = Rng::new(seed);
    let entities = entity_pool(n);
    let filler = 5_000;
    (0..n)
        .map(|b| {
            let mut ents: Vec<usize> = Vec::with_capacity(3);
            while ents.len() < 3 {
                let e = rng.below(entities);
                if !ents.contains(&e) {
                    ents.push(e);
                }
            }
            let mut words: Vec<String> = (0..30 + rng.below(21))
                .map(|_| word("xe", rng.skewed(filler)))
                .collect();
            for &e in &ents {
                for _ in 0..1 + rng.below(2) {
                    let at = rng.below(words.len() + 1);
                    words.insert(at, word("qy", e));
                }
            }
            let (a, c) = match rng.below(3) {
                0 => (ents[0], ents[1]),
                1 => (ents[1], ents[2]),
                _ => (ents[0], ents[2]),
            };
            let question = format!(
                "What does the record say about {} and {}, regarding {} {}?",
                word("qy", a),
                word("qy", c),
                word("xe", rng.skewed(filler)),
                word("xe", rng.skewed(filler)),
            );
            Block {
                id: format!("kb-{b:06}"),
                text: words.join(" "),
                question,
            }
        })
        .collect()
}
