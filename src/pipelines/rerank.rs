//! Scoring (picture, text) pairs by the model's own perplexities: self-reranking of generated
//! pictures by their text, of captions by their picture, and the scores behind classification.

use super::perplexity::{ce_to_ppl, token_cross_entropy};
use crate::model::{Rudolph, masks};
use candle_core::{Result, Tensor};

/// Lower is better for both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScore {
    /// Perplexity of the right text given the picture.
    pub ppl_text: f32,
    /// Perplexity of the picture's codes 1…N−1 (the first code is not scored).
    pub ppl_image: f32,
}

/// Scores each `(codes, right text)` pair in the layout `[zeros(l) | codes | text]` under the
/// rc1 i2t mask, as `self_reranking_by_text` and `zs_clf` do. Right-text tokens before
/// `text_from` (BOS + a shared template) are not scored.
pub fn score_pairs(
    model: &Rudolph,
    pairs: &[(&[u32], &[u32])],
    text_from: usize,
    batch: usize,
) -> Result<Vec<PairScore>> {
    let cfg = model.config();
    let (l, n, r) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.r_text_seq_length,
    );
    let t = cfg.total_seq_length();
    if text_from == 0 || text_from >= r {
        candle_core::bail!("text scoring must start after BOS and before the end ({text_from})");
    }
    let v = cfg.text_vocab();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let mut ids = Vec::with_capacity(chunk.len() * t);
        let mut pads = Vec::with_capacity(chunk.len());
        for (codes, text) in chunk {
            if codes.len() != n || text.len() != r {
                candle_core::bail!(
                    "a scored pair needs {n} codes and {r} text ids, got {} and {}",
                    codes.len(),
                    text.len()
                );
            }
            ids.extend(std::iter::repeat_n(0, l));
            ids.extend_from_slice(codes);
            ids.extend_from_slice(text);
            pads.push(text.iter().map(|&x| (x != 0) as u8).collect());
        }
        let b = chunk.len();
        let ids = Tensor::from_vec(ids, (b, t), model.device())?;
        let mask = masks::i2t_mask(cfg, &pads, model.device())?;
        let logits = model.forward(&ids, &mask)?;
        let text_start = t - r + text_from;
        let text_ce = token_cross_entropy(
            &logits,
            text_start - 1..t - 1,
            0..v,
            &ids.narrow(1, text_start, t - text_start)?,
            Some(0),
        )?;
        let image_ce = image_cross_entropy(model, &logits, &ids)?;
        out.extend(text_ce.iter().zip(&image_ce).map(|(tc, ic)| PairScore {
            ppl_text: ce_to_ppl(tc),
            ppl_image: ce_to_ppl(ic),
        }));
    }
    Ok(out)
}

fn image_cross_entropy(model: &Rudolph, logits: &Tensor, ids: &Tensor) -> Result<Vec<Vec<f32>>> {
    let cfg = model.config();
    let (l, n) = (cfg.l_text_seq_length, cfg.image_seq_length());
    let v = cfg.text_vocab();
    token_cross_entropy(
        logits,
        l..l + n - 1,
        v..v + cfg.image_vocab(),
        &ids.narrow(1, l + 1, n - 1)?,
        None,
    )
}

/// rc1 `self_reranking_by_image`: each text (`r` ids) is put in both text slots around the
/// picture and scored on the LEFT slot. Under the rc1 i2t mask those rows are fully masked, so
/// the score hardly depends on the picture; kept for parity, not used for ranking.
pub fn score_texts_by_image_rc1(
    model: &Rudolph,
    codes: &[u32],
    texts: &[Vec<u32>],
    batch: usize,
) -> Result<Vec<PairScore>> {
    let cfg = model.config();
    let (l, n, r) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.r_text_seq_length,
    );
    let t = cfg.total_seq_length();
    if l != r {
        candle_core::bail!("rc1 by-image reranking puts the text in both slots, so it needs l = r");
    }
    if codes.len() != n {
        candle_core::bail!("expected {n} image codes, got {}", codes.len());
    }
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let mut ids = Vec::with_capacity(chunk.len() * t);
        let mut pads = Vec::with_capacity(chunk.len());
        for text in chunk {
            if text.len() != r {
                candle_core::bail!("expected {r} text ids, got {}", text.len());
            }
            ids.extend_from_slice(text);
            ids.extend_from_slice(codes);
            ids.extend_from_slice(text);
            pads.push(text.iter().map(|&x| (x != 0) as u8).collect());
        }
        let b = chunk.len();
        let ids = Tensor::from_vec(ids, (b, t), model.device())?;
        let mask = masks::i2t_mask(cfg, &pads, model.device())?;
        let logits = model.forward(&ids, &mask)?;
        let text_ce = token_cross_entropy(
            &logits,
            0..l - 1,
            0..cfg.text_vocab(),
            &ids.narrow(1, 1, l - 1)?,
            Some(0),
        )?;
        let image_ce = image_cross_entropy(model, &logits, &ids)?;
        out.extend(text_ce.iter().zip(&image_ce).map(|(tc, ic)| PairScore {
            ppl_text: ce_to_ppl(tc),
            ppl_image: ce_to_ppl(ic),
        }));
    }
    Ok(out)
}
