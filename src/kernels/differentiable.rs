//! Training kernels for the CPU: GELU, swish, LayerNorm and the masked attention softmax as single ops
//! with hand-written backward passes, on all cores.
//!
//! Built from candle's elementwise ops, each of these is a chain of passes over memory in both
//! directions (LayerNorm: nine forward, about twenty backward; GELU's backward calls libm's `powf`
//! and `tanhf` per element), most of them on one core, each allocating a fresh tensor. On the
//! built-in model's training step they were most of the time outside the matrix products. The
//! maths is the composite forms' (tested against them, values and gradients); only rounding
//! differs. Other devices and dtypes take the composite forms.

use super::MASK_VALUE;
use super::activation::{SQRT_TWO_OVER_PI, exp, tanh};
use super::slice;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether the training kernels apply to `t`: an f32 tensor on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// Elements per parallel chunk of an elementwise pass.
const CHUNK: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// Pointwise activations: GELU (tanh form, the original's `gelu_jit`) and swish (taming's
// `nonlinearity`)

/// GELU with its gradient.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GELU)
}

/// Swish `x·σ(x)` with its gradient.
pub fn swish(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SWISH)
}

/// A pointwise function and its derivative, one pass each way on all cores.
#[derive(Clone, Copy)]
struct Pointwise {
    /// The op's name and its backward pass's.
    names: [&'static str; 2],
    f: fn(f32) -> f32,
    df: fn(f32) -> f32,
}

const GELU: Pointwise = Pointwise {
    names: ["rudolph-gelu", "rudolph-gelu-backward"],
    f: |x| 0.5 * x * (1.0 + tanh(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x))),
    // With u = √(2/π)(x + 0.044715x³):
    // gelu'(x) = ½(1 + tanh u) + ½x(1 − tanh² u)·√(2/π)(1 + 3·0.044715x²).
    df: |x| {
        let x2 = x * x;
        let t = tanh(SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x2));
        let du = SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * x2);
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    },
};

const SWISH: Pointwise = Pointwise {
    names: ["rudolph-swish", "rudolph-swish-backward"],
    f: |x| x * sigmoid(x),
    // σ(x) + x·σ(x)·(1 − σ(x))
    df: |x| {
        let s = sigmoid(x);
        s + x * s * (1.0 - s)
    },
};

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        self.names[0]
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = slice(s, l)?.to_vec();
        let f = self.f;
        y.par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &PointwiseBackward(*self),
        )?))
    }
}

/// `(x, grad_y)` → `grad_y · f'(x)`.
struct PointwiseBackward(Pointwise);

impl CustomOp2 for PointwiseBackward {
    fn name(&self) -> &'static str {
        self.0.names[1]
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(xs, xl)?, slice(gs, gl)?);
        if x.len() != g.len() {
            candle_core::bail!(
                "{} gradient {:?} does not fit",
                self.0.names[0],
                gl.shape().dims()
            );
        }
        let df = self.0.df;
        let mut out = g.to_vec();
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o *= df(x);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension (biased variance, affine)

/// `(x − mean) / √(var + ε) · weight + bias` over the last dimension, with its gradients.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

#[derive(Clone, Copy)]
struct LayerNorm {
    eps: f64,
}

