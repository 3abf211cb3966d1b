//! The autoregressive loop every generator shares: items are produced in chunks, each chunk
//! with a fresh KV cache (its own, or a session of a shared [`Batcher`]); each step either
//! appends a forced token (image prompts, without a model call, as the original does) or samples
//! one from a slice of the logits.
//!
//! With classifier-free guidance every item runs twice, after its own prefix and after an
//! unconditional one, and samples from the conditional logits pushed away from the
//! unconditional ones: `u + scale · (c − u)`. Both rows then receive the drawn token.

use crate::batching::{Batcher, Session};
use crate::model::{KvCache, Rudolph};
use crate::progress::ProgressSink;
use crate::sampling::{Sampler, SamplingParams};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// How the rows of a generation meet the model.
#[derive(Clone)]
pub enum Decoding {
    /// In chunks of this many items, each chunk alone.
    Chunks(usize),
    /// In the shared batch of a [`Batcher`] (over the same model), beside other callers' rows,
    /// in chunks as large as the batch holds.
    Shared(Batcher),
}

impl Decoding {
    /// Items per chunk when each item takes `rows_per_item` rows (two with guidance).
    fn chunk(&self, rows_per_item: usize) -> Result<usize> {
        match self {
            Self::Chunks(0) => candle_core::bail!("batch size must be at least 1"),
            Self::Chunks(batch) => Ok(*batch),
            Self::Shared(b) if b.max_batch() < rows_per_item => candle_core::bail!(
                "each item takes {rows_per_item} rows (guidance doubles them) but the batch \
                 holds {}",
                b.max_batch()
            ),
            Self::Shared(b) => Ok(b.max_batch() / rows_per_item),
        }
    }
}

impl std::fmt::Debug for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Chunks(b) => write!(f, "Chunks({b})"),
            Self::Shared(b) => write!(f, "Shared(max_batch {})", b.max_batch()),
        }
    }
}

impl From<usize> for Decoding {
    fn from(batch: usize) -> Self {
        Self::Chunks(batch)
    }
}

/// What to generate after a shared prefix.
pub struct Plan<'a> {
    /// Tokens every item starts from (absolute positions `0..prefix.len()`).
    pub prefix: &'a [u32],
    /// Per step: a forced token, or `None` to sample.
    pub steps: Vec<Option<u32>>,
    /// Columns of the logits to sample from; the sampled index is relative to `classes.start`.
    pub classes: Range<usize>,
    /// Applied to each sampled id before it is appended (special-id replacement).
    pub post: &'a (dyn Fn(u32) -> u32 + Sync),
    /// Pipeline mask `[1 or B, 1, T, T]`.
    pub mask: &'a Tensor,
    /// Classifier-free guidance, if any.
    pub guidance: Option<Guidance<'a>>,
}

/// Classifier-free guidance: the unconditional prefix (as long as the plan's) and the scale
/// (1 = the conditional logits unchanged).
#[derive(Debug, Clone, Copy)]
pub struct Guidance<'a> {
    pub prefix: &'a [u32],
    pub scale: f32,
}

/// A text segment to sample: its `template` tokens are the end of `start`, and it is drawn on
/// until it fills `slots` text positions, under `mask`, from the text vocabulary, with `post`
/// replacing special ids.
pub struct TextPlan<'a> {
    pub start: &'a [u32],
    pub template: &'a [u32],
    pub slots: usize,
    pub mask: &'a Tensor,
    pub post: &'a (dyn Fn(u32) -> u32 + Sync),
}

/// `count` texts sampled by `plan`, each `template` followed by what was drawn (`slots` ids).
pub fn generate_text(
    model: &Rudolph,
    plan: &TextPlan,
    count: usize,
    decoding: &Decoding,
    params: &SamplingParams,
    seed: u64,
    progress: &dyn ProgressSink,
) -> Result<Vec<Vec<u32>>> {
    let steps = Plan {
        prefix: plan.start,
        steps: vec![None; plan.slots - plan.template.len()],
        classes: 0..model.config().text_vocab(),
        post: plan.post,
        mask: plan.mask,
        guidance: None,
    };
    let rows = generate(model, &steps, count, decoding, params, seed, progress)?;
    Ok(rows
        .into_iter()
        .map(|generated| [plan.template, &generated].concat())
        .collect())
}

