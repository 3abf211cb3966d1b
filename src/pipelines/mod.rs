//! The tasks of the original library (SPEC §7), each in its own file. Every pipeline has an
//! id-level core (tokens in, tokens/scores out), which the parity tests check against the
//! goldens, and a text/picture-level function on top.

pub mod captions;
pub mod classify;
pub mod generate;
pub mod images;
pub mod perplexity;
pub mod rerank;
pub mod texts;

use crate::sampling::SamplingParams;

/// How closely to follow the original where it is plainly wrong (SPEC §9, fixtures quirk 9).
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

/// Settings shared by the generators.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub params: SamplingParams,
    pub seed: u64,
    pub batch_size: usize,
    pub fidelity: Fidelity,
    /// Show a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

impl GenerateOptions {
    /// Sampling as the original's defaults for a task, seed 0, batch 8, fixed behaviour.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            seed: 0,
            batch_size: 8,
            fidelity: Fidelity::Fixed,
            progress: false,
        }
    }
}
