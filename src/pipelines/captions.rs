//! Image → text in the right-text segment (rc1 `generate_captions`).

use super::generate::{Plan, generate};
use super::texts::{SpecialIds, special_to_eos};
use crate::model::{Rudolph, masks};
use crate::progress::Progress;
use crate::sampling::SamplingParams;
use candle_core::Result;

/// Generates `count` right texts for the picture `codes` after `prefix` (`[BOS, template…]`);
/// each row has `r` ids. Position tokens are replaced by EOS as they are drawn.
#[allow(clippy::too_many_arguments)]
pub fn generate_caption_ids(
    model: &Rudolph,
    codes: &[u32],
    prefix: &[u32],
    count: usize,
    batch: usize,
    params: &SamplingParams,
    seed: u64,
    progress: &Progress,
) -> Result<Vec<Vec<u32>>> {
    let cfg = model.config();
    let (l, n, r) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.r_text_seq_length,
    );
    if codes.len() != n {
        candle_core::bail!("expected {n} image codes, got {}", codes.len());
    }
    if prefix.is_empty() || prefix.len() > r {
        candle_core::bail!(
            "a caption prefix needs 1 to {r} tokens (BOS + template), got {}",
            prefix.len()
        );
    }
    let mut start = vec![0u32; l];
    start.extend_from_slice(codes);
    start.extend_from_slice(prefix);
    // The original passes an all-ones pad mask: left columns zeroed, no rows cut.
    let mask = masks::i2t_mask(cfg, &[vec![1; r]], model.device())?;
    let post = special_to_eos(cfg.left_position_token(0), SpecialIds::AllPositionTokens);
    let plan = Plan {
        prefix: &start,
        steps: vec![None; r - prefix.len()],
        classes: 0..cfg.text_vocab(),
        post: &post,
        mask: &mask,
    };
    let rows = generate(model, &plan, count, batch, params, seed, progress)?;
    Ok(rows
        .into_iter()
        .map(|generated| [prefix, &generated].concat())
        .collect())
}
