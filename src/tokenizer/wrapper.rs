//! ruDALL-E's `YTTMTokenizerWrapper`: fixed-length `[BOS] text [EOS] PAD…` sequences.

use std::path::Path;

use super::{Bpe, TokenizerError};

/// The tokenizer the RuDOLPH pipelines use: a [`Bpe`] plus ruDALL-E's framing.
///
/// The wrapper's special ids are class constants in the original (not read from the model),
/// so they are constants here too.
///
/// ```
/// use rudolph::tokenizer::{Bpe, TextTokenizer};
/// let bpe = Bpe::from_str_model("3 1\n9601 4\n97 5\n98 6\n5 6 7\n1 0 2 3\n", "inline").unwrap();
/// let tok = TextTokenizer::from_bpe(bpe);
/// assert_eq!(tok.encode_text("ab a", 8), vec![2, 4, 7, 4, 5, 3, 0, 0]);
/// assert_eq!(tok.encode_text("ab a", 4), vec![2, 4, 7, 4]); // truncation drops the EOS
/// assert_eq!(tok.decode_text(&[2, 4, 7, 4, 5, 3, 0, 0]).unwrap(), "ab a");
/// ```
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    bpe: Bpe,
}

/// The most characters of a text that [`TextTokenizer::encode_text`] reads.
pub const MAX_TEXT_CHARS: usize = 1 << 16;

/// The first [`MAX_TEXT_CHARS`] characters of `text`.
fn head(text: &str) -> &str {
    match text.char_indices().nth(MAX_TEXT_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

impl TextTokenizer {
    pub const PAD_ID: u32 = 0;
    pub const UNK_ID: u32 = 1;
    pub const BOS_ID: u32 = 2;
    pub const EOS_ID: u32 = 3;
    /// What `decode_text` drops.
    pub const SPECIAL_IDS: [u32; 4] = [Self::EOS_ID, Self::BOS_ID, Self::UNK_ID, Self::PAD_ID];

    /// Loads a YTTM `bpe.model`.
    pub fn load(path: impl AsRef<Path>) -> Result<TextTokenizer, TokenizerError> {
        Bpe::load(path).map(Self::from_bpe)
    }

    pub fn from_bpe(bpe: Bpe) -> TextTokenizer {
        TextTokenizer { bpe }
    }

    /// The underlying YTTM model.
    pub fn bpe(&self) -> &Bpe {
        &self.bpe
    }

    pub fn vocab_size(&self) -> usize {
        self.bpe.vocab_size()
    }

    /// `encode_text(text, len)`: `[BOS] + ids + [EOS]`, right-padded with PAD or cut to `len`
    /// (a long text loses its EOS, as in the original). No lowercasing here.
    ///
    /// Only the first [`MAX_TEXT_CHARS`] characters are read: their tokens already overflow any
    /// model's slots, and the tokenizer's memory grows with the longest word it is given.
    pub fn encode_text(&self, text: &str, len: usize) -> Vec<u32> {
        Self::frame(self.bpe.encode(head(text)), len)
    }

    /// `encode_text(text, len, bpe_dropout=p)`, with [`Bpe::encode_with_dropout`]'s RNG caveat.
    pub fn encode_text_with_dropout<R: rand::Rng + ?Sized>(
        &self,
        text: &str,
        len: usize,
        p: f64,
        rng: &mut R,
    ) -> Result<Vec<u32>, TokenizerError> {
        Ok(Self::frame(
            self.bpe.encode_with_dropout(head(text), p, rng)?,
            len,
        ))
    }

    fn frame(ids: Vec<u32>, len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(len.max(ids.len() + 2));
        out.push(Self::BOS_ID);
        out.extend(ids);
        out.push(Self::EOS_ID);
        out.resize(len, Self::PAD_ID);
        out
    }

    /// The words of `text` (lowercased and stripped as the pipelines do) that have a character
    /// the tokenizer does not know, each once, in order: they encode to the unknown id, which
    /// every such word shares, so the model cannot tell them apart (nor read them).
    ///
    /// ```
    /// use rudolph::tokenizer::{Bpe, TextTokenizer};
    /// let bpe = Bpe::from_str_model("3 1\n9601 4\n97 5\n98 6\n5 6 7\n1 0 2 3\n", "inline").unwrap();
    /// let tok = TextTokenizer::from_bpe(bpe);
    /// assert_eq!(tok.unknown_words("AB cab a"), vec!["cab"]);
    /// ```
    pub fn unknown_words(&self, text: &str) -> Vec<String> {
        let unk = self.bpe.special_ids().unk;
        let text = super::lower_strip(text);
        let mut out: Vec<String> = Vec::new();
        for word in Bpe::words(&text) {
            if self.bpe.encode(word).contains(&unk) && !out.iter().any(|w| w == word) {
                out.push(word.to_string());
            }
        }
        out
    }

    /// `decode_text(ids)`: YTTM decode ignoring ids 0–3. An empty list is an error, where the
    /// original fails with `IndexError`.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if ids.is_empty() {
            return Err(TokenizerError::EmptyInput);
        }
        self.bpe.decode(ids, &Self::SPECIAL_IDS)
    }
}
