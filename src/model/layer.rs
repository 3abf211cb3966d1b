//! One pre-LN decoder block with CogView's sandwich LayerNorms around both sublayers.

use super::attention::{AdditiveMask, Attention};
use super::dense::Dense;
use crate::config::Config;
use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

pub const LAYER_NORM_EPS: f64 = 1e-5;

/// How a forward pass computes: inference uses candle's fused kernels, which have no backward
/// pass (their gradients silently come back empty); training needs the composite forms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ops<'a> {
    pub differentiable: bool,
    /// Training-time dropout on attention probabilities and sublayer outputs.
    pub dropout: Option<&'a super::dropout::Dropout>,
}

impl Ops<'_> {
    pub fn dropout(&self, x: Tensor) -> Result<Tensor> {
        match self.dropout {
            Some(d) => d.apply(&x),
            None => Ok(x),
        }
    }
}

/// LayerNorm (biased variance, affine), fused for inference and composite for training.
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    pub fn new(size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
        })
    }

    pub fn forward(&self, x: &Tensor, ops: Ops<'_>) -> Result<Tensor> {
        crate::kernels::layer_norm(
            x,
            &self.weight,
            &self.bias,
            LAYER_NORM_EPS,
            ops.differentiable,
        )
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    dense_h_to_4h: Dense,
    dense_4h_to_h: Dense,
}

impl Mlp {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            dense_h_to_4h: Dense::new(h, 4 * h, vb.pp("dense_h_to_4h"))?,
            dense_4h_to_h: Dense::new(4 * h, h, vb.pp("dense_4h_to_h"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, the original's `gelu_jit`.
        self.dense_4h_to_h
            .forward(&self.dense_h_to_4h.forward_gelu(x)?)
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    input_layernorm: Norm,
    attention: Attention,
    before_first_addition_layernorm: Norm,
    post_attention_layernorm: Norm,
    mlp: Mlp,
    before_second_addition_layernorm: Norm,
}

impl Layer {
    /// The layer's four linear maps.
    pub(crate) fn denses_mut(&mut self) -> [&mut Dense; 4] {
        let (qkv, dense) = self.attention.denses_mut();
        [
            qkv,
            dense,
            &mut self.mlp.dense_h_to_4h,
            &mut self.mlp.dense_4h_to_h,
        ]
    }

    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let ln = |name: &str| Norm::new(h, vb.pp(name));
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
        ops: Ops<'_>,
        append: impl FnOnce(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h, ops)?;
        let a = self.attention.forward(&x, mask, ops, append)?;
        let h = (h + self.before_first_addition_layernorm.forward(&a, ops)?)?;
        let y = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h, ops)?)?;
        let y = ops.dropout(y)?;
        h + self.before_second_addition_layernorm.forward(&y, ops)?
    }

    /// Inference over groups of rows at different positions (see
    /// [`Attention::forward_groups`]): `h` `[ΣB, Sq, H]` → the same shape.
    pub fn forward_groups<'m>(
        &self,
        h: &Tensor,
        sizes: &[usize],
        mask: impl Fn(usize) -> &'m AdditiveMask,
        append: impl FnMut(usize, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let ops = Ops::default();
        let x = self.input_layernorm.forward(h, ops)?;
        let a = self.attention.forward_groups(&x, sizes, mask, append)?;
        let h = (h + self.before_first_addition_layernorm.forward(&a, ops)?)?;
        let y = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h, ops)?)?;
        h + self.before_second_addition_layernorm.forward(&y, ops)?
    }
}
