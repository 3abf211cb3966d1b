//! Training a YouTokenToMe BPE model from texts ([`train_bpe`]), written in YTTM 1.0.6's
//! `bpe.model` text format so that both [`Bpe::load`] and the Python library read it.
//!
//! Semantics follow YTTM's `learn_bpe`:
//! - texts are split into words on YTTM whitespace (ASCII `isspace` and U+2581 `▁`), exactly as
//!   the encoder does; every word starts with `▁`, and merges never cross words;
//! - the alphabet is every non-space character seen; with `coverage < 1` the rarest characters
//!   are dropped (YTTM's rule: drop while the kept share stays above `coverage`) and removed
//!   from the words;
//! - ids: `pad 0`, `unk 1`, `bos 2`, `eos 3` (the last line reads `1 0 2 3`), then `▁` = 4, then
//!   the other characters by decreasing frequency (ties: smaller code point first);
//! - merges: repeatedly merge the most frequent adjacent pair (ties: smallest `(left, right)`)
//!   into the next id, until `vocab_size` ids exist or no pair occurs at least twice. A run of
//!   equal tokens `x x x` counts `(x, x)` once per non-overlapping pair, as YTTM does, and
//!   merging works left to right, as the encoder does.
//!
//! Where this is not YTTM: its tie-breaking between equally frequent pairs and characters follows
//! hash-map order and threads, so a model trained here has the same kind of vocabulary but not
//! necessarily the same ids as one trained by the original on the same text.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use super::bpe::{SPACE_TOKEN, is_yttm_space};
use super::{Bpe, TokenizerError};

/// Ids `0..4` are `pad, unk, bos, eos`.
const N_SPECIAL: usize = 4;
/// The model's last line: `unk_id pad_id bos_id eos_id`.
const SPECIAL_LINE: &str = "1 0 2 3";
/// Largest vocabulary accepted (the encoder keeps ids below 2^31).
const MAX_VOCAB: usize = 1 << 30;

/// Training options beyond the vocabulary size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// Share of the character occurrences the alphabet must cover, in `(0, 1]`; YTTM's
    /// `coverage`, default 1.0 (keep every character).
    pub coverage: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { coverage: 1.0 }
    }
}

/// A trained model: its `bpe.model` text and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainedBpe {
    text: String,
    n_chars: usize,
    n_merges: usize,
    n_dropped_chars: usize,
}

impl TrainedBpe {
    /// The model in YTTM's `bpe.model` format.
    pub fn model_text(&self) -> &str {
        &self.text
    }

    /// Characters in the alphabet (`▁` included).
    pub fn n_chars(&self) -> usize {
        self.n_chars
    }

    /// Merge rules learned.
    pub fn n_merges(&self) -> usize {
        self.n_merges
    }

    /// Distinct characters left out by the `coverage` option.
    pub fn n_dropped_chars(&self) -> usize {
        self.n_dropped_chars
    }

    /// `n_chars + n_merges + 4`: the ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.n_chars + self.n_merges + N_SPECIAL
    }

    /// The model, ready to encode.
    pub fn to_bpe(&self) -> Result<Bpe, TokenizerError> {
        Bpe::from_str_model(&self.text, "trained model")
    }

    /// Writes the model to `path` atomically (a temporary file in the same folder, then a
    /// rename). An existing file is an error unless `overwrite`.
    pub fn save(&self, path: impl AsRef<Path>, overwrite: bool) -> Result<(), TokenizerError> {
        let path = path.as_ref();
        if !overwrite && path.exists() {
            return Err(TokenizerError::Exists(path.to_path_buf()));
        }
        let io = |_: &'static str, source| TokenizerError::Write {
            path: path.to_path_buf(),
            source,
        };
        crate::atomic_file::write_atomically(
            path,
            |w| {
                w.write_all(self.text.as_bytes())
                    .map_err(|e| io("write", e))
            },
            io,
        )
    }
}

fn train_error(message: String) -> TokenizerError {
    TokenizerError::Train(message)
}

