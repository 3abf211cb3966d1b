//! The tasks of the original library, each in its own file. Every pipeline has an
//! id-level core (tokens in, tokens/scores out), which the parity tests check against the
//! goldens, and a text/picture-level function on top.

pub mod captions;
pub mod classify;
pub mod generate;
pub mod images;
pub mod perplexity;
pub mod rerank;
pub mod texts;

use crate::progress::{ProgressSink, silent};
use crate::sampling::SamplingParams;
use std::path::PathBuf;
use std::sync::Arc;

/// How closely to follow the original where it is plainly wrong (see `docs/fidelity.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fidelity {
    /// Texts end at their first EOS; every left-text position token sampled becomes EOS.
    #[default]
    Fixed,
    /// rc1 exactly: texts end at the number of EOS ids; generate_texts lets the first position
    /// token through (which the decoder then rejects).
    Original,
}

impl Fidelity {
    pub fn text_end(self) -> texts::TextEnd {
        match self {
            Self::Fixed => texts::TextEnd::FirstEos,
            Self::Original => texts::TextEnd::EosCount,
        }
    }

    pub fn special_ids(self) -> texts::SpecialIds {
        match self {
            Self::Fixed => texts::SpecialIds::AllPositionTokens,
            Self::Original => texts::SpecialIds::OriginalTexts,
        }
    }
}

/// The CLI's sampling per task (`rudolph image`, `caption`, `text`; `world eval` measures
/// with them). Pictures and texts sample as the original's defaults; captions are drawn more
/// widely than rc1's (top-k 32, top-p 0.6) because [`captions::CaptionRank::Joint`] picks among
/// them, and it can only pick the right caption if it was drawn.
pub mod defaults {
    use crate::sampling::SamplingParams;

    pub const IMAGE: SamplingParams = SamplingParams {
        top_k: 512,
        top_p: 0.9,
        temperature: 1.0,
    };
    pub const CAPTION: SamplingParams = SamplingParams {
        top_k: 64,
        top_p: 0.99,
        temperature: 1.3,
    };
    pub const TEXT: SamplingParams = SamplingParams {
        top_k: 32,
        top_p: 0.8,
        temperature: 1.0,
    };
    /// Classifier-free guidance scale of pictures (1: none).
    pub const GUIDANCE: f32 = 1.0;
    /// The guidance scales that make sense: 1 is off; below 1 the mix leans towards the picture
    /// of no text (0 ignores the text, below 0 draws against it), and far above the built-in
    /// model's best (1.6) the shapes break up long before 10.
    pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f32> = 1.0..=10.0;
    /// The most sequences one call draws (pictures, captions or texts): far more than any
    /// ranking needs, and few enough that their tokens always fit in memory.
    pub const MAX_COUNT: usize = 10_000;
    /// Pictures drawn per text, the best by its text kept.
    pub const IMAGES: usize = 8;
    /// Captions drawn per picture (duplicates merged), the best kept.
    pub const CAPTIONS: usize = 48;
    /// Captions drawn per picture to classify it in the caption mode
    /// ([`classify_by_caption`](super::classify::classify_by_caption)).
    pub const CLASSIFY_CAPTIONS: usize = 16;
    /// The best of them that each class is put in.
    pub const CLASSIFY_CAPTIONS_KEPT: usize = 2;
}

/// Something the caller should tell whoever asked: the results stand, but their input was not
/// used whole, or not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// A template filled every text slot, and was cut so that at least one token is generated.
    TemplateTruncated { what: String, slots: usize },
    /// A text needs more than its slots, and was cut (the original then loses its EOS too).
    TextTruncated {
        what: String,
        text: String,
        slots: usize,
    },
    /// A class does not fit the text slots with the template, and was cut: with BOS and EOS
    /// it needs `tokens` of the `slots`.
    ClassTruncated {
        class: String,
        template: String,
        tokens: usize,
        slots: usize,
    },
    /// Words of a text the model cannot read (see [`crate::vocabulary`]).
    UnknownWords {
        what: String,
        text: String,
        words: Vec<String>,
        unknown_to: UnknownTo,
    },
    /// Training texts of a data file that the model cannot learn whole: each line (from 1) with
    /// what is wrong in it.
    TrainingTexts {
        file: PathBuf,
        problem: TextProblem,
        lines: Vec<(usize, String)>,
    },
}

/// What the words of [`Warning::UnknownWords`] are unknown to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownTo {
    /// The tokenizer: they hold characters it cannot spell, so each becomes the unknown id, the
    /// same for every such word.
    Tokenizer,
    /// The model's training texts, as its vocabulary (the file, when it was read from one)
    /// lists their words.
    Training { vocabulary: Option<PathBuf> },
}

/// What is wrong with the training texts of [`Warning::TrainingTexts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextProblem {
    /// Words the tokenizer cannot spell: they are all learnt as one unknown id.
    UnknownWords,
    /// More tokens (with BOS and EOS) than the text slots of the left (`left`) or the right
    /// (`right`) text: the end is cut off.
    TooLong { left: usize, right: usize },
}

