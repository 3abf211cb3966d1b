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
}

/// Something the caller should tell whoever asked: the results stand, but their input was not
/// used whole.
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
    /// A class name does not fit the text slots after the template, and was cut.
    ClassTruncated { class: String },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TemplateTruncated { what, slots } => {
                write!(
                    f,
                    "the {what} does not fit the {slots} text slots; it was truncated"
                )
            }
            Self::TextTruncated { what, text, slots } => write!(
                f,
                "the {what} «{text}» needs more than the {slots} text slots; it was truncated"
            ),
            Self::ClassTruncated { class } => write!(
                f,
                "class «{class}» does not fit the text slots with the template; it was truncated"
            ),
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
            .finish_non_exhaustive()
    }
}
