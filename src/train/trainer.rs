//! The training loop's state: parameters (trainable ones as variables), AdamW, dropout and the
//! step counter; one call per optimizer step.

use super::optim::{AdamW, AdamWConfig};
use super::schedule::{Schedule, learning_rate};
use crate::config::Config;
use crate::model::dropout::Dropout;
use crate::model::{Labels, LayerMasks, Loss, LossWeights, Rudolph};
use candle_core::{DType, Device, Result, Tensor, Var, bail};
use candle_nn::VarBuilder;
use std::collections::HashMap;

/// Which parameters train.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Freeze {
    /// Everything trains.
    Nothing,
    /// Attention and MLP weights stay fixed; embeddings, LayerNorms and the head train (as in
    /// the original's notebooks).
    AttentionMlp,
    /// Only embeddings and LayerNorms train.
    AllButEmbeddingsAndNorms,
    /// Only the last `n` layers, the final LayerNorm and the head train.
    AllButLastLayers(usize),
}

impl Freeze {
    /// Whether the parameter `name` (an original state-dict name) trains.
    pub fn trains(&self, name: &str, num_layers: usize) -> bool {
        let is_norm = name.contains("layernorm") || name.starts_with("to_logits.0");
        let is_embedding = name.contains("embeddings");
        match self {
            Self::Nothing => true,
            Self::AttentionMlp => !(name.contains(".attention.") || name.contains(".mlp.")),
            Self::AllButEmbeddingsAndNorms => is_norm || is_embedding,
            Self::AllButLastLayers(n) => match layer_index(name) {
                Some(i) => i + n >= num_layers,
                None => name.starts_with("to_logits") || name.contains("final_layernorm"),
            },
        }
    }
}

impl std::str::FromStr for Freeze {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::Nothing),
            "attention-mlp" => Ok(Self::AttentionMlp),
            "all-but-embeddings-norms" => Ok(Self::AllButEmbeddingsAndNorms),
            _ => match s.strip_prefix("all-but-last:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::AllButLastLayers(n)),
                _ => Err(format!(
                    "unknown freeze '{s}' (none, attention-mlp, all-but-embeddings-norms, all-but-last:N)"
                )),
            },
        }
    }
}

fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("transformer.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    /// Optimizer steps in the whole run (the schedule spans them).
    pub steps: u64,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup: u64,
    /// Micro-batches per optimizer step.
    pub accumulate: usize,
    /// Clip the global gradient norm to this (PyTorch's `clip_grad_norm_`).
    pub clip_norm: Option<f64>,
    pub loss_weights: [f64; 3],
    /// Score each target in its own vocabulary ([`Labels::Corrected`]); `false`: the
    /// original's labels. A plain flag, as checkpoints have always saved it.
    pub corrected_labels: bool,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub freeze: Freeze,
    /// Dropout probability in training (the published models were trained with 0.1, the
    /// built-in model with 0).
    pub dropout: f32,
    pub seed: u64,
}

/// `rudolph train`'s settings for fine-tuning (its flags' help says why each).
impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 1000,
            lr: 5e-5,
            schedule: Schedule::Cosine,
            warmup: 100,
            accumulate: 1,
            clip_norm: Some(1.0),
            loss_weights: [1.0, 2.0, 1.0],
            corrected_labels: true,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            freeze: Freeze::Nothing,
            dropout: 0.0,
            seed: 0,
        }
    }
}

impl TrainOptions {
    pub fn weights(&self) -> LossWeights {
        let [l_text, image, r_text] = self.loss_weights;
        LossWeights {
            l_text,
            image,
            r_text,
        }
    }