/// How many lines of a [`Warning::TrainingTexts`] are named before the rest are counted.
const LINES_SHOWN: usize = 5;

fn quoted(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("«{w}»"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TemplateTruncated { what, slots } => {
                write!(
                    f,
                    "the {what} fills the {slots} text slots and leaves none to generate; its \
                     end was cut off"
                )
            }
            Self::TextTruncated { what, text, slots } => write!(
                f,
                "the {what} «{text}» needs more than the {slots} text slots; it was truncated"
            ),
            Self::ClassTruncated {
                class,
                template,
                tokens,
                slots,
            } => {
                write!(f, "class «{class}»")?;
                if !template.is_empty() {
                    write!(f, " in the template «{template}»")?;
                }
                write!(
                    f,
                    " needs {tokens} tokens with BOS and EOS, more than the {slots} text slots; \
                     it was cut to fit"
                )
            }
            Self::UnknownWords {
                what,
                text,
                words,
                unknown_to,
            } => {
                let words_ = if words.len() == 1 { "a word" } else { "words" };
                write!(f, "the {what} «{text}» has {words_} ")?;
                match unknown_to {
                    UnknownTo::Tokenizer => write!(
                        f,
                        "the tokenizer cannot spell: {} (each becomes the unknown token, so the \
                         model cannot read {})",
                        quoted(words),
                        if words.len() == 1 { "it" } else { "them" }
                    ),
                    UnknownTo::Training { vocabulary } => {
                        write!(f, "the model never saw in training: {}", quoted(words))?;
                        match vocabulary {
                            Some(p) => write!(f, " (the words it knows are in {})", p.display()),
                            None => Ok(()),
                        }
                    }
                }
            }
            Self::TrainingTexts {
                file,
                problem,
                lines,
            } => {
                let n = lines.len();
                let s = if n == 1 { "" } else { "s" };
                match problem {
                    TextProblem::UnknownWords => write!(
                        f,
                        "{} text{s} of {} ha{} words the tokenizer cannot spell, which are all \
                         learnt as the one unknown token:",
                        n,
                        file.display(),
                        if n == 1 { "s" } else { "ve" }
                    )?,
                    TextProblem::TooLong { left, right } => write!(
                        f,
                        "{} text{s} of {} need{} more tokens with BOS and EOS than the text slots \
                         (left {left}, right {right}), and will be cut:",
                        n,
                        file.display(),
                        if n == 1 { "s" } else { "" }
                    )?,
                }
                for (line, detail) in lines.iter().take(LINES_SHOWN) {
                    write!(f, "\n  {}:{line}: {detail}", file.display())?;
                }
                if n > LINES_SHOWN {
                    write!(f, "\n  … and {} more", n - LINES_SHOWN)?;
                }
                Ok(())
            }
        }
    }
}

/// A warning in JSON is its message.
impl serde::Serialize for Warning {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Adds `more` to `warnings`, leaving out those already there: a text that several steps of a
/// task read (a picture's prompt is read again to rank the pictures) is warned of once.
pub fn add_warnings(warnings: &mut Vec<Warning>, more: impl IntoIterator<Item = Warning>) {
    for w in more {
        if !warnings.contains(&w) {
            warnings.push(w);
        }
    }
}

/// A pipeline's results, best first, with the warnings met making them. It reads as the slice
/// of its items.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked<T> {
    pub items: Vec<T>,
    pub warnings: Vec<Warning>,
}

impl<T> std::ops::Deref for Ranked<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<'a, T> IntoIterator for &'a Ranked<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<T> IntoIterator for Ranked<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// Settings shared by the generators.
#[derive(Clone)]
pub struct GenerateOptions {
    pub params: SamplingParams,
    pub seed: u64,
    pub batch_size: usize,
    pub fidelity: Fidelity,
    /// Classifier-free guidance scale for pictures (1: none; see
    /// [`images::generate_image_codes`]).
    pub guidance: f32,
    /// Hears each generated token (silent by default).
    pub progress: Arc<dyn ProgressSink>,
    /// Decode in this shared batch rather than alone in chunks of `batch_size` (a server's).
    pub shared: Option<crate::batching::Batcher>,
}

impl GenerateOptions {
    /// Sampling as the original's defaults for a task, seed 0, batch 8, fixed behaviour, no
    /// progress reports.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            seed: 0,
            batch_size: 8,
            fidelity: Fidelity::Fixed,
            guidance: 1.0,
            progress: silent(),
            shared: None,
        }
    }

    /// How generation meets the model: the shared batch if there is one, else chunks of
    /// `batch_size`.
    pub fn decoding(&self) -> generate::Decoding {
        match &self.shared {
            Some(b) => generate::Decoding::Shared(b.clone()),
            None => generate::Decoding::Chunks(self.batch_size),
        }
    }
}

impl std::fmt::Debug for GenerateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("params", &self.params)
            .field("seed", &self.seed)
            .field("batch_size", &self.batch_size)
            .field("fidelity", &self.fidelity)
            .field("guidance", &self.guidance)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}
