//! Attention for inference on the CPU: the masked softmax, and attention fused from scores to
//! context, in place, one pass, on all cores.
//!
//! candle runs the two halves of the additive mask as single-core passes over memory, and a
//! decoding step's 2·B·heads tiny matrix products one after another on one core, while the
//! products around them use every core. The row loops here run compiled for the CPU's widest
//! vectors ([`super::cpu`]). Anything else (other devices or dtypes, tensors that carry
//! gradients, i.e. training) takes the unfused path.

use super::MASK_VALUE;
use super::activation::exp;
use super::cpu::{Simd, Width, simd_variants};
use super::{fusable, slice, slice_mut};
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

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

/// Attention of a few new rows against the cached keys and values, fused: scores, the
/// original's masking, softmax and the weighted sum of values in one pass per (sample, head), on
/// all cores, reading the cache buffers in place. Decoding steps otherwise spend a fifth of their
/// time in 2·B·heads tiny matrix products that candle runs one after another on one core.
/// `q`: `[B, heads, Sq, hd]`; `k`, `v`: `[B, heads, Sk, hd]`, rows contiguous (views of the KV
/// cache are); `keep`: `[B or 1, 1, Sq, Sk]` of 0/1; the scores are `scale · q·k`. Returns the
/// context `[B, Sq, heads·hd]`, or `None` when the tensors do not suit the kernel.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    decode_attention_with(q, k, v, keep, scale, Simd::best())
}

/// [`decode_attention`] compiled for the vector width `simd` (`cargo bench --bench attention`
/// compares them).
pub fn decode_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &Tensor,
    scale: f32,
    simd: Simd,
) -> Result<Option<Tensor>> {
    let (b, heads, sq, hd) = q.dims4()?;
    let sk = k.dim(2)?;
    let suits =
        |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op();
    let rows_contiguous = |t: &Tensor| t.stride()[3] == 1 && t.stride()[2] == hd;
    if !(suits(q) && suits(k) && suits(v) && fusable(keep))
        || sq > DECODE_ROWS
        || k.dims() != [b, heads, sk, hd]
        || v.dims() != k.dims()
        || !rows_contiguous(k)
        || !rows_contiguous(v)
        || !matches!(keep.dims4()?, (kb, 1, ksq, ksk) if (kb == b || kb == 1) && ksq == sq && ksk == sk)
    {
        return Ok(None);
    }
    let op = DecodeAttention {
        keep: keep.clone(),
        scale,
        simd,
    };
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?))
}

/// How far ahead (in key rows) [`decode_attention`] asks for the cache: with the hardware
/// prefetcher alone it read 14 GB/s of the machine's 30 (350M, batch 8), 17 GB/s with this.
const PREFETCH_ROWS: usize = 32;

/// Asks the CPU to start loading the cache line of `data[at..]` (nothing if out of bounds).
#[inline(always)]
fn prefetch(data: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < data.len() {
        // SAFETY: a prefetch never faults; the address is inside `data` anyway.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let p = data.as_ptr().add(at) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128));
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(192));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

/// Most new rows per call for which [`decode_attention`] beats the matrix products.
const DECODE_ROWS: usize = 8;

struct DecodeAttention {
    keep: Tensor,
    scale: f32,
    simd: Simd,
}

/// One new query row against one (sample, head)'s cached keys and values, `sk × hd` each.
struct DecodeRow<'a> {
    /// The level `decode_row` was compiled for, which its dot products use too.
    simd: Simd,
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    keep: &'a [f32],
    scale: f32,
}

simd_variants!(decode_row_simd => decode_row(row: &DecodeRow, scores: &mut [f32], out: &mut [f32]));

