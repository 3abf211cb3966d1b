use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (384usize, 1024usize, 4096usize),
        (8, 1024, 4096),
        (1, 1024, 24640),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let _ = a.matmul(&b.t()?)?;
        let t0 = Instant::now();
        let reps = 10;
        for _ in 0..reps {
            let _ = a.matmul(&b.t()?)?;
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{k}x{n}: {:.2} ms, {:.1} GFLOP/s, {:.1} GB/s weights",
            dt * 1e3,
            2.0 * (m * k * n) as f64 / dt / 1e9,
            (k * n * 4) as f64 / dt / 1e9
        );
        let b16 = b.to_dtype(DType::F16)?;
        let a16 = a.to_dtype(DType::F16)?;
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = a16.matmul(&b16.t()?)?;
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        println!("   f16: {:.2} ms", dt * 1e3);
    }
    Ok(())
}
