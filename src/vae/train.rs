//! Training a small VQGAN of ruDALL-E's architecture from scratch.
//!
//! ruDALL-E's Gumbel quantizer, trained on a small world, collapses to a handful of codes. This
//! trainer uses nearest-neighbour vector quantisation instead (van den Oord et al.: codebook and
//! commitment losses, straight-through gradients) and re-seeds codes that went unused with
//! the current batch's worst-represented latents. The result is stored in the Gumbel layout: `quantize.proj`
//! becomes the 1×1 convolution whose logits are `2·e·z − ‖e‖² = −‖z − e‖² + ‖z‖²`, so the
//! argmax that [`Vqgan::encode_codes`] takes is the nearest codebook entry, and inference runs
//! the same code path as for the real VQGAN.
//!
//! The reconstruction loss is an L1 + L2 loss with a per-pixel weight, so that a small shape on
//! a large plain background is not drowned out by it.

use super::{VaeError, Vqgan, VqganConfig, VqganLayout};
use crate::train::optim::{AdamW, AdamWConfig};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Mixed into the options' seed for the initial weights, so that they do not share a stream
/// with the code re-seeding.
const INIT_SEED: u64 = 0x1a17_5eed;

/// A [`VarMap`] whose new variables are drawn with candle's initialisations (the hints its
/// layers give) from a seeded generator: candle's own CPU generator cannot be seeded, and a
/// recipe is reproducible only if its starting weights are. Layers ask for their variables in
/// construction order, so the same seed gives the same weights.
struct SeededInit {
    map: VarMap,
    rng: std::sync::Mutex<ChaCha8Rng>,
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        use candle_nn::init::{Init, NormalOrUniform};
        let poisoned = |_| candle_core::Error::Msg("the VQGAN's VarMap lock is poisoned".into());
        let mut data = self.map.data().lock().map_err(poisoned)?;
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "shape mismatch for {name}: {:?} held, {:?} asked",
                    var.shape(),
                    shape
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = self.rng.lock().map_err(|_| {
            candle_core::Error::Msg("the VQGAN's init generator lock is poisoned".into())
        })?;
        let n = shape.elem_count();
        let mut uniform = |lo: f64, up: f64| -> Vec<f32> {
            (0..n)
                .map(|_| (lo + (up - lo) * unit(&mut rng)) as f32)
                .collect()
        };
        let values = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => uniform(lo, up),
            Init::Randn { mean, stdev } => normal(n, mean, stdev, &mut rng),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(-bound, bound)
                    }
                    NormalOrUniform::Normal => normal(n, 0.0, std, &mut rng),
                }
            }
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: a new VQGAN's variables need a shape and an initialisation")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .is_ok_and(|data| data.contains_key(name))
    }
}

