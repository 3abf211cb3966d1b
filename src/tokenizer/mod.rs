//! The text tokenizer: a port of YouTokenToMe 1.0.6 BPE ([`Bpe`]) that produces the same ids as
//! the original, ruDALL-E's `YTTMTokenizerWrapper` on top of it ([`TextTokenizer`]), and the
//! `text.lower().strip()` preprocessing every pipeline applies ([`lower_strip`]), and a trainer
//! that writes new models in YTTM's format ([`train_bpe`]).

mod bpe;
mod lower;
mod train;
mod unicode_tables;
mod wrapper;

use std::path::PathBuf;

pub use bpe::{Bpe, SpecialIds};
pub use lower::{lower_strip, python_strip};
pub use train::{TrainOptions, TrainedBpe, bpe_from_merges, train_bpe};
pub use wrapper::{MAX_TEXT_CHARS, TextTokenizer};

/// Everything that can go wrong while loading a model or encoding/decoding with it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model file could not be read.
    #[error("cannot read tokenizer model {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model text is malformed at a given line (1-based).
    #[error("{origin}: line {line}: {message}")]
    Parse {
        origin: String,
        line: usize,
        message: String,
    },
    /// The model text parses but is inconsistent as a whole.
    #[error("{origin}: {message}")]
    Model { origin: String, message: String },
    /// Decoding met an id that the vocabulary does not have.
    #[error("id must be in the range [0, vocab_size - 1]: got id {id}, vocab_size is {vocab_size}")]
    IdOutOfRange { id: u32, vocab_size: usize },
    /// BPE-dropout probability outside `[0, 1]` (or NaN).
    #[error("BPE-dropout probability must be in [0, 1], got {0}")]
    InvalidDropout(f64),
    /// `decode_text` of an empty id list; the original raises `IndexError` here.
    #[error(
        "cannot decode an empty id list (the original raises IndexError: list index out of range)"
    )]
    EmptyInput,
    /// Training cannot proceed (no text, vocabulary too small, bad option).
    #[error("cannot train a tokenizer: {0}")]
    Train(String),
    /// Writing a trained model failed.
    #[error("cannot write tokenizer model {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Saving would replace an existing model file.
    #[error("{} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
}
