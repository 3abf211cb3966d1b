//! Scoring token sequences: per-token cross-entropy and the original's "perplexity", which is
//! the mean of per-token perplexities `exp(ce)`, not `exp(mean ce)`, as the original computes it.

use crate::kernels::exp;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Per-token cross-entropy of `logits[:, positions, classes]` against `targets` `[B, P]`;
/// positions whose target is `ignore` give 0. Returns `[B][P]`.
///
/// Scoring needs no gradient, so this is a plain log-sum-exp per row on the host, on all cores
/// (candle's composite log-softmax makes several single-core passes over the whole slice).
pub fn token_cross_entropy(
    logits: &Tensor,
    positions: std::ops::Range<usize>,
    classes: std::ops::Range<usize>,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Vec<Vec<f32>>> {
    let (b, p) = targets.dims2()?;
    if p != positions.len() {
        candle_core::bail!("{p} targets per row for {} positions", positions.len());
    }
    let c = classes.len();
    let values = logits
        .narrow(1, positions.start, p)?
        .narrow(2, classes.start, c)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = targets
        .iter()
        .find(|&&t| Some(t) != ignore && t as usize >= c)
    {
        candle_core::bail!("target class {bad} is out of range for {c} logits");
    }
    let ce: Vec<f32> = values
        .par_chunks(c)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            if Some(target) == ignore {
                return 0.0;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|&x| exp(x - max)).sum();
            sum.ln() + max - row[target as usize]
        })
        .collect();
    Ok(ce.chunks(p.max(1)).take(b).map(<[f32]>::to_vec).collect())
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
