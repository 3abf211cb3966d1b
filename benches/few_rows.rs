//! The few-row products of one decoding step of the 350M configuration (every layer's four
//! linear weights, so they stream from memory as in generation), timed with each kernel this
//! CPU has, in the same run: ms per step and the weight bytes read per second.
//! `FEW_ROWS_BENCH_ITERS` sets the timed steps (default 5, after one warm-up).
//!
//!     cargo bench --bench few_rows

use candle_core::{DType, Device, Tensor};
use rudolph::config::Config;
use rudolph::kernels::few_rows::{Kernel, matmul_t_with};

mod support;

fn main() -> anyhow::Result<()> {
    let iters = support::iterations("FEW_ROWS_BENCH_ITERS", 5);
    let device = Device::Cpu;
    let cfg = Config::preset("350m")?;
    let h = cfg.hidden_size;
    let shapes = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)];
    for dtype in [DType::F32, DType::F16] {
        // Values do not change the speed; ones build fast.
        let weights: Vec<Tensor> = (0..cfg.num_layers)
            .flat_map(|_| shapes.iter().map(|&s| Tensor::ones(s, dtype, &device)))
            .collect::<candle_core::Result<_>>()?;
        let bytes: usize = weights
            .iter()
            .map(|w| w.elem_count() * dtype.size_in_bytes())
            .sum();
        for m in [1, 8] {
            let xs: Vec<Tensor> = shapes
                .iter()
                .map(|&(_, k)| Tensor::ones((m, k), DType::F32, &device))
                .collect::<candle_core::Result<_>>()?;
            let step = |kernel: Kernel| -> anyhow::Result<()> {
                for (i, w) in weights.iter().enumerate() {
                    matmul_t_with(&xs[i % shapes.len()], w, kernel)?;
                }
                Ok(())
            };
            let mut line = format!("{dtype:?} weights, {m} row(s):");
            for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
                if kernel == Kernel::Scalar && dtype != DType::F32 {
                    continue;
                }
                let dt = support::mean_seconds(iters, || step(kernel))?;
                line += &format!(
                    "  {kernel:?} {:.1} ms ({:.1} GB/s)",
                    dt * 1e3,
                    bytes as f64 / dt / 1e9
                );
            }
            println!("{line}");
        }
    }
    Ok(())
}
