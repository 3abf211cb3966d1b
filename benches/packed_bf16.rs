//! The compute-bound products of the 350M configuration (one layer's four linear weights against
//! the rows of a reranked picture and of full sequences) in f32
//! through candle's GEMM and in bf16 (`--dtype packed-bf16`) on every kernel this CPU has (AMX tiles,
//! AVX-512 BF16, AVX2), in the same run: ms per layer, GFLOP/s and the ratio to f32.
//! `PACKED_BENCH_ITERS` sets the timed runs (default 10, after one warm-up).
//!
//!     cargo bench --bench packed_bf16

use candle_core::{Device, Tensor};
use rudolph::config::Config;
use rudolph::kernels::packed_bf16::{self, Kernel, PackedWeight};

mod support;

fn main() -> anyhow::Result<()> {
    let iters = support::iterations("PACKED_BENCH_ITERS", 10);
    let kernels: Vec<Kernel> = [Kernel::Tiles, Kernel::Avx512, Kernel::Avx2]
        .into_iter()
        .filter(|k| k.available())
        .collect();
    if kernels.is_empty() {
        println!("this CPU has no AMX tiles, AVX-512 BF16 or AVX2: nothing to compare");
        return Ok(());
    }
    let device = Device::Cpu;
    let cfg = Config::preset("350m")?;
    let h = cfg.hidden_size;
    let shapes = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)];
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|&s| Tensor::randn(0f32, 0.02, s, &device))
        .collect::<candle_core::Result<_>>()?;
    let packed: Vec<PackedWeight> = weights
        .iter()
        .map(PackedWeight::pack)
        .collect::<candle_core::Result<_>>()?;
    let flops_per_row: usize = shapes.iter().map(|(n, k)| 2 * n * k).sum();
    // 264: a reranked picture's image codes and right text; 384: a full sequence.
    for m in [264, 384, 8 * 264] {
        let xs: Vec<Tensor> = shapes
            .iter()
            .map(|&(_, k)| Tensor::randn(0f32, 1.0, (m, k), &device))
            .collect::<candle_core::Result<_>>()?;
        let f32_layer = support::mean_seconds(iters, || {
            for (x, w) in xs.iter().zip(&weights) {
                x.matmul(&w.t()?)?;
            }
            Ok(())
        })?;
        let gflops = |dt: f64| (m * flops_per_row) as f64 / dt / 1e9;
        let mut line = format!(
            "{m} rows, one layer: f32 GEMM {:.2} ms ({:.0} GFLOP/s)",
            f32_layer * 1e3,
            gflops(f32_layer)
        );
        for &kernel in &kernels {
            let bf16_layer = support::mean_seconds(iters, || {
                for ((x, w), &(n, _)) in xs.iter().zip(&packed).zip(&shapes) {
                    packed_bf16::matmul_t_with(x, w, 0..n, kernel)?;
                }
                Ok(())
            })?;
            line += &format!(
                "; bf16 on {} {:.2} ms ({:.0} GFLOP/s, {:.2}×)",
                kernel.name(),
                bf16_layer * 1e3,
                gflops(bf16_layer),
                f32_layer / bf16_layer
            );
        }
        println!("{line}");
    }
    Ok(())
}
