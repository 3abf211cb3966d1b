//! A whole training run as plain settings (what `rudolph train` and the world recipe ask for):
//! where the model starts, what it trains on and how; run from the start to the saved model, or
//! continued from one of its checkpoints.

use super::checkpoint::{find_checkpoint, load_checkpoint};
use super::data::{CodesCache, Compose, Sample, load_dataset, split, synthetic};
use super::run::{RunSpec, Summary, companions, run};
use super::schedule::Schedule;
use super::{Freeze, TrainOptions, Trainer};
use crate::config::Config;
use crate::error::{Error, Result, invalid};
use crate::folder::{GenerationConfig, ModelSpec, OpenedModel};
use crate::model::masks::MaskVariant;
use crate::model::{Labels, LayerMasks, Rudolph};
use crate::progress::ProgressSink;
use crate::tokenizer::TextTokenizer;
use crate::vae::Vqgan;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where a run's model starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// A model folder's weights, with its configuration, tokenizer and VQGAN unless the spec
    /// names others.
    Folder(ModelSpec),
    /// Fresh weights of a preset (or `config.json`), with the tokenizer of its texts and the
    /// VQGAN that encodes its pictures.
    Scratch {
        config: String,
        tokenizer: PathBuf,
        vae: Option<PathBuf>,
        vae_config: Option<PathBuf>,
    },
}

/// What a run trains on.
#[derive(Debug, Clone)]
pub enum Data {
    /// A JSONL file of pictures and texts, or a folder holding one (see [`load_dataset`]).
    Jsonl(PathBuf),
    /// This many samples of random codes, for measuring speed and memory.
    Synthetic(usize),
}

/// A new run.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub start: Start,
    pub data: Data,
    /// The run folder: `model.safetensors`, `config.json`, `log.jsonl`, `loss.png`,
    /// `checkpoint-<step>/`.
    pub out: PathBuf,
    /// Optimizer steps in the whole run.
    pub steps: u64,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub accumulate: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Linear warmup steps (constant and cosine schedules).
    pub warmup: u64,
    /// Clip the global gradient norm to this; `None`: no clipping.
    pub clip_norm: Option<f64>,
    pub weight_decay: f64,
    /// Weights of the left-text, image and right-text losses.
    pub loss_weights: [f64; 3],
    pub freeze: Freeze,
    /// Dropout probability in training; `None`: the config's.
    pub dropout: Option<f32>,
    /// How samples become sequences: left texts blanked, BPE-dropout.
    pub compose: Compose,
    /// Fraction of the samples held out for validation.
    pub val_fraction: f64,
    /// Validation every this many steps (0: never).
    pub eval_every: u64,
    /// A checkpoint every this many steps (0: never).
    pub save_every: u64,
    /// A `log.jsonl` line every this many steps.
    pub log_every: u64,
    pub seed: u64,
    /// How the segment-boundary targets are scored: [`Labels::Corrected`] (each in its own
    /// vocabulary), or the original's.
    pub labels: Labels,
}

impl TrainJob {
    /// Trains from the start to the saved model in `self.out`, whatever that folder already
    /// holds (refusing a non-empty one is the caller's choice). The folder ends as a model
    /// folder every command reads: the weights and `config.json`, with the tokenizer, the
    /// VQGAN (and its `.config.yml`) and the `generation_config.json` the run started from.
    ///
    /// The settings, the model, the tokenizer, the VQGAN and every sample are checked before
    /// `out` is made; if the run fails after all and made `out` itself, it removes `out` unless
    /// a checkpoint is in it (which [`resume`] continues).
    pub fn run(&self, progress: &dyn ProgressSink) -> Result<Summary> {
        self.validate()?;
        let device = Device::Cpu;
        let model = self.start_model(&device)?;
        if let Some(problem) = self.labels.misfit(&model.config) {
            return Err(invalid(format!(
                "{problem}; train with the corrected labels"
            )));
        }
        let options = TrainOptions {
            steps: self.steps,
            lr: self.lr,
            schedule: self.schedule,
            warmup: self.warmup,
            accumulate: self.accumulate,
            clip_norm: self.clip_norm,
            loss_weights: self.loss_weights,
            corrected_labels: self.labels == Labels::Corrected,
            weight_decay: self.weight_decay,
            freeze: self.freeze.clone(),
            dropout: self
                .dropout
                .unwrap_or(model.config.embedding_dropout_prob as f32),
            seed: self.seed,
            ..TrainOptions::default()
        };
        if !(0.0..1.0).contains(&options.dropout) {
            return Err(invalid(format!(
                "dropout must be in [0, 1), got {}",
                options.dropout
            )));
        }
        let (data, synthetic) = match &self.data {
            Data::Jsonl(path) => (Some(absolute(path)), None),
            Data::Synthetic(n) => (None, Some(*n)),
        };
        let generation_config = match &self.start {
            Start::Folder(ModelSpec { dir: Some(dir), .. }) => {
                Some(dir.join(GenerationConfig::FILE)).filter(|p| p.is_file())
            }
            _ => None,
        };
        let spec = RunSpec {
            data,
            synthetic,
            tokenizer: absolute(&model.tokenizer),
            vae: model.vae.as_deref().map(absolute),
            vae_config: model.vae_config.as_deref().map(absolute),
            generation_config: generation_config.as_deref().map(absolute),
            batch_size: self.batch_size,
            options: options.clone(),
            compose: self.compose,
            val_fraction: self.val_fraction,
            eval_every: self.eval_every,
            save_every: self.save_every,
            log_every: self.log_every,
        };
        let mut trainer =
            Trainer::new(&model.config, model.weights, model.masks, options, &device)?;
        let inputs = Inputs::load(&trainer, &spec, &self.out, progress)?;
        let made_out = !self.out.exists();
        let result = inputs.train(&mut trainer, &spec, &self.out, progress);
        if result.is_err() && made_out && find_checkpoint(&self.out).is_err() {
            // Best effort: the folder holds only what this run wrote, and the error is what
            // the caller needs.
            let _ = std::fs::remove_dir_all(&self.out);
        }
        result
    }

