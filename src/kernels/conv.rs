//! CPU training kernels of the VQGAN: convolution, group norm and ×2 nearest upsampling, each
//! with its backward pass, as candle custom ops (its swish is in `differentiable`).
//!
//! Built from candle's generic ops, one training step of the world's VQGAN on 8 pictures of
//! 64 px took over 2 s (about 4 GFLOP/s): candle's elementwise maps run on one core, the
//! im2col of a convolution was nine strided copies and a concatenation, and every intermediate
//! was a fresh allocation. Here a convolution is an im2col and one GEMM per picture, a norm is
//! one pass per group, and both spread pictures (or groups) over all cores. Only tensors that
//! carry gradients take these paths (see `taming`); inference keeps candle's ops.

use super::slice;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, each operand given by its row and column strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index the GEMM reads or writes inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Pictures go to different cores when there are enough of them; otherwise each GEMM uses all.
fn inner_parallelism(batch: usize) -> Parallelism {
    if batch >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// The shape of a 2-D convolution: square kernel, one stride, zero padding that may differ on
/// each side (taming's downsampling pads only right and bottom).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    /// Top, bottom, left, right.
    pub pad: [usize; 4],
}

impl ConvGeometry {
    pub fn symmetric(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel,
            stride,
            pad: [padding; 4],
        }
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (k, s) = (self.kernel, self.stride);
        let (hp, wp) = (h + self.pad[0] + self.pad[1], w + self.pad[2] + self.pad[3]);
        if hp < k || wp < k || s == 0 {
            candle_core::bail!("convolution of a {h}×{w} input with a {k}×{k} kernel, stride {s}");
        }
        Ok(((hp - k) / s + 1, (wp - k) / s + 1))
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.pad == [0; 4]
    }

    /// The input pixel row (or column) that output row `o` reads through tap `t`, if inside.
    fn source(&self, o: usize, t: usize, before: usize, len: usize) -> Option<usize> {
        (o * self.stride + t)
            .checked_sub(before)
            .filter(|&i| i < len)
    }

    /// The outputs `o0..o1` whose tap `t` falls inside `0..len`, and the input of `o0`.
    fn valid(&self, t: usize, before: usize, len: usize, outs: usize) -> (usize, usize, usize) {
        let s = self.stride;
        // o·s + t − before ≥ 0  and  o·s + t − before < len
        let o0 = before.saturating_sub(t).div_ceil(s);
        let o1 = (len + before).saturating_sub(t).div_ceil(s).min(outs);
        let o0 = o0.min(o1);
        (o0, o1, (o0 * s + t).saturating_sub(before))
    }

    /// `x` `[C, H, W]` → `cols` `[C·k·k, Ho·Wo]`, rows in the weight's `(c, ky, kx)` order.
    fn im2col(&self, x: &[f32], (c, h, w): (usize, usize, usize), cols: &mut [f32]) -> Result<()> {
        let (ho, wo) = self.out_size(h, w)?;
        let (k, s) = (self.kernel, self.stride);
        for ci in 0..c {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((ci * k + ky) * k + kx) * ho * wo..][..ho * wo];
                    let (ox0, ox1, ix0) = self.valid(kx, self.pad[2], w, wo);
                    for oy in 0..ho {
                        let out = &mut row[oy * wo..(oy + 1) * wo];
                        let Some(iy) = self.source(oy, ky, self.pad[0], h) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * w..(iy + 1) * w];
                        out[..ox0].fill(0.0);
                        out[ox1..].fill(0.0);
                        if s == 1 {
                            out[ox0..ox1].copy_from_slice(&src[ix0..ix0 + (ox1 - ox0)]);
                        } else {
                            for (j, o) in out[ox0..ox1].iter_mut().enumerate() {
                                *o = src[ix0 + j * s];
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The adjoint of [`Self::im2col`]: adds each column entry back onto the pixel it came from.
    fn col2im(&self, cols: &[f32], (c, h, w): (usize, usize, usize), x: &mut [f32]) -> Result<()> {
        let (ho, wo) = self.out_size(h, w)?;
        let (k, s) = (self.kernel, self.stride);
        x.fill(0.0);
        for ci in 0..c {
            let plane = &mut x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((ci * k + ky) * k + kx) * ho * wo..][..ho * wo];
                    let (ox0, ox1, ix0) = self.valid(kx, self.pad[2], w, wo);
                    for oy in 0..ho {
                        let Some(iy) = self.source(oy, ky, self.pad[0], h) else {
                            continue;
                        };
                        let dst = &mut plane[iy * w..(iy + 1) * w];
                        let src = &row[oy * wo + ox0..oy * wo + ox1];
                        if s == 1 {
                            let dst = &mut dst[ix0..ix0 + src.len()];
                            dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
                        } else {
                            for (j, v) in src.iter().enumerate() {
                                dst[ix0 + j * s] += v;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `conv2d(x, weight) + bias` with gradients for all three.
/// `x`: `[B, C, H, W]`, `weight`: `[O, C, k, k]`, `bias`: `[O]` → `[B, O, Ho, Wo]`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    geometry: ConvGeometry,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Conv2d { geometry },
    )
}

struct Conv2d {
    geometry: ConvGeometry,
}

struct ConvDims {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    ho: usize,
    wo: usize,
    /// `C·k·k`, the inner dimension of the GEMM.
    ckk: usize,
}

impl ConvDims {
    fn new(geometry: &ConvGeometry, x: &Shape, weight: &Shape) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (o, wc, k1, k2) = weight.dims4()?;
        let k = geometry.kernel;
        if wc != c || k1 != k || k2 != k {
            candle_core::bail!(
                "convolution weight {:?} does not fit input {:?} and kernel {k}",
                weight.dims(),
                x.dims()
            );
        }
        let (ho, wo) = geometry.out_size(h, w)?;
        Ok(Self {
            b,
            c,
            h,
            w,
            o,
            ho,
            wo,
            ckk: c * k * k,
        })
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "rudolph-conv2d"
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
        let d = ConvDims::new(&self.geometry, xl.shape(), wl.shape())?;
        let (x, weight, bias) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let (chw, plane) = (d.c * d.h * d.w, d.ho * d.wo);
        let par = inner_parallelism(d.b);
        let mut y = vec![0f32; d.b * d.o * plane];
        y.par_chunks_mut(d.o * plane)
            .enumerate()
            .try_for_each(|(bi, y)| -> Result<()> {
                let xb = &x[bi * chw..(bi + 1) * chw];
                let cols_buf;
                let cols = if self.geometry.is_pointwise() {
                    xb
                } else {
                    let mut buf = vec![0f32; d.ckk * plane];
                    self.geometry.im2col(xb, (d.c, d.h, d.w), &mut buf)?;
                    cols_buf = buf;
                    &cols_buf
                };
                matmul(
                    (d.o, plane, d.ckk),
                    y,
                    false,
                    weight,
                    (d.ckk, 1),
                    cols,
                    (plane, 1),
                    par,
                );
                for (row, &bv) in y.chunks_mut(plane).zip(bias) {
                    row.iter_mut().for_each(|v| *v += bv);
                }
                Ok(())
            })?;
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.o, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(
            weight,
            &grad.contiguous()?,
            &Conv2dBackward {
                geometry: self.geometry,
            },
        )?;
        let (nx, nw) = (x.elem_count(), weight.elem_count());
        let dx = flat.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = flat.narrow(0, nx, nw)?.reshape(weight.shape())?;
        let db = flat
            .narrow(0, nx + nw, bias.elem_count())?
            .reshape(bias.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, grad_y)` → `[dx | dweight | dbias]` flattened into one vector.
struct Conv2dBackward {
    geometry: ConvGeometry,
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "rudolph-conv2d-backward"
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
        let d = ConvDims::new(&self.geometry, xl.shape(), wl.shape())?;
        let (x, weight, grad) = (slice(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?);
        let (chw, plane) = (d.c * d.h * d.w, d.ho * d.wo);
        if grad.len() != d.b * d.o * plane {
            candle_core::bail!("convolution gradient {:?} does not fit", gl.shape().dims());
        }
        let pointwise = self.geometry.is_pointwise();
        let par = inner_parallelism(d.b);
        let mut dx = vec![0f32; d.b * chw];
        // Each picture's own weight and bias gradients, [dW (O·Ckk) | db (O)], added up in
        // picture order below: per-thread partial sums would group the pictures as the
        // scheduler happens to split them, and training would not be reproducible.
        let partials = dx
            .par_chunks_mut(chw)
            .enumerate()
            .map(|(bi, dxb)| -> Result<Vec<f32>> {
                let mut acc = vec![0f32; d.o * d.ckk + d.o];
                let xb = &x[bi * chw..(bi + 1) * chw];
                let gb = &grad[bi * d.o * plane..(bi + 1) * d.o * plane];
                let (dw, db) = acc.split_at_mut(d.o * d.ckk);
                let mut cols = if pointwise {
                    Vec::new()
                } else {
                    let mut buf = vec![0f32; d.ckk * plane];
                    self.geometry.im2col(xb, (d.c, d.h, d.w), &mut buf)?;
                    buf
                };
                let colsv: &[f32] = if pointwise { xb } else { &cols };
                // dW = dY [O, P] · colsᵀ [P, Ckk]
                matmul(
                    (d.o, d.ckk, plane),
                    dw,
                    false,
                    gb,
                    (plane, 1),
                    colsv,
                    (1, plane),
                    par,
                );
                for (s, row) in db.iter_mut().zip(gb.chunks(plane)) {
                    *s += row.iter().sum::<f32>();
                }
                // dcols = Wᵀ [Ckk, O] · dY [O, P] (a 1×1 convolution's columns are its pixels),
                // then back onto the pixels.
                let dcols: &mut [f32] = if pointwise { &mut *dxb } else { &mut cols };
                matmul(
                    (d.ckk, plane, d.o),
                    dcols,
                    false,
                    weight,
                    (1, d.ckk),
                    gb,
                    (plane, 1),
                    par,
                );
                if !pointwise {
                    self.geometry.col2im(&cols, (d.c, d.h, d.w), dxb)?;
                }
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut partial = vec![0f32; d.o * d.ckk + d.o];
        for p in &partials {
            partial.iter_mut().zip(p).for_each(|(x, y)| *x += y);
        }
        dx.extend_from_slice(&partial);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
}

/// `GroupNorm(x)·γ + β` with gradients for all three. `x`: `[B, C, H, W]`, `gamma`, `beta`:
/// `[C]`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNorm { groups, eps },
    )
}

#[derive(Clone, Copy)]
struct GroupNorm {
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `(B, C, H·W)` of a `[B, C, H, W]` input whose channels split into the groups.
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let (b, c, h, w) = shape.dims4()?;
        if self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!("group norm: {c} channels in {} groups", self.groups);
        }
        Ok((b, c, h * w))
    }

    /// Mean and reciprocal standard deviation of one group (biased variance, as PyTorch).
    fn stats(&self, chunk: &[f32]) -> (f32, f32) {
        let n = chunk.len() as f64;
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = chunk
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "rudolph-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = self.dims(xl.shape())?;
        let (x, gamma, beta) = (slice(xs, xl)?, slice(gs, gl)?, slice(bs, bl)?);
        let cpg = c / self.groups;
        let mut y = x.to_vec();
        // Chunk i is group (i % groups) of picture (i / groups).
        y.par_chunks_mut(cpg * hw)
            .enumerate()
            .for_each(|(i, chunk)| {
                let (mean, rstd) = self.stats(chunk);
                let c0 = (i % self.groups) * cpg;
                for (j, row) in chunk.chunks_mut(hw).enumerate() {
                    let (g, b) = (gamma[c0 + j], beta[c0 + j]);
                    for v in row {
                        *v = (*v - mean) * rstd * g + b;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &GroupNormBackward(*self))?;
        let (nx, c) = (x.elem_count(), gamma.elem_count());
        let dx = flat.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dgamma = flat.narrow(0, nx, c)?;
        let dbeta = flat.narrow(0, nx + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, γ, grad_out)` → `[dx | dγ | dβ]` flattened into one vector.
struct GroupNormBackward(GroupNorm);

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "rudolph-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let (_, c, hw) = op.dims(xl.shape())?;
        let (x, gamma, dout) = (slice(xs, xl)?, slice(gs, gl)?, slice(ds, dl)?);
        if dout.len() != x.len() {
            candle_core::bail!("group norm gradient {:?} does not fit", dl.shape().dims());
        }
        let cpg = c / op.groups;
        let n = (cpg * hw) as f32;
        let mut dx = vec![0f32; x.len()];
        // Chunk i is group (i % groups) of picture (i / groups); each returns its channels'
        // partial sums of dγ and dβ.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(cpg * hw)
            .enumerate()
            .map(|(i, dxc)| {
                let xc = &x[i * cpg * hw..(i + 1) * cpg * hw];
                let dc = &dout[i * cpg * hw..(i + 1) * cpg * hw];
                let (mean, rstd) = op.stats(xc);
                let c0 = (i % op.groups) * cpg;
                let (mut dgamma, mut dbeta) = (vec![0f32; cpg], vec![0f32; cpg]);
                let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
                // First pass: dxc holds dx̂ = dy·γ.
                for j in 0..cpg {
                    let g = gamma[c0 + j];
                    for p in j * hw..(j + 1) * hw {
                        let xh = (xc[p] - mean) * rstd;
                        let dt = dc[p];
                        dgamma[j] += dt * xh;
                        dbeta[j] += dt;
                        let dxh = dt * g;
                        dxc[p] = dxh;
                        sum_dxh += dxh as f64;
                        sum_dxh_xh += (dxh * xh) as f64;
                    }
                }
                let (m1, m2) = ((sum_dxh / n as f64) as f32, (sum_dxh_xh / n as f64) as f32);
                for (p, d) in dxc.iter_mut().enumerate() {
                    let xh = (xc[p] - mean) * rstd;
                    *d = rstd * (*d - m1 - xh * m2);
                }
                (dgamma, dbeta)
            })
            .collect();
        let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
        for (i, (dg, db)) in partials.into_iter().enumerate() {
            let c0 = (i % op.groups) * cpg;
            for j in 0..cpg {
                dgamma[c0 + j] += dg[j];
                dbeta[c0 + j] += db[j];
            }
        }
        dx.extend_from_slice(&dgamma);
        dx.extend_from_slice(&dbeta);
        let nx = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(nx)))
    }
}

/// Nearest-neighbour ×2 upsampling with its gradient: `[B, C, H, W]` → `[B, C, 2H, 2W]`.
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Upsample2)
}

