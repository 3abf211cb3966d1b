//! One pre-LN decoder block with CogView's sandwich LayerNorms around both sublayers.

use super::attention::{AdditiveMask, Attention};
use crate::config::Config;
use candle_core::{Result, Tensor};
use candle_nn::{LayerNorm, Linear, Module, VarBuilder, layer_norm, linear};

pub const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
pub struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

impl Mlp {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            dense_h_to_4h: linear(h, 4 * h, vb.pp("dense_h_to_4h"))?,
            dense_4h_to_h: linear(4 * h, h, vb.pp("dense_4h_to_h"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, the original's `gelu_jit`.
        self.dense_4h_to_h
            .forward(&self.dense_h_to_4h.forward(x)?.gelu()?)
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    input_layernorm: LayerNorm,
    attention: Attention,
    before_first_addition_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    mlp: Mlp,
    before_second_addition_layernorm: LayerNorm,
}

impl Layer {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let ln = |name: &str| layer_norm(h, LAYER_NORM_EPS, vb.pp(name));
        Ok(Self {
            input_layernorm: ln("input_layernorm")?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            before_first_addition_layernorm: ln("before_first_addition_layernorm")?,
            post_attention_layernorm: ln("post_attention_layernorm")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            before_second_addition_layernorm: ln("before_second_addition_layernorm")?,
        })
    }

    /// `h`: `[B, Sq, H]` hidden states of the new rows → the same shape.
    pub fn forward(
        &self,
        h: &Tensor,
        mask: &AdditiveMask,
        append: impl FnOnce(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let a = self
            .attention
            .forward(&self.input_layernorm.forward(h)?, mask, append)?;
        let h = (h + self.before_first_addition_layernorm.forward(&a)?)?;
        let y = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?;
        h + self.before_second_addition_layernorm.forward(&y)?
    }
}
