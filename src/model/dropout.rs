//! Dropout for training, drawn from our own seeded generator so that a resumed run makes the
//! same draws as an uninterrupted one.

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Mutex, PoisonError};

#[derive(Debug)]
pub struct Dropout {
    p: f32,
    // Behind a lock only so that a forward pass can move to the thread pool; one thread draws.
    rng: Mutex<ChaCha8Rng>,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Self {
        Self {
            p,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    pub fn p(&self) -> f32 {
        self.p
    }

    /// Where the generator stands, to save with a checkpoint.
    pub fn position(&self) -> u128 {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_word_pos()
    }

    /// Moves the generator to a saved position.
    pub fn set_position(&self, pos: u128) {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_word_pos(pos);
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 − p)`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let scale = 1.0 / (1.0 - self.p);
        let threshold = (self.p as f64 * u32::MAX as f64) as u32;
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        let keep: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.next_u32() >= threshold {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let keep = Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * keep
    }
}