/// Generates `count` items and returns each item's generated tokens (`plan.steps.len()` each).
/// Item `i` draws from stream `(seed, i)`, so results do not depend on the chunks. Each sampled
/// step advances `progress` by the items it drew and shows it their tokens; a cancelled
/// `progress` stops the work with an error.
pub fn generate(
    model: &Rudolph,
    plan: &Plan,
    count: usize,
    decoding: &Decoding,
    params: &SamplingParams,
    seed: u64,
    progress: &dyn ProgressSink,
) -> Result<Vec<Vec<u32>>> {
    params.validate().map_err(candle_core::Error::msg)?;
    let batch = decoding.chunk(if plan.guidance.is_some() { 2 } else { 1 })?;
    if count > super::defaults::MAX_COUNT {
        candle_core::bail!(
            "{count} sequences asked for; one call draws at most {}",
            super::defaults::MAX_COUNT
        );
    }
    if let Some(g) = &plan.guidance {
        if g.prefix.len() != plan.prefix.len() {
            candle_core::bail!(
                "the unconditional prefix has {} tokens, the prefix {}",
                g.prefix.len(),
                plan.prefix.len()
            );
        }
        if !g.scale.is_finite() {
            candle_core::bail!("guidance scale must be finite, got {}", g.scale);
        }
    }
    let mut results = Vec::with_capacity(count);
    for chunk_start in (0..count).step_by(batch) {
        let rows = batch.min(count - chunk_start);
        let mut samplers: Vec<Sampler> = (chunk_start..chunk_start + rows)
            .map(|i| Sampler::new(seed, i as u64))
            .collect();
        let mut generated = vec![Vec::with_capacity(plan.steps.len()); rows];
        // Tokens appended since the last model call: each item's row, then (with guidance) its
        // unconditional twin at `rows + r`.
        let mut pending: Vec<Vec<u32>> = vec![plan.prefix.to_vec(); rows];
        if let Some(g) = &plan.guidance {
            pending.extend(vec![g.prefix.to_vec(); rows]);
        }
        let mut forward = Forward::new(model, plan, decoding, pending.len())?;
        for step in &plan.steps {
            if let Some(token) = step {
                for row in &mut generated {
                    row.push(*token);
                }
                for p in &mut pending {
                    p.push(*token);
                }
                continue;
            }
            if progress.cancelled() {
                candle_core::bail!("cancelled");
            }
            let mut logits = forward.logits(&pending)?;
            if let Some(g) = &plan.guidance {
                let unconditional = logits.split_off(rows);
                for (c, u) in logits.iter_mut().zip(&unconditional) {
                    for (c, u) in c.iter_mut().zip(u) {
                        *c = u + g.scale * (*c - u);
                    }
                }
            }
            // Rows draw from their own streams, so they can filter and draw side by side: the
            // draws stay those of one row at a time, and the host's share of a step shrinks
            // with the cores (the step's only serial work on a GPU).
            let tokens: Vec<u32> = samplers
                .par_iter_mut()
                .zip(&logits)
                .map(|(sampler, row)| (plan.post)(sampler.sample(row, params) as u32))
                .collect();
            for (row, token) in generated.iter_mut().zip(tokens) {
                row.push(token);
            }
            for (p, row) in pending.iter_mut().zip(generated.iter().cycle()) {
                *p = vec![*row.last().expect("a token was just drawn")];
            }
            progress.advance(rows as u64);
            progress.drawn(chunk_start, &generated);
        }
        results.extend(generated);
    }
    Ok(results)
}

/// Where a chunk's steps go: the model with a cache of the chunk's own, or a session of the
/// shared batch.
enum Forward<'a> {
    Alone {
        model: &'a Rudolph,
        plan: &'a Plan<'a>,
        cache: KvCache,
    },
    Shared(Session),
}

impl<'a> Forward<'a> {
    fn new(model: &'a Rudolph, plan: &'a Plan, decoding: &Decoding, rows: usize) -> Result<Self> {
        Ok(match decoding {
            Decoding::Chunks(_) => Self::Alone {
                model,
                plan,
                cache: model.new_cache(),
            },
            Decoding::Shared(b) => {
                Self::Shared(b.open(rows, plan.mask.clone(), plan.classes.clone())?)
            }
        })
    }

    /// Each row's logits after appending its `pending` tokens.
    fn logits(&mut self, pending: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Alone { model, plan, cache } => {
                let width = pending[0].len();
                let ids =
                    Tensor::from_vec(pending.concat(), (pending.len(), width), model.device())?;
                model
                    .forward_cached_last(&ids, plan.mask, cache, plan.classes.clone())?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()
            }
            Self::Shared(session) => session.step(pending),
        }
    }
}