    /// The configuration the run starts from (read without its weights), e.g. to check
    /// settings against it before anything runs.
    pub fn config(&self) -> Result<Config> {
        match &self.start {
            Start::Folder(spec) => Ok(spec.open()?.config),
            Start::Scratch { config, .. } => Ok(Config::from_name_or_path(config)?),
        }
    }

    fn validate(&self) -> Result<()> {
        let w = self.loss_weights;
        let checks = [
            (
                self.lr.is_finite() && self.lr > 0.0,
                format!("lr must be a positive number, got {}", self.lr),
            ),
            (
                self.clip_norm.is_none_or(|c| c.is_finite() && c > 0.0),
                format!(
                    "clip_norm must be a positive number (or none), got {:?}",
                    self.clip_norm
                ),
            ),
            (
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
                format!(
                    "weight_decay must be a number of at least 0, got {}",
                    self.weight_decay
                ),
            ),
            (
                w.iter().all(|x| x.is_finite()),
                format!("loss_weights {w:?}: weights must be finite"),
            ),
            (
                (0.0..1.0).contains(&self.val_fraction),
                format!("val_fraction must be in [0, 1), got {}", self.val_fraction),
            ),
            (
                (0.0..=1.0).contains(&self.compose.i2t_fraction),
                format!(
                    "i2t_fraction must be in [0, 1], got {}",
                    self.compose.i2t_fraction
                ),
            ),
            (
                (0.0..1.0).contains(&self.compose.bpe_dropout),
                format!(
                    "bpe_dropout must be in [0, 1), got {}",
                    self.compose.bpe_dropout
                ),
            ),
            (self.steps > 0, "steps must be at least 1".to_string()),
            (
                self.batch_size > 0 && self.accumulate > 0,
                "batch_size and accumulate must be at least 1".to_string(),
            ),
            (
                w.iter().all(|x| *x >= 0.0) && w.iter().sum::<f64>() > 0.0,
                format!("loss_weights {w:?}: weights must be non-negative and not all zero"),
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, problem)) => Err(invalid(problem)),
            None => Ok(()),
        }
    }

    /// The configuration, weights (fresh ones: `None`), masks and files the run starts from.
    fn start_model(&self, device: &Device) -> Result<StartModel> {
        match &self.start {
            Start::Folder(spec) => {
                let OpenedModel {
                    files,
                    checkpoint,
                    config,
                } = spec.open()?;
                let shapes = Rudolph::tensor_shapes(&config);
                checkpoint.check(&shapes)?;
                // Weights holding NaN or infinities only train into more of them.
                checkpoint.check_finite(shapes.iter().map(|(name, _)| name.as_str()))?;
                let mut weights = HashMap::new();
                for (name, _) in Rudolph::tensor_shapes(&config) {
                    if !name.ends_with("_mask") {
                        let t = checkpoint.load(&name, DType::F32, device)?;
                        weights.insert(name, t);
                    }
                }
                let masks = crate::model::load::masks_from_checkpoint(&checkpoint, device)?;
                Ok(StartModel {
                    config,
                    weights: Some(weights),
                    masks,
                    tokenizer: files.tokenizer,
                    vae: files.vae,
                    vae_config: files.vae_config,
                })
            }
            Start::Scratch {
                config,
                tokenizer,
                vae,
                vae_config,
            } => {
                let config = Config::from_name_or_path(config)?;
                let masks = LayerMasks::build(&config, MaskVariant::Rc1, device)?;
                Ok(StartModel {
                    config,
                    weights: None,
                    masks,
                    tokenizer: tokenizer.clone(),
                    vae: vae.clone(),
                    vae_config: vae_config.clone(),
                })
            }
        }
    }
}

