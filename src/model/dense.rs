//! A linear layer (`y = x·Wᵀ + b`, weight stored `[out, in]` as in the original) that folds all
//! leading dimensions into one matrix product. candle's `Linear` instead broadcasts the weight
//! over the batch, which re-reads the whole weight matrix once per sequence: in batched decoding
//! that multiplies the memory traffic by the batch size.
//!
//! The weight can be held in f16 or bf16 while activations stay in f32: decoding steps read it
//! through the few-row kernel, which widens it as it streams, so a step reads half the bytes;
//! larger products widen it to f32 first.
//!
//! The weight can be quantized in place (ggml block formats through candle's `QMatMul`): batch-1
//! decoding reads every weight once per token, so fewer bytes per weight is the way past the
//! memory-bandwidth limit. Activations and the bias stay in float.
//!
//! Or it can be packed in bf16 (`--dtype packed-bf16`: AMX tiles, AVX-512 BF16 or AVX2): bf16
//! products with f32 accumulation, several times the f32 peak where products of many rows are
//! compute-bound on the first two.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

use crate::kernels::{self, PackedWeight};

#[derive(Debug, Clone)]
enum Weight {
    Float(Tensor),
    /// An f16 or bf16 weight under f32 activations.
    Half(Tensor),
    Quantized {
        matmul: QMatMul,
        dtype: DType,
    },
    /// Packed in bf16 for [`kernels::packed_bf16`], under f32 activations.
    Packed(Arc<PackedWeight>),
}

#[derive(Debug, Clone)]
pub struct Dense {
    weight: Weight,
    bias: Tensor,
    out_dim: usize,
}

impl Dense {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: Weight::Float(vb.get((out_dim, in_dim), "weight")?),
            bias: vb.get(out_dim, "bias")?,
            out_dim,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The dtype the layer computes in (f32 for a quantized one).
    pub fn dtype(&self) -> DType {
        match &self.weight {
            Weight::Float(w) => w.dtype(),
            Weight::Half(_) | Weight::Packed(_) => DType::F32,
            Weight::Quantized { dtype, .. } => *dtype,
        }
    }

    /// Keeps the weight in `dtype` (f16 or bf16) under f32 activations and bias.
    pub fn store_half(&mut self, dtype: DType) -> Result<()> {
        if let Weight::Float(w) = &self.weight {
            self.weight = Weight::Half(w.to_dtype(dtype)?);
            self.bias = self.bias.to_dtype(DType::F32)?;
        }
        Ok(())
    }

    /// Packs the weight for the bf16 kernels (bf16 products, f32 activations and bias). CPU
    /// only.
    pub fn store_packed(&mut self) -> Result<()> {
        if let Weight::Float(w) | Weight::Half(w) = &self.weight {
            if !w.device().is_cpu() {
                candle_core::bail!("packed-bf16 weights are for the CPU; use f16 or bf16 on a GPU");
            }
            self.weight = Weight::Packed(Arc::new(PackedWeight::pack(w)?));
            self.bias = self.bias.to_dtype(DType::F32)?;
        }
        Ok(())
    }

    /// Replaces the float weight by its `format` quantization. Returns false (and keeps the
    /// float weight) when the input width is not a multiple of the format's block size.
    pub fn quantize(&mut self, format: GgmlDType) -> Result<bool> {
        let Weight::Float(w) = &self.weight else {
            return Ok(true);
        };
        if w.dim(1)? % format.block_size() != 0 {
            return Ok(false);
        }
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, format)?;
        self.bias = self.bias.to_dtype(DType::F32)?;
        self.weight = Weight::Quantized {
            matmul: QMatMul::from_qtensor(q)?,
            dtype: DType::F32,
        };
        Ok(true)
    }
}

impl Dense {
    /// `[…, in]` → GELU of `[…, out]`, with the bias add and the activation in one pass.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, true)
    }

    /// `[…, in]` → `[…, cols.len()]`: only the outputs `cols` (a slice of the head, say). A
    /// float weight's rows are a view, so the other outputs cost nothing; a quantized weight
    /// computes them all and keeps the slice.
    pub fn forward_columns(&self, x: &Tensor, cols: std::ops::Range<usize>) -> Result<Tensor> {
        if cols == (0..self.out_dim) {
            return self.forward(x);
        }
        let narrowed = |w: &Tensor| w.narrow(0, cols.start, cols.len());
        let weight = match &self.weight {
            Weight::Float(w) => Weight::Float(narrowed(w)?),
            Weight::Half(w) => Weight::Half(narrowed(w)?),
            Weight::Quantized { .. } => {
                let last = x.rank().saturating_sub(1);
                return self.forward(x)?.narrow(last, cols.start, cols.len());
            }
            Weight::Packed(packed) => {
                let bias = self.bias.narrow(0, cols.start, cols.len())?;
                return Self::finish(
                    x,
                    |x| kernels::packed_matmul_t(x, packed, cols.clone()),
                    &bias,
                    false,
                );
            }
        };
        Dense {
            weight,
            bias: self.bias.narrow(0, cols.start, cols.len())?,
            out_dim: cols.len(),
        }
        .forward(x)
    }

    fn forward_with(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        let product = |x: &Tensor| match &self.weight {
            Weight::Float(w) | Weight::Half(w) => kernels::matmul_t(x, w),
            Weight::Quantized { matmul, .. } => matmul.forward(x),
            Weight::Packed(packed) => kernels::packed_matmul_t(x, packed, 0..self.out_dim),
        };
        Self::finish(x, product, &self.bias, gelu)
    }

    /// `[…, in]` → `[…, out]`: the leading dimensions folded into rows for `product`, then the
    /// bias and activation.
    fn finish(
        x: &Tensor,
        product: impl Fn(&Tensor) -> Result<Tensor>,
        bias: &Tensor,
        gelu: bool,
    ) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let in_dim = dims.pop().unwrap_or(0);
        let rows: usize = dims.iter().product();
        let y = product(&x.contiguous()?.reshape((rows, in_dim))?)?;
        dims.push(bias.dim(0)?);
        kernels::bias_activation(y, bias, gelu)?.reshape(dims)
    }
}

impl Module for Dense {
    /// `[…, in]` → `[…, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, false)
    }
}
