//! Matrix products with few rows, `y = x·Wᵀ` for `x` `[m, k]` with `m` ≤ [`MAX_ROWS`]: every
//! decoding step of every layer (one new token per sequence).
//!
//! Such a product is bound by reading `W` from memory: each weight is used `m` times and never
//! again in the step. A general GEMM first packs (copies) `W` into its own layout, so it reads the
//! weights twice and writes them once; here each weight row is streamed once, straight from
//! where it lies, against all `m` rows of `x` (which stay in cache), on all cores. Weights may be
//! stored in f16 or bf16 and are widened to f32 as they are read: half the bytes per step, f32
//! arithmetic. The real RuDOLPH checkpoints are f16, so f16 storage loses nothing for them.

use super::cpu::{Cpu, Level};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// The most rows of `x` handled here; more rows go to the GEMM.
pub const MAX_ROWS: usize = 8;

/// Whether `x·wᵀ` takes this path: CPU, f32 activations of at most [`MAX_ROWS`] rows, a
/// contiguous `[n, k]` weight in f32, f16 or bf16, outside any autograd graph.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && matches!(w.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && w.rank() == 2
        && w.is_contiguous()
        && x.rank() == 2
        && x.dim(0).is_ok_and(|m| m <= MAX_ROWS)
        && !x.track_op()
        && !w.track_op()
}

/// `x` `[m, k]` (f32) · `w` `[n, k]`ᵀ → `[m, n]` (f32), with the fastest kernel this CPU has.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_t_with(x, w, Kernel::best())
}

/// [`matmul_t`] with a chosen kernel (the tests and `benches/few_rows.rs` compare them).
pub fn matmul_t_with(x: &Tensor, w: &Tensor, kernel: Kernel) -> Result<Tensor> {
    if !kernel.available() {
        candle_core::bail!("the {kernel:?} few-row kernel needs CPU features this machine lacks");
    }
    x.contiguous()?.apply_op2_no_bwd(w, &FewRowMatmul(kernel))
}

/// The instruction sets the products can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// 8 lanes, one weight row at a time (AVX2, FMA, F16C).
    Avx2,
    /// 16 lanes and several weight rows at a time, sharing each load of `x` (AVX-512F).
    Avx512,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512];

    /// The kernel for what `cpu` allows.
    pub fn for_cpu(cpu: Cpu) -> Self {
        match cpu.level() {
            Level::Portable => Kernel::Scalar,
            Level::Avx2 => Kernel::Avx2,
            Level::Avx512 | Level::Amx => Kernel::Avx512,
        }
    }

    pub fn available(self) -> bool {
        Cpu::available().iter().any(|&c| Self::for_cpu(c) == self)
    }

    pub fn best() -> Self {
        Self::for_cpu(Cpu::best())
    }
}

struct FewRowMatmul(Kernel);

/// Weight rows given to one task: enough work to amortise the task, several tasks per core.
const ROWS_PER_TASK: usize = 64;

impl CustomOp2 for FewRowMatmul {
    fn name(&self) -> &'static str {
        "rudolph-few-row-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if wk != k || m > MAX_ROWS {
            candle_core::bail!("few-row matmul of {:?} by {:?}ᵀ", xl.shape(), wl.shape());
        }
        if m == 0 || n == 0 || k == 0 {
            // Nothing to stream; the kernels' chunking needs whole rows.
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        let (xo, _) = xl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("few-row matmul: strided input".into()))?;
        let (wo, _) = wl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("few-row matmul: strided weight".into()))?;
        let x = &xs.as_slice::<f32>()?[xo..xo + m * k];
        // yt[j, i] = row j of W · row i of x: each task fills a contiguous block of yt.
        let mut yt = vec![0f32; n * m];
        match ws {
            CpuStorage::F32(w) => run(self.0, &w[wo..wo + n * k], x, m, k, &mut yt),
            CpuStorage::F16(w) => run(self.0, &w[wo..wo + n * k], x, m, k, &mut yt),
            CpuStorage::BF16(w) => run(self.0, &w[wo..wo + n * k], x, m, k, &mut yt),
            _ => candle_core::bail!("few-row matmul: the weight is not f32, f16 or bf16"),
        }
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + j] = v;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// A weight element type that widens to f32.
trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
    /// Eight consecutive elements as f32, with the fastest instructions this CPU has.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen consecutive elements as f32 (AVX-512F).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Widen for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }
}

/// Columns of `x` per pass when all of `x` would not fit the L1 cache: `MAX_ROWS` rows of this
/// many f32 stay there while the weight rows stream past. A smaller `x` is taken whole, so each
/// weight row is read front to back in one go.
const K_BLOCK: usize = 1024;
const L1_FLOATS: usize = 8192;

/// Weight rows the AVX-512 kernel takes at once for `m` rows of `x`: each load of `x` then
/// feeds `R` FMAs, and the `R·m` accumulators (24 at most) still fit the 32 vector registers.
#[cfg(target_arch = "x86_64")]
const fn rows_at_once(m: usize) -> usize {
    match m {
        1 | 2 => 4,
        _ => 3,
    }
}