/// `out = softmax(mask(scale · q·kⱼ))·V` for one query row, streaming the keys then the values.
#[inline(always)]
fn decode_row(row: &DecodeRow, scores: &mut [f32], out: &mut [f32]) {
    let hd = row.q.len();
    let penalty = MASK_VALUE as f32;
    let mut max = f32::NEG_INFINITY;
    let sk = scores.len();
    // Rows are asked for PREFETCH_ROWS ahead: the first keys now, the first values while the
    // last keys are read.
    for j in 0..PREFETCH_ROWS.min(sk) {
        prefetch(row.keys, j * hd);
    }
    for (j, (s, &m)) in scores.iter_mut().zip(row.keep).enumerate() {
        match j + PREFETCH_ROWS {
            ahead if ahead < sk => prefetch(row.keys, ahead * hd),
            ahead => prefetch(row.values, (ahead - sk) * hd),
        }
        let kj = &row.keys[j * hd..][..hd];
        *s = dot(row.simd, row.q, kj) * row.scale * m - (m * -penalty + penalty);
        max = max.max(*s);
    }
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let sum = lane_sum(scores);
    // The context in blocks of 64 columns held in registers across the value rows (a head is
    // 64 wide in most configurations; wider ones take a second, cached pass).
    for base in (0..hd).step_by(CONTEXT_BLOCK) {
        let width = CONTEXT_BLOCK.min(hd - base);
        let mut acc = [[0f32; 16]; CONTEXT_BLOCK / 16];
        for (j, &p) in scores.iter().enumerate() {
            prefetch(row.values, (j + PREFETCH_ROWS) * hd + base);
            let vj = &row.values[j * hd + base..][..width];
            if let Ok(vj) = <&[f32; CONTEXT_BLOCK]>::try_from(vj) {
                for (a, x) in acc.iter_mut().zip(vj.as_chunks::<16>().0) {
                    for l in 0..16 {
                        a[l] += p * x[l];
                    }
                }
            } else {
                for (a, &x) in acc.as_flattened_mut().iter_mut().zip(vj) {
                    *a += p * x;
                }
            }
        }
        let inv = 1.0 / sum;
        for (o, a) in out[base..base + width].iter_mut().zip(acc.as_flattened()) {
            *o = a * inv;
        }
    }
}

/// Context columns [`decode_row`] accumulates at once: four AVX-512 registers.
const CONTEXT_BLOCK: usize = 64;

/// `softmax(mask(scores))` in place: kept scores as they are, masked ones at the original's
/// large negative value (so a fully masked row is uniform, as in the original).
#[inline(always)]
fn masked_softmax_row(scores: &mut [f32], keep: &[f32]) {
    let penalty = MASK_VALUE as f32;
    for (s, &m) in scores.iter_mut().zip(keep) {
        *s = *s * m - (m * -penalty + penalty);
    }
    let max = row_max(scores);
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let inv = 1.0 / lane_sum(scores);
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

simd_variants!(masked_softmax_row_simd => masked_softmax_row(scores: &mut [f32], keep: &[f32]));

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (b, heads, sq, hd) = ql.shape().dims4()?;
        let sk = kl.shape().dims()[2];
        let q = slice(qs, ql)?;
        let (k, v) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
        let (keep_storage, keep_layout) = self.keep.storage_and_layout();
        let keep = match &*keep_storage {
            candle_core::Storage::Cpu(s) => slice(s, keep_layout)?,
            _ => candle_core::bail!("decode attention: the mask is not on the CPU"),
        };
        let keep_rows = keep.len() / sk;
        let block = |l: &Layout, unit: usize| {
            let st = l.stride();
            l.start_offset() + (unit / heads) * st[0] + (unit % heads) * st[1]
        };
        // Rows are contiguous (checked by `decode_attention`): each unit's keys and values are
        // one block of sk × hd; the last unit's must end inside its storage.
        for (l, data) in [(kl, k), (vl, v)] {
            if b * heads > 0 && block(l, b * heads - 1) + sk * hd > data.len() {
                candle_core::bail!("decode attention: a view reaches past its storage");
            }
        }
        let simd = self.simd;
        let contexts: Vec<Vec<f32>> = (0..b * heads)
            .into_par_iter()
            .map(|unit| {
                let sample = unit / heads;
                let mut out = vec![0f32; sq * hd];
                let mut scores = vec![0f32; sk];
                let keys = &k[block(kl, unit)..][..sk * hd];
                let values = &v[block(vl, unit)..][..sk * hd];
                for (i, out) in out.chunks_mut(hd).enumerate() {
                    let row = DecodeRow {
                        simd,
                        q: &q[(unit * sq + i) * hd..][..hd],
                        keys,
                        values,
                        keep: &keep[((sample * sq + i) % keep_rows) * sk..][..sk],
                        scale: self.scale,
                    };
                    decode_row_simd(simd, &row, &mut scores, out);
                }
                out
            })
            .collect();
        // [B, heads, Sq, hd] → [B, Sq, heads·hd], the layout the output projection reads.
        let mut context = vec![0f32; b * sq * heads * hd];
        for (unit, c) in contexts.iter().enumerate() {
            let (sample, head) = (unit / heads, unit % heads);
            for (i, row) in c.chunks(hd).enumerate() {
                let to = ((sample * sq + i) * heads + head) * hd;
                context[to..to + hd].copy_from_slice(row);
            }
        }
        Ok((
            CpuStorage::F32(context),
            candle_core::Shape::from((b, sq, heads * hd)),
        ))
    }
}

