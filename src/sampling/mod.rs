//! Choosing the next token: temperature, then the original's `top_k_top_p_filtering`
//! (transformers 4.10), then a draw from our own seeded generator.
//!
//! PyTorch's `multinomial` stream cannot be reproduced outside PyTorch, so draws are ours:
//! ChaCha20, one stream per generated item (`seed`, item index). An item's tokens therefore do
//! not depend on the batch size or on which other items are generated with it.

pub mod torch_order;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The knobs of every generator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Keep the `top_k` largest logits (and every logit tied with the k-th); 0 disables.
    pub top_k: usize,
    /// Nucleus mass; applied whenever it lies in [0, 1], even at 1.0, as the original does.
    pub top_p: f64,
    pub temperature: f64,
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be positive, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top_p must lie in [0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// transformers' `top_k_top_p_filtering(logits, top_k, top_p)` with `filter_value = −inf` and
/// `min_tokens_to_keep = 1`, on one row, in place.
pub fn top_k_top_p_filtering(logits: &mut [f32], top_k: usize, top_p: f64) {
    if logits.is_empty() {
        return;
    }
    if top_k > 0 {
        let k = top_k.clamp(1, logits.len());
        // The k-th largest value by selection, not a sort: a batched decoding step filters
        // thousands of classes per row.
        let mut values = logits.to_vec();
        let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        // Strictly smaller only: ties with the k-th value survive.
        logits
            .iter_mut()
            .filter(|v| **v < kth)
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
    if (0.0..=1.0).contains(&top_p) {
        // The original sorts the whole row; entries already at −inf sort last, add zero
        // probability and are only ever set to −inf again, so the sorted finite values decide
        // how many tokens are kept. The sorted values are the same whatever the order of equal
        // logits, so a stable sort gives the right count.
        let mut order: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i] > f32::NEG_INFINITY)
            .collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
        let probs = torch_softmax(&sorted);
        // torch accumulates a float cumsum in double and stores each partial sum as float; the
        // comparison with top_p happens in float. At top_p = 1.0 rounding can drop the tail.
        // The partial sums only grow, so the kept tokens are a prefix: the one that crosses the
        // threshold is kept, and so is the best whatever happens.
        let mut cumulative = 0.0f64;
        let mut kept = sorted.len();
        for (rank, p) in probs.iter().enumerate() {
            cumulative += *p as f64;
            if (cumulative as f32) > top_p as f32 {
                kept = rank + 1;
                break;
            }
        }
        if kept < sorted.len() && sorted[kept - 1] == sorted[kept] {
            // The cut splits a run of equal logits: which of them survive is decided by where
            // torch's unstable sort put them.
            order = torch_order::descending_order(logits);
        }
        for &idx in &order[kept..] {
            logits[idx] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax summed as PyTorch's AVX2 CPU kernel sums it: eight f32 lanes, the tail added into the
/// first lanes, the lanes folded 4+4, 2+2, 1+1 (rows under eight: one running sum), then each
/// exponential times the sum's reciprocal. A plain running sum drifts by many units in the last
/// place over thousands of equal probabilities, which moves the top-p cut by whole tokens.
fn torch_softmax(logits: &[f32]) -> Vec<f32> {
    const LANES: usize = 8;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum = if exps.len() < LANES {
        exps.iter().sum::<f32>()
    } else {
        let mut acc = [0f32; LANES];
        acc.copy_from_slice(&exps[..LANES]);
        for chunk in exps[LANES..].chunks(LANES) {
            for (a, e) in acc.iter_mut().zip(chunk) {
                *a += e;
            }
        }
        let half: Vec<f32> = (0..4).map(|i| acc[i] + acc[i + 4]).collect();
        (half[0] + half[2]) + (half[1] + half[3])
    };
    let inv = 1.0 / sum;
    exps.into_iter().map(|e| e * inv).collect()
}

/// Softmax in f32 (−inf entries give 0).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let inv = 1.0 / exps.iter().sum::<f32>();
    exps.into_iter().map(|e| e * inv).collect()
}

/// Index of the largest value; the first one on ties (what greedy `top_k = 1` keeps when a tie
/// leaves several candidates is decided by the draw instead).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// A seeded source of draws for one generated item.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: ChaCha20Rng,
}

impl Sampler {
    /// The stream of item `item` under `seed`.
    pub fn new(seed: u64, item: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(item);
        Self { rng }
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Temperature, filtering, then one draw from the resulting distribution over `logits`.
    pub fn sample(&mut self, logits: &[f32], params: &SamplingParams) -> usize {
        let mut scaled: Vec<f32> = logits
            .iter()
            .map(|&x| x / params.temperature as f32)
            .collect();
        top_k_top_p_filtering(&mut scaled, params.top_k, params.top_p);
        let probs = softmax(&scaled);
        let u = self.uniform() * probs.iter().map(|&p| p as f64).sum::<f64>();
        let mut acc = 0.0;
        let mut last_kept = argmax(&probs);
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p as f64;
                last_kept = i;
                if u < acc {
                    return i;
                }
            }
        }
        // Only reachable through rounding at the very top of the range.
        last_kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_ties_with_the_kth_value() {
        let mut row = vec![3.0, 1.0, 2.0, 2.0, 2.0, 0.5];
        top_k_top_p_filtering(&mut row, 2, 1.0);
        let kept: Vec<bool> = row.iter().map(|v| v.is_finite()).collect();
        assert_eq!(kept, [true, false, true, true, true, false]);
    }

    #[test]
    fn draws_depend_only_on_seed_and_item() {
        let params = SamplingParams {
            top_k: 0,
            top_p: 1.0,
            temperature: 1.0,
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed, item| {
            let mut s = Sampler::new(seed, item);
            (0..20)
                .map(|_| s.sample(&logits, &params))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 3), draw(7, 3));
        assert_ne!(draw(7, 3), draw(7, 4));
        assert_ne!(draw(7, 3), draw(8, 3));
    }

    #[test]
    fn greedy_filtering_always_returns_the_best() {
        let params = SamplingParams {
            top_k: 1,
            top_p: 0.8,
            temperature: 1.0,
        };
        let logits = [0.1, 0.9, -3.0, 0.89];
        let mut s = Sampler::new(1, 0);
        assert!((0..100).all(|_| s.sample(&logits, &params) == 1));
    }
}
