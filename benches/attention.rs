//! The decoding attention of one 350M step at batch 8 (24 layers, 16 heads of 64, one new row
//! against `sk` cached ones), at every vector width this CPU has, in the same run: ms per step
//! and the cache bytes read per second. "memory" reads a separate cache per layer, as decoding
//! does; "cache" reuses one layer's, which stays in the last-level cache, to show the kernel's
//! own speed. `ATTENTION_BENCH_ITERS` sets the timed steps (default 10, after one warm-up).
//!
//!     cargo bench --bench attention

use candle_core::{DType, Device, Tensor};
use rudolph::config::Config;
use rudolph::kernels::attention::decode_attention_with;
use rudolph::kernels::cpu::Simd;

mod support;

fn main() -> anyhow::Result<()> {
    let iters = support::iterations("ATTENTION_BENCH_ITERS", 10);
    let device = Device::Cpu;
    let cfg = Config::preset("350m")?;
    let (b, heads) = (8, cfg.num_attention_heads);
    let hd = cfg.hidden_size / heads;
    let capacity = cfg.total_seq_length();
    let layers: Vec<(Tensor, Tensor)> = (0..cfg.num_layers)
        .map(|_| {
            let cache = || Tensor::randn(0f32, 1., (b, heads, capacity, hd), &device);
            Ok((cache()?, cache()?))
        })
        .collect::<candle_core::Result<_>>()?;
    let q = Tensor::randn(0f32, 1., (b, heads, 1, hd), &device)?;
    let scale = 1.0 / (hd as f32).sqrt();
    for sk in [64, capacity / 2, capacity - 64] {
        let keep = Tensor::ones((1, 1, 1, sk), DType::F32, &device)?;
        for (place, distinct) in [("memory", cfg.num_layers), ("cache", 1)] {
            let step = |simd: Simd| -> anyhow::Result<()> {
                for layer in 0..cfg.num_layers {
                    let (k, v) = &layers[layer % distinct];
                    let (k, v) = (k.narrow(2, 0, sk)?, v.narrow(2, 0, sk)?);
                    decode_attention_with(&q, &k, &v, &keep, scale, simd)?
                        .ok_or_else(|| anyhow::anyhow!("the kernel declined the cache views"))?;
                }
                Ok(())
            };
            let bytes = cfg.num_layers * 2 * b * heads * sk * hd * 4;
            let mut line = format!("{sk:>3} cached rows, {place:>6}:");
            for simd in Simd::available() {
                let dt = support::mean_seconds(iters, || step(simd))?;
                line += &format!(
                    "  {} {:.1} ms ({:.1} GB/s)",
                    simd.name(),
                    dt * 1e3,
                    bytes as f64 / dt / 1e9
                );
            }
            println!("{line}");
        }
    }
    Ok(())
}
