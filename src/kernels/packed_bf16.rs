//! Matrix products with bf16 weights (`--dtype packed-bf16`): `y = x·Wᵀ` in bf16 with f32 accumulation,
//! on Intel AMX tiles, AVX-512 BF16 or AVX2, whichever the CPU has ([`Kernel`]).
//!
//! Sapphire Rapids and later Xeons multiply 16×32 bf16 tiles by 32×16 ones in one instruction,
//! several times the f32 FMA peak of the same core; CPUs with AVX-512 BF16 but no tiles (AMD
//! Zen 4, for one) do 16 dot products of bf16 pairs per instruction, twice the f32 FMA rate;
//! AVX2 widens the pairs to f32 in registers and runs at the f32 rate. Reranking, captioning
//! prompts and full forwards are compute-bound products of hundreds of rows, so they gain the
//! most from the first two; decoding steps read half the bytes of f32 weights on all of them.
//!
//! The weight is packed once, when the model is built, into the layout the tile loads want (the
//! packing a GEMM would otherwise redo at every call): for each group of 16 outputs and each
//! chunk of 32 inputs, one 1 KiB block of 16 rows of input pairs, `[k/2][16 outputs][2]`. Each
//! output group's chunks follow one another, so a product streams the weight once, in order.
//! Activations are rounded to bf16 (to nearest even) as they are laid out for the tiles; biases,
//! norms, attention and the head's log-softmax stay in f32.
//!
//! Elsewhere (not x86-64) the same arithmetic runs as plain Rust loops the compiler vectorises,
//! or, for many rows, the weight is unpacked for candle's f32 GEMM: the same products, in
//! another order of summation.

use super::cpu::{Cpu, Level};
use candle_core::{DType, Result, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::ops::Range;

/// Outputs per tile (a tile row holds 16 f32 accumulators).
const N_TILE: usize = 16;
/// Inputs per chunk (a tile row holds 32 bf16 values).
const K_CHUNK: usize = 32;
/// bf16 values in one packed weight block: `K_CHUNK / 2` rows of `N_TILE` pairs.
const BLOCK: usize = K_CHUNK * N_TILE;
/// From this many rows on, the portable kernel unpacks the weight to f32 for candle's GEMM; below
/// it, reading the packed bf16 directly is faster (a decoding step's product is bound by reading
/// the weight, and unpacking it would write twice its bytes). On 350M with SSE2 loops: one
/// picture generated in 11.5 s against 80 s unpacking at every step; a reranked picture (264
/// rows) in 1.9 s against 4.9 s in the loops.
const PORTABLE_GEMM_ROWS: usize = 32;
/// Bytes of bf16 activations multiplied against the whole weight at a time.
const A_BLOCK_BYTES: usize = 1 << 20;

/// A `[n, k]` weight packed for the tiles. Output groups are padded to an even count (the
/// kernel works on pairs of them) and inputs to whole chunks, with zeros.
#[derive(Debug)]
pub struct PackedWeight {
    data: Vec<u16>,
    n: usize,
    k: usize,
    chunks: usize,
}

impl PackedWeight {
    /// Packs `w` (`[n, k]`, any float dtype, on the CPU).
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let chunks = k.div_ceil(K_CHUNK);
        let groups = n.div_ceil(N_TILE).next_multiple_of(2);
        let mut data = vec![0u16; groups * chunks * BLOCK];
        data.par_chunks_mut(chunks * BLOCK)
            .enumerate()
            .for_each(|(g, group)| {
                for (c, block) in group.chunks_mut(BLOCK).enumerate() {
                    for (i, v) in block.iter_mut().enumerate() {
                        let (pair, col, half) = (i / (2 * N_TILE), i / 2 % N_TILE, i % 2);
                        let (row, input) = (g * N_TILE + col, c * K_CHUNK + 2 * pair + half);
                        if row < n && input < k {
                            *v = bf16::from_f32(w[row * k + input]).to_bits();
                        }
                    }
                }
            });
        Ok(Self { data, n, k, chunks })
    }

    /// Rows `rows` of the weight back in f32, `[rows.len(), k]`.
    fn unpack(&self, rows: Range<usize>) -> Vec<f32> {
        let k = self.k;
        let mut out = vec![0f32; rows.len() * k];
        out.par_chunks_mut(k).enumerate().for_each(|(r, dst)| {
            let row = rows.start + r;
            let (g, col) = (row / N_TILE, row % N_TILE);
            for (input, v) in dst.iter_mut().enumerate() {
                let (c, within) = (input / K_CHUNK, input % K_CHUNK);
                let at = (g * self.chunks + c) * BLOCK + (within / 2) * 2 * N_TILE + col * 2;
                *v = bf16::from_bits(self.data[at + within % 2]).to_f32();
            }
        });
        out
    }
}

