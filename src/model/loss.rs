//! The training loss: three cross-entropies (left text, image, right text) with the original's
//! label slicing, including its shift across segment boundaries (the original's image labels
//! start one position late, so the first code's image logits are never trained).

use crate::config::Config;
use candle_core::{D, DType, Result, Tensor, bail};

/// Weights of the three terms; the total is their weighted mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    pub l_text: f64,
    pub image: f64,
    pub r_text: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            l_text: 1.0,
            image: 7.0,
            r_text: 1.0,
        }
    }
}

/// Each term as a scalar tensor (so a trainer can backpropagate through `total`).
#[derive(Debug, Clone)]
pub struct Loss {
    pub total: Tensor,
    pub l_text: Tensor,
    pub image: Tensor,
    pub r_text: Tensor,
}

/// How the segment-boundary targets are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Labels {
    /// As rudolph rc1 trains: the last left position is scored against the first image code as
    /// a *text* class, and the last image position against the right-text BOS as an *image*
    /// class.
    Original,
    /// Each position is scored in the vocabulary of the token it predicts, as inference samples
    /// it: the last left position against the first image code as an *image* class (so the first
    /// code, which sets a picture's corner, is learnt from the text); the right-text BOS, which
    /// is never sampled, is not scored.
    #[default]
    Corrected,
}

impl Labels {
    /// Why these labels cannot train a model of `cfg`, if they cannot: the original's score the
    /// first image code as a text class, so every code must also be a text class.
    pub fn misfit(self, cfg: &Config) -> Option<String> {
        let (v, vi) = (cfg.text_vocab(), cfg.image_vocab());
        (self == Labels::Original && vi > v).then(|| {
            format!(
                "the original's labels score the first image code as a text class, which needs \
                 the image vocabulary ({vi}) to fit in the text one ({v})"
            )
        })
    }
}

/// Per-position cross-entropy. `logits`: `[N, C]`, `targets`: `[N]` u32 → `[N]` f32.
/// Positions whose target equals `ignore` get 0 (as torch's `reduction='none'` does).
pub fn cross_entropy_per_token(
    logits: &Tensor,
    targets: &Tensor,
    ignore: Option<u32>,
) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    let max_target = targets.max(0)?.to_scalar::<u32>()?;
    if ignore != Some(max_target) && max_target as usize >= classes {
        bail!("target class {max_target} is out of range for {classes} logits");
    }
    // Composite log-softmax, so that gradients flow (candle's fused softmax has no backward).
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let safe_targets = match ignore {
        Some(i) => targets.eq(i)?.where_cond(&targets.zeros_like()?, targets)?,
        None => targets.clone(),
    };
    let nll = logp
        .gather(&safe_targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    match ignore {
        Some(i) => nll.broadcast_mul(&targets.ne(i)?.to_dtype(DType::F32)?),
        None => Ok(nll),
    }
}

/// Mean over the positions whose target is not `ignore` (torch's `reduction='mean'`).
fn mean_cross_entropy(logits: &Tensor, targets: &Tensor, ignore: Option<u32>) -> Result<Tensor> {
    let ce = cross_entropy_per_token(logits, targets, ignore)?;
    let count = match ignore {
        Some(i) => targets.ne(i)?.to_dtype(DType::F32)?.sum_all()?,
        None => Tensor::new(targets.dim(0)? as f32, targets.device())?,
    };
    ce.sum_all()?.broadcast_div(&count)
}

/// The three-part loss of a full sequence. `logits`: `[B, T, V + Vi]`; `labels_source`: `[B, T]`
/// u32 input ids with the left pads already replaced by position tokens.
pub fn rudolph_loss(
    cfg: &Config,
    logits: &Tensor,
    labels_source: &Tensor,
    weights: LossWeights,
    labels: Labels,
) -> Result<Loss> {
    let (_, s) = labels_source.dims2()?;
    let t = cfg.total_seq_length();
    if s != t {
        bail!("the loss needs the full sequence of {t} tokens, got {s}");
    }
    let (l, n, r) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.r_text_seq_length,
    );
    let v = cfg.text_vocab();
    let vi = cfg.image_vocab();
    if let Some(problem) = labels.misfit(cfg) {
        bail!("{problem}; train with the corrected labels");
    }
    // Next-token labels: label p is the target of position p.
    let next = labels_source.narrow(1, 1, t - 1)?;
    let flat = |x: Tensor, classes: usize| -> Result<Tensor> {
        let rows = x.dim(0)? * x.dim(1)?;
        x.contiguous()?.reshape((rows, classes))
    };
    let flat_ids = |x: Tensor| -> Result<Tensor> { x.contiguous()?.flatten_all() };
    // (left-text positions, first image-term position): the original scores positions
    // l … l+n−1 as image classes; corrected, positions l−1 … l+n−2, i.e. exactly the n codes.
    let (lt_positions, img_from) = match labels {
        Labels::Original => (l, l),
        Labels::Corrected => (l - 1, l - 1),
    };
    let lt = mean_cross_entropy(
        &flat(logits.narrow(1, 0, lt_positions)?.narrow(2, 0, v)?, v)?,
        &flat_ids(next.narrow(1, 0, lt_positions)?)?,
        None,
    )?;
    let img = mean_cross_entropy(
        &flat(logits.narrow(1, img_from, n)?.narrow(2, v, vi)?, vi)?,
        &flat_ids(next.narrow(1, img_from, n)?)?,
        None,
    )?;
    let rt = mean_cross_entropy(
        &flat(logits.narrow(1, l + n, r - 1)?.narrow(2, 0, v)?, v)?,
        &flat_ids(next.narrow(1, l + n, r - 1)?)?,
        Some(0),
    )?;
    let norm = weights.l_text + weights.image + weights.r_text;
    if norm <= 0.0 {
        bail!("loss weights must not all be zero");
    }
    let total = ((lt.affine(weights.l_text, 0.0)? + img.affine(weights.image, 0.0)?)?
        + rt.affine(weights.r_text, 0.0)?)?
    .affine(1.0 / norm, 0.0)?;
    Ok(Loss {
        total,
        l_text: lt,
        image: img,
        r_text: rt,
    })
}
