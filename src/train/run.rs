//! The training loop behind `rudolph train`: draws batches, steps the [`Trainer`], logs,
//! evaluates, checkpoints and saves the result.

use super::checkpoint::{save_checkpoint, save_model};
use super::data::{Compose, Part, Sample, compose, draw, split};
use super::plot::{Curve, draw_loss_curve};
use super::trainer::{MicroBatch, StepLog, TrainOptions, Trainer};
use crate::error::{Error, Result, invalid};
use crate::model::LossWeights;
use crate::model::masks::causal_mask;
use crate::progress::ProgressSink;
use crate::tokenizer::TextTokenizer;
use candle_core::Tensor;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything that defines a run, saved in each checkpoint so `--resume` needs nothing else.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    /// The JSONL file (or folder); `None` with `synthetic`.
    pub data: Option<PathBuf>,
    /// Random-code samples instead of data (for measuring speed and memory).
    pub synthetic: Option<usize>,
    pub tokenizer: PathBuf,
    pub vae: Option<PathBuf>,
    pub vae_config: Option<PathBuf>,
    /// The starting folder's `generation_config.json`, copied beside the trained model (runs
    /// saved before it was recorded have none).
    #[serde(default)]
    pub generation_config: Option<PathBuf>,
    pub batch_size: usize,
    pub options: TrainOptions,
    pub compose: Compose,
    pub val_fraction: f64,
    /// Evaluate on the held-out samples every this many steps (0: never).
    pub eval_every: u64,
    /// Write `checkpoint-<step>` every this many steps (0: never).
    pub save_every: u64,
    pub log_every: u64,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub steps: u64,
    pub train_samples: usize,
    pub val_samples: usize,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub last_val_loss: Option<f32>,
    pub peak_rss_bytes: u64,
    /// The run folder, where the model was saved.
    pub out: PathBuf,
    /// Training texts the model could not learn whole.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<crate::pipelines::Warning>,
    /// Files of the run folder that held something else, and were replaced by the files that
    /// complete the model folder (see [`companions`]).
    pub replaced: Vec<PathBuf>,
}

/// One `log.jsonl` line: the step's losses (each part averaged over the samples that weight
/// it), its learning rate and gradient norm before clipping; on evaluation steps also the
/// held-out weighted loss and its exponential.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LogLine {
    step: u64,
    loss: f32,
    l_text_loss: f32,
    image_loss: f32,
    r_text_loss: f32,
    lr: f64,
    grad_norm: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    val_loss: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    val_perplexity: Option<f32>,
}