/// Which instructions multiply the packed weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX: 16×32 by 32×16 bf16 tiles (Sapphire Rapids and later Xeons).
    Tiles,
    /// AVX-512 BF16 (`vdpbf16ps`, AMD Zen 4 and later, Intel Cooper Lake and later): 16 outputs
    /// per register, each a dot product of one input pair. The packed blocks are already laid
    /// out as one register of 16 output pairs per input pair.
    Avx512,
    /// AVX2 with FMA (any x86-64 of the last decade): each bf16 pair widened to two f32 in
    /// registers by a shift and a mask, then two FMAs. The f32 rate, with half the weight bytes.
    Avx2,
    /// The same arithmetic in plain Rust, vectorised by the compiler for any CPU.
    Portable,
}

impl Kernel {
    /// The kernel for what `cpu` allows: tiles, else AVX-512 BF16, else AVX2, else portable.
    pub fn for_cpu(cpu: Cpu) -> Self {
        match cpu.level() {
            Level::Amx => Self::Tiles,
            Level::Avx512 if cpu.has_bf16_dot() => Self::Avx512,
            Level::Avx512 | Level::Avx2 => Self::Avx2,
            Level::Portable => Self::Portable,
        }
    }

    /// The kernel packed-bf16 products use (see [`Cpu::best`]).
    pub fn best() -> Self {
        Self::for_cpu(Cpu::best())
    }

    /// Whether this CPU (and, for the tiles, the OS) offers it.
    pub fn available(self) -> bool {
        Cpu::available().iter().any(|&c| Self::for_cpu(c) == self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tiles => "AMX tiles",
            Self::Avx512 => "AVX-512 BF16",
            Self::Avx2 => "AVX2",
            Self::Portable => "portable",
        }
    }
}

/// `x` `[m, k]` (f32) · the packed weight's rows `cols`, transposed → `[m, cols.len()]` (f32),
/// on the best kernel.
pub fn matmul_t(x: &Tensor, w: &PackedWeight, cols: Range<usize>) -> Result<Tensor> {
    matmul_t_with(x, w, cols, Kernel::best())
}

