//! Self-attention with CogView's PB-relax and the original's additive −10000 masking.

use super::dense::Dense;
use super::layer::Ops;
use crate::config::Config;
use crate::kernels::{self, MASK_VALUE};
use candle_core::{D, Result, Tensor};
use candle_nn::{Module, VarBuilder};

#[derive(Debug, Clone)]
pub struct Attention {
    query_key_value: Dense,
    dense: Dense,
    num_heads: usize,
    head_dim: usize,
}

/// A layer's effective mask for one call, pre-split into the two terms of `s·m − 10000·(1−m)`.
#[derive(Debug, Clone)]
pub struct AdditiveMask {
    /// `[B, 1, Sq, Sk]` 0/1.
    pub keep: Tensor,
    /// `[B, 1, Sq, Sk]` 0 or 10000.
    pub penalty: Tensor,
}

impl AdditiveMask {
    pub fn new(keep: Tensor) -> Result<Self> {
        let penalty = keep.affine(-MASK_VALUE, MASK_VALUE)?;
        Ok(Self { keep, penalty })
    }
}

impl Attention {
    pub(crate) fn denses_mut(&mut self) -> (&mut Dense, &mut Dense) {
        (&mut self.query_key_value, &mut self.dense)
    }

    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            query_key_value: Dense::new(h, 3 * h, vb.pp("query_key_value"))?,
            dense: Dense::new(h, h, vb.pp("dense"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: `[B, Sq, H]` (the new rows). `past`: keys/values of the earlier rows, to which the
    /// new ones are appended by the caller-provided `append`. Returns `[B, Sq, H]`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &AdditiveMask,
        ops: Ops<'_>,
        append: impl FnOnce(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, sq, h) = x.dims3()?;
        let qkv = self.query_key_value.forward(x)?;
        if !ops.differentiable {
            return self.dense.forward(&self.context(&qkv, mask, append)?);
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // [B, Sq, H] → [B, nh, Sq, hd]; q, k, v are contiguous thirds of the projection.
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * h, h)?
                .reshape((b, sq, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (k, v) = append(&heads(1)?, &heads(2)?)?;
        ops.dropout(
            self.dense
                .forward(&self.attend(&heads(0)?, &k, &v, mask, ops, scale)?)?,
        )
    }

    /// Inference attention of projected rows `qkv` `[B, Sq, 3H]` → the context `[B, Sq, H]`,
    /// before the output projection.
    fn context(
        &self,
        qkv: &Tensor,
        mask: &AdditiveMask,
        append: impl FnOnce(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, sq, _) = qkv.dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Views of the projection's thirds, [B, nh, Sq, hd], for the fused kernels, which read
        // them in place (the cache copies what it keeps).
        let qkv = qkv.reshape((b, sq, 3, self.num_heads, self.head_dim))?;
        let view = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let q = view(0)?;
        let (k, v) = append(&view(1)?, &view(2)?)?;
        if let Some(context) = kernels::fused_attention(&q, &k, &v, &mask.keep, scale as f32)? {
            return Ok(context);
        }
        let (q, k) = (q.contiguous()?, gemm_operand(&k)?);
        self.attend(&q, &k, &v, mask, Ops::default(), scale)
    }

    /// Inference over groups of rows that sit at different positions: `x` `[ΣB, Sq, H]` holds
    /// the groups one after another, `sizes` their row counts. The projections run once for all
    /// rows; each group attends to its own keys (`append(group, k, v)`) under its own mask.
    pub fn forward_groups<'m>(
        &self,
        x: &Tensor,
        sizes: &[usize],
        mask: impl Fn(usize) -> &'m AdditiveMask,
        mut append: impl FnMut(usize, &Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let qkv = self.query_key_value.forward(x)?;
        let mut contexts = Vec::with_capacity(sizes.len());
        let mut first = 0;
        for (group, &rows) in sizes.iter().enumerate() {
            let part = qkv.narrow(0, first, rows)?;
            contexts.push(self.context(&part, mask(group), |k, v| append(group, k, v))?);
            first += rows;
        }
        self.dense.forward(&Tensor::cat(&contexts, 0)?)
    }

    /// Attention by candle's ops, `[B, nh, Sq, hd]` each → the context `[B, Sq, H]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &AdditiveMask,
        ops: Ops<'_>,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, _, sq, _) = q.dims4()?;
        // PB-relax scales q before the product rather than the scores after it.
        let q = (q / scale.recip())?;
        let scores = q.matmul(&k.t()?)?; // [B, nh, Sq, Sk]
        let probs = kernels::masked_softmax(scores, &mask.keep, &mask.penalty, ops.differentiable)?;
        let probs = ops.dropout(probs)?;
        probs
            .matmul(&gemm_operand(v)?)? // [B, nh, Sq, hd]
            .transpose(1, 2)?
            .reshape((b, sq, self.num_heads * self.head_dim))
    }
}

/// Keys or values `[B, nh, S, hd]` as the matrix product can read them. cuBLAS takes a KV cache's
/// view in place (rows of `hd` packed elements, `hd` apart, heads one stride apart), which saves
/// copying the whole cache twice per layer and step; a view of the fused projection, or any
/// operand on the CPU, is packed first.
fn gemm_operand(t: &Tensor) -> Result<Tensor> {
    let (_, nh, _, hd) = t.dims4()?;
    let st = t.stride();
    if !t.device().is_cpu() && st[3] == 1 && st[2] == hd && st[0] == st[1] * nh {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}