fn run<W: Widen>(kernel: Kernel, w: &[W], x: &[f32], m: usize, k: usize, yt: &mut [f32]) {
    let block = if m * k <= L1_FLOATS {
        k.max(1)
    } else {
        K_BLOCK
    };
    yt.par_chunks_mut(ROWS_PER_TASK * m)
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(out, rows)| {
            for k0 in (0..k).step_by(block) {
                let span = k0..(k0 + block).min(k);
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `matmul_t_with` checked that the CPU has AVX-512F.
                    Kernel::Avx512 => unsafe { rows_avx512_any(rows, x, k, span, out) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => {
                        for (j, (o, row)) in out.chunks_mut(m).zip(rows.chunks(k)).enumerate() {
                            let next = rows.get((j + 1) * k..(j + 2) * k).unwrap_or(&[]);
                            // SAFETY: `matmul_t_with` checked AVX2, FMA and F16C.
                            unsafe { dots_avx2_any(row, next, x, k, span.clone(), o) };
                        }
                    }
                    _ => {
                        for (o, row) in out.chunks_mut(m).zip(rows.chunks(k)) {
                            dots_scalar(row, x, k, span.clone(), o);
                        }
                    }
                }
            }
        });
}

/// `out[i] += row[span] · x[i][span]` for every row `i` of `x` (rows of length `k`).
fn dots_scalar<W: Widen>(
    row: &[W],
    x: &[f32],
    k: usize,
    span: std::ops::Range<usize>,
    out: &mut [f32],
) {
    for (i, o) in out.iter_mut().enumerate() {
        *o += row[span.clone()]
            .iter()
            .zip(&x[i * k + span.start..i * k + span.end])
            .map(|(w, v)| w.widen() * v)
            .sum::<f32>();
    }
}

/// [`dots_avx2`] with the row count as a constant, so the accumulators live in registers, and
/// with enough independent accumulator chains (`U` per row) to hide the FMA latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2_any<W: Widen>(
    row: &[W],
    next: &[W],
    x: &[f32],
    k: usize,
    span: std::ops::Range<usize>,
    out: &mut [f32],
) {
    unsafe {
        match out.len() {
            1 => dots_avx2::<W, 1, 4>(row, next, x, k, span, out),
            2 => dots_avx2::<W, 2, 4>(row, next, x, k, span, out),
            3 => dots_avx2::<W, 3, 2>(row, next, x, k, span, out),
            4 => dots_avx2::<W, 4, 2>(row, next, x, k, span, out),
            5 => dots_avx2::<W, 5, 1>(row, next, x, k, span, out),
            6 => dots_avx2::<W, 6, 1>(row, next, x, k, span, out),
            7 => dots_avx2::<W, 7, 1>(row, next, x, k, span, out),
            _ => dots_avx2::<W, 8, 1>(row, next, x, k, span, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2<W: Widen, const M: usize, const U: usize>(
    row: &[W],
    next: &[W],
    x: &[f32],
    k: usize,
    span: std::ops::Range<usize>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); U]; M];
    let step = 8 * U;
    let body = span.start + (span.end - span.start) / step * step;
    let mut c = span.start;
    // The next row into L2 (or, for the last row, the row itself again: no branch in the loop).
    let ahead = if next.len() >= k { next } else { row }.as_ptr();
    while c < body {
        // SAFETY: c < k bounds both rows.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.add(c) as *const i8) };
        for u in 0..U {
            // SAFETY: c + 8·U ≤ span.end ≤ k bounds the row and every row of x.
            unsafe {
                let wv = W::load8(row.as_ptr().add(c + 8 * u));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(i * k + c + 8 * u));
                    a[u] = _mm256_fmadd_ps(wv, xv, a[u]);
                }
            }
        }
        c += step;
    }
    for (i, o) in out.iter_mut().enumerate().take(M) {
        let a = acc[i][1..]
            .iter()
            .fold(acc[i][0], |sum, &v| _mm256_add_ps(sum, v));
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut total = _mm_cvtss_f32(s);
        for j in body..span.end {
            total += row[j].widen() * x[i * k + j];
        }
        *o += total;
    }
}