/// Trains `trainer` (fresh, or restored to a checkpoint's step) on `samples` up to
/// `spec.options.steps`, writing `log.jsonl`, `loss.png`, checkpoints and finally
/// `model.safetensors` + `config.json` into `out`.
pub fn run(
    trainer: &mut Trainer,
    spec: &RunSpec,
    samples: &[Sample],
    tokenizer: &TextTokenizer,
    out: &Path,
    progress: &dyn ProgressSink,
) -> Result<Summary> {
    if spec.batch_size == 0 || spec.options.accumulate == 0 {
        return Err(invalid("batch_size and accumulate must be at least 1"));
    }
    let seed = spec.options.seed;
    let (train, val) = split(samples.len(), spec.val_fraction, seed);
    if train.is_empty() {
        return Err(invalid(
            "no training samples are left after the held-out split",
        ));
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let log_path = out.join("log.jsonl");
    let mut history = read_log(&log_path, trainer.step())?;
    rewrite_log(&log_path, &history)?;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .map_err(|source| Error::Io {
            path: log_path.clone(),
            source,
        })?;

    let cfg = trainer.config().clone();
    let device = trainer.model().device().clone();
    let mask = causal_mask(1, cfg.total_seq_length(), &device)?;
    let per_step = (spec.batch_size * spec.options.accumulate) as u64;
    let total = spec.options.steps;
    progress.start(total, "training", "steps");
    progress.advance(trainer.step());
    let mut first_loss = None;
    let mut last_val = history.iter().rev().find_map(|l| l.val_loss);
    while trainer.step() < total {
        let base = trainer.step() * per_step;
        let mut batches = Vec::new();
        for a in 0..spec.options.accumulate {
            let draws: Vec<u64> = (0..spec.batch_size as u64)
                .map(|j| base + (a * spec.batch_size) as u64 + j)
                .collect();
            let items = draws
                .iter()
                .map(|&k| {
                    let sample = &samples[train[draw(k, train.len(), seed)]];
                    compose(sample, &cfg, tokenizer, spec.compose, seed, k)
                })
                .collect::<Result<Vec<_>>>()?;
            batches.extend(micro_batches(items, &spec.options, per_step, &mask)?);
        }
        let step = trainer.train_step_weighted(&batches)?;
        // Nothing useful comes after this: every later step and the saved model would be NaN.
        if !step.loss.is_finite() {
            return Err(invalid(format!(
                "the loss is {} at step {}: training diverged; a lower learning rate may keep it",
                step.loss, step.step
            )));
        }
        first_loss.get_or_insert(step.loss);
        progress.advance(1);
        progress.message(&format!("loss {:.4}", step.loss));
        let s = step.step;
        let mut line = log_line(&step);
        let eval_now = spec.eval_every > 0 && (s % spec.eval_every == 0 || s == total);
        if eval_now && !val.is_empty() {
            let v = evaluate(trainer, spec, samples, &val, tokenizer, &mask)?;
            line.val_loss = Some(v);
            line.val_perplexity = Some(v.exp());
            last_val = Some(v);
        }
        let log_now = line.val_loss.is_some()
            || s == total
            || (spec.log_every > 0 && s % spec.log_every == 0);
        if log_now {
            let text = serde_json::to_string(&line).map_err(|e| invalid(e.to_string()))?;
            writeln!(log, "{text}").map_err(|source| Error::Io {
                path: log_path.clone(),
                source,
            })?;
            history.push(line);
        }
        if spec.save_every > 0 && s % spec.save_every == 0 {
            save_checkpoint(trainer, spec, &out.join(format!("checkpoint-{s}")))?;
            draw_loss_curve(&curve(&history), &out.join("loss.png"))?;
        }
    }
    progress.finish();
    save_model(trainer, out)?;
    let replaced = copy_companions(spec, out)?;
    draw_loss_curve(&curve(&history), &out.join("loss.png"))?;
    Ok(Summary {
        steps: trainer.step(),
        train_samples: train.len(),
        val_samples: val.len(),
        first_loss,
        last_loss: history.last().map(|l| l.loss),
        last_val_loss: last_val,
        peak_rss_bytes: crate::bench::peak_rss_bytes(),
        out: out.to_path_buf(),
        warnings: Vec::new(),
        replaced,
    })
}

/// The files that make a run folder a model folder beside the weights and `config.json`, as
/// `(source, name in the folder)`: the tokenizer as `bpe.model`; the VQGAN under its own name
/// when the folder would find it by that name (`*.ckpt`, `vqgan*.safetensors`), else as
/// `vqgan.ckpt` or `vqgan.safetensors`; the VQGAN's `.config.yml` (the one named, else the one
/// beside it) under the name the folder looks for beside that; the starting folder's
/// `generation_config.json`. A VQGAN read with the built-in configuration needs no file. Every
/// source must exist.
pub fn companions(spec: &RunSpec) -> Result<Vec<(PathBuf, String)>> {
    let mut files = vec![(spec.tokenizer.clone(), "bpe.model".to_string())];
    if let Some(vae) = &spec.vae {
        let own = vae.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let name = if crate::folder::is_vqgan_file(Path::new(own)) {
            own.to_string()
        } else if own.ends_with(".safetensors") {
            "vqgan.safetensors".to_string()
        } else {
            "vqgan.ckpt".to_string()
        };
        let config = spec
            .vae_config
            .clone()
            .or_else(|| crate::vae::sibling_config(vae));
        if let Some(config) = config {
            let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
            files.push((config, format!("{stem}.config.yml")));
        }
        files.push((vae.clone(), name));
    }
    if let Some(g) = &spec.generation_config {
        files.push((g.clone(), crate::folder::GenerationConfig::FILE.to_string()));
    }
    for (from, _) in &files {
        if !from.is_file() {
            return Err(invalid(format!(
                "{} does not exist (the run needs it, and copies it into its folder)",
                from.display()
            )));
        }
    }
    Ok(files)
}

/// Copies [`companions`] into `out`, and returns the files there that held something else.
fn copy_companions(spec: &RunSpec, out: &Path) -> Result<Vec<PathBuf>> {
    let mut replaced = Vec::new();
    for (from, name) in companions(spec)? {
        let to = out.join(&name);
        let io = |source| Error::Io {
            path: to.clone(),
            source,
        };
        if to.exists() {
            let same_file = std::fs::canonicalize(&to).ok() == std::fs::canonicalize(&from).ok();
            if same_file || same_bytes(&from, &to).map_err(io)? {
                continue;
            }
            replaced.push(to.clone());
        }
        std::fs::copy(&from, &to).map_err(io)?;
    }
    Ok(replaced)
}

fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    if std::fs::metadata(a)?.len() != std::fs::metadata(b)?.len() {
        return Ok(false);
    }
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

/// Groups composed sequences into at most three micro-batches: captioned pictures with the
/// run's loss weights, texts alone with the left-text term alone, pictures alone with the
/// picture term alone (each alone term is the whole loss of its sample). Each gets its share of
/// the `per_step` samples, so the step's gradient is the mean over all of them.
fn micro_batches(
    items: Vec<(Vec<u32>, Part)>,
    options: &TrainOptions,
    per_step: u64,
    mask: &Tensor,
) -> Result<Vec<MicroBatch>> {
    let all = options.weights();
    let text_only = LossWeights {
        l_text: 1.0,
        image: 0.0,
        r_text: 0.0,
    };
    let image_only = LossWeights {
        l_text: 0.0,
        image: 1.0,
        r_text: 0.0,
    };
    let mut out = Vec::new();
    for (part, weights) in [
        (Part::All, all),
        (Part::Text, text_only),
        (Part::Image, image_only),
    ] {
        let rows: Vec<&Vec<u32>> = items
            .iter()
            .filter(|(_, p)| *p == part)
            .map(|(ids, _)| ids)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let len = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        out.push(MicroBatch {
            ids: Tensor::from_vec(flat, (rows.len(), len), mask.device())?,
            mask: mask.clone(),
            weights,
            share: rows.len() as f64 / per_step as f64,
        });
    }
    Ok(out)
}

/// The held-out loss (no dropout, no left-text blanking, no BPE-dropout).
fn evaluate(
    trainer: &Trainer,
    spec: &RunSpec,
    samples: &[Sample],
    val: &[usize],
    tokenizer: &TextTokenizer,
    mask: &Tensor,
) -> Result<f32> {
    let how = Compose {
        i2t_fraction: 0.0,
        bpe_dropout: 0.0,
    };
    let cfg = trainer.config();
    let mut batches = Vec::new();
    for chunk in val.chunks(spec.batch_size) {
        let items = chunk
            .iter()
            .map(|&i| compose(&samples[i], cfg, tokenizer, how, 0, i as u64))
            .collect::<Result<Vec<_>>>()?;
        batches.extend(micro_batches(items, &spec.options, val.len() as u64, mask)?);
    }
    Ok(trainer.evaluate_weighted(&batches)?[0])
}

fn log_line(s: &StepLog) -> LogLine {
    LogLine {
        step: s.step,
        loss: s.loss,
        l_text_loss: s.l_text_loss,
        image_loss: s.image_loss,
        r_text_loss: s.r_text_loss,
        lr: s.lr,
        grad_norm: s.grad_norm,
        val_loss: None,
        val_perplexity: None,
    }
}

/// The lines of an existing log up to `step` (a resumed run drops what came after its
/// checkpoint, since it will log those steps again).
fn read_log(path: &Path, step: u64) -> Result<Vec<LogLine>> {
    if step == 0 || !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: LogLine = serde_json::from_str(raw).map_err(|e| {
            invalid(format!(
                "{}:{}: not a training log line: {e}",
                path.display(),
                i + 1
            ))
        })?;
        if line.step <= step {
            out.push(line);
        }
    }
    Ok(out)
}

