//! The machine's ceilings for the README's roofline: f32 matrix-product throughput through
//! candle (the kernel our model uses), bf16 throughput on the AMX tiles where the CPU has them
//! (`--dtype packed-bf16`), memory-copy bandwidth, and the bandwidth of reading
//! memory on every core (what decoding does with the weights and the KV cache).
//!
//!     cargo run --release --example roofline

use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    // The shape of the 350M MLP on a full sequence: [384, 1024] × [1024, 4096].
    let (m, k, n) = (384usize, 1024usize, 4096usize);
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    a.matmul(&b.t()?)?;
    let reps = 20;
    let t0 = Instant::now();
    for _ in 0..reps {
        a.matmul(&b.t()?)?;
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    println!(
        "matmul {m}×{k}×{n}: {:.1} GFLOP/s",
        2.0 * (m * k * n) as f64 / dt / 1e9
    );

    let kernel = rudolph::kernels::packed_bf16::Kernel::best();
    if kernel != rudolph::kernels::packed_bf16::Kernel::Portable {
        let packed = rudolph::kernels::packed_bf16::PackedWeight::pack(&b)?;
        rudolph::kernels::packed_bf16::matmul_t(&a, &packed, 0..n)?;
        let t0 = Instant::now();
        for _ in 0..reps {
            rudolph::kernels::packed_bf16::matmul_t(&a, &packed, 0..n)?;
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        println!(
            "bf16 matmul {m}×{k}×{n} on {}: {:.1} GFLOP/s",
            kernel.name(),
            2.0 * (m * k * n) as f64 / dt / 1e9
        );
    } else {
        println!("bf16 matmul on AMX tiles: this CPU has none");
    }

    let src = vec![1f32; 64 << 20];
    let mut dst = vec![0f32; 64 << 20];
    dst.copy_from_slice(&src);
    let t0 = Instant::now();
    for _ in 0..5 {
        std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
    }
    let dt = t0.elapsed().as_secs_f64() / 5.0;
    // A copy reads and writes every byte.
    println!(
        "memory copy: {:.1} GB/s",
        2.0 * (src.len() * 4) as f64 / dt / 1e9
    );

    // Reading on all cores: a sum over 1 GiB, far larger than any cache.
    use rayon::prelude::*;
    let big = vec![1f32; 256 << 20];
    // Sixteen lanes, so that the adds vectorise and the loop waits on memory, not on them.
    let sum = |v: &[f32]| -> f32 {
        v.par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for x in c.chunks_exact(16) {
                    for (a, x) in acc.iter_mut().zip(x) {
                        *a += x;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum()
    };
    std::hint::black_box(sum(&big));
    let t0 = Instant::now();
    for _ in 0..5 {
        std::hint::black_box(sum(std::hint::black_box(&big)));
    }
    let dt = t0.elapsed().as_secs_f64() / 5.0;
    println!(
        "memory read, all cores: {:.1} GB/s",
        (big.len() * 4) as f64 / dt / 1e9
    );
    Ok(())
}
