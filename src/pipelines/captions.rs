//! Image → text in the right-text segment (rc1 `generate_captions`).

use super::GenerateOptions;
use super::generate::{Plan, generate};
use super::rerank::score_pairs;
use super::texts::{SpecialIds, decode_unique, special_to_eos, template_prefix};
use crate::model::{Rudolph, masks};
use crate::progress::Progress;
use crate::sampling::SamplingParams;
use crate::tokenizer::{TextTokenizer, lower_strip};
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

/// A caption with its score: the perplexity of the caption given the picture (lower is better).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Caption {
    pub text: String,
    pub ppl: f32,
}

/// Picture codes → up to `count` distinct captions continuing `template`, ranked by the
/// perplexity of each caption given the picture (rc1 ranked by degenerate fully masked rows,
/// SPEC §9 #4; this score actually depends on the caption).
pub fn generate_captions(
    model: &Rudolph,
    tokenizer: &TextTokenizer,
    codes: &[u32],
    template: &str,
    count: usize,
    opts: &GenerateOptions,
) -> crate::Result<Vec<Caption>> {
    let r = model.config().r_text_seq_length;
    let encoded = tokenizer.encode_text(&lower_strip(template), r);
    let prefix = template_prefix(&encoded, r, "template");
    let progress = Progress::new(
        ((r - prefix.len()) * count) as u64,
        "captions",
        opts.progress,
    );
    let rows = generate_caption_ids(
        model,
        codes,
        &prefix,
        count,
        opts.batch_size,
        &opts.params,
        opts.seed,
        &progress,
    )?;
    progress.finish();
    let texts = decode_unique(tokenizer, &rows, opts.fidelity.text_end())?;
    let encoded: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode_text(&lower_strip(t), r))
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = encoded.iter().map(|e| (codes, e.as_slice())).collect();
    let scores = score_pairs(model, &pairs, 1, opts.batch_size)?;
    let mut out: Vec<Caption> = texts
        .into_iter()
        .zip(scores)
        .map(|(text, s)| Caption {
            text,
            ppl: s.ppl_text,
        })
        .collect();
    out.sort_by(|a, b| a.ppl.total_cmp(&b.ppl));
    Ok(out)
}