    pub fn labels(&self) -> Labels {
        if self.corrected_labels {
            Labels::Corrected
        } else {
            Labels::Original
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f32,
    pub l_text_loss: f32,
    pub image_loss: f32,
    pub r_text_loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
}

pub struct Trainer {
    cfg: Config,
    model: Rudolph,
    /// Every parameter by its original name; trainable ones are variables.
    params: Vec<(String, Tensor)>,
    masks: LayerMasks,
    optimizer: AdamW,
    dropout: Dropout,
    options: TrainOptions,
}

impl Trainer {
    /// Starts from `weights` (original names; masks ignored) or, if `None`, from random weights.
    pub fn new(
        cfg: &Config,
        weights: Option<HashMap<String, Tensor>>,
        masks: LayerMasks,
        options: TrainOptions,
        device: &Device,
    ) -> Result<Self> {
        let mut weights = match weights {
            Some(w) => w,
            None => Rudolph::random_weights(cfg, options.seed, device)?,
        };
        let mut params = Vec::new();
        let mut trainable = Vec::new();
        for (name, _) in Rudolph::tensor_shapes(cfg) {
            if name.ends_with("_mask") {
                continue;
            }
            let Some(t) = weights.remove(&name) else {
                bail!("the starting weights have no tensor '{name}'");
            };
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            if options.freeze.trains(&name, cfg.num_layers) {
                let var = Var::from_tensor(&t)?;
                params.push((name.clone(), var.as_tensor().clone()));
                trainable.push((name, var));
            } else {
                params.push((name, t));
            }
        }
        if trainable.is_empty() {
            bail!("the freeze option leaves nothing to train");
        }
        let model = build(cfg, &params, &masks, device)?;
        let optimizer = AdamW::new(
            trainable,
            AdamWConfig {
                lr: options.lr,
                beta1: options.betas[0],
                beta2: options.betas[1],
                eps: options.eps,
                weight_decay: options.weight_decay,
            },
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            model,
            params,
            masks,
            dropout: Dropout::new(options.dropout, options.seed ^ 0x5eed),
            optimizer,
            options,
        })
    }

    pub fn model(&self) -> &Rudolph {
        &self.model
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optimizer.step
    }

    /// Every parameter (current values) by its original name, plus the layer masks.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        for kind in crate::model::LayerMaskKind::ALL {
            out.push((
                format!("transformer.{}", kind.buffer_name()),
                self.masks.get(kind).clone(),
            ));
        }
        Ok(out)
    }

    /// One optimizer step over `micro_batches` (each `[B, T]` ids with a `[B or 1, 1, T, T]`
    /// mask): gradients averaged over them, clipped, then AdamW at the scheduled rate.
    pub fn train_step(&mut self, micro_batches: &[(Tensor, Tensor)]) -> Result<StepLog> {
        let batches = self.uniform(micro_batches);
        self.train_step_weighted(&batches)
    }

    /// One optimizer step over micro-batches that each carry their own loss weights and share
    /// of the step (shares should sum to 1): lets text-only batches train only the left-text
    /// term, and a mixed batch be split without changing the average.
    pub fn train_step_weighted(&mut self, micro_batches: &[MicroBatch]) -> Result<StepLog> {
        if micro_batches.is_empty() {
            bail!("a training step needs at least one batch");
        }
        let mut grads: HashMap<candle_core::TensorId, Tensor> = HashMap::new();
        let mut parts = PartSums::default();
        for mb in micro_batches {
            let loss = self.model.loss_with_dropout(
                &mb.ids,
                &mb.mask,
                mb.weights,
                self.options.labels(),
                Some(&self.dropout),
            )?;
            parts.add(&loss, mb.weights, mb.share)?;
            let store = loss.total.backward()?;
            for slot in &self.optimizer.slots {
                let id = slot.param.as_tensor().id();
                if let Some(g) = store.get(slot.param.as_tensor()) {
                    let g = g.affine(mb.share, 0.0)?;
                    let sum = match grads.remove(&id) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    grads.insert(id, sum);
                }
            }
        }
        // Summed in the parameters' order (not the map's, which changes from run to run), so
        // that the clipping, and with it the whole run, is reproducible bit for bit.
        let mut norm_sq = 0f64;
        for slot in &self.optimizer.slots {
            if let Some(g) = grads.get(&slot.param.as_tensor().id()) {
                norm_sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let grad_norm = norm_sq.sqrt();
        if let Some(max) = self.options.clip_norm {
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                for g in grads.values_mut() {
                    *g = g.affine(coef, 0.0)?;
                }
            }
        }
        let lr = learning_rate(
            self.options.schedule,
            self.optimizer.step,
            self.options.steps,
            self.options.lr,
            self.options.warmup,
        );
        self.optimizer
            .step(|var| grads.get(&var.as_tensor().id()).cloned(), lr)?;
        let [loss, l_text_loss, image_loss, r_text_loss] = parts.finish();
        Ok(StepLog {
            step: self.optimizer.step,
            loss,
            l_text_loss,
            image_loss,
            r_text_loss,
            lr,
            grad_norm: grad_norm as f32,
        })
    }

    /// The loss without dropout, averaged over `batches`.
    pub fn evaluate(&self, batches: &[(Tensor, Tensor)]) -> Result<[f32; 4]> {
        self.evaluate_weighted(&self.uniform(batches))
    }

    /// The loss without dropout over weighted micro-batches (as [`Self::train_step_weighted`]);
    /// each part is averaged over the batches that weight it, the total over all.
    pub fn evaluate_weighted(&self, batches: &[MicroBatch]) -> Result<[f32; 4]> {
        let mut parts = PartSums::default();
        for mb in batches {
            let loss = self
                .model
                .loss(&mb.ids, &mb.mask, mb.weights, self.options.labels())?;
            parts.add(&loss, mb.weights, mb.share)?;
        }
        Ok(parts.finish())
    }

    fn uniform(&self, batches: &[(Tensor, Tensor)]) -> Vec<MicroBatch> {
        let share = 1.0 / batches.len().max(1) as f64;
        batches
            .iter()
            .map(|(ids, mask)| MicroBatch {
                ids: ids.clone(),
                mask: mask.clone(),
                weights: self.options.weights(),
                share,
            })
            .collect()
    }

    /// AdamW's moments as `exp_avg.<name>` / `exp_avg_sq.<name>` (trainable parameters only).
    pub fn optimizer_state(&self) -> Vec<(String, Tensor)> {
        self.optimizer.moments()
    }

    /// Where the dropout generator stands (saved with a checkpoint).
    pub fn dropout_position(&self) -> u128 {
        self.dropout.position()
    }

    /// Continues a saved run: the optimizer's step count and moments (as
    /// [`Self::optimizer_state`] names them) and the dropout generator's position. The
    /// parameters themselves come in through [`Trainer::new`].
    pub fn restore(
        &mut self,
        step: u64,
        moments: &HashMap<String, Tensor>,
        dropout_position: u128,
    ) -> Result<()> {
        for slot in &mut self.optimizer.slots {
            let get = |prefix: &str| -> Result<Tensor> {
                let key = format!("{prefix}.{}", slot.name);
                let Some(t) = moments.get(&key) else {
                    bail!("the optimizer state has no tensor '{key}'");
                };
                if t.dims() != slot.param.as_tensor().dims() {
                    bail!(
                        "optimizer tensor '{key}' has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.param.as_tensor().dims()
                    );
                }
                t.to_dtype(DType::F32)?
                    .to_device(slot.param.as_tensor().device())
            };
            slot.exp_avg = get("exp_avg")?;
            slot.exp_avg_sq = get("exp_avg_sq")?;
        }
        self.optimizer.step = step;
        self.dropout.set_position(dropout_position);
        Ok(())
    }
}