/// Trains a BPE model of (at most) `vocab_size` ids on `texts`.
///
/// Fewer ids result when no pair occurs twice any more. Errors: no characters at all, a
/// `vocab_size` below `4 + number of characters`, a `coverage` outside `(0, 1]`.
///
/// ```
/// use rudolph::tokenizer::{TrainOptions, train_bpe};
/// let texts = ["ab ab ab", "abc"];
/// let model = train_bpe(texts.iter().copied(), 10, &TrainOptions::default()).unwrap();
/// // ▁ a b c, then ▁+a, ▁a+b: 4 specials + 4 characters + 2 merges.
/// assert_eq!(model.model_text(), "4 2\n9601 4\n97 5\n98 6\n99 7\n4 5 8\n8 6 9\n1 0 2 3\n");
/// assert_eq!(model.vocab_size(), 10);
/// let bpe = model.to_bpe().unwrap();
/// assert_eq!(bpe.encode("ab abc"), vec![9, 9, 7]);
/// ```
pub fn train_bpe<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    vocab_size: usize,
    options: &TrainOptions,
) -> Result<TrainedBpe, TokenizerError> {
    if !(options.coverage > 0.0 && options.coverage <= 1.0) {
        return Err(train_error(format!(
            "coverage must be in (0, 1], got {}",
            options.coverage
        )));
    }
    if vocab_size > MAX_VOCAB {
        return Err(train_error(format!(
            "vocab size {vocab_size} is too large (at most {MAX_VOCAB})"
        )));
    }

    // Distinct words (without the `▁`) and how often each occurs; all characters, for coverage.
    let mut word_counts: HashMap<&str, u64> = HashMap::new();
    let mut data_len: u64 = 0;
    for text in texts {
        data_len += text.chars().count() as u64;
        for word in text.split(is_yttm_space).filter(|w| !w.is_empty()) {
            *word_counts.entry(word).or_default() += 1;
        }
    }
    let mut char_counts: HashMap<char, u64> = HashMap::new();
    for (word, &n) in &word_counts {
        for c in word.chars() {
            *char_counts.entry(c).or_default() += n;
        }
    }
    if char_counts.is_empty() {
        return Err(train_error(
            "the input holds no text (only whitespace or nothing at all)".to_string(),
        ));
    }

    // Alphabet: rarest first, drop while the rest still covers more than `coverage`.
    let mut by_freq: Vec<(u64, char)> = char_counts.iter().map(|(&c, &n)| (n, c)).collect();
    by_freq.sort_unstable();
    let target = data_len as f64 * options.coverage;
    let mut n_removed_occurrences = 0u64;
    let mut n_dropped = 0;
    while n_dropped < by_freq.len()
        && (data_len - n_removed_occurrences - by_freq[n_dropped].0) as f64 > target
    {
        n_removed_occurrences += by_freq[n_dropped].0;
        n_dropped += 1;
    }
    let mut kept: Vec<(u64, char)> = by_freq[n_dropped..].to_vec();
    // Most frequent first, ties by code point; `▁` (never in a word) comes first of all.
    kept.sort_unstable_by_key(|&(n, c)| (Reverse(n), c));
    let alphabet: Vec<char> = std::iter::once(SPACE_TOKEN)
        .chain(kept.iter().map(|&(_, c)| c))
        .collect();
    let n_chars = alphabet.len();
    if vocab_size < N_SPECIAL + n_chars {
        return Err(train_error(format!(
            "vocab size {vocab_size} is too small: the text has {} distinct characters{}, plus `▁` \
             and 4 special ids, so at least {} ids are needed",
            n_chars - 1,
            if n_dropped > 0 {
                format!(" (after dropping {n_dropped} rare ones for coverage)")
            } else {
                String::new()
            },
            N_SPECIAL + n_chars
        )));
    }
    let char_id: HashMap<char, u32> = alphabet
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, (N_SPECIAL + i) as u32))
        .collect();

    // Words as id sequences `▁ c1 c2 …` (dropped characters removed), merged duplicates.
    let mut word_ids: HashMap<Vec<u32>, u64> = HashMap::new();
    for (word, &n) in &word_counts {
        let ids: Vec<u32> = std::iter::once(N_SPECIAL as u32)
            .chain(word.chars().filter_map(|c| char_id.get(&c).copied()))
            .collect();
        if ids.len() > 1 {
            *word_ids.entry(ids).or_default() += n;
        }
    }
    // Sorted only so that the work order (not the result) is reproducible.
    let mut words: Vec<(Vec<u32>, u64)> = word_ids.into_iter().collect();
    words.sort_unstable();

    let max_merges = vocab_size - N_SPECIAL - n_chars;
    let merges = learn_merges(&mut words, (N_SPECIAL + n_chars) as u32, max_merges);

    let mut model = bpe_from_merges(&alphabet, &merges)?;
    model.n_dropped_chars = n_dropped;
    Ok(model)
}

