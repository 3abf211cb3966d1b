//! Flags shared by the task commands: where the model is, how to sample, how to report.

use candle_core::Device;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use rudolph::folder::{Loaded, ModelSpec};
use rudolph::model::Precision;
use rudolph::pipelines::images::ImageRank;
use rudolph::pipelines::{Fidelity, GenerateOptions, Warning};
use rudolph::sampling::SamplingParams;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The value parser of a flag that takes one of a library enum's values by name (`FromStr`
/// reads what `name` writes), listed in the help with what each means.
pub fn choices<T, const N: usize>(
    all: [T; N],
    name: fn(T) -> &'static str,
    help: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T>
where
    T: FromStr + Copy + Send + Sync + 'static,
    T::Err: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let values = all.map(|v| PossibleValue::new(name(v)).help(help(v)));
    PossibleValuesParser::new(values).try_map(|name| name.parse::<T>())
}

/// What each `--rank` of pictures means (`rudolph image`, `world eval`).
pub fn image_rank_help(rank: ImageRank) -> &'static str {
    match rank {
        ImageRank::Codes => {
            "The text's perplexity given the sampled codes, as rc1's `self_reranking_by_text`"
        }
        ImageRank::Decoded => {
            "The text's perplexity given the codes of the picture as shown: decoded and encoded \
             again, which reads more like a training picture to the model (docs/commands.md)"
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub folder: FolderArgs,
    /// Where to compute: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight precision: f32 (exact, the default), f16 or bf16; f16w or bf16w store the linear
    /// weights in 16 bits; q8 or q4k quantize them (about 4× or 7× fewer bytes); packed-bf16
    /// (alias amx) runs the linear products in bf16 on Intel AMX tiles, else with AVX-512 BF16
    /// (AMD Zen 4), else AVX2 (see docs/performance.md for each one's quality cost).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Load weights holding NaN or infinite values (refused by default: they give empty texts,
    /// NaN scores or blank pictures), warning of them.
    #[arg(long)]
    pub allow_non_finite: bool,
}

/// The `--device` flag: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    rudolph::device::parse_device(name).map_err(|e| anyhow::anyhow!("{e} (--device)"))
}

pub fn parse_precision(name: &str) -> anyhow::Result<Precision> {
    name.parse::<Precision>()
        .map_err(|e| anyhow::anyhow!("--dtype {e}"))
}

/// A model folder and the files that replace its pieces (the task commands and `train`).
#[derive(Debug, Clone, clap::Args)]
pub struct FolderArgs {
    /// Model folder holding the original files (config.json, pytorch_model.bin or
    /// model.safetensors, bpe.model, the VQGAN *.ckpt). Without one, every command uses the
    /// built-in shapes-world model (`train` fine-tunes it, unless --config trains from scratch).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// A preset (350m, 350m-v2, 1.3b, 2.7b, 2.7b-fbc2) or config.json, overriding the folder's
    /// (`train` without a folder trains this configuration from scratch).
    #[arg(long)]
    pub config: Option<String>,
    /// The YouTokenToMe bpe.model, overriding the folder's.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// The VQGAN checkpoint, overriding the folder's.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// The VQGAN's .config.yml (default: the one beside the checkpoint, else the real config).
    #[arg(long, value_name = "YML")]
    pub vae_config: Option<PathBuf>,
}

impl FolderArgs {
    /// The files of `dir` with this command line's replacements.
    pub fn spec(&self, dir: Option<PathBuf>) -> ModelSpec {
        ModelSpec {
            dir,
            config: self.config.clone(),
            weights: None,
            tokenizer: self.tokenizer.clone(),
            vae: self.vae.clone(),
            vae_config: self.vae_config.clone(),
            allow_non_finite: false,
        }
    }
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Loaded> {
        // Without a folder (and without the pieces that replace one) the built-in model runs.
        let f = &self.folder;
        let dir = match &f.model {
            Some(d) => Some(d.clone()),
            None if f.tokenizer.is_none() || f.config.is_none() => Some(rudolph::builtin::dir()?),
            None => None,
        };
        let mut spec = f.spec(dir);
        spec.allow_non_finite = self.allow_non_finite;
        let device = parse_device(&self.device)?;
        let precision = parse_precision(&self.dtype)?;
        let loaded = Loaded::load_as(&spec, &device, precision)?;
        if let Some(first) = loaded.report.non_finite.first() {
            let n = loaded.report.non_finite.len();
            let s = if n == 1 { " holds" } else { "s hold" };
            eprintln!("warning: {n} tensor{s} NaN or infinite values (first: {first})");
        }
        Ok(loaded)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// Seed of the draws (default: from the clock; the JSON output reports it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sequences run through the model at once (more is faster until memory runs out; the
    /// results do not depend on it).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Keep the k most likely tokens (0 = all); default per task as the original.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus mass in [0, 1]; default per task as the original.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Softmax temperature; default per task (1, but 1.3 for captions).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Reproduce rudolph 0.0.1rc1 exactly, including its text-end and special-id bugs.
    #[arg(long)]
    pub original: bool,
}

impl SampleArgs {
    /// The options, each unset sampling flag taken from the task's `defaults`.
    pub fn options(
        &self,
        defaults: SamplingParams,
        quiet: bool,
    ) -> anyhow::Result<GenerateOptions> {
        let params = SamplingParams {
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            temperature: self.temperature.unwrap_or(defaults.temperature),
        };
        params.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        Ok(GenerateOptions {
            params,
            seed: self.seed.unwrap_or_else(clock_seed),
            batch_size: self.batch_size,
            fidelity: if self.original {
                Fidelity::Original
            } else {
                Fidelity::Fixed
            },
            guidance: 1.0,
            progress: super::progress::progress(quiet),
            shared: None,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Print one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64 % (u32::MAX as u64))
}

/// Reads a picture and turns it into the model's codes (pre-processing as the pipelines do).
pub fn picture_codes(loaded: &Loaded, path: &Path) -> anyhow::Result<Vec<u32>> {
    let img = rudolph::image::load_image(path)?;
    let mut codes =
        rudolph::pipelines::images::picture_codes(&loaded.model, loaded.vae()?, &[img])?;
    Ok(codes.remove(0))
}

/// Tells the user what the library warned of, on stderr, each warning once (several steps of a
/// command may read the same text).
pub fn print_warnings(warnings: &[Warning]) {
    for (i, w) in warnings.iter().enumerate() {
        if !warnings[..i].contains(w) {
            eprintln!("warning: {w}");
        }
    }
}

/// A count of sequences to draw (`--images`, `--captions`, `--texts`): from 1 to the most one
/// call draws.
pub fn check_count(flag: &str, n: usize) -> anyhow::Result<()> {
    let most = rudolph::pipelines::defaults::MAX_COUNT;
    anyhow::ensure!(n > 0, "{flag} must be at least 1");
    anyhow::ensure!(
        n <= most,
        "{flag} {n} is more than the {most} one run draws"
    );
    Ok(())
}

/// Refuses to replace a file the user has not asked to overwrite.
pub fn check_writable(path: &Path, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        anyhow::bail!("{} exists; pass --force to overwrite it", path.display());
    }
    Ok(())
}

/// Checks, before any work, that a picture can be written to `path`: not replacing a file
/// unasked, in a folder that exists, with an extension that names a format.
pub fn check_picture_output(path: &Path, force: bool) -> anyhow::Result<()> {
    check_writable(path, force)?;
    rudolph::image::output_format(path)?;
    Ok(())
}