struct Upsample2;

impl CustomOp1 for Upsample2 {
    fn name(&self) -> &'static str {
        "rudolph-upsample2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = slice(s, l)?;
        let mut y = vec![0f32; b * c * 4 * h * w];
        y.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(out, plane)| {
                for (iy, src) in plane.chunks(w).enumerate() {
                    let row = &mut out[2 * iy * 2 * w..(2 * iy + 1) * 2 * w];
                    for (ix, &v) in src.iter().enumerate() {
                        row[2 * ix] = v;
                        row[2 * ix + 1] = v;
                    }
                    out.copy_within(2 * iy * 2 * w..(2 * iy + 1) * 2 * w, (2 * iy + 1) * 2 * w);
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Downsum2)?))
    }
}

/// The adjoint of [`Upsample2`]: each output pixel is the sum of its 2×2 block.
struct Downsum2;

impl CustomOp1 for Downsum2 {
    fn name(&self) -> &'static str {
        "rudolph-downsum2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = l.shape().dims4()?;
        let (h, w) = (h2 / 2, w2 / 2);
        let g = slice(s, l)?;
        let mut y = vec![0f32; b * c * h * w];
        y.par_chunks_mut(h * w)
            .zip(g.par_chunks(h2 * w2))
            .for_each(|(out, plane)| {
                for (iy, row) in out.chunks_mut(w).enumerate() {
                    let (r0, r1) = (
                        &plane[2 * iy * w2..][..w2],
                        &plane[(2 * iy + 1) * w2..][..w2],
                    );
                    for (ix, o) in row.iter_mut().enumerate() {
                        *o = r0[2 * ix] + r0[2 * ix + 1] + r1[2 * ix] + r1[2 * ix + 1];
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Var {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// `Σ out·r` for a fixed random `r`, so every output element gets its own gradient.
    fn probe(out: &Tensor, seed: u64) -> Tensor {
        let r = rand(out.dims(), seed);
        (out * r.as_tensor()).unwrap().sum_all().unwrap()
    }

    /// Forward and all three gradients agree with candle's own conv2d (after explicit padding).
    #[test]
    fn conv2d_matches_candle() {
        let cases = [
            (ConvGeometry::symmetric(3, 1, 1), 2, 5, 4, 9),
            (
                ConvGeometry {
                    kernel: 3,
                    stride: 2,
                    pad: [0, 1, 0, 1],
                },
                3,
                4,
                6,
                8,
            ),
            (ConvGeometry::symmetric(1, 1, 0), 1, 6, 3, 5),
            (ConvGeometry::symmetric(3, 1, 1), 1, 3, 2, 1),
        ];
        for (i, &(g, b, c, o, side)) in cases.iter().enumerate() {
            let seed = 10 * i as u64;
            let (x, w, bias) = (
                // candle's reference backward needs the strided windows to tile the input
                // exactly, as taming's 64 + 1 px do; stride-1 cases test non-square inputs.
                rand(&[b, c, side, side + usize::from(g.stride == 1)], seed),
                rand(&[o, c, g.kernel, g.kernel], seed + 1),
                rand(&[o], seed + 2),
            );
            let ours = conv2d(&x, &w, &bias, g).unwrap();
            let padded = x
                .pad_with_zeros(2, g.pad[0], g.pad[1])
                .unwrap()
                .pad_with_zeros(3, g.pad[2], g.pad[3])
                .unwrap();
            let reference = padded
                .conv2d(&w, 0, g.stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert!(max_diff(&ours, &reference) < 1e-5, "case {i}");
            let (ga, gb) = (
                probe(&ours, seed + 3).backward().unwrap(),
                probe(&reference, seed + 3).backward().unwrap(),
            );
            for v in [&x, &w, &bias] {
                let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
                assert!(max_diff(a, b) < 1e-4, "case {i}: {:?}", v.dims());
            }
        }
    }

    #[test]
    fn group_norm_matches_candle() {
        let (x, gamma, beta) = (rand(&[3, 8, 5, 4], 1), rand(&[8], 2), rand(&[8], 3));
        let ours = group_norm(&x, &gamma, &beta, 4, 1e-6).unwrap();
        let norm = candle_nn::GroupNorm::new(
            gamma.as_tensor().clone(),
            beta.as_tensor().clone(),
            8,
            4,
            1e-6,
        )
        .unwrap();
        let reference = candle_core::Module::forward(&norm, &x).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        let (ga, gb) = (
            probe(&ours, 4).backward().unwrap(),
            probe(&reference, 4).backward().unwrap(),
        );
        for v in [&x, &gamma, &beta] {
            let (a, b) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(max_diff(a, b) < 1e-4, "{:?}", v.dims());
        }
    }

    #[test]
    fn swish_and_upsampling_match_candle() {
        let x = rand(&[2, 3, 4, 5], 7);
        let ours = super::super::differentiable::swish(&x).unwrap();
        let reference = (x.as_tensor() * candle_nn::ops::sigmoid(&x).unwrap()).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-6);
        let (ga, gb) = (
            probe(&ours, 8).backward().unwrap(),
            probe(&reference, 8).backward().unwrap(),
        );
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);

        let ours = upsample2(&x).unwrap();
        let reference = x
            .reshape((2, 3, 4, 1, 5, 1))
            .unwrap()
            .broadcast_as((2, 3, 4, 2, 5, 2))
            .unwrap()
            .reshape((2, 3, 8, 10))
            .unwrap();
        assert_eq!(max_diff(&ours, &reference), 0.0);
        let (ga, gb) = (
            probe(&ours, 9).backward().unwrap(),
            probe(&reference, 9).backward().unwrap(),
        );
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-6);
    }
}
