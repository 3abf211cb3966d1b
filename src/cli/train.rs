//! `rudolph train`: fine-tune (or train from scratch) on a JSONL of pictures and texts.

use super::common::FolderArgs;
use super::progress::progress;
use anyhow::Context;
use rudolph::model::Labels;
use rudolph::train::Freeze;
use rudolph::train::checkpoint::find_checkpoint;
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
    /// Peak learning rate; default 5e-5 to fine-tune (it teaches the built-in model new pairs
    /// without undoing what it knew; 1e-3 wrecks it, see docs/training.md), 1e-3 from scratch.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// constant, cosine (after --warmup, down to 0 at the last step) or one-cycle (PyTorch's
    /// OneCycleLR). Cosine with a warmup is how the built-in model was trained.
    #[arg(long, default_value = "cosine")]
    pub schedule: Schedule,
    /// Linear warmup steps (constant and cosine schedules); default: a tenth of --steps, at
    /// most 100, so that the optimizer's first, noisiest steps are small.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub clip: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Weights of the left-text, image and right-text losses. The default is what the built-in
    /// model was trained with; the original's notebooks used e.g. 0.01,1,7.
    #[arg(long, default_value = "1,2,1", value_name = "LT,IMG,RT")]
    pub loss_weights: String,
    /// none, attention-mlp, all-but-embeddings-norms or all-but-last:N.
    #[arg(long, default_value = "none")]
    pub freeze: Freeze,
    /// Dropout probability in training; default 0, with which the built-in model was trained
    /// and fine-tunes best (the published models were trained with 0.1).
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
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
    /// Score the targets at the segment boundaries as rudolph rc1 trains (the first image code
    /// as a text class); by default each is scored in its own vocabulary, as it is sampled.
    /// Needs an image vocabulary no larger than the text one (docs/training.md).
    #[arg(long)]
    pub original: bool,
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
        None => {
            let job = job(&args)?;
            job.run(progress.as_ref())
                .map_err(|e| match find_checkpoint(&job.out) {
                    Ok(checkpoint) => anyhow::anyhow!(
                        "{e}; {} was saved before: `rudolph train --resume {}` continues the run",
                        checkpoint.display(),
                        job.out.display()
                    ),
                    Err(_) => e.into(),
                })?
        }
    };
    super::common::print_warnings(&summary.warnings);
    for path in &summary.replaced {
        eprintln!(
            "warning: replaced {}, which held another file, to complete the model folder",
            path.display()
        );
    }
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
        // As the task commands: without a folder, the built-in model.
        (None, None) => Start::Folder(f.spec(Some(rudolph::builtin::dir()?))),
    };
    let lr = args.lr.unwrap_or(match start {
        Start::Folder(_) => 5e-5,
        Start::Scratch { .. } => 1e-3,
    });
    let job = TrainJob {
        start,
        data,
        out,
        steps: args.steps,
        batch_size: args.batch_size,
        accumulate: args.accumulate,
        lr,
        schedule: args.schedule,
        warmup: args.warmup.unwrap_or((args.steps / 10).min(100)),
        clip_norm: (args.clip != 0.0).then_some(args.clip),
        weight_decay: args.weight_decay,
        loss_weights: parse_weights(&args.loss_weights)?,
        freeze: args.freeze.clone(),
        dropout: Some(args.dropout),
        compose: Compose {
            i2t_fraction: args.i2t_fraction,
            bpe_dropout: args.bpe_dropout,
        },
        val_fraction: args.val_fraction,
        eval_every: args.eval_every,
        save_every: args.save_every,
        log_every: args.log_every,
        seed: args.seed,
        labels: if args.original {
            Labels::Original
        } else {
            Labels::Corrected
        },
    };
    // Checked here, before the run loads anything, to name the flag.
    if let Some(problem) = job.labels.misfit(&job.config()?) {
        anyhow::bail!(
            "{problem}: this model cannot train with them; drop --original to score each \
             target in its own vocabulary (the default)"
        );
    }
    Ok(job)
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