fn rewrite_log(path: &Path, lines: &[LogLine]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).map_err(|e| invalid(e.to_string()))?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn curve(history: &[LogLine]) -> Curve {
    Curve {
        train: history.iter().map(|l| (l.step, l.loss)).collect(),
        val: history
            .iter()
            .filter_map(|l| Some((l.step, l.val_loss?)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each part goes to its own micro-batch, in order, with the loss weights that train only
    /// that part, and the shares add up to the step's samples.
    #[test]
    fn each_part_gets_its_own_micro_batch_and_weights() {
        let options = TrainOptions::default();
        let row = |k: u32| vec![k; 3];
        let items = vec![
            (row(1), Part::Image),
            (row(2), Part::All),
            (row(3), Part::Text),
            (row(4), Part::Image),
        ];
        let mask = Tensor::zeros(
            (1, 1, 3, 3),
            candle_core::DType::U8,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let batches = micro_batches(items, &options, 8, &mask).unwrap();
        let got: Vec<(Vec<Vec<u32>>, [f64; 3], f64)> = batches
            .iter()
            .map(|b| {
                let w = b.weights;
                (
                    b.ids.to_vec2::<u32>().unwrap(),
                    [w.l_text, w.image, w.r_text],
                    b.share,
                )
            })
            .collect();
        let [l, i, r] = options.loss_weights;
        assert_eq!(
            got,
            vec![
                (vec![row(2)], [l, i, r], 1.0 / 8.0),
                (vec![row(3)], [1.0, 0.0, 0.0], 1.0 / 8.0),
                (vec![row(1), row(4)], [0.0, 1.0, 0.0], 2.0 / 8.0),
            ]
        );
    }
}
