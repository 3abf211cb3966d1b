//! `rudolph train`: fine-tune (or train from scratch) on a JSONL of pictures and texts.

use anyhow::Context;
use candle_core::{DType, Device};
use rudolph::config::Config;
use rudolph::folder::ModelSpec;
use rudolph::model::masks::MaskVariant;
use rudolph::model::{LayerMasks, Rudolph};
use rudolph::tokenizer::TextTokenizer;
use rudolph::train::checkpoint::{find_checkpoint, load_checkpoint};
use rudolph::train::data::{CodesCache, Compose, load_dataset, synthetic};
use rudolph::train::run::{RunSpec, run as run_loop};
use rudolph::train::schedule::Schedule;
use rudolph::train::{Freeze, TrainOptions, Trainer};
use rudolph::vae::Vqgan;
use rudolph::weights::Checkpoint;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// A JSONL file, one {"image": "path relative to the file", "text": "..."} per line, or a
    /// folder holding one. Lines with only "text" train the left-text model; lines with only
    /// "image" train the picture after a blank left text; lines with "image" and "prompt"
    /// train the picture after the prompt, which is not itself trained.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Start from this model folder (config.json, pytorch_model.bin or model.safetensors,
    /// bpe.model, the VQGAN *.ckpt).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Train from scratch with this preset or config.json (or override the folder's config).
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// The VQGAN checkpoint that encodes the pictures.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    #[arg(long, value_name = "YML")]
    pub vae_config: Option<PathBuf>,
    /// Output folder: model.safetensors, config.json, log.jsonl, loss.png, checkpoint-<step>/.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue a run exactly: a checkpoint-<step> folder, or an output folder (its latest
    /// checkpoint). The run's settings come from the checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Optimizer steps in the whole run.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// constant, cosine (after --warmup) or one-cycle (PyTorch's OneCycleLR).
    #[arg(long, default_value = "one-cycle")]
    pub schedule: Schedule,
    /// Linear warmup steps (constant and cosine schedules).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Weights of the left-text, image and right-text losses (the original's notebooks used
    /// e.g. 0.01,1,7).
    #[arg(long, default_value = "1,7,1", value_name = "LT,IMG,RT")]
    pub loss_weights: String,
    /// none, attention-mlp, all-but-embeddings-norms or all-but-last:N.
    #[arg(long, default_value = "none")]
    pub freeze: Freeze,
    /// Dropout probability in training (default: the config's).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// BPE-dropout probability for the texts.
    #[arg(long, default_value_t = 0.0)]
    pub bpe_dropout: f64,
    /// Fraction of the samples held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Validation every N steps (0: never).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// A checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// A log.jsonl line every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Score each target in its own vocabulary: the first image code as an image class from the
    /// last left-text position (the original scores it as a text class), the right BOS not at all.
    #[arg(long)]
    pub corrected_labels: bool,
    /// Probability of blanking the left text of a picture sample, so captioning learns from
    /// the picture.
    #[arg(long, default_value_t = 0.25)]
    pub i2t_fraction: f64,
    /// Train on N samples of random codes instead of --data (speed and memory measurements).
    #[arg(long, hide = true, value_name = "N")]
    pub synthetic: Option<usize>,
    /// No progress bars; no summary on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write into a non-empty --out folder.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (mut trainer, spec, out) = match &args.resume {
        Some(path) => resume(&args, path, &device)?,
        None => start(&args, &device)?,
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let tokenizer = TextTokenizer::load(&spec.tokenizer)?;
    let cache_path = out.join("codes-cache.json");
    let samples = match (spec.synthetic, &spec.data) {
        (Some(n), _) => synthetic(trainer.config(), n, spec.options.seed),
        (None, Some(data)) => {
            let vae = match &spec.vae {
                Some(p) => Some(Vqgan::load(p, spec.vae_config.as_deref(), &device)?),
                None => None,
            };
            let vae_id = spec.vae.as_ref().map_or(String::new(), |p| vae_identity(p));
            let mut cache = CodesCache::open(&cache_path, &vae_id)?;
            let samples = load_dataset(
                data,
                vae.as_ref(),
                trainer.config(),
                &mut cache,
                !args.quiet,
            )?;
            cache.save(&cache_path)?;
            samples
        }
        (None, None) => anyhow::bail!("no training data: pass --data PATH"),
    };
    let summary = run_loop(&mut trainer, &spec, &samples, &tokenizer, &out, !args.quiet)?;
    if !args.quiet {
        eprintln!(
            "trained to step {} on {} samples ({} held out): loss {} → {}; peak memory {:.2} GiB; saved in {}",
            summary.steps,
            summary.train_samples,
            summary.val_samples,
            fmt_loss(summary.first_loss),
            fmt_loss(summary.last_loss),
            summary.peak_rss_bytes as f64 / (1u64 << 30) as f64,
            out.display()
        );
    }
    Ok(())
}

fn fmt_loss(l: Option<f32>) -> String {
    l.map_or("-".into(), |l| format!("{l:.4}"))
}

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

fn parse_weights(s: &str) -> anyhow::Result<[f64; 3]> {
    let parts: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--loss-weights '{s}': expected three numbers LT,IMG,RT"))?;
    let w: [f64; 3] = parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("--loss-weights '{s}': expected three numbers LT,IMG,RT"))?;
    anyhow::ensure!(
        w.iter().all(|x| *x >= 0.0) && w.iter().sum::<f64>() > 0.0,
        "--loss-weights '{s}': weights must be non-negative and not all zero"
    );
    Ok(w)
}