/// A uniform draw in [0, 1) with 53 random bits.
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` normal draws (Box–Muller).
fn normal(n: usize, mean: f64, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v) = (1.0 - unit(rng), unit(rng));
            (mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VqTrainOptions {
    pub steps: u64,
    pub lr: f64,
    /// Weight of the commitment term `‖z − sg(e)‖²` (the codebook term has weight 1).
    pub commitment: f64,
    /// Codes unused for this many steps are re-seeded with latents of the current batch.
    pub reseed_every: u64,
    pub seed: u64,
}

impl Default for VqTrainOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            lr: 1e-3,
            commitment: 0.25,
            reseed_every: 25,
            seed: 0,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct VqStepLog {
    pub step: u64,
    pub loss: f32,
    pub reconstruction: f32,
    pub quantization: f32,
    /// Distinct codes the batch used.
    pub codes_used: usize,
    /// Codes re-seeded after this step.
    pub reseeded: usize,
    pub lr: f64,
}

/// A VQGAN under training with its optimizer and code-usage counters.
pub struct VqTrainer {
    config: VqganConfig,
    varmap: VarMap,
    model: Vqgan,
    embed: Var,
    optimizer: AdamW,
    opts: VqTrainOptions,
    /// Times each code was chosen since the last re-seeding.
    usage: Vec<u64>,
    rng: ChaCha8Rng,
    codebook_initialised: bool,
}

fn candle(e: candle_core::Error) -> VaeError {
    VaeError::Candle(e)
}

impl VqTrainer {
    /// A fresh model with candle's default initialisation; the codebook is initialised from
    /// the first batch's latents.
    pub fn new(
        config: &VqganConfig,
        opts: VqTrainOptions,
        device: &Device,
    ) -> Result<Self, VaeError> {
        let varmap = VarMap::new();
        let seeded = SeededInit {
            map: varmap.clone(),
            rng: std::sync::Mutex::new(ChaCha8Rng::seed_from_u64(opts.seed ^ INIT_SEED)),
        };
        let vb = VarBuilder::from_backend(Box::new(seeded), DType::F32, device.clone());
        let model = Vqgan::new(config, VqganLayout::Plain, vb)?;
        let vars: Vec<(String, Var)> = {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| VaeError::BadInput("VarMap lock poisoned".into()))?;
            let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let embed = vars
            .iter()
            .find(|(k, _)| k == "quantize.embed.weight")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| VaeError::BadInput("the model has no quantize.embed.weight".into()))?;
        // Every residual branch starts as the identity (its last convolution zeroed), so the
        // untrained network passes its input through and each block learns a correction: on
        // the world this reached the same reconstructions in about half the steps.
        {
            let data = varmap
                .data()
                .lock()
                .map_err(|_| VaeError::BadInput("VarMap lock poisoned".into()))?;
            for (name, var) in data.iter() {
                if name.ends_with("conv2.weight") || name.ends_with("proj_out.weight") {
                    var.set(&var.as_tensor().zeros_like()?).map_err(candle)?;
                }
            }
        }
        // The projection is derived from the codebook when saving; it is not trained.
        let trained = vars
            .into_iter()
            .filter(|(k, _)| !k.starts_with("quantize.proj."))
            .collect();
        let optimizer = AdamW::new(
            trained,
            AdamWConfig {
                lr: opts.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .map_err(candle)?;
        Ok(Self {
            config: config.clone(),
            usage: vec![0; config.n_embed],
            varmap,
            model,
            embed,
            optimizer,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            opts,
            codebook_initialised: false,
        })
    }

    pub fn step(&self) -> u64 {
        self.optimizer.step
    }

    pub fn options(&self) -> &VqTrainOptions {
        &self.opts
    }

    /// Cosine decay from the peak to 5% of it over the run.
    fn lr(&self) -> f64 {
        let t = self.optimizer.step as f64 / self.opts.steps.max(1) as f64;
        self.opts.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
    }

    /// One optimizer step on `images` (`[B, 3, H, W]` in `[0, 1]`) with per-pixel loss
    /// weights `weights` (`[B, 1, H, W]`).
    pub fn train_step(&mut self, images: &Tensor, weights: &Tensor) -> Result<VqStepLog, VaeError> {
        let z = self.model.quant_conv_out(images)?; // [B, D, s, s]
        let (b, d, s, _) = z.dims4()?;
        // [B·s·s, D]
        let flat = z.permute((0, 2, 3, 1))?.reshape((b * s * s, d))?;
        if !self.codebook_initialised {
            self.seed_codes(
                &flat.detach(),
                &(0..self.config.n_embed).collect::<Vec<_>>(),
            )?;
            self.codebook_initialised = true;
        }
        let embed = self.embed.as_tensor();
        let codes = nearest_codes(&flat.detach(), &embed.detach())?;
        let quantized = embed.index_select(&codes, 0)?; // [B·s·s, D]
        let codebook = (quantized.clone() - flat.detach())?.sqr()?.mean_all()?;
        let commit = (flat.clone() - quantized.detach())?.sqr()?.mean_all()?;
        let straight = (&flat + (quantized - &flat)?.detach())?;
        let zq = straight.reshape((b, s, s, d))?.permute((0, 3, 1, 2))?;
        let recon = self.model.decode_z_preclamp(&zq)?; // [B, 3, H, W] in about [-1, 1]
        let target = images.affine(2.0, -1.0)?;
        let diff = (recon - target)?;
        let per_pixel = (diff.abs()? + diff.sqr()?)?.mean_keepdim(1)?; // [B, 1, H, W]
        let reconstruction = ((per_pixel * weights)?.sum_all()? / weights.sum_all()?)?;
        let quantization = (codebook + (commit * self.opts.commitment)?)?;
        let loss = (&reconstruction + &quantization)?;

        let grads = loss.backward().map_err(candle)?;
        let lr = self.lr();
        self.optimizer
            .step(|v| grads.get(v.as_tensor()).cloned(), lr)
            .map_err(candle)?;

        let used = codes.to_vec1::<u32>()?;
        for &c in &used {
            self.usage[c as usize] += 1;
        }
        let mut distinct = used.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let mut reseeded = 0;
        if self.opts.reseed_every > 0 && self.optimizer.step.is_multiple_of(self.opts.reseed_every)
        {
            let dead: Vec<usize> = (0..self.usage.len())
                .filter(|&c| self.usage[c] == 0)
                .collect();
            reseeded = dead.len();
            if !dead.is_empty() {
                // The worst-represented latents (edges of shapes, rare colours) get the free
                // codes, rather than random ones, which are mostly plain background.
                let chosen = self.embed.as_tensor().index_select(&codes, 0)?;
                let error = (flat.detach() - chosen)?.sqr()?.sum(D::Minus1)?;
                let mut order: Vec<(f32, usize)> = error
                    .to_vec1::<f32>()?
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| (e, i))
                    .collect();
                order.sort_by(|a, b| b.0.total_cmp(&a.0));
                let worst: Vec<u32> = order
                    .iter()
                    .take(dead.len().max(1))
                    .map(|&(_, i)| i as u32)
                    .collect();
                let idx = Tensor::from_vec(worst.clone(), worst.len(), flat.device())?;
                let pool = flat.detach().index_select(&idx, 0)?;
                self.seed_codes(&pool, &dead)?;
            }
            self.usage.iter_mut().for_each(|u| *u = 0);
        }
        Ok(VqStepLog {
            step: self.optimizer.step,
            loss: loss.to_scalar::<f32>()?,
            reconstruction: reconstruction.to_scalar::<f32>()?,
            quantization: quantization.to_scalar::<f32>()?,
            codes_used: distinct.len(),
            reseeded,
            lr,
        })
    }

    /// Sets the codebook rows `which` to randomly chosen latents of `flat` (`[N, D]`) plus a
    /// little noise, so that two re-seeded codes never coincide.
    fn seed_codes(&mut self, flat: &Tensor, which: &[usize]) -> Result<(), VaeError> {
        let (n, d) = flat.dims2()?;
        let latents = flat.to_vec2::<f32>()?;
        let mut rows = self.embed.as_tensor().to_vec2::<f32>()?;
        for &c in which {
            let src = &latents[(self.rng.next_u64() % n as u64) as usize];
            for j in 0..d {
                rows[c][j] =
                    src[j] + 0.01 * ((self.rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5);
            }
        }
        let flat_rows: Vec<f32> = rows.into_iter().flatten().collect();
        let t = Tensor::from_vec(flat_rows, self.embed.as_tensor().dims(), flat.device())?;
        self.embed.set(&t).map_err(candle)?;
        Ok(())
    }

    /// The model as it stands (for evaluation between steps).
    pub fn model(&self) -> Result<Vqgan, VaeError> {
        let vb = VarBuilder::from_tensors(self.gumbel_tensors()?, DType::F32, self.embed.device());
        Vqgan::new(&self.config, VqganLayout::Plain, vb)
    }

    /// Every weight under its taming name, with `quantize.proj` set so that its argmax is the
    /// nearest codebook entry (see the module docs).
    pub fn gumbel_tensors(&self) -> Result<HashMap<String, Tensor>, VaeError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| VaeError::BadInput("VarMap lock poisoned".into()))?;
        let mut out: HashMap<String, Tensor> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let e = self.embed.as_tensor().detach();
        let (k, d) = e.dims2()?;
        out.insert(
            "quantize.proj.weight".into(),
            (e.clone() * 2.0)?.reshape((k, d, 1, 1))?,
        );
        out.insert("quantize.proj.bias".into(), e.sqr()?.sum(D::Minus1)?.neg()?);
        Ok(out)
    }

    /// The optimizer's moments, named `exp_avg.<tensor>` / `exp_avg_sq.<tensor>`.
    pub fn optimizer_state(&self) -> HashMap<String, Tensor> {
        self.optimizer.moments().into_iter().collect()
    }

    /// Continues a saved run: weights, moments, step.
    pub fn restore(
        &mut self,
        weights: &HashMap<String, Tensor>,
        moments: &HashMap<String, Tensor>,
        step: u64,
    ) -> Result<(), VaeError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| VaeError::BadInput("VarMap lock poisoned".into()))?;
        for (name, var) in data.iter() {
            let t = weights.get(name).ok_or_else(|| {
                VaeError::BadInput(format!("the VQGAN checkpoint has no tensor {name}"))
            })?;
            var.set(&t.to_dtype(DType::F32)?).map_err(candle)?;
        }
        drop(data);
        for slot in &mut self.optimizer.slots {
            let get = |prefix: &str| {
                moments
                    .get(&format!("{prefix}.{}", slot.name))
                    .cloned()
                    .ok_or_else(|| {
                        VaeError::BadInput(format!(
                            "the VQGAN checkpoint has no optimizer tensor {prefix}.{}",
                            slot.name
                        ))
                    })
            };
            slot.exp_avg = get("exp_avg")?;
            slot.exp_avg_sq = get("exp_avg_sq")?;
        }
        self.optimizer.step = step;
        self.codebook_initialised = true;
        Ok(())
    }
}

/// The nearest codebook row of each latent: `[N, D]`, `[K, D]` → `[N]` u32.
pub fn nearest_codes(flat: &Tensor, embed: &Tensor) -> candle_core::Result<Tensor> {
    // ‖z‖² is the same for every code, so argmin ‖z − e‖² = argmax 2·z·e − ‖e‖².
    let scores = flat
        .matmul(&embed.t()?)?
        .affine(2.0, 0.0)?
        .broadcast_sub(&embed.sqr()?.sum(D::Minus1)?.unsqueeze(0)?)?;
    scores.argmax(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VqganConfig {
        VqganConfig::from_yaml_str(
            "embed_dim: 32\nn_embed: 16\nddconfig:\n  ch: 32\n  ch_mult: [1, 2]\n  \
             num_res_blocks: 1\n  attn_resolutions: []\n  z_channels: 32\n  resolution: 16\n  \
             in_channels: 3\n  out_ch: 3\n",
        )
        .unwrap()
    }

    /// The training forward (explicit GEMM convolutions, broadcast upsampling) and the
    /// inference forward (candle's conv2d) compute the same function, and the saved projection
    /// picks the nearest code.
    #[test]
    fn gemm_path_matches_inference_and_proj_is_nearest_neighbour() {
        let dev = Device::Cpu;
        let mut t = VqTrainer::new(&tiny(), VqTrainOptions::default(), &dev).unwrap();
        let images = Tensor::rand(0f32, 1f32, (2, 3, 16, 16), &dev).unwrap();
        let weights = Tensor::ones((2, 1, 16, 16), DType::F32, &dev).unwrap();
        let first = t.train_step(&images, &weights).unwrap();
        assert!(first.loss.is_finite());
        let inference = t.model().unwrap();
        let tracked = &t.model;
        let a = inference.quant_conv_out(&images).unwrap();
        let b = tracked.quant_conv_out(&images).unwrap();
        let diff = (a.clone() - b.clone())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(b.track_op());
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        let codes = inference
            .encode_codes(&images)
            .unwrap()
            .flatten_all()
            .unwrap();
        let (bsz, d, s, _) = a.dims4().unwrap();
        let flat = a
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((bsz * s * s, d))
            .unwrap();
        let nearest = nearest_codes(&flat, t.embed.as_tensor()).unwrap();
        assert_eq!(
            codes.to_vec1::<u32>().unwrap(),
            nearest.to_vec1::<u32>().unwrap()
        );
        let zq = inference
            .embed_codes(&codes.reshape((bsz, s * s)).unwrap())
            .unwrap();
        let dec_inf = inference.decode_z_preclamp(&zq).unwrap();
        let zq_tracked =
            (zq.clone() + Var::zeros(zq.dims(), DType::F32, &dev).unwrap().as_tensor()).unwrap();
        let dec_tr = inference.decode_z_preclamp(&zq_tracked).unwrap();
        let diff = (dec_inf - dec_tr)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }

    /// A few steps on one batch lower the loss: the gradients reach every part.
    #[test]
    fn loss_goes_down() {
        let dev = Device::Cpu;
        let opts = VqTrainOptions {
            steps: 30,
            lr: 2e-3,
            ..Default::default()
        };
        let mut t = VqTrainer::new(&tiny(), opts, &dev).unwrap();
        let images = Tensor::rand(0f32, 1f32, (4, 3, 16, 16), &dev).unwrap();
        let weights = Tensor::ones((4, 1, 16, 16), DType::F32, &dev).unwrap();
        let first = t.train_step(&images, &weights).unwrap().reconstruction;
        let mut last = first;
        for _ in 0..29 {
            last = t.train_step(&images, &weights).unwrap().reconstruction;
        }
        assert!(last < 0.8 * first, "{first} -> {last}");
    }

    /// Two trainers with the same options and pictures end bit for bit the same, code
    /// re-seeding included: the initial weights are drawn from the options' seed, and the
    /// convolutions' weight gradients are summed over the pictures in a fixed order, whichever
    /// threads computed them.
    #[test]
    fn training_is_reproducible() {
        let dev = Device::Cpu;
        let opts = VqTrainOptions {
            reseed_every: 2,
            ..Default::default()
        };
        let images = Tensor::rand(0f32, 1f32, (8, 3, 16, 16), &dev).unwrap();
        let weights = Tensor::rand(0.5f32, 2f32, (8, 1, 16, 16), &dev).unwrap();
        let run = || {
            let mut t = VqTrainer::new(&tiny(), opts, &dev).unwrap();
            for _ in 0..4 {
                t.train_step(&images, &weights).unwrap();
            }
            let mut tensors: Vec<(String, Vec<f32>)> = t
                .gumbel_tensors()
                .unwrap()
                .into_iter()
                .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            tensors
        };
        let first = run();
        for _ in 0..4 {
            assert!(
                run() == first,
                "two identical runs trained different weights"
            );
        }
    }

    /// A trainer restored from another's weights, moments and step continues identically.
    #[test]
    fn restore_continues_exactly() {
        let dev = Device::Cpu;
        let opts = VqTrainOptions {
            reseed_every: 0,
            ..Default::default()
        };
        let images = Tensor::rand(0f32, 1f32, (2, 3, 16, 16), &dev).unwrap();
        let weights = Tensor::ones((2, 1, 16, 16), DType::F32, &dev).unwrap();
        let mut a = VqTrainer::new(&tiny(), opts, &dev).unwrap();
        a.train_step(&images, &weights).unwrap();
        a.train_step(&images, &weights).unwrap();
        let mut b = VqTrainer::new(&tiny(), opts, &dev).unwrap();
        b.restore(&a.gumbel_tensors().unwrap(), &a.optimizer_state(), a.step())
            .unwrap();
        let la = a.train_step(&images, &weights).unwrap();
        let lb = b.train_step(&images, &weights).unwrap();
        assert_eq!(la.step, 3);
        assert_eq!(lb.step, 3);
        assert!(
            (la.loss - lb.loss).abs() < 1e-6,
            "{} vs {}",
            la.loss,
            lb.loss
        );
    }
}
