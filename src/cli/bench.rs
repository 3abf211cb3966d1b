//! `rudolph bench`: time a task on a preset with random weights.

use super::common::choices;
use rudolph::bench::{self, Task};
use rudolph::config::Config;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Configuration preset (or config.json) to build with random weights.
    #[arg(long, default_value = "350m")]
    pub preset: String,
    #[arg(long, value_parser = choices(Task::ALL, Task::name, task_help), default_value = "image")]
    pub task: Task,
    /// Pictures (or captions, or reranked pairs) to produce.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Sequences run through the model at once (more is faster until memory runs out).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Worker threads for tensor work (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weight precision: f32 (default), f16, bf16, f16w, bf16w, q8, q4k or packed-bf16 (alias
    /// amx: bf16 products on Intel AMX tiles, else AVX-512 BF16, else AVX2). On a GPU, f16 or
    /// bf16 compute in that dtype throughout.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, or cuda[:N] (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

fn task_help(task: Task) -> &'static str {
    match task {
        Task::Forward => "One full forward of `batch` full-length sequences",
        Task::Image => {
            "Text → image codes for `images` pictures, `batch` at a time, with the KV cache"
        }
        Task::Caption => "Captions of one picture, `images` of them, `batch` at a time",
        Task::Rerank => "Perplexity of `images` (picture, text) pairs",
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cfg = Config::from_name_or_path(&args.preset)?;
    let report = bench::run(
        &cfg,
        &args.preset,
        args.task,
        args.images,
        args.batch_size,
        super::common::parse_precision(&args.dtype)?,
        &super::common::parse_device(&args.device)?,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:?} on {} ({}, {}, {} threads): {:.3} s for {} items at batch {} — {:.1} tokens/s, {:.3} s/item, peak RSS {:.0} MiB (model built in {:.1} s{})",
            report.task,
            report.preset,
            report.device,
            match &report.kernel {
                Some(k) => format!("{} on {k}", report.dtype),
                None => report.dtype.clone(),
            },
            report.threads,
            report.seconds,
            report.images,
            report.batch_size,
            report.tokens_per_second,
            report.seconds_per_image,
            report.peak_rss_bytes as f64 / (1 << 20) as f64,
            report.build_seconds,
            if report.warmup_seconds > 0.0 {
                format!(", untimed warm-up {:.1} s", report.warmup_seconds)
            } else {
                String::new()
            },
        );
    }
    Ok(())
}
