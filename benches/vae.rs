//! Decoding speed of the real-size VQGAN (vqgan.gumbelf8-sber config, random weights): a batch of
//! 16 images of 16×16 codes (128×128 px), on the CPU. `VAE_BENCH_ITERS` sets the timed runs
//! (default 2, after one warm-up).

use candle_core::{Device, Tensor};
use rudolph::vae::{Vqgan, VqganConfig};

mod support;

fn main() -> anyhow::Result<()> {
    const BATCH: usize = 16;
    const SIDE: usize = 16;
    let iters = support::iterations("VAE_BENCH_ITERS", 2);
    let device = Device::Cpu;
    let config = VqganConfig::gumbelf8_sber();
    let vae = Vqgan::random(&config, &device)?;

    // Deterministic pseudo-random codes.
    let codes: Vec<u32> = (0..BATCH * SIDE * SIDE)
        .map(|i| ((i as u64 * 2_654_435_761) % config.n_embed as u64) as u32)
        .collect();
    let codes = Tensor::from_vec(codes, (BATCH, SIDE * SIDE), &device)?;

    let per_batch = support::mean_seconds(iters, || Ok(vae.decode_codes(&codes).map(drop)?))?;
    println!(
        "vae decode, real config, {BATCH}×{SIDE}×{SIDE} codes -> {BATCH}×3×{px}×{px}: \
         {per_batch:.3} s/batch, {:.3} s/image ({iters} runs, {} threads)",
        per_batch / BATCH as f64,
        candle_core::utils::get_num_threads(),
        px = 8 * SIDE,
    );
    Ok(())
}
