//! Bias and GELU in one pass on all cores, and the vectorisable `tanh` and `exp` the other
//! kernels share.
//!
//! candle runs the bias add and GELU as two single-core passes over memory each; at full sequence
//! length they cost a sizeable share of a forward. GELU's tanh and the softmax's exp are
//! approximations the compiler vectorises (libm's scalar `tanhf` was an eighth of a 350M forward,
//! `expf` most of a softmax), within 5 · 10⁻⁷ and 2 ulp of libm.

use super::cpu::{Simd, simd_variants};
use super::{differentiable, fusable, slice, slice_mut};
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
        true if differentiable::applies(&y) => differentiable::gelu(&y),
        true => y.gelu(),
        false => Ok(y),
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
        let (gelu, simd) = (self.gelu, Simd::best());
        y.par_chunks_mut(bias.len())
            .for_each(|row| bias_activation_row_simd(simd, row, bias, gelu));
        Ok(())
    }
}

/// `row += bias`, then GELU if asked: candle's f32 `gelu` (the tanh form) with a tanh that
/// vectorises.
#[inline(always)]
pub(super) fn bias_activation_row(row: &mut [f32], bias: &[f32], gelu: bool) {
    for (v, b) in row.iter_mut().zip(bias) {
        *v += b;
    }
    if gelu {
        for v in row.iter_mut() {
            let x = *v;
            *v = 0.5 * x * (1.0 + tanh(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)));
        }
    }
}

simd_variants!(pub(super) bias_activation_row_simd => bias_activation_row(row: &mut [f32], bias: &[f32], gelu: bool));

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

/// `eˣ` as Cephes' `expf` computes it (`2ᵏ · p(r)`, `x = k·ln 2 + r`), branch-free so that
/// loops over it vectorise; within 2 ulp of libm's scalar `expf`, which was most of a softmax's
/// time. For the softmaxes' `x − max ≤ 0` (valid up to 88.37, where `2ᵏ` would leave the
/// float exponent); below −87.3, where `eˣ` leaves the normal floats, it gives exactly 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MAX: f32 = 88.37;
    const MIN: f32 = -87.336_55;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that `x − k·ln 2` loses no bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer with plain float adds.
    const ROUND: f32 = 12_582_912.0;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_2e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_66,
        0.5,
    ];
    let xc = x.clamp(MIN, MAX);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let r2 = r * r;
    let p = P[0] * r + P[1];
    let p = p * r + P[2];
    let p = p * r + P[3];
    let p = p * r + P[4];
    let p = p * r + P[5];
    let y = p * r2 + r + 1.0;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < MIN { 0.0 } else { y * scale }
}
