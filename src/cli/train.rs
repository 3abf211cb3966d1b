//! `rudolph train`: fine-tune (or train from scratch) on a JSONL of pictures and texts.

use super::common::FolderArgs;
use super::progress::progress;
use anyhow::Context;
use rudolph::train::Freeze;
use rudolph::train::data::Compose;
use rudolph::train::job::{Data, Start, TrainJob, resume};
use rudolph::train::run::Summary;
use rudolph::train::schedule::Schedule;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// A JSONL file, one {"image": "path relative to the file", "text": "..."} per line, or a
    /// folder holding one. Lines with only "text" train the left-text model; lines with only
    /// "image" train the picture after a blank left text; lines with "image" and "prompt"
    /// train the picture after the prompt, which is not itself trained.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub folder: FolderArgs,
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
    /// Samples per micro-batch (memory grows with it; see --accumulate).
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
    /// AdamW's decoupled weight decay.
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
    /// Seed of the initial weights (from scratch), the shuffling, the validation split and
    /// the dropout.
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
    let progress = progress(args.quiet);
    let summary = match &args.resume {
        Some(path) => resume(path, args.out.as_deref(), progress.as_ref())?,
        None => job(&args)?.run(progress.as_ref())?,
    };
    super::common::print_warnings(&summary.warnings);
    if !args.quiet {
        print_summary(&summary);
    }
    Ok(())
}

/// The one line a finished run reports on stderr.
pub fn print_summary(summary: &Summary) {
    eprintln!(
        "trained to step {} on {} samples ({} held out): loss {} → {}; peak memory {:.2} GiB; saved in {}",
        summary.steps,
        summary.train_samples,
        summary.val_samples,
        fmt_loss(summary.first_loss),
        fmt_loss(summary.last_loss),
        summary.peak_rss_bytes as f64 / (1u64 << 30) as f64,
        summary.out.display()
    );
}

fn fmt_loss(l: Option<f32>) -> String {
    l.map_or("-".into(), |l| format!("{l:.4}"))
}

/// A fresh run from the flags.
fn job(args: &TrainArgs) -> anyhow::Result<TrainJob> {
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
    let data = match (&args.data, args.synthetic) {
        (Some(path), None) => Data::Jsonl(path.clone()),
        (None, Some(n)) => Data::Synthetic(n),
        _ => anyhow::bail!("pass --data PATH (a JSONL file or a folder with one)"),
    };
    let f = &args.folder;
    let start = match (&f.model, &f.config) {
        (Some(dir), _) => Start::Folder(f.spec(Some(dir.clone()))),
        (None, Some(config)) => Start::Scratch {
            config: config.clone(),
            tokenizer: f
                .tokenizer
                .clone()
                .context("training from scratch needs --tokenizer PATH (a bpe.model)")?,
            vae: f.vae.clone(),
            vae_config: f.vae_config.clone(),
        },
        (None, None) => anyhow::bail!(
            "pass --model DIR to fine-tune, or --config PRESET|config.json to train from scratch"
        ),
    };
    Ok(TrainJob {
        start,
        data,
        out,
        steps: args.steps,
        batch_size: args.batch_size,
        accumulate: args.accumulate,
        lr: args.lr,
        schedule: args.schedule,
        warmup: args.warmup,
        clip_norm: (args.clip > 0.0).then_some(args.clip),
        weight_decay: args.weight_decay,
        loss_weights: parse_weights(&args.loss_weights)?,
        freeze: args.freeze.clone(),
        dropout: args.dropout,
        compose: Compose {
            i2t_fraction: args.i2t_fraction,
            bpe_dropout: args.bpe_dropout,
        },
        val_fraction: args.val_fraction,
        eval_every: args.eval_every,
        save_every: args.save_every,
        log_every: args.log_every,
        seed: args.seed,
        corrected_labels: args.corrected_labels,
    })
}

fn parse_weights(s: &str) -> anyhow::Result<[f64; 3]> {
    let parts: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--loss-weights '{s}': expected three numbers LT,IMG,RT"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("--loss-weights '{s}': expected three numbers LT,IMG,RT"))
}