/// One micro-batch of a weighted step: `[B, T]` ids, a `[B or 1, 1, T, T]` mask, the loss
/// weights for it and its share of the step's gradient.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub weights: LossWeights,
    pub share: f64,
}

/// Share-weighted sums of the loss parts; a part counts only where its weight is non-zero, so
/// that a text-only batch does not report its (unweighted) image loss.
#[derive(Default)]
struct PartSums {
    sums: [f64; 4],
    shares: [f64; 4],
}

impl PartSums {
    fn add(&mut self, loss: &Loss, weights: LossWeights, share: f64) -> Result<()> {
        let counted = [
            true,
            weights.l_text > 0.0,
            weights.image > 0.0,
            weights.r_text > 0.0,
        ];
        for (i, t) in [&loss.total, &loss.l_text, &loss.image, &loss.r_text]
            .into_iter()
            .enumerate()
        {
            if counted[i] {
                self.sums[i] += t.to_scalar::<f32>()? as f64 * share;
                self.shares[i] += share;
            }
        }
        Ok(())
    }

    fn finish(&self) -> [f32; 4] {
        std::array::from_fn(|i| {
            if self.shares[i] > 0.0 {
                (self.sums[i] / self.shares[i]) as f32
            } else {
                0.0
            }
        })
    }
}

fn build(
    cfg: &Config,
    params: &[(String, Tensor)],
    masks: &LayerMasks,
    device: &Device,
) -> Result<Rudolph> {
    let map: HashMap<String, Tensor> = params.iter().cloned().collect();
    Rudolph::new(
        cfg,
        VarBuilder::from_tensors(map, DType::F32, device),
        masks.clone(),
    )
}