/// A model from its alphabet (`▁` first; ids from 4 on, in this order) and its merges
/// `(left, right, new id)` in rank order, new ids following the alphabet's: for tokenizers
/// designed rather than learnt (the shapes world's). Errors if `▁` is not first, a character
/// repeats, or a merge uses an id not defined before it.
pub fn bpe_from_merges(
    alphabet: &[char],
    merges: &[(u32, u32, u32)],
) -> Result<TrainedBpe, TokenizerError> {
    let n_chars = alphabet.len();
    if alphabet.first() != Some(&SPACE_TOKEN) {
        return Err(train_error(format!(
            "the alphabet must start with {SPACE_TOKEN}"
        )));
    }
    if alphabet.iter().collect::<HashSet<_>>().len() != n_chars {
        return Err(train_error("the alphabet repeats a character".to_string()));
    }
    for (i, &(x, y, z)) in merges.iter().enumerate() {
        let next = (N_SPECIAL + n_chars + i) as u32;
        if z != next || x < N_SPECIAL as u32 || y < N_SPECIAL as u32 || x >= next || y >= next {
            return Err(train_error(format!(
                "merge {i} ({x}, {y}) → {z}: ids must be defined before use, new ids in order"
            )));
        }
    }
    let mut text = String::with_capacity(16 * (n_chars + merges.len()) + 16);
    let _ = writeln!(text, "{} {}", n_chars, merges.len());
    for (c, id) in alphabet.iter().zip(N_SPECIAL..) {
        let _ = writeln!(text, "{} {id}", *c as u32);
    }
    for (x, y, z) in merges {
        let _ = writeln!(text, "{x} {y} {z}");
    }
    text.push_str(SPECIAL_LINE);
    text.push('\n');
    Ok(TrainedBpe {
        text,
        n_chars,
        n_merges: merges.len(),
        n_dropped_chars: 0,
    })
}

/// The pairs a word contributes to the counts: every adjacent pair, except that in a run of
/// equal tokens `(x, x)` counts once per non-overlapping pair (`x x x` → once).
fn word_pairs(word: &[u32], mut f: impl FnMut((u32, u32))) {
    let mut last_self: Option<usize> = None;
    for i in 0..word.len().saturating_sub(1) {
        let (a, b) = (word[i], word[i + 1]);
        if a == b && i > 0 && last_self == Some(i - 1) {
            last_self = None;
            continue;
        }
        f((a, b));
        if a == b {
            last_self = Some(i);
        }
    }
}