/// [`matmul_t`] on a chosen kernel (the tests compare them).
pub fn matmul_t_with(
    x: &Tensor,
    w: &PackedWeight,
    cols: Range<usize>,
    kernel: Kernel,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if k != w.k || cols.end > w.n || cols.start > cols.end {
        candle_core::bail!(
            "tile product: x is [{m}, {k}], the weight [{}, {}], columns {cols:?}",
            w.n,
            w.k
        );
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    if cols.is_empty() || k == 0 {
        return Tensor::zeros((m, cols.len()), DType::F32, x.device());
    }
    if kernel == Kernel::Portable && m >= PORTABLE_GEMM_ROWS {
        // Many rows are compute-bound: unpacking the weight once and using candle's GEMM (which
        // picks the CPU's widest instructions at run time) beats the plain loops.
        let rounded = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let wt = Tensor::from_vec(w.unpack(cols.clone()), (cols.len(), k), x.device())?;
        return rounded.matmul(&wt.t()?);
    }
    if !kernel.available() {
        candle_core::bail!("this CPU or kernel does not offer {}", kernel.name());
    }
    let a = to_tile_rows(&x.flatten_all()?.to_vec1::<f32>()?, m, k, w.chunks);
    // Whole pairs of output groups around `cols`; the extra columns are cut off below.
    let first = cols.start / N_TILE / 2 * 2;
    let last = cols.end.div_ceil(N_TILE).next_multiple_of(2).max(first + 2);
    let width = (last - first) * N_TILE;
    let mut out = vec![0f32; m * width];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let group_len = w.chunks * BLOCK;
    match kernel {
        Kernel::Tiles | Kernel::Avx2 | Kernel::Portable => {
            let stride = w.chunks * K_CHUNK;
            let (group_pair, block): (GroupPairFn, usize) = match kernel {
                // Rows in blocks whose activations stay in a core's L2 cache while every pair
                // of output groups streams past them (2112 rows of the MLP's 4096 inputs would
                // be 17 MB).
                Kernel::Tiles => (
                    amx::group_pair,
                    (A_BLOCK_BYTES / (2 * stride)).max(32) / 32 * 32,
                ),
                Kernel::Avx2 => (avx2::group_pair, m.max(1)),
                _ => (portable::group_pair, m.max(1)),
            };
            for start in (0..m).step_by(block) {
                let rows = block.min(m - start);
                let a = &a[start * stride..(start + rows) * stride];
                // A task per pair of output groups.
                (0..(last - first) / 2).into_par_iter().for_each(|pair| {
                    let g = first + 2 * pair;
                    let out_ptr = &out_ptr;
                    // SAFETY: the kernel is available (checked above; the tiles granted); each
                    // task writes only its own two output groups' columns of rows `start..start
                    // + rows` of `out`, whose rows are `width` long; `a` holds `rows` rows of
                    // `chunks` whole chunks and the weight holds groups `g` and `g + 1`.
                    unsafe {
                        group_pair(
                            a,
                            rows,
                            w.chunks,
                            &w.data[g * group_len..(g + 2) * group_len],
                            out_ptr.0.add(start * width + (g - first) * N_TILE),
                            width,
                        )
                    }
                });
            }
        }
        Kernel::Avx512 => {
            // A task per four output groups (the last may be two), each over every row: the
            // four groups' weights stay in its core's L2 while the rows stream past.
            let starts: Vec<usize> = (first..last).step_by(avx512::GROUPS).collect();
            starts.into_par_iter().for_each(|g| {
                let count = (last - g).min(avx512::GROUPS);
                let out_ptr = &out_ptr;
                // SAFETY: AVX-512 BF16 was detected (checked above); each task writes only its
                // own groups' columns of `out`, whose `m` rows are `width` long; `a` holds `m`
                // rows of `chunks` whole chunks and the weight holds groups `g..g + count`.
                unsafe {
                    avx512::groups(
                        &a,
                        m,
                        w.chunks,
                        &w.data[g * group_len..(g + count) * group_len],
                        count,
                        out_ptr.0.add((g - first) * N_TILE),
                        width,
                    )
                }
            });
        }
    }
    let y = Tensor::from_vec(out, (m, width), x.device())?;
    let from = cols.start - first * N_TILE;
    if from == 0 && cols.len() == width {
        Ok(y)
    } else {
        y.narrow(1, from, cols.len())?.contiguous()
    }
}

/// A kernel's product for two output groups over a block of rows (see `avx2::group_pair`).
type GroupPairFn = unsafe fn(&[u16], usize, usize, &[u16], *mut f32, usize);

struct SendPtr(*mut f32);
// SAFETY: the tasks sharing it write disjoint columns (see `matmul_t_with`).
unsafe impl Sync for SendPtr {}

/// `x` rounded to bf16, rows padded with zeros to whole chunks: `[m, chunks · 32]`.
fn to_tile_rows(x: &[f32], m: usize, k: usize, chunks: usize) -> Vec<u16> {
    let stride = chunks * K_CHUNK;
    let mut a = vec![0u16; m * stride];
    a.par_chunks_mut(stride)
        .zip(x.par_chunks(k.max(1)))
        .with_min_len(8)
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = round_to_bf16(*s);
            }
        });
    a
}

