//! Text generation in the left-text segment (rc1 `generate_texts`), ranked by perplexity.

use super::generate::{Decoding, TextPlan, generate_text};
use super::perplexity::{ce_to_ppl, token_cross_entropy};
use super::{GenerateOptions, Ranked, Warning};
use crate::model::{Rudolph, masks};
use crate::progress::ProgressSink;
use crate::sampling::SamplingParams;
use crate::tokenizer::{TextTokenizer, lower_strip, python_strip};
use candle_core::{Result, Tensor};

pub const BOS: u32 = 2;
pub const EOS: u32 = 3;

/// Which sampled ids become EOS. The original's `generate_texts` replaces ids `> V − l`, so the
/// first position token survives (and crashes the decoder); `generate_captions` uses `≥`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialIds {
    /// `id > V − l` → EOS (rc1 `generate_texts`).
    OriginalTexts,
    /// `id ≥ V − l` → EOS: every left-text position token (rc1 `generate_captions`, and our fix).
    AllPositionTokens,
}

/// Where a generated text ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEnd {
    /// rc1: the row is cut at the *number* of EOS ids it contains (whole row if none).
    EosCount,
    /// Fixed: the row is cut at its first EOS.
    FirstEos,
}

/// The replacement of special ids for a model whose position tokens start at `first_position`.
pub fn special_to_eos(first_position: u32, rule: SpecialIds) -> impl Fn(u32) -> u32 {
    move |id| {
        let special = match rule {
            SpecialIds::OriginalTexts => id > first_position,
            SpecialIds::AllPositionTokens => id >= first_position,
        };
        if special { EOS } else { id }
    }
}

/// The tokens of a generated row that make up its text.
pub fn cut_text(row: &[u32], end: TextEnd) -> &[u32] {
    let cut = match end {
        TextEnd::EosCount => match row.iter().filter(|&&t| t == EOS).count() {
            0 => row.len(),
            n => n.min(row.len()),
        },
        TextEnd::FirstEos => row.iter().position(|&t| t == EOS).unwrap_or(row.len()),
    };
    &row[..cut]
}

/// Generates `count` left texts after `prefix` (`[BOS, template…]`), each a row of `l` ids.
#[allow(clippy::too_many_arguments)]
pub fn generate_text_ids(
    model: &Rudolph,
    prefix: &[u32],
    count: usize,
    decoding: &Decoding,
    params: &SamplingParams,
    seed: u64,
    rule: SpecialIds,
    progress: &dyn ProgressSink,
) -> Result<Vec<Vec<u32>>> {
    let cfg = model.config();
    let l = cfg.l_text_seq_length;
    if prefix.is_empty() || prefix.len() > l {
        candle_core::bail!(
            "a text prefix needs 1 to {l} tokens (BOS + template), got {}",
            prefix.len()
        );
    }
    let mask = masks::t2t_mask(cfg, 1, model.device())?;
    let post = special_to_eos(cfg.left_position_token(0), rule);
    let plan = TextPlan {
        start: prefix,
        template: prefix,
        slots: l,
        mask: &mask,
        post: &post,
    };
    generate_text(model, &plan, count, decoding, params, seed, progress)
}

/// Perplexity of left texts (each `l` ids, `[BOS, …, EOS, 0…]`), as generate_texts re-scores
/// them: t2t mask, next-token targets, pads ignored.
pub fn left_text_perplexities(
    model: &Rudolph,
    texts: &[Vec<u32>],
    batch: usize,
) -> Result<Vec<f32>> {
    let cfg = model.config();
    let l = cfg.l_text_seq_length;
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch.max(1)) {
        let b = chunk.len();
        let ids = Tensor::from_vec(chunk.concat(), (b, l), model.device())?;
        let mask = masks::t2t_mask(cfg, b, model.device())?;
        let logits = model.forward(&ids, &mask)?;
        let targets = ids.narrow(1, 1, l - 1)?;
        let ce = token_cross_entropy(&logits, 0..l - 1, 0..cfg.text_vocab(), &targets, Some(0))?;
        out.extend(ce.iter().map(|row| ce_to_ppl(row)));
    }
    Ok(out)
}

/// A generated text and its perplexity (lower is better).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GeneratedText {
    pub text: String,
    /// The text's perplexity (named as every other text score).
    pub ppl_text: f32,
}

/// rc1 `generate_texts`: `count` left texts continuing `template`, deduplicated (first
/// occurrence order) and sorted by perplexity. `fidelity` picks the original's text-end and
/// special-id rules or the fixed ones. A template that fills the slots is cut, with a warning.
pub fn generate_texts(
    model: &Rudolph,
    tokenizer: &TextTokenizer,
    template: &str,
    count: usize,
    opts: &GenerateOptions,
) -> crate::Result<Ranked<GeneratedText>> {
    let l = model.config().l_text_seq_length;
    let encoded = tokenizer.encode_text(&lower_strip(template), l);
    let (prefix, warning) = template_prefix(&encoded, l, "template");
    opts.progress.start(
        ((l - prefix.len()) * count) as u64,
        &format!("writing {count} texts"),
        "tokens",
    );
    let rows = generate_text_ids(
        model,
        &prefix,
        count,
        &opts.decoding(),
        &opts.params,
        opts.seed,
        opts.fidelity.special_ids(),
        opts.progress.as_ref(),
    )?;
    opts.progress.finish();
    let texts = decode_unique(tokenizer, &rows, opts.fidelity.text_end())?;
    // As the original, each text is re-encoded from its decoded string before scoring.
    let encoded: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode_text(&lower_strip(t), l))
        .collect();
    let ppl = left_text_perplexities(model, &encoded, opts.batch_size)?;
    let mut out: Vec<GeneratedText> = texts
        .into_iter()
        .zip(ppl)
        .map(|(text, ppl_text)| GeneratedText { text, ppl_text })
        .collect();
    out.sort_by(|a, b| a.ppl_text.total_cmp(&b.ppl_text));
    Ok(Ranked {
        items: out,
        warnings: warning.into_iter().collect(),
    })
}

/// `[BOS, template…]` from an `encode_text` row: everything before its EOS (the original's
/// `count(≠0) − 1`). A template that fills the slots loses its EOS; it is cut so that at least
/// one token is still generated, and the warning says so (`what` names the template).
pub fn template_prefix(encoded: &[u32], slots: usize, what: &str) -> (Vec<u32>, Option<Warning>) {
    let nonzero = encoded.iter().filter(|&&t| t != 0).count();
    let len = nonzero.saturating_sub(1).max(1);
    // The count above takes the last id for the EOS; when the template filled the slots there is
    // none, and the last id it drops is the template's own.
    let lost_eos = nonzero > 1 && encoded[nonzero - 1] != EOS;
    if len >= slots || lost_eos {
        let warning = Warning::TemplateTruncated {
            what: what.to_string(),
            slots,
        };
        return (encoded[..slots - 1].to_vec(), Some(warning));
    }
    (encoded[..len].to_vec(), None)
}

/// Cuts each row at its end, decodes it, strips it and keeps the non-empty texts once each, in
/// the order first seen (the original's `set` has no order).
pub fn decode_unique(
    tokenizer: &TextTokenizer,
    rows: &[Vec<u32>],
    end: TextEnd,
) -> crate::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for row in rows {
        let text = tokenizer.decode_text(cut_text(row, end))?;
        let text = python_strip(&text).to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push(text);
        }
    }
    Ok(out)
}