/// Replaces every `(x, y)` in `word`, left to right, by `z`.
fn merge_word(word: &[u32], (x, y): (u32, u32), z: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == x && word[i + 1] == y {
            out.push(z);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    out
}

/// Learns up to `max_merges` rules `(x, y, z)` with `z` from `first_id` on; updates `words`.
///
/// Pair counts are kept incrementally: a merge only revisits the words that hold its pair. The
/// best pair comes from a lazy max-heap of `(count, Reverse(pair))`; an entry whose count is no
/// longer current is skipped (every change pushes a fresh entry).
fn learn_merges(
    words: &mut [(Vec<u32>, u64)],
    first_id: u32,
    max_merges: usize,
) -> Vec<(u32, u32, u32)> {
    let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
    let mut where_: HashMap<(u32, u32), Vec<u32>> = HashMap::new();
    for (w, (word, n)) in words.iter().enumerate() {
        word_pairs(word, |p| {
            *counts.entry(p).or_default() += n;
            let at = where_.entry(p).or_default();
            if at.last() != Some(&(w as u32)) {
                at.push(w as u32);
            }
        });
    }
    let mut heap: BinaryHeap<(u64, Reverse<(u32, u32)>)> =
        counts.iter().map(|(&p, &n)| (n, Reverse(p))).collect();

    let mut merges = Vec::new();
    let mut changed: HashSet<(u32, u32)> = HashSet::new();
    while merges.len() < max_merges {
        let Some((n, Reverse(pair))) = heap.pop() else {
            break;
        };
        if counts.get(&pair).copied().unwrap_or(0) != n {
            continue; // stale
        }
        if n < 2 {
            break;
        }
        let z = first_id + merges.len() as u32;
        merges.push((pair.0, pair.1, z));

        let mut holders = where_.remove(&pair).unwrap_or_default();
        holders.sort_unstable();
        holders.dedup();
        changed.clear();
        for w in holders {
            let (word, n) = &mut words[w as usize];
            let merged = merge_word(word, pair, z);
            if merged.len() == word.len() {
                continue; // the pair left this word in an earlier merge
            }
            word_pairs(word, |p| {
                if let Some(c) = counts.get_mut(&p) {
                    *c -= *n;
                }
                changed.insert(p);
            });
            word_pairs(&merged, |p| {
                *counts.entry(p).or_default() += *n;
                changed.insert(p);
                let at = where_.entry(p).or_default();
                if at.last() != Some(&w) {
                    at.push(w);
                }
            });
            *word = merged;
        }
        for p in &changed {
            match counts.get(p).copied() {
                Some(0) => {
                    counts.remove(p);
                }
                Some(c) => heap.push((c, Reverse(*p))),
                None => {}
            }
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(word: &[u32]) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        word_pairs(word, |p| out.push(p));
        out
    }

    #[test]
    fn runs_count_non_overlapping_pairs() {
        assert_eq!(pairs(&[1, 1, 1]), vec![(1, 1)]);
        assert_eq!(pairs(&[1, 1, 1, 1]), vec![(1, 1), (1, 1)]);
        assert_eq!(pairs(&[2, 1, 1, 3]), vec![(2, 1), (1, 1), (1, 3)]);
        assert_eq!(pairs(&[1, 1, 1, 3]), vec![(1, 1), (1, 3)]);
        assert_eq!(pairs(&[5]), vec![]);
    }

    #[test]
    fn merge_is_left_to_right() {
        assert_eq!(merge_word(&[1, 1, 1], (1, 1), 9), vec![9, 1]);
        assert_eq!(merge_word(&[1, 2, 1, 2], (1, 2), 9), vec![9, 9]);
    }

    #[test]
    fn coverage_drops_rare_characters() {
        let texts = ["aaaa aaaa b"];
        let opts = TrainOptions { coverage: 0.8 };
        let model = train_bpe(texts.iter().copied(), 100, &opts).unwrap();
        assert_eq!(model.n_dropped_chars(), 1);
        assert_eq!(model.n_chars(), 2);
    }

    #[test]
    fn designed_models_are_checked() {
        let abc = [SPACE_TOKEN, 'a', 'b'];
        // ▁+a → 7, then ▁a+b → 8.
        let ok = bpe_from_merges(&abc, &[(4, 5, 7), (7, 6, 8)]).unwrap();
        assert_eq!(ok.to_bpe().unwrap().encode("ab"), vec![8]);
        assert!(
            bpe_from_merges(&['a', SPACE_TOKEN], &[]).is_err(),
            "▁ not first"
        );
        assert!(
            bpe_from_merges(&[SPACE_TOKEN, 'a', 'a'], &[]).is_err(),
            "repeat"
        );
        assert!(bpe_from_merges(&abc, &[(4, 8, 7)]).is_err(), "undefined id");
        assert!(
            bpe_from_merges(&abc, &[(4, 5, 9)]).is_err(),
            "ids out of order"
        );
    }
}
