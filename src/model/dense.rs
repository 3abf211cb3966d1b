//! A linear layer (`y = x·Wᵀ + b`, weight stored `[out, in]` as in the original) that folds all
//! leading dimensions into one matrix product. candle's `Linear` instead broadcasts the weight
//! over the batch, which re-reads the whole weight matrix once per sequence: in batched decoding
//! that multiplies the memory traffic by the batch size.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: vb.get(out_dim, "bias")?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Dense {
    /// `[…, in]` → `[…, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(0);
        let rows: usize = dims.iter().product();
        let y = x
            .contiguous()?
            .reshape((rows, in_dim))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        dims.push(self.weight.dim(0)?);
        y.reshape(dims)
    }
}