/// `half::bf16::from_f32` without branches, so that the loop vectorises: round to nearest even
/// on the upper 16 bits, NaNs kept NaN (quiet).
#[inline(always)]
fn round_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let nan = ((bits >> 16) | 0x40) as u16;
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{BLOCK, K_CHUNK};
    use std::arch::asm;

    /// The 64-byte tile configuration (palette 1): tiles 0–3 accumulate the 2×2 output tiles,
    /// 4–5 hold `rows0` and `rows1` rows of activations, 6–7 two weight blocks. A tile with zero
    /// rows is left unconfigured (`rows1 == 0`: one row tile only).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new(rows0: usize, rows1: usize) -> Self {
            let mut c = [0u8; 64];
            c[0] = 1;
            let rows = [
                rows0,
                rows0,
                rows1,
                rows1,
                rows0,
                rows1,
                K_CHUNK / 2,
                K_CHUNK / 2,
            ];
            for (t, r) in rows.into_iter().enumerate() {
                if r > 0 {
                    c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
                    c[48 + t] = r as u8;
                }
            }
            Self(c)
        }
    }

    /// Two output groups (32 columns) for all `m` rows of `a`: `out` points at the first of
    /// them in a row-major `[m, width]` f32 matrix.
    ///
    /// # Safety
    /// AMX must be granted; `a` holds `m · chunks · 32` values, `w` two groups of `chunks`
    /// blocks, and `out` `m` rows of `width ≥ 32` writable floats.
    pub unsafe fn group_pair(
        a: &[u16],
        m: usize,
        chunks: usize,
        w: &[u16],
        out: *mut f32,
        width: usize,
    ) {
        debug_assert!(a.len() == m * chunks * K_CHUNK && w.len() == 2 * chunks * BLOCK);
        let a_stride = chunks * K_CHUNK * 2;
        let out_stride = width * 4;
        let (w0, w1) = (w.as_ptr(), unsafe { w.as_ptr().add(chunks * BLOCK) });
        let mut loaded = (0, 0);
        let mut row = 0;
        while row < m {
            let rows0 = (m - row).min(16);
            let rows1 = (m - row - rows0).min(16);
            if loaded != (rows0, rows1) {
                let cfg = Config::new(rows0, rows1);
                unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
                loaded = (rows0, rows1);
            }
            let a0 = unsafe { a.as_ptr().add(row * chunks * K_CHUNK) };
            let c0 = unsafe { out.add(row * width) };
            if rows1 > 0 {
                let a1 = unsafe { a0.add(16 * chunks * K_CHUNK) };
                let c1 = unsafe { c0.add(16 * width) };
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        "2:",
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tileloadd tmm7, [{w1} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        "add {a0}, 64",
                        "add {a1}, 64",
                        "add {w0}, 1024",
                        "add {w1}, 1024",
                        "dec {n}",
                        "jnz 2b",
                        "tilestored [{c0} + {sc}*1], tmm0",
                        "tilestored [{c0} + {sc}*1 + 64], tmm1",
                        "tilestored [{c1} + {sc}*1], tmm2",
                        "tilestored [{c1} + {sc}*1 + 64], tmm3",
                        a0 = inout(reg) a0 => _,
                        a1 = inout(reg) a1 => _,
                        w0 = inout(reg) w0 => _,
                        w1 = inout(reg) w1 => _,
                        n = inout(reg) chunks => _,
                        sa = in(reg) a_stride,
                        sw = in(reg) 64usize,
                        c0 = in(reg) c0,
                        c1 = in(reg) c1,
                        sc = in(reg) out_stride,
                        options(nostack),
                    )
                }
            } else {
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "2:",
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tileloadd tmm7, [{w1} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "add {a0}, 64",
                        "add {w0}, 1024",
                        "add {w1}, 1024",
                        "dec {n}",
                        "jnz 2b",
                        "tilestored [{c0} + {sc}*1], tmm0",
                        "tilestored [{c0} + {sc}*1 + 64], tmm1",
                        a0 = inout(reg) a0 => _,
                        w0 = inout(reg) w0 => _,
                        w1 = inout(reg) w1 => _,
                        n = inout(reg) chunks => _,
                        sa = in(reg) a_stride,
                        sw = in(reg) 64usize,
                        c0 = in(reg) c0,
                        sc = in(reg) out_stride,
                        options(nostack),
                    )
                }
            }
            row += rows0 + rows1;
        }
        // Gives the tile state back, so that context switches stop saving it.
        unsafe { asm!("tilerelease", options(nostack)) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{K_CHUNK, N_TILE};
    use std::arch::x86_64::*;

    /// Output groups per task: 4 groups × [`ROWS`] rows of accumulators fill 24 of the 32
    /// registers, leaving 4 for the weights and one for the broadcast input pair.
    pub const GROUPS: usize = 4;
    /// Rows per register tile.
    const ROWS: usize = 6;

    /// `count` (2 or 4) output groups for all `m` rows of `a`: `out` points at the first of
    /// them in a row-major `[m, width]` f32 matrix.
    ///
    /// # Safety
    /// AVX-512 BF16 must be present; `a` holds `m · chunks · 32` values, `w` `count` groups of
    /// `chunks` blocks, and `out` `m` rows of `width ≥ 16 · count` writable floats.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn groups(
        a: &[u16],
        m: usize,
        chunks: usize,
        w: &[u16],
        count: usize,
        out: *mut f32,
        width: usize,
    ) {
        debug_assert!(a.len() == m * chunks * K_CHUNK && w.len() == count * chunks * K_CHUNK * 16);
        let stride = chunks * K_CHUNK;
        let group_len = w.len() / count;
        let pairs = stride / 2;
        let mut row = 0;
        while row < m {
            let rows = (m - row).min(ROWS);
            // SAFETY: rows `row..row + rows` exist in `a` and `out` (see above).
            let (a, out) = unsafe { (a.as_ptr().add(row * stride), out.add(row * width)) };
            let w = w.as_ptr();
            let args = (a, stride, w, group_len, pairs, out, width);
            unsafe {
                match (rows, count) {
                    (6, 4) => tile::<6, 4>(args),
                    (5, 4) => tile::<5, 4>(args),
                    (4, 4) => tile::<4, 4>(args),
                    (3, 4) => tile::<3, 4>(args),
                    (2, 4) => tile::<2, 4>(args),
                    (1, 4) => tile::<1, 4>(args),
                    (6, _) => tile::<6, 2>(args),
                    (5, _) => tile::<5, 2>(args),
                    (4, _) => tile::<4, 2>(args),
                    (3, _) => tile::<3, 2>(args),
                    (2, _) => tile::<2, 2>(args),
                    _ => tile::<1, 2>(args),
                }
            }
            row += rows;
        }
    }

    type TileArgs = (*const u16, usize, *const u16, usize, usize, *mut f32, usize);

    /// `R` rows × `G` groups of 16 outputs, accumulated in registers over every input pair:
    /// one broadcast pair of each row against one register of each group's 16 output pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn tile<const R: usize, const G: usize>(
        (a, stride, w, group_len, pairs, out, width): TileArgs,
    ) {
        let mut acc = [[_mm512_setzero_ps(); G]; R];
        for p in 0..pairs {
            // SAFETY (this block): pair `p` of each of the `G` groups and of each of the `R`
            // rows is in bounds (see `groups`).
            let wv: [__m512bh; G] = std::array::from_fn(|g| unsafe {
                std::mem::transmute(_mm512_loadu_si512(
                    w.add(g * group_len + p * 2 * N_TILE).cast(),
                ))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = unsafe { a.add(r * stride + 2 * p).cast::<i32>().read_unaligned() };
                let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_dpbf16_ps(*acc, av, *wv);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (g, acc) in acc.iter().enumerate() {
                unsafe { _mm512_storeu_ps(out.add(r * width + g * N_TILE), *acc) };
            }
        }
    }
}

/// The kernels' arithmetic in plain Rust, for any CPU: the compiler vectorises the loops over
/// 32 outputs for whatever the target has (SSE2 on baseline x86-64, NEON on ARM).
mod portable {
    use super::{K_CHUNK, N_TILE};

    /// Rows per tile: 4 rows × 32 outputs of accumulators.
    const ROWS: usize = 4;

    /// Two output groups (32 columns) for all `m` rows of `a`: `out` points at the first of
    /// them in a row-major `[m, width]` f32 matrix.
    ///
    /// # Safety
    /// `a` holds `m · chunks · 32` values, `w` two groups of `chunks` blocks, and `out` `m` rows
    /// of `width ≥ 32` writable floats.
    pub unsafe fn group_pair(
        a: &[u16],
        m: usize,
        chunks: usize,
        w: &[u16],
        out: *mut f32,
        width: usize,
    ) {
        let stride = chunks * K_CHUNK;
        let group_len = w.len() / 2;
        let widen = |v: u16| f32::from_bits((v as u32) << 16);
        for row in (0..m).step_by(ROWS) {
            let rows = (m - row).min(ROWS);
            let mut acc = [[0f32; 2 * N_TILE]; ROWS];
            for p in 0..stride / 2 {
                let (mut even, mut odd) = ([0f32; 2 * N_TILE], [0f32; 2 * N_TILE]);
                for g in 0..2 {
                    let line = &w[g * group_len + p * 2 * N_TILE..][..2 * N_TILE];
                    for o in 0..N_TILE {
                        even[g * N_TILE + o] = widen(line[2 * o]);
                        odd[g * N_TILE + o] = widen(line[2 * o + 1]);
                    }
                }
                for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                    let at = (row + r) * stride + 2 * p;
                    let (x0, x1) = (widen(a[at]), widen(a[at + 1]));
                    for o in 0..2 * N_TILE {
                        acc[o] += x0 * even[o] + x1 * odd[o];
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(rows) {
                // SAFETY: row `row + r` < `m` and its 32 columns are within `width`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.add((row + r) * width), 32) };
                dst.copy_from_slice(acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{K_CHUNK, N_TILE};
    use std::arch::x86_64::*;

    /// Rows per register tile: 2 rows × 4 registers of 8 outputs are 8 accumulators, with 4
    /// registers for the widened inputs and 2 for the widened weights, within AVX2's 16.
    const ROWS: usize = 2;

    /// Two output groups (32 columns) for all `m` rows of `a`: `out` points at the first of
    /// them in a row-major `[m, width]` f32 matrix.
    ///
    /// # Safety
    /// AVX2 and FMA must be present; `a` holds `m · chunks · 32` values, `w` two groups of
    /// `chunks` blocks, and `out` `m` rows of `width ≥ 32` writable floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group_pair(
        a: &[u16],
        m: usize,
        chunks: usize,
        w: &[u16],
        out: *mut f32,
        width: usize,
    ) {
        debug_assert!(a.len() == m * chunks * K_CHUNK && w.len() == 2 * chunks * K_CHUNK * 16);
        let stride = chunks * K_CHUNK;
        let mut row = 0;
        while row < m {
            let rows = (m - row).min(ROWS);
            // SAFETY: rows `row..row + rows` exist in `a` and `out` (see above).
            let (a, out) = unsafe { (a.as_ptr().add(row * stride), out.add(row * width)) };
            let args = (a, stride, w.as_ptr(), w.len() / 2, stride / 2, out, width);
            unsafe {
                match rows {
                    2 => tile::<2>(args),
                    _ => tile::<1>(args),
                }
            }
            row += rows;
        }
    }

    type TileArgs = (*const u16, usize, *const u16, usize, usize, *mut f32, usize);

    /// `R` rows × 32 outputs. A packed line of 16 output pairs is two registers of 8 pairs;
    /// a pair's even (low) half becomes an f32 by a 16-bit left shift, its odd half by masking
    /// off the low 16 bits.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize>((a, stride, w, group_len, pairs, out, width): TileArgs) {
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for p in 0..pairs {
            // SAFETY (this block): pair `p` of both groups and of each of the `R` rows is in
            // bounds (see `group_pair`).
            let inputs: [(__m256, __m256); R] = std::array::from_fn(|r| {
                let pair = unsafe { a.add(r * stride + 2 * p).cast::<i32>().read_unaligned() };
                let v = _mm256_set1_epi32(pair);
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                    _mm256_castsi256_ps(_mm256_and_si256(v, high)),
                )
            });
            for h in 0..4 {
                let at = (h / 2) * group_len + p * 2 * N_TILE + (h % 2) * N_TILE;
                let raw = unsafe { _mm256_loadu_si256(w.add(at).cast()) };
                let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
                for (acc, (x_even, x_odd)) in acc.iter_mut().zip(&inputs) {
                    acc[h] = _mm256_fmadd_ps(*x_even, even, acc[h]);
                    acc[h] = _mm256_fmadd_ps(*x_odd, odd, acc[h]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (h, acc) in acc.iter().enumerate() {
                let at = r * width + (h / 2) * N_TILE + (h % 2) * 8;
                unsafe { _mm256_storeu_ps(out.add(at), *acc) };
            }
        }
    }
}

/// What the x86-64 kernels' modules offer elsewhere: nothing is available, so nothing is called.
#[cfg(not(target_arch = "x86_64"))]
mod x86_only {
    pub const GROUPS: usize = 4;

    /// # Safety
    /// Never called: off x86-64 a `Cpu` is always portable.
    pub unsafe fn group_pair(_: &[u16], _: usize, _: usize, _: &[u16], _: *mut f32, _: usize) {
        unreachable!("AMX and AVX exist only on x86-64")
    }

    /// # Safety
    /// Never called: off x86-64 a `Cpu` is always portable.
    pub unsafe fn groups(
        _: &[u16],
        _: usize,
        _: usize,
        _: &[u16],
        _: usize,
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("AVX-512 exists only on x86-64")
    }
}
#[cfg(not(target_arch = "x86_64"))]
use x86_only as amx;
#[cfg(not(target_arch = "x86_64"))]
use x86_only as avx2;
#[cfg(not(target_arch = "x86_64"))]
use x86_only as avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The fallback is the definition: bf16-rounded operands, f32 products.
    #[test]
    fn fallback_is_the_product_of_the_rounded_operands() {
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for (m, n, k, cols) in [
            (5, 19, 40, 0..19),
            (9, 70, 33, 20..61),
            (1, 32, 96, 0..32),
            (PORTABLE_GEMM_ROWS + 3, 40, 64, 5..37),
        ] {
            let (x, w) = (random(m, k, 1), random(n, k, 2));
            let packed = PackedWeight::pack(&w).unwrap();
            let got = matmul_t_with(&x, &packed, cols.clone(), Kernel::Portable).unwrap();
            let w = round(&w).narrow(0, cols.start, cols.len()).unwrap();
            let want = round(&x).matmul(&w.t().unwrap()).unwrap();
            let diff = max_abs(&(got - want).unwrap());
            assert!(diff < 1e-5, "m {m} n {n} k {k} {cols:?}: {diff}");
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The fast kernels against the fallback, over shapes that leave partial row tiles, partial
    /// chunks, odd output groups, a last group pair and column windows.
    #[test]
    fn kernels_match_the_fallback() {
        for kernel in [Kernel::Tiles, Kernel::Avx512, Kernel::Avx2] {
            if kernel.available() {
                kernel_matches_the_fallback(kernel);
            } else {
                eprintln!("no {} on this machine: not exercised", kernel.name());
            }
        }
    }

    fn kernel_matches_the_fallback(kernel: Kernel) {
        for (m, n, k, cols) in [
            (1, 32, 32, 0..32),
            (7, 48, 70, 0..48),
            (16, 64, 64, 0..64),
            (33, 100, 96, 3..97),
            (264, 96, 128, 17..50),
            (40, 1040, 64, 1000..1040),
            (600, 64, 2048, 0..64),
            (13, 96, 64, 0..96),
            (9, 160, 40, 40..150),
        ] {
            let (x, w) = (random(m, k, m as u64), random(n, k, n as u64 + 7));
            let packed = PackedWeight::pack(&w).unwrap();
            let got = matmul_t_with(&x, &packed, cols.clone(), kernel).unwrap();
            let want = matmul_t_with(&x, &packed, cols.clone(), Kernel::Portable).unwrap();
            assert_eq!(got.dims(), [m, cols.len()]);
            let scale = max_abs(&want);
            let diff = max_abs(&(got - want).unwrap());
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{}: m {m} n {n} k {k} {cols:?}: {diff}",
                kernel.name()
            );
        }
    }

    #[test]
    fn rounding_agrees_with_half() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
        ];
        let mut s = 1u32;
        let randoms = (0..100_000).map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            f32::from_bits(s)
        });
        for x in specials.into_iter().chain(randoms) {
            let want = bf16::from_f32(x);
            let got = bf16::from_bits(round_to_bf16(x));
            if want.is_nan() {
                assert!(got.is_nan(), "{x:e} ({:#x})", x.to_bits());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let packed = PackedWeight::pack(&random(16, 32, 3)).unwrap();
        let portable = Kernel::Portable;
        let err = matmul_t_with(&random(2, 31, 4), &packed, 0..16, portable).unwrap_err();
        assert!(err.to_string().contains("[2, 31]"), "{err}");
        assert!(matmul_t_with(&random(2, 32, 4), &packed, 0..17, portable).is_err());
        for kernel in [portable, Kernel::best()] {
            let empty = matmul_t_with(&random(2, 32, 4), &packed, 16..16, kernel).unwrap();
            assert_eq!(empty.dims(), [2, 0]);
        }
    }
}