/// `out[r·m + i] += rows[r][span] · x[i][span]` for the weight rows in `rows` (`k` each) and
/// the `m = out.len() / (rows.len() / k)` rows of `x`, several weight rows at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512_any<W: Widen>(
    rows: &[W],
    x: &[f32],
    k: usize,
    span: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let n = rows.len() / k;
    let m = out.len() / n;
    unsafe {
        match m {
            1 => rows_avx512::<W, 1, { rows_at_once(1) }>(rows, x, k, span, out),
            2 => rows_avx512::<W, 2, { rows_at_once(2) }>(rows, x, k, span, out),
            3 => rows_avx512::<W, 3, { rows_at_once(3) }>(rows, x, k, span, out),
            4 => rows_avx512::<W, 4, { rows_at_once(4) }>(rows, x, k, span, out),
            5 => rows_avx512::<W, 5, { rows_at_once(5) }>(rows, x, k, span, out),
            6 => rows_avx512::<W, 6, { rows_at_once(6) }>(rows, x, k, span, out),
            7 => rows_avx512::<W, 7, { rows_at_once(7) }>(rows, x, k, span, out),
            _ => rows_avx512::<W, 8, { rows_at_once(8) }>(rows, x, k, span, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512<W: Widen, const M: usize, const R: usize>(
    rows: &[W],
    x: &[f32],
    k: usize,
    span: std::ops::Range<usize>,
    out: &mut [f32],
) {
    for (g, (o, w)) in out.chunks_mut(R * M).zip(rows.chunks(R * k)).enumerate() {
        // Only the last group can be short, by fewer than R ≤ 4 rows.
        let r = w.len() / k;
        // The next group's rows, fetched into L2 while this group computes.
        let next = rows.get((g + 1) * R * k..).unwrap_or(&[]);
        unsafe {
            match r {
                _ if r == R => dots_avx512::<W, M, R>(w, next, x, k, span.clone(), o),
                1 => dots_avx512::<W, M, 1>(w, next, x, k, span.clone(), o),
                2 => dots_avx512::<W, M, 2>(w, next, x, k, span.clone(), o),
                _ => dots_avx512::<W, M, 3>(w, next, x, k, span.clone(), o),
            }
        }
    }
}

/// Weight elements ahead of the current column that each row prefetches into L1. Each row also
/// asks for the same column of the row `R` below it (the next group) into L2: an L1 prefetch
/// holds one of the core's few line-fill buffers until its line arrives, an L2 one does not,
/// so these keep many more lines on their way from memory. In `cargo bench --bench few_rows`
/// the 350M step at 8 rows went from 65.9 to 58.7 ms (f32) and 57.5 to 38.7 ms (f16); AVX2's
/// one-row-at-a-time kernel does the same for its next row (8 rows: 102 → 75 ms).
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 256;

/// `R` weight rows against the `M` rows of `x` over `span`: per 16 columns, `R` weight loads and
/// `M` loads of `x`, each feeding `R` FMAs into `R·M` independent accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<W: Widen, const M: usize, const R: usize>(
    w: &[W],
    next: &[W],
    x: &[f32],
    k: usize,
    span: std::ops::Range<usize>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    // Where each row's L2 prefetch reads: the next group's row, or (past the last one) the row
    // itself, already on its way, which keeps the loop free of branches.
    let ahead: [*const W; R] = std::array::from_fn(|r| match (r + 1) * k <= next.len() {
        true => next[r * k..].as_ptr(),
        false => w[r * k..].as_ptr(),
    });
    let body = span.start + (span.end - span.start) / 16 * 16;
    let mut c = span.start;
    while c < body {
        // SAFETY: c + 16 ≤ span.end ≤ k bounds every weight row and every row of x.
        unsafe {
            let mut wv = [_mm512_setzero_ps(); R];
            for (r, v) in wv.iter_mut().enumerate() {
                let p = w.as_ptr().add(r * k + c);
                // The hardware prefetcher alone leaves these rows' streams waiting on memory.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(ahead[r].add(c) as *const i8);
                *v = W::load16(p);
            }
            #[allow(clippy::needless_range_loop)] // `i` indexes the inner arrays of `acc`.
            for i in 0..M {
                let xv = _mm512_loadu_ps(x.as_ptr().add(i * k + c));
                for (a, &wr) in acc.iter_mut().zip(&wv) {
                    a[i] = _mm512_fmadd_ps(wr, xv, a[i]);
                }
            }
        }
        c += 16;
    }
    for r in 0..R {
        for i in 0..M {
            let mut total = _mm512_reduce_add_ps(acc[r][i]);
            for j in body..span.end {
                total += w[r * k + j].widen() * x[i * k + j];
            }
            out[r * M + i] += total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_gemm_in_every_weight_format() {
        let dev = Device::Cpu;
        for &(m, k, n) in &[
            (1, 64, 130),
            (3, 37, 9),
            (8, 1024, 200),
            (5, 8, 1),
            (2, 300, 67),
            (7, 4100, 5),
        ] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
            for (dtype, kernel) in [DType::F32, DType::F16, DType::BF16]
                .into_iter()
                .flat_map(|d| Kernel::ALL.map(|k| (d, k)))
                .filter(|(_, k)| k.available())
            {
                let wd = w.to_dtype(dtype).unwrap();
                let ours = matmul_t_with(&x, &wd, kernel).unwrap();
                let reference = x
                    .matmul(&wd.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap();
                let err = (ours - reference)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    err < 1e-3 * (k as f32).sqrt(),
                    "{m}×{k}·{n} {dtype:?} {kernel:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 0), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 0), DType::F32, &dev).unwrap();
        for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
            let y = matmul_t_with(&x, &w, kernel).unwrap();
            assert_eq!(y.dims(), &[2, 3]);
            assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![0f32; 3]; 2]);
        }
    }
}
