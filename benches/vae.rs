//! Decoding speed of the real-size VQGAN (vqgan.gumbelf8-sber config, random weights): a batch of
//! 16 images of 16×16 codes (128×128 px), on the CPU. `VAE_BENCH_ITERS` sets the timed runs
//! (default 2, after one warm-up).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rudolph::vae::{Vqgan, VqganConfig, VqganLayout};

mod support;

fn main() -> anyhow::Result<()> {
    const BATCH: usize = 16;
    const SIDE: usize = 16;
    let iters = support::iterations("VAE_BENCH_ITERS", 2);
    let device = Device::Cpu;
    let config = VqganConfig::gumbelf8_sber();
    // Random init through a VarMap, then detached copies: weights that are `Var`s would make
    // candle record the autograd graph and keep every activation alive.
    let varmap = VarMap::new();
    Vqgan::new(
        &config,
        VqganLayout::Plain,
        VarBuilder::from_varmap(&varmap, DType::F32, &device),
    )?;
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &device);
    let vae = Vqgan::new(&config, VqganLayout::Plain, vb)?;

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