/// A fresh run: model from a folder or a config, settings from the flags.
fn start(args: &TrainArgs, device: &Device) -> anyhow::Result<(Trainer, RunSpec, PathBuf)> {
    let out = args
        .out
        .clone()
        .context("pass --out DIR (where the model, log and checkpoints go)")?;
    if out.is_dir() && std::fs::read_dir(&out)?.next().is_some() && !args.force {
        anyhow::bail!(
            "{} exists and is not empty; pass --force to write into it or --resume to continue",
            out.display()
        );
    }
    anyhow::ensure!(
        args.data.is_some() != args.synthetic.is_some(),
        "pass --data PATH (a JSONL file or a folder with one)"
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&args.val_fraction),
        "--val-fraction must be in [0, 1), got {}",
        args.val_fraction
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.i2t_fraction),
        "--i2t-fraction must be in [0, 1], got {}",
        args.i2t_fraction
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&args.bpe_dropout),
        "--bpe-dropout must be in [0, 1), got {}",
        args.bpe_dropout
    );
    anyhow::ensure!(args.steps > 0, "--steps must be at least 1");
    let (cfg, weights, masks, tokenizer, vae, vae_config) = match &args.model {
        Some(dir) => {
            let files = ModelSpec {
                dir: Some(dir.clone()),
                config: args.config.clone(),
                weights: None,
                tokenizer: args.tokenizer.clone(),
                vae: args.vae.clone(),
                vae_config: args.vae_config.clone(),
            }
            .resolve()?;
            let ckpt = Checkpoint::open(&files.weights)?;
            let cfg = match &files.config {
                Some(c) => Config::from_name_or_path(c)?,
                None => Config::preset(Rudolph::preset_of(&ckpt).with_context(|| {
                    format!(
                        "{}: no config.json beside it and its shapes match no preset; pass --config",
                        files.weights.display()
                    )
                })?)?,
            };
            ckpt.check(&Rudolph::tensor_shapes(&cfg))?;
            let mut weights = HashMap::new();
            for (name, _) in Rudolph::tensor_shapes(&cfg) {
                if !name.ends_with("_mask") {
                    let t = ckpt.load(&name, DType::F32, device)?;
                    weights.insert(name, t);
                }
            }
            let masks = rudolph::model::load::masks_from_checkpoint(&ckpt, device)?;
            (
                cfg,
                Some(weights),
                masks,
                files.tokenizer,
                files.vae,
                files.vae_config,
            )
        }
        None => {
            let name = args
                .config
                .as_deref()
                .context("pass --model DIR to fine-tune, or --config PRESET|config.json to train from scratch")?;
            let cfg = Config::from_name_or_path(name)?;
            let tokenizer = args
                .tokenizer
                .clone()
                .context("training from scratch needs --tokenizer PATH (a bpe.model)")?;
            let masks = LayerMasks::build(&cfg, MaskVariant::Rc1, device)?;
            (
                cfg,
                None,
                masks,
                tokenizer,
                args.vae.clone(),
                args.vae_config.clone(),
            )
        }
    };
    let options = TrainOptions {
        steps: args.steps,
        lr: args.lr,
        schedule: args.schedule,
        warmup: args.warmup,
        accumulate: args.accumulate,
        clip_norm: (args.clip > 0.0).then_some(args.clip),
        loss_weights: parse_weights(&args.loss_weights)?,
        corrected_labels: args.corrected_labels,
        weight_decay: args.weight_decay,
        freeze: args.freeze.clone(),
        dropout: args.dropout.unwrap_or(cfg.embedding_dropout_prob as f32),
        seed: args.seed,
        ..TrainOptions::default()
    };
    anyhow::ensure!(
        (0.0..1.0).contains(&options.dropout),
        "--dropout must be in [0, 1), got {}",
        options.dropout
    );
    let spec = RunSpec {
        data: args.data.as_deref().map(absolute),
        synthetic: args.synthetic,
        tokenizer: absolute(&tokenizer),
        vae: vae.as_deref().map(absolute),
        vae_config: vae_config.as_deref().map(absolute),
        batch_size: args.batch_size,
        options: options.clone(),
        compose: Compose {
            i2t_fraction: args.i2t_fraction,
            bpe_dropout: args.bpe_dropout,
        },
        val_fraction: args.val_fraction,
        eval_every: args.eval_every,
        save_every: args.save_every,
        log_every: args.log_every,
    };
    let trainer = Trainer::new(&cfg, weights, masks, options, device)?;
    Ok((trainer, spec, out))
}

/// A resumed run: everything from the checkpoint; `--out` defaults to the folder above it.
fn resume(
    args: &TrainArgs,
    path: &Path,
    device: &Device,
) -> anyhow::Result<(Trainer, RunSpec, PathBuf)> {
    let dir = find_checkpoint(path)?;
    let restored = load_checkpoint(&dir, device)?;
    let out = match &args.out {
        Some(o) => o.clone(),
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
        device,
    )?;
    trainer.restore(
        restored.state.step,
        &restored.moments,
        restored.state.dropout_position()?,
    )?;
    Ok((trainer, spec, out))
}
