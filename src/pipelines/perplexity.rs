//! Scoring token sequences: per-token cross-entropy and the original's "perplexity", which is
//! the mean of per-token perplexities `exp(ce)`, not `exp(mean ce)` (SPEC §7.1, quirk 10).

use crate::model::loss::cross_entropy_per_token;
use candle_core::{Result, Tensor};

/// Per-token cross-entropy of `logits[:, positions, classes]` against `targets` `[B, P]`;
/// positions whose target is `ignore` give 0. Returns `[B][P]`.
pub fn token_cross_entropy(
    logits: &Tensor,
    positions: std::ops::Range<usize>,
    classes: std::ops::Range<usize>,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Vec<Vec<f32>>> {
    let (b, p) = targets.dims2()?;
    let c = classes.len();
    let slice = logits
        .narrow(1, positions.start, positions.len())?
        .narrow(2, classes.start, c)?
        .contiguous()?
        .reshape((b * p, c))?;
    let ce = cross_entropy_per_token(&slice, &targets.flatten_all()?, ignore)?;
    ce.reshape((b, p))?.to_vec2::<f32>()
}

/// The original's `ce_to_ppl` for one row: mean of `exp(ce)` over entries whose CE is not zero
/// (ignored targets and exact zeros are left out of both sums). A row with nothing scored gives
/// NaN, where the original mis-aligns its counts.
pub fn ce_to_ppl(ce: &[f32]) -> f32 {
    let scored: Vec<f32> = ce.iter().filter(|&&v| v != 0.0).map(|v| v.exp()).collect();
    if scored.is_empty() {
        return f32::NAN;
    }
    scored.iter().sum::<f32>() / scored.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppl_is_the_mean_of_exponentials_over_scored_tokens() {
        let ppl = ce_to_ppl(&[1.0, 0.0, 2.0]);
        let want = (1f32.exp() + 2f32.exp()) / 2.0;
        assert!((ppl - want).abs() < 1e-6);
        assert!(ce_to_ppl(&[0.0, 0.0]).is_nan());
    }
}
