//! KV cache for incremental decoding. Unlike the original (which re-embeds and re-normalises
//! the whole prefix at every step), each call only computes the new positions; keys and values
//! live in buffers preallocated to the full sequence length.

use crate::config::Config;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &Config) -> Self {
        // Keys/values are [B, heads, seq, head_dim]: the sequence is dim 2.
        let layers = (0..cfg.num_layers)
            .map(|_| candle_nn::kv_cache::KvCache::new(2, cfg.total_seq_length()))
            .collect();
        Self { layers, len: 0 }
    }

    /// Positions already processed: the next call starts here.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
        self.len = 0;
    }

    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.layers[layer].append(&k.contiguous()?, &v.contiguous()?)
    }

    pub(crate) fn advance(&mut self, by: usize) {
        self.len += by;
    }
}
