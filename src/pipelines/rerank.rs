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
    let mut rows = Vec::with_capacity(pairs.len());
    for (codes, text) in pairs {
        if codes.len() != n || text.len() != r {
            candle_core::bail!(
                "a scored pair needs {n} codes and {r} text ids, got {} and {}",
                codes.len(),
                text.len()
            );
        }
        rows.push(([&vec![0; l], *codes, *text].concat(), text.to_vec()));
    }
    score_rows(model, &rows, t - r + text_from..t, batch, true)
}

/// `−log p(text) − log p(picture | text)` in nats, for each text (`l` ids) as the LEFT text
/// before the picture `codes`, under the causal mask that generation uses: the text's tokens
/// after BOS (pads ignored) scored by the model as a language model, then every one of the
/// picture's N codes given the text. By Bayes' rule, ordering captions of one picture by it
/// orders them by the model's `p(caption | picture)`, read through its text → image direction
/// with its own language model as the prior. (A checkpoint trained with the original's label
/// shift never trained the first code's image logits; it still counts here.)
pub fn joint_nll(
    model: &Rudolph,
    codes: &[u32],
    texts: &[Vec<u32>],
    batch: usize,
) -> Result<Vec<f32>> {
    let cfg = model.config();
    let (l, n) = (cfg.l_text_seq_length, cfg.image_seq_length());
    if codes.len() != n {
        candle_core::bail!("expected {n} image codes, got {}", codes.len());
    }
    let v = cfg.text_vocab();
    // The last code is only a target, so its own logits are not needed.
    let s = l + n - 1;
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let mut flat = Vec::with_capacity(chunk.len() * (s + 1));
        for text in chunk {
            if text.len() != l {
                candle_core::bail!("expected {l} left-text ids, got {}", text.len());
            }
            flat.extend_from_slice(text);
            flat.extend_from_slice(codes);
        }
        let all = Tensor::from_vec(flat, (chunk.len(), s + 1), model.device())?;
        let mask = masks::causal_mask(chunk.len(), s, model.device())?;
        let vi = cfg.image_vocab();
        let parts = [(0..l - 1, 0..v), (l - 1..s, v..v + vi)];
        let logits = model.forward_window_parts(&all.narrow(1, 0, s)?, &mask, 0, &parts)?;
        let text_ce = token_cross_entropy(
            &logits[0],
            0..l - 1,
            0..v,
            &all.narrow(1, 1, l - 1)?,
            Some(0),
        )?;
        let image_ce = token_cross_entropy(&logits[1], 0..n, 0..vi, &all.narrow(1, l, n)?, None)?;
        out.extend(
            text_ce
                .iter()
                .zip(&image_ce)
                .map(|(t, i)| t.iter().sum::<f32>() + i.iter().sum::<f32>()),
        );
    }
    Ok(out)
}

/// rc1 `self_reranking_by_image`: each text (`r` ids) is put in both text slots around the
/// picture and scored on the LEFT slot, whose rows the rc1 i2t mask fully masks (they attend
/// uniformly to every position, the text's own future included). Kept for parity; captions are
/// ranked with [`score_pairs`].
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
    if l != r {
        candle_core::bail!("rc1 by-image reranking puts the text in both slots, so it needs l = r");
    }
    if codes.len() != n {
        candle_core::bail!("expected {n} image codes, got {}", codes.len());
    }
    let mut rows = Vec::with_capacity(texts.len());
    for text in texts {
        if text.len() != r {
            candle_core::bail!("expected {r} text ids, got {}", text.len());
        }
        rows.push(([text, codes, text].concat(), text.clone()));
    }
    // No window: the scored left rows attend uniformly to every position of the sequence.
    score_rows(model, &rows, 1..l, batch, false)
}

/// One forward per chunk of full sequences (with the right text that decides each row's i2t
/// mask); the text perplexity is over the targets at `text_targets`, pads ignored, and the
/// image perplexity over codes 1…N−1.
///
/// With `window`, only the positions whose logits are scored, and those they attend to, are
/// computed: under the i2t mask no scored position sees the left text, and none sees the pads
/// after the chunk's last non-pad target, so that window gives the same logits as the full
/// sequence (the left text and the trailing pads are a third of a 350M sequence).
fn score_rows(
    model: &Rudolph,
    rows: &[(Vec<u32>, Vec<u32>)],
    text_targets: std::ops::Range<usize>,
    batch: usize,
    window: bool,
) -> Result<Vec<PairScore>> {
    let cfg = model.config();
    let (l, n, t) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.total_seq_length(),
    );
    let v = cfg.text_vocab();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let b = chunk.len();
        let flat: Vec<u32> = chunk
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        let pads: Vec<Vec<u8>> = chunk
            .iter()
            .map(|(_, right)| right.iter().map(|&x| (x != 0) as u8).collect())
            .collect();
        // The last text target that is not a pad (pads are ignored), over the chunk.
        let last_target = chunk
            .iter()
            .filter_map(|(ids, _)| text_targets.clone().rev().find(|&p| ids[p] != 0))
            .max()
            .unwrap_or(text_targets.start);
        let (texts, first, end) = if window {
            let texts = text_targets.start..last_target + 1;
            // Logits rows needed: texts − 1 and the image's l … l + n − 2.
            let first = (texts.start - 1).min(l);
            (texts.clone(), first, (texts.end - 1).max(l + n - 1).min(t))
        } else {
            (text_targets.clone(), 0, t)
        };
        let ids = Tensor::from_vec(flat, (b, t), model.device())?;
        let mask = masks::i2t_mask(cfg, &pads, model.device())?;
        let vi = cfg.image_vocab();
        let text_rows = texts.start - 1 - first..texts.end - 1 - first;
        let image_rows = l - first..l + n - 1 - first;
        let parts = [(text_rows.clone(), 0..v), (image_rows.clone(), v..v + vi)];
        let logits = model.forward_window_parts(
            &ids.narrow(1, first, end - first)?,
            &mask,
            first,
            &parts,
        )?;
        let text_ce = token_cross_entropy(
            &logits[0],
            0..text_rows.len(),
            0..v,
            &ids.narrow(1, texts.start, texts.len())?,
            Some(0),
        )?;
        let image_ce = token_cross_entropy(
            &logits[1],
            0..image_rows.len(),
            0..vi,
            &ids.narrow(1, l + 1, n - 1)?,
            None,
        )?;
        out.extend(text_ce.iter().zip(&image_ce).map(|(tc, ic)| PairScore {
            ppl_text: ce_to_ppl(tc),
            ppl_image: ce_to_ppl(ic),
        }));
    }
    Ok(out)
}