/// Mean and 1/σ of one row, accumulated in f64 so that long rows round as little as the
/// composite form's pairwise sums.
fn row_stats(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

fn width_of(x: &Layout, w: &[f32], b: &[f32]) -> Result<usize> {
    let h = x.shape().dims().last().copied().unwrap_or(0);
    if h == 0 || w.len() != h || b.len() != h {
        candle_core::bail!(
            "layer norm of {:?} with weight {} and bias {}",
            x.shape().dims(),
            w.len(),
            b.len()
        );
    }
    Ok(h)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "rudolph-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let h = width_of(xl, w, b)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let (mean, rstd) = row_stats(x, self.eps);
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = weight.elem_count();
        let rows = x.elem_count() / h;
        // One op computes all three gradients: `[dx (rows·h) | dweight (h) | dbias (h)]`.
        let all = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = all.narrow(0, 0, rows * h)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows * h, h)?.reshape(weight.shape())?;
        let db = all.narrow(0, rows * h + h, h)?.reshape(weight.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, grad_y)` → `[dx | dweight | dbias]` flattened. With `x̂ = (x − mean)·rstd` and
/// `g = grad_y · weight`: `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))`, `dweight = Σ grad_y·x̂`,
/// `dbias = Σ grad_y` over rows.
struct LayerNormBackward {
    eps: f64,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "rudolph-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?);
        let h = width_of(xl, w, w)?;
        if g.len() != x.len() {
            candle_core::bail!("layer norm gradient {:?} does not fit", gl.shape().dims());
        }
        let mut out = vec![0f32; x.len() + 2 * h];
        let (dx, _) = out.split_at_mut(x.len());
        // Rows in blocks, each block summing its own dweight/dbias; the blocks' sums are added
        // at the end in block order, so the result does not depend on the thread count.
        let block_rows = (CHUNK / h).max(1);
        let partial: Vec<Vec<f64>> = dx
            .par_chunks_mut(block_rows * h)
            .zip(x.par_chunks(block_rows * h))
            .zip(g.par_chunks(block_rows * h))
            .map(|((dx, x), gy)| {
                let mut sums = vec![0f64; 2 * h];
                for ((dx, x), gy) in dx.chunks_mut(h).zip(x.chunks(h)).zip(gy.chunks(h)) {
                    let (mean, rstd) = row_stats(x, self.eps);
                    let (mut mean_g, mut mean_gx) = (0f64, 0f64);
                    for i in 0..h {
                        let xh = (x[i] - mean) * rstd;
                        let gi = gy[i] * w[i];
                        mean_g += gi as f64;
                        mean_gx += (gi * xh) as f64;
                        sums[i] += (gy[i] * xh) as f64;
                        sums[h + i] += gy[i] as f64;
                    }
                    let (mean_g, mean_gx) =
                        ((mean_g / h as f64) as f32, (mean_gx / h as f64) as f32);
                    for i in 0..h {
                        let xh = (x[i] - mean) * rstd;
                        dx[i] = rstd * (gy[i] * w[i] - mean_g - xh * mean_gx);
                    }
                }
                sums
            })
            .collect();
        let tail = &mut out[x.len()..];
        for sums in partial {
            for (t, s) in tail.iter_mut().zip(&sums) {
                *t += *s as f32;
            }
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Masked softmax over attention scores

/// `softmax(s·m − 10000·(1 − m))` over the last dimension, with the gradient for the scores.
/// `scores`: `[B, heads, Sq, Sk]`; `keep`: `[B or 1, 1, Sq, Sk]` of 0/1 (no gradient).
///
/// The original's PB-relax (scores divided by 32, their maximum subtracted, multiplied back)
/// is a shift of each row, which softmax ignores; this subtracts each row's own maximum.
pub fn masked_softmax(scores: &Tensor, keep: &Tensor) -> Result<Tensor> {
    let (b, _, sq, sk) = scores.dims4()?;
    let (kb, kh, ksq, ksk) = keep.dims4()?;
    if !(kb == b || kb == 1) || (kh, ksq, ksk) != (1, sq, sk) {
        candle_core::bail!(
            "mask {:?} does not fit scores {:?}",
            keep.dims(),
            scores.dims()
        );
    }
    scores
        .contiguous()?
        .apply_op2(&keep.detach().contiguous()?, MaskedSoftmax)
}

struct MaskedSoftmax;

/// The mask row of score row `row` (sample, head, query) of `[B, heads, Sq, Sk]`.
fn mask_row(keep: &[f32], row: usize, heads: usize, sq: usize, sk: usize) -> &[f32] {
    let keep_rows = keep.len() / sk;
    let (sample, query) = (row / (heads * sq), row % sq);
    let k = (sample * sq + query) % keep_rows;
    &keep[k * sk..(k + 1) * sk]
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "rudolph-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, heads, sq, sk) = sl.shape().dims4()?;
        let keep = slice(ks, kl)?;
        let mut p = slice(ss, sl)?.to_vec();
        let penalty = MASK_VALUE as f32;
        p.par_chunks_mut(sk).enumerate().for_each(|(row, p)| {
            let keep = mask_row(keep, row, heads, sq, sk);
            let mut max = f32::NEG_INFINITY;
            for (s, &m) in p.iter_mut().zip(keep) {
                *s = *s * m - (m * -penalty + penalty);
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in p.iter_mut() {
                *s = exp(*s - max);
                sum += *s;
            }
            for s in p.iter_mut() {
                *s /= sum;
            }
        });
        Ok((CpuStorage::F32(p), sl.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        keep: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = probs.apply_op3_no_bwd(&grad.contiguous()?, keep, &MaskedSoftmaxBackward)?;
        Ok((Some(ds), None))
    }
}

/// `(p, grad_p, keep)` → `keep · p · (grad_p − Σ grad_p·p)` per row.
struct MaskedSoftmaxBackward;

impl CustomOp3 for MaskedSoftmaxBackward {
    fn name(&self) -> &'static str {
        "rudolph-masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, heads, sq, sk) = pl.shape().dims4()?;
        let (p, keep) = (slice(ps, pl)?, slice(ks, kl)?);
        let mut ds = slice(gs, gl)?.to_vec();
        if ds.len() != p.len() {
            candle_core::bail!("softmax gradient {:?} does not fit", gl.shape().dims());
        }
        ds.par_chunks_mut(sk)
            .zip(p.par_chunks(sk))
            .enumerate()
            .for_each(|(row, (g, p))| {
                let keep = mask_row(keep, row, heads, sq, sk);
                let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
                for ((g, &p), &m) in g.iter_mut().zip(p).zip(keep) {
                    *g = m * p * (*g - dot);
                }
            });
        Ok((CpuStorage::F32(ds), pl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-5;
    use candle_core::{D, DType, Device, Var};

    fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (g, w)) in g.iter().zip(&w).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} against {w} (scale {scale})"
            );
        }
    }

    /// The kernel's and the composite form's values, and the gradients of `Σ out·r` (a random
    /// `r`, so every output element matters) with respect to each input.
    fn compare(
        what: &str,
        inputs: &[Tensor],
        kernel: impl Fn(&[Tensor]) -> Result<Tensor>,
        composite: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let got = kernel(&ts).unwrap();
        let want = composite(&ts).unwrap();
        close(&format!("{what} value"), &got, &want, tol);
        let r = random(got.dims(), 99, 2.0);
        let g_got = (&got * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            if let (Some(a), Some(b)) = (g_got.get(v), g_want.get(v)) {
                close(&format!("{what} gradient {i}"), a, b, tol);
            } else {
                assert!(
                    g_got.get(v).is_none() && g_want.get(v).is_none(),
                    "{what}: gradient {i} reached only one form"
                );
            }
        }
    }

    #[test]
    fn gelu_matches_candles_value_and_gradient() {
        let x = random(&[7, 300], 1, 12.0);
        compare("gelu", &[x], |t| gelu(&t[0]), |t| t[0].gelu(), 5e-6);
    }

    #[test]
    fn layer_norm_matches_the_composite_form() {
        let (x, w, b) = (
            random(&[3, 5, 64], 2, 6.0).affine(1.0, 3.0).unwrap(),
            random(&[64], 3, 2.0),
            random(&[64], 4, 2.0),
        );
        compare(
            "layer norm",
            &[x, w, b],
            |t| layer_norm(&t[0], &t[1], &t[2], EPS),
            |t| {
                let x = &t[0];
                let mean = x.mean_keepdim(D::Minus1)?;
                let centred = x.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred
                    .broadcast_div(&(var + EPS)?.sqrt()?)?
                    .broadcast_mul(&t[1])?
                    .broadcast_add(&t[2])
            },
            2e-5,
        );
    }

    #[test]
    fn masked_softmax_matches_the_composite_form_with_pb_relax() {
        let (b, heads, sq, sk) = (2, 3, 5, 9);
        let scores = random(&[b, heads, sq, sk], 5, 20.0);
        for kb in [1, b] {
            let keep = random(&[kb, 1, sq, sk], 6 + kb as u64, 1.0)
                .ge(-0.2)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let penalty = keep.affine(-MASK_VALUE, MASK_VALUE).unwrap();
            compare(
                &format!("masked softmax (mask batch {kb})"),
                std::slice::from_ref(&scores),
                |t| masked_softmax(&t[0], &keep),
                |t| {
                    let s = t[0].broadcast_mul(&keep)?.broadcast_sub(&penalty)?;
                    let s = s.affine(1.0 / 32.0, 0.0)?;
                    let max = s
                        .detach()
                        .flatten_from(2)?
                        .max_keepdim(D::Minus1)?
                        .unsqueeze(D::Minus1)?;
                    let s = s.broadcast_sub(&max)?.affine(32.0, 0.0)?;
                    candle_nn::ops::softmax(&s, D::Minus1)
                },
                1e-5,
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = random(&[2, 8], 1, 1.0);
        assert!(layer_norm(&x, &random(&[7], 2, 1.0), &random(&[8], 3, 1.0), EPS).is_err());
        assert!(
            masked_softmax(
                &random(&[1, 2, 3, 4], 1, 1.0),
                &random(&[1, 1, 3, 5], 2, 1.0)
            )
            .is_err()
        );
    }
}
