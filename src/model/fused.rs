//! Inference kernels for the CPU that fuse elementwise passes and spread them over every core.
//!
//! candle runs its unary and binary maps (bias add, GELU, the two halves of the additive mask)
//! on one core, one full pass over memory each, while the matrix products around them use all
//! cores. At full sequence length those passes cost a sizeable share of a forward, so inference
//! does them here: in place, one pass, all cores. The masked softmax does the same float
//! operations in the same order as the unfused ops (bit-identical); GELU's tanh is a rational
//! approximation the compiler vectorises (libm's scalar `tanhf` was an eighth of a 350M forward),
//! within 5 · 10⁻⁷ of it. Anything else (other devices or dtypes, tensors that carry gradients,
//! i.e. training) takes the unfused path.

use super::attention::MASK_VALUE;
use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, D, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// `y + bias`, then GELU (tanh form) when `gelu`. `y`: `[…, out]`, `bias`: `[out]`.
pub fn bias_activation(y: Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    if fusable(&y) && fusable(bias) && bias.dims() == [y.dim(D::Minus1)?] {
        y.inplace_op2(bias, &BiasActivation { gelu })?;
        return Ok(y);
    }
    let y = y.broadcast_add(bias)?;
    match gelu {
        true if super::kernels::applies(&y) => super::kernels::gelu(&y),
        true => y.gelu(),
        false => Ok(y),
    }
}

/// The original's masking `s·m − 10000·(1−m)` followed by a softmax over the keys.
/// `scores`: `[B, heads, Sq, Sk]`; `keep`: `[B or 1, 1, Sq, Sk]` of 0/1.
pub fn masked_softmax(scores: Tensor, keep: &Tensor, penalty: &Tensor) -> Result<Tensor> {
    let (b, _, sq, sk) = scores.dims4()?;
    let (kb, kh, ksq, ksk) = keep.dims4()?;
    if fusable(&scores) && fusable(keep) && (kb == b || kb == 1) && (kh, ksq, ksk) == (1, sq, sk) {
        scores.inplace_op2(keep, &MaskedSoftmax)?;
        return Ok(scores);
    }
    let scores = scores.broadcast_mul(keep)?.broadcast_sub(penalty)?;
    candle_nn::ops::softmax_last_dim(&scores)
}

/// A fresh (or read-only) f32 tensor in one contiguous block on the CPU, outside any graph.
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu()
        && t.dtype() == candle_core::DType::F32
        && t.is_contiguous()
        && !t.track_op()
}

pub(super) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op on a strided tensor".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

fn slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op on a strided tensor".into()))?;
    match storage {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("fused op on a non-f32 tensor"),
    }
}

struct BiasActivation {
    gelu: bool,
}

impl InplaceOp2 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-activation"
    }

    fn cpu_fwd(&self, y: &mut CpuStorage, yl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<()> {
        let bias = slice(b, bl)?;
        let y = slice_mut(y, yl)?;
        let gelu = self.gelu;
        y.par_chunks_mut(bias.len()).for_each(|row| {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
            if gelu {
                // candle's f32 `gelu` (the tanh form), with a tanh that vectorises.
                for v in row.iter_mut() {
                    let x = *v;
                    *v = 0.5 * x * (1.0 + tanh(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)));
                }
            }
        });
        Ok(())
    }
}

pub(super) const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;

/// tanh as Eigen's and XLA's fast float kernel computes it: `x · p(x²) / q(x²)` on `x` clamped
/// to ±7.905 (where tanh rounds to ±1 in f32). Branch-free, so loops over it vectorise.
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_672e-11,
        2.000_188e-13,
        -2.760_768_5e-16,
    ];
    const B: [f32; 4] = [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    // Plain multiply-adds: `mul_add` is a libm call unless the build targets FMA.
    let p = x2 * A[6] + A[5];
    let p = x2 * p + A[4];
    let p = x2 * p + A[3];
    let p = x2 * p + A[2];
    let p = x2 * p + A[1];
    let p = x2 * p + A[0];
    let q = x2 * B[3] + B[2];
    let q = x2 * q + B[1];
    let q = x2 * q + B[0];
    x * p / q
}

struct MaskedSoftmax;

impl InplaceOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, sl: &Layout, k: &CpuStorage, kl: &Layout) -> Result<()> {
        let (_, heads, sq, sk) = sl.shape().dims4()?;
        let keep = slice(k, kl)?;
        let keep_rows = keep.len() / sk;
        let scores = slice_mut(s, sl)?;
        let penalty = MASK_VALUE as f32;
        scores
            .par_chunks_mut(sk)
            .enumerate()
            .for_each(|(row, scores)| {
                // Row `row` is (sample, head, query); the mask has one row per (sample, query),
                // or per query when it is shared by the batch.
                let (sample, query) = (row / (heads * sq), row % sq);
                let k = (sample * sq + query) % keep_rows;
                let keep = &keep[k * sk..(k + 1) * sk];
                let mut max = f32::NEG_INFINITY;
                for (s, &m) in scores.iter_mut().zip(keep) {
                    *s = *s * m - (m * -penalty + penalty);
                    max = max.max(*s);
                }
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                }
                // candle's own (SIMD) sum, so that the result matches its softmax bit for bit.
                let mut sum = 0f32;
                unsafe { <f32 as VecOps>::vec_reduce_sum(scores.as_ptr(), &mut sum, scores.len()) };
                for s in scores.iter_mut() {
                    *s /= sum;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn bias_is_bit_identical_and_gelu_within_rounding_of_the_unfused_ops() {
        let y = random(&[64, 10], 1);
        let bias = random(&[10], 2);
        let plain = y.broadcast_add(&bias).unwrap();
        let fused = bias_activation(y.copy().unwrap(), &bias, false).unwrap();
        assert_eq!(bits(&fused), bits(&plain));
        let want = plain
            .gelu()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = bias_activation(y.copy().unwrap(), &bias, true).unwrap();
        for (g, w) in got
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(&want)
        {
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "gelu {g} against {w}"
            );
        }
    }

    #[test]
    fn tanh_is_within_5e7_of_libm() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((tanh(x) - x.tanh()).abs());
        }
        for x in [0.0f32, 1e-30, -1e-8, 9.0, -9.0, 100.0, f32::MAX, f32::MIN] {
            assert!(
                (tanh(x) - x.tanh()).abs() <= 2e-7,
                "tanh({x}) = {}",
                tanh(x)
            );
        }
        assert!(worst <= 5e-7, "largest error {worst}");
    }

    #[test]
    fn masked_softmax_is_bit_identical_to_the_unfused_ops() {
        let (b, heads, sq, sk) = (2, 3, 4, 37);
        let scores = random(&[b, heads, sq, sk], 3);
        for kb in [1, b] {
            let keep = random(&[kb, 1, sq, sk], 4 + kb as u64)
                .ge(0.0)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let penalty = keep.affine(-MASK_VALUE, MASK_VALUE).unwrap();
            let plain = scores
                .broadcast_mul(&keep)
                .unwrap()
                .broadcast_sub(&penalty)
                .unwrap();
            let plain = candle_nn::ops::softmax_last_dim(&plain).unwrap();
            let fused = masked_softmax(scores.copy().unwrap(), &keep, &penalty).unwrap();
            assert_eq!(bits(&fused), bits(&plain), "mask batch {kb}");
        }
    }
}