/// Attention of many rows at once (a window, a prompt), fused per (sample, head) on all cores:
/// `softmax(mask(scale · q·kᵀ))·v` with one single-threaded GEMM for the scores and one for the
/// values, the masked softmax in between, straight from strided views (the columns of the
/// query-key-value projection, or the KV cache) into the context's `[B, Sq, heads·hd]` layout.
/// candle instead runs 2·B·heads small products one after another (each spread over the cores,
/// at a fraction of their speed), and the views must first be copied out contiguously.
/// `q`: `[B, heads, Sq, hd]`, `k`, `v`: `[B, heads, Sk, hd]`, each with unit stride in its last
/// dimension; `keep`: `[B or 1, 1, Sq, Sk]` of 0/1. `None` when the tensors do not suit.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    let (b, heads, sq, hd) = q.dims4()?;
    let sk = k.dim(2)?;
    let suits = |t: &Tensor| {
        t.device().is_cpu()
            && t.dtype() == candle_core::DType::F32
            && !t.track_op()
            && t.stride()[3] == 1
    };
    if !(suits(q) && suits(k) && suits(v) && fusable(keep))
        || k.dims() != [b, heads, sk, hd]
        || v.dims() != k.dims()
        || !matches!(keep.dims4()?, (kb, 1, ksq, ksk) if (kb == b || kb == 1) && ksq == sq && ksk == sk)
    {
        return Ok(None);
    }
    let op = Attention {
        keep: keep.clone(),
        scale,
    };
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?))
}

struct Attention {
    keep: Tensor,
    scale: f32,
}

/// The context rows written by several threads at once, each (sample, head) its own columns.
struct SharedOut(*mut f32);
// SAFETY: every unit of work writes a disjoint set of elements (its head's columns of its
// sample's rows), and the buffer outlives the parallel loop.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (b, heads, sq, hd) = ql.shape().dims4()?;
        let sk = kl.shape().dims()[2];
        let (q, k, v) = (
            qs.as_slice::<f32>()?,
            ks.as_slice::<f32>()?,
            vs.as_slice::<f32>()?,
        );
        let (keep_storage, keep_layout) = self.keep.storage_and_layout();
        let keep = match &*keep_storage {
            candle_core::Storage::Cpu(s) => slice(s, keep_layout)?,
            _ => candle_core::bail!("attention: the mask is not on the CPU"),
        };
        let keep_rows = keep.len() / sk;
        // Where (sample, head) `unit`'s block starts, and its row stride.
        let block = |l: &Layout, unit: usize| {
            let st = l.stride();
            (
                l.start_offset() + (unit / heads) * st[0] + (unit % heads) * st[1],
                st[2],
            )
        };
        // The last element each block reads must lie inside its storage.
        for (l, data, rows) in [(ql, q, sq), (kl, k, sk), (vl, v, sk)] {
            let (start, rs) = block(l, b * heads - 1);
            if rows > 0 && start + (rows - 1) * rs + hd > data.len() {
                candle_core::bail!("attention: a view reaches past its storage");
            }
        }
        let width = heads * hd;
        let mut context = vec![0f32; b * sq * width];
        let out = SharedOut(context.as_mut_ptr());
        let simd = Simd::best();
        (0..b * heads).into_par_iter().for_each(|unit| {
            let (sample, head) = (unit / heads, unit % heads);
            let (q0, q_rs) = block(ql, unit);
            let (k0, k_rs) = block(kl, unit);
            let (v0, v_rs) = block(vl, unit);
            let mut scores = vec![0f32; sq * sk];
            // SAFETY: the operands lie inside their storages (checked above for the last
            // block; earlier blocks start before it), `scores` holds sq × sk, and the context
            // block `[sample, :, head]` is this unit's alone.
            unsafe {
                gemm::gemm(
                    sq,
                    sk,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    sk as isize,
                    false,
                    q.as_ptr().add(q0),
                    1,
                    q_rs as isize,
                    k.as_ptr().add(k0),
                    k_rs as isize,
                    1,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_mut(sk).enumerate() {
                let m = (sample * sq + i) % keep_rows;
                masked_softmax_row_simd(simd, row, &keep[m * sk..(m + 1) * sk]);
            }
            // SAFETY: as above.
            unsafe {
                gemm::gemm(
                    sq,
                    hd,
                    sk,
                    out.at(sample * sq * width + head * hd),
                    1,
                    width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    sk as isize,
                    v.as_ptr().add(v0),
                    1,
                    v_rs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        Ok((
            CpuStorage::F32(context),
            candle_core::Shape::from((b, sq, width)),
        ))
    }
}

/// The largest element, in sixteen lanes (a running `max` is a chain the compiler keeps scalar).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("a chunk of LANES");
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// `Σ aᵢ·bᵢ` in sixteen independent lanes folded by halves, the same sums at every level. Left
/// to itself the compiler vectorised the lanes two at a time (and the key loop of the decoding
/// attention with them), so the x86 levels spell them out.
#[inline(always)]
fn dot(simd: Simd, a: &[f32], b: &[f32]) -> f32 {
    match simd.0 {
        // SAFETY: only `Simd::available` makes a `Simd`, after finding the feature.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { dot_avx2(a, b) },
        _ => dot_lanes(a, b),
    }
}

/// [`dot_lanes`] with one AVX-512 register for the sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    for c in (0..n).step_by(16) {
        // SAFETY: c + 16 ≤ n bounds both slices.
        let (x, y) = unsafe {
            (
                _mm512_loadu_ps(a.as_ptr().add(c)),
                _mm512_loadu_ps(b.as_ptr().add(c)),
            )
        };
        // Product, then sum: no fused multiply-add, as in `dot_lanes`.
        acc = _mm512_add_ps(acc, _mm512_mul_ps(x, y));
    }
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    let eight = _mm256_add_ps(_mm512_castps512_ps256(acc), high);
    fold_eight(eight) + tail_dot(a, b, n)
}

/// [`dot_lanes`] with two AVX registers for the sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len()) / 16 * 16;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for c in (0..n).step_by(16) {
        // SAFETY: c + 16 ≤ n bounds both slices.
        unsafe {
            let (pa, pb) = (a.as_ptr().add(c), b.as_ptr().add(c));
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb)));
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8))),
            );
        }
    }
    fold_eight(_mm256_add_ps(lo, hi)) + tail_dot(a, b, n)
}

