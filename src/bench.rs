//! Benchmarks on random weights (no download): the measured work of each task, timed apart
//! from model construction, with the process's peak memory.

use crate::config::Config;
use crate::error::{Result, invalid};
use crate::model::{Precision, Rudolph, masks};
use crate::pipelines::{captions, images, rerank};
use crate::progress::Silent;
use crate::sampling::SamplingParams;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// One full forward of `batch` full-length sequences.
    Forward,
    /// Text → image codes for `images` pictures, `batch` at a time, with the KV cache.
    Image,
    /// Captions of one picture, `images` of them, `batch` at a time.
    Caption,
    /// Perplexity of `images` (picture, text) pairs.
    Rerank,
}

impl Task {
    pub const ALL: [Self; 4] = [Self::Forward, Self::Image, Self::Caption, Self::Rerank];

    /// The name `FromStr` reads and `Display` writes.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Image => "image",
            Self::Caption => "caption",
            Self::Rerank => "rerank",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown task '{s}' (forward, image, caption, rerank)"))
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub task: Task,
    pub preset: String,
    pub dtype: String,
    /// With `packed-bf16`, the instructions the products ran on (`AMX tiles`, `AVX-512 BF16`, `AVX2`
    /// or `portable`).
    pub kernel: Option<String>,
    pub threads: usize,
    pub images: usize,
    pub batch_size: usize,
    /// Wall time of the measured work, model construction excluded.
    pub seconds: f64,
    /// Tokens produced (generation) or processed (forward, rerank) per second.
    pub tokens_per_second: f64,
    pub seconds_per_image: f64,
    pub peak_rss_bytes: u64,
    pub build_seconds: f64,
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    /// An untimed first run of one batch, on a GPU only: it loads and JIT-compiles the kernels
    /// and creates the BLAS handles, which a long-running program pays once.
    pub warmup_seconds: f64,
}

/// Runs `task` on a randomly initialised `cfg` model: `images` items (pictures, captions or
/// reranked pairs), `batch` at a time.
pub fn run(
    cfg: &Config,
    preset: &str,
    task: Task,
    images: usize,
    batch: usize,
    precision: Precision,
    device: &Device,
) -> Result<BenchReport> {
    if images == 0 || batch == 0 {
        return Err(invalid(
            "a benchmark needs at least one item and a batch of at least one",
        ));
    }
    let t0 = Instant::now();
    let model = Rudolph::random(cfg, 0, precision, device)?;
    let build_seconds = t0.elapsed().as_secs_f64();
    let (l, n, r) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.r_text_seq_length,
    );
    let t = cfg.total_seq_length();
    let params = SamplingParams {
        top_k: 1024.min(cfg.image_vocab_size),
        top_p: 0.975,
        temperature: 1.0,
    };
    // BOS, six ids and EOS followed by pads: as long as the original's bench prompt «рыжий кот
    // сидит на окне» in the fixtures' tokenizer, so a rerank's window matches its work.
    let vocab = cfg.vocab_size as u32;
    let mut left: Vec<u32> = [2, 513, 331, 743, 124, 293, 130, 3]
        .iter()
        .map(|&id| id % vocab)
        .collect();
    left.resize(l, 0);
    let codes: Vec<u32> = (0..n as u32)
        .map(|i| (i * 37) % cfg.image_vocab_size as u32)
        .collect();
    let work = |images: usize| -> Result<usize> {
        Ok(match task {
            Task::Forward => {
                let ids: Vec<u32> = [left.clone(), codes.clone(), left.clone()].concat();
                let ids = Tensor::new(ids, device)?.unsqueeze(0)?.repeat((batch, 1))?;
                let mask = masks::causal_mask(1, t, device)?;
                model
                    .forward(&ids, &mask)?
                    .to_dtype(DType::F32)?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                batch * t
            }
            Task::Image => {
                images::generate_image_codes(
                    &model,
                    &left,
                    images,
                    None,
                    1.0,
                    &batch.into(),
                    &params,
                    0,
                    &Silent,
                )?;
                images * n
            }
            Task::Caption => {
                let text_params = SamplingParams {
                    top_k: 32,
                    top_p: 0.6,
                    temperature: 1.0,
                };
                captions::generate_caption_ids(
                    &model,
                    &codes,
                    &[2],
                    images,
                    &batch.into(),
                    &text_params,
                    0,
                    &Silent,
                )?;
                images * (r - 1)
            }
            Task::Rerank => {
                let text: Vec<u32> = left.clone();
                let pairs: Vec<(&[u32], &[u32])> =
                    (0..images).map(|_| (&codes[..], &text[..])).collect();
                rerank::score_pairs(&model, &pairs, 1, batch)?;
                images * t
            }
        })
    };
    let warmup_seconds = if device.is_cpu() {
        0.0
    } else {
        let start = Instant::now();
        work(batch.min(images))?;
        start.elapsed().as_secs_f64()
    };
    let start = Instant::now();
    let tokens = work(images)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        task,
        preset: preset.to_string(),
        dtype: precision.name().to_string(),
        kernel: (precision == Precision::PackedBf16).then(|| {
            crate::kernels::packed_bf16::Kernel::best()
                .name()
                .to_string()
        }),
        threads: candle_core::utils::get_num_threads(),
        images: if task == Task::Forward { batch } else { images },
        batch_size: batch,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        seconds_per_image: seconds / if task == Task::Forward { batch } else { images } as f64,
        peak_rss_bytes: peak_rss_bytes(),
        build_seconds,
        device: device_name(device),
        warmup_seconds,
    })
}

fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The process's peak resident set (`VmHWM`), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