struct StartModel {
    config: Config,
    weights: Option<HashMap<String, Tensor>>,
    masks: LayerMasks,
    tokenizer: PathBuf,
    vae: Option<PathBuf>,
    vae_config: Option<PathBuf>,
}

/// Continues a run exactly, with the settings its checkpoint saved: `checkpoint` is a
/// `checkpoint-<step>` folder, or a run folder (its latest checkpoint). `out` defaults to the
/// folder the checkpoint is in.
pub fn resume(
    checkpoint: &Path,
    out: Option<&Path>,
    progress: &dyn ProgressSink,
) -> Result<Summary> {
    let device = Device::Cpu;
    let dir = find_checkpoint(checkpoint)?;
    let restored = load_checkpoint(&dir, &device)?;
    let out = match out {
        Some(o) => o.to_path_buf(),
        None => dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let spec = restored.state.run.clone();
    let mut trainer = Trainer::new(
        &restored.config,
        Some(restored.weights),
        restored.masks,
        spec.options.clone(),
        &device,
    )?;
    trainer.restore(
        restored.state.step,
        &restored.moments,
        restored.state.dropout_position()?,
    )?;
    train(&mut trainer, &spec, &out, progress)
}

/// Reads the run's samples (pictures encoded once, their codes cached in `out`) and trains
/// `trainer` to the end of the run.
fn train(
    trainer: &mut Trainer,
    spec: &RunSpec,
    out: &Path,
    progress: &dyn ProgressSink,
) -> Result<Summary> {
    Inputs::load(trainer, spec, out, progress)?.train(trainer, spec, out, progress)
}

/// What a run reads before it writes anything: the tokenizer, the samples (with the codes
/// cache to save) and the files that complete the model folder, all checked.
struct Inputs {
    tokenizer: TextTokenizer,
    samples: Vec<Sample>,
    cache: Option<CodesCache>,
    /// Training texts the model cannot learn whole (unknown words, cut to the slots).
    warnings: Vec<crate::pipelines::Warning>,
}

impl Inputs {
    fn load(
        trainer: &Trainer,
        spec: &RunSpec,
        out: &Path,
        progress: &dyn ProgressSink,
    ) -> Result<Self> {
        let tokenizer = TextTokenizer::load(&spec.tokenizer)?;
        companions(spec)?;
        let (samples, cache, warnings) = match (spec.synthetic, &spec.data) {
            (Some(n), _) => (
                synthetic(trainer.config(), n, spec.options.seed),
                None,
                Vec::new(),
            ),
            (None, Some(data)) => {
                let vae = match &spec.vae {
                    Some(p) => Some(Vqgan::load(
                        p,
                        spec.vae_config.as_deref(),
                        trainer.model().device(),
                    )?),
                    None => None,
                };
                let vae_id = spec.vae.as_ref().map_or(String::new(), |p| vae_identity(p));
                let mut cache = CodesCache::open(&out.join(CODES_CACHE), &vae_id)?;
                let (samples, warnings) = load_dataset(
                    data,
                    vae.as_ref(),
                    trainer.config(),
                    &tokenizer,
                    &mut cache,
                    progress,
                )?;
                (samples, Some(cache), warnings)
            }
            (None, None) => {
                return Err(invalid(
                    "the run names no training data (neither a data file nor synthetic samples)",
                ));
            }
        };
        let (train, _) = split(samples.len(), spec.val_fraction, spec.options.seed);
        if train.is_empty() {
            return Err(invalid(format!(
                "no training samples are left after holding out {} of the {}",
                samples.len() - train.len(),
                samples.len()
            )));
        }
        Ok(Self {
            tokenizer,
            samples,
            cache,
            warnings,
        })
    }

    fn train(
        self,
        trainer: &mut Trainer,
        spec: &RunSpec,
        out: &Path,
        progress: &dyn ProgressSink,
    ) -> Result<Summary> {
        std::fs::create_dir_all(out).map_err(|source| Error::Io {
            path: out.to_path_buf(),
            source,
        })?;
        if let Some(cache) = &self.cache {
            cache.save(&out.join(CODES_CACHE))?;
        }
        let summary = run(trainer, spec, &self.samples, &self.tokenizer, out, progress)?;
        Ok(Summary {
            warnings: self.warnings,
            ..summary
        })
    }
}

/// Where a run keeps its pictures' codes.
const CODES_CACHE: &str = "codes-cache.json";

/// The VQGAN file's identity for the codes cache: path, size and modification time.
fn vae_identity(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}|{}|{mtime}",
        absolute(path).display(),
        meta.map_or(0, |m| m.len())
    )
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