/// The last three halvings of [`fold_lanes`] on lanes 0–7.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn fold_eight(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps::<1>(two, two)))
}

/// The products past the last whole group of sixteen, summed in order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tail_dot(a: &[f32], b: &[f32], from: usize) -> f32 {
    a[from..].iter().zip(&b[from..]).map(|(x, y)| x * y).sum()
}

/// The sixteen-lane dot product in plain code, which the baseline level vectorises.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    fold_lanes(acc) + tail
}

/// The sum of sixteen lanes by halves (8 + 4 + 2 + 1 vector adds instead of a chain of 16).
#[inline(always)]
fn fold_lanes(mut acc: [f32; 16]) -> f32 {
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `Σ xᵢ` in sixteen independent lanes.
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    fold_lanes(acc) + tail
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
        let simd = Simd::best();
        scores
            .par_chunks_mut(sk)
            .enumerate()
            .for_each(|(row, scores)| {
                // Row `row` is (sample, head, query); the mask has one row per (sample, query),
                // or per query when it is shared by the batch.
                let (sample, query) = (row / (heads * sq), row % sq);
                let k = (sample * sq + query) % keep_rows;
                masked_softmax_row_simd(simd, scores, &keep[k * sk..(k + 1) * sk]);
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::activation::*;
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

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
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
    fn exp_is_within_2_ulp_of_libm() {
        let ulp = |v: f32| (f32::from_bits(v.to_bits() + 1) - v).abs();
        let mut worst = 0f32;
        for i in -873_365..=883_700 {
            let x = i as f32 * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / ulp(want));
        }
        assert!(worst <= 2.0, "largest error {worst} ulp");
        for x in [-87.34f32, -100.0, -10000.0, f32::MIN, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn masked_softmax_is_within_rounding_of_the_unfused_ops() {
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
            let (got, want) = (values(&fused), values(&plain));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.max(1e-30),
                    "mask batch {kb}: {g} against {w}"
                );
            }
            // Masked keys get exactly nothing.
            assert_eq!(
                got.iter()
                    .zip(&want)
                    .filter(|(g, w)| (**g == 0.0) != (**w == 0.0))
                    .count(),
                0
            );
        }
    }

    /// Plain candle ops: `softmax(mask(scale·q·kᵀ))·v` → `[B, Sq, heads·hd]`.
    fn reference_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        keep: &Tensor,
        scale: f64,
    ) -> Tensor {
        let (b, heads, sq, hd) = q.dims4().unwrap();
        let penalty = keep.affine(-MASK_VALUE, MASK_VALUE).unwrap();
        let scores = (q.contiguous().unwrap() * scale)
            .unwrap()
            .matmul(&k.contiguous().unwrap().t().unwrap())
            .unwrap()
            .broadcast_mul(keep)
            .unwrap()
            .broadcast_sub(&penalty)
            .unwrap();
        candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, sq, heads * hd))
            .unwrap()
    }

    #[test]
    fn fused_attention_reads_strided_views_and_matches_candle() {
        let (b, heads) = (2, 3);
        let scale = 0.25;
        // Head widths below, at and above the decoding kernel's register block.
        for (sq, sk, hd) in [
            (1, 7, 16),
            (5, 5, 16),
            (13, 13, 16),
            (9, 30, 16),
            (1, 40, 64),
            (3, 37, 80),
        ] {
            // q from a query-key-value projection's columns; k, v as views of a longer cache.
            let qkv = random(&[b, sq, 3, heads, hd], 10 + sq as u64)
                .affine(0.5, 0.0)
                .unwrap();
            let q = qkv
                .narrow(2, 0, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let cache = |seed| {
                random(&[b, heads, sk + 4, hd], seed)
                    .narrow(2, 0, sk)
                    .unwrap()
            };
            let (k, v) = (cache(20), cache(21));
            for kb in [1, b] {
                let keep = random(&[kb, 1, sq, sk], 30 + kb as u64)
                    .ge(-1.0)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap();
                let want = values(&reference_attention(&q, &k, &v, &keep, scale));
                let mut kernels = vec![attention(&q, &k, &v, &keep, scale as f32).unwrap()];
                kernels.push(decode_attention(&q, &k, &v, &keep, scale as f32).unwrap());
                for (which, got) in kernels.into_iter().enumerate() {
                    let Some(got) = got else {
                        assert!(which == 1 && sq > DECODE_ROWS, "kernel {which} declined");
                        continue;
                    };
                    assert_close(
                        &values(&got),
                        &want,
                        &format!("kernel {which}, sq {sq}, sk {sk}, hd {hd}, mask batch {kb}"),
                    );
                }
            }
        }
    }

    /// Every element within `1e-5` relative (plus `1e-5` absolute) of `want`.
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}: {g} against {w}"
            );
        }
    }

    #[test]
    fn every_simd_level_of_the_row_kernels_agrees_with_the_baseline() {
        for (sk, hd) in [(1, 64), (45, 64), (33, 80), (20, 16)] {
            let draw = |n: usize, seed: u64| values(&random(&[n], seed));
            let (q, keys, values) = (draw(hd, 1), draw(sk * hd, 2), draw(sk * hd, 3));
            let keep: Vec<f32> = (0..sk).map(|j| (j % 3 != 1) as u32 as f32).collect();
            let row = DecodeRow {
                simd: Simd::available()[0],
                q: &q,
                keys: &keys,
                values: &values,
                keep: &keep,
                scale: 0.125,
            };
            let mut want = vec![0f32; hd];
            decode_row(&row, &mut vec![0f32; sk], &mut want);
            for simd in Simd::available() {
                let mut got = vec![0f32; hd];
                let row = DecodeRow { simd, ..row };
                decode_row_simd(simd, &row, &mut vec![0f32; sk], &mut got);
                assert_close(
                    &got,
                    &want,
                    &format!("decoding {}, sk {sk}, hd {hd}", simd.name()),
                );
            }
        }
        // The dot products spell out the plain code's sums: equal to the bit.
        for n in [1, 15, 16, 17, 64, 80, 200] {
            let (a, b) = (values(&random(&[n], 11)), values(&random(&[n], 12)));
            for simd in Simd::available() {
                assert_eq!(
                    dot(simd, &a, &b).to_bits(),
                    dot_lanes(&a, &b).to_bits(),
                    "dot {} of {n}",
                    simd.name()
                );
            }
        }
        for n in [1, 17, 64, 200] {
            let x = values(&random(&[n], n as u64).affine(3.0, 0.0).unwrap());
            let keep: Vec<f32> = (0..n).map(|j| (j % 4 != 2) as u32 as f32).collect();
            let bias = values(&random(&[n], 7));
            let mut softmax = x.clone();
            masked_softmax_row(&mut softmax, &keep);
            let mut activated = x.clone();
            bias_activation_row(&mut activated, &bias, true);
            for simd in Simd::available() {
                let mut got = x.clone();
                masked_softmax_row_simd(simd, &mut got, &keep);
                assert_close(&got, &softmax, &format!("softmax {}, {n}", simd.name()));
                let mut got = x.clone();
                bias_activation_row_simd(simd, &mut got, &bias, true);
                assert_close(
                    &got,
                    &activated,
                    &format!("bias + GELU {}, {n}", simd.name()),
                );
            }
        }
    }
}
