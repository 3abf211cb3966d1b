//! `encode-image` and `decode-codes`: the VQGAN image tokenizer from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::Device;

use super::progress::progress;
use rudolph::image as img;
use rudolph::pipelines::images::decode_pictures;
use rudolph::vae::Vqgan;

#[derive(Debug, clap::Args)]
pub struct EncodeImageArgs {
    /// A PNG or JPEG picture; it is centre-cropped to a square and resized (PIL bilinear).
    pub image: PathBuf,
    /// The VQGAN checkpoint (.ckpt / .bin / .safetensors, plain or DWT layout; default: the
    /// built-in model's).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The VQGAN .config.yml (default: the one beside the checkpoint, else the real
    /// vqgan.gumbelf8-sber config).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// Pre-processing size in pixels (default: the config's `resolution`).
    #[arg(long)]
    pub size: Option<u32>,
    /// Print `{"codes": [...], "size": s}` (codes row-major, s codes per side) instead of a grid.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DecodeCodesArgs {
    /// JSON codes: `{"codes": [...]}` as written by `encode-image --json`, or a bare array;
    /// a list of lists decodes several images into one grid.
    pub codes: PathBuf,
    /// The VQGAN checkpoint (.ckpt / .bin / .safetensors, plain or DWT layout; default: the
    /// built-in model's).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The VQGAN .config.yml (default: the one beside the checkpoint, else the real config).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// The picture to write: .png, .jpg/.jpeg or .webp (lossless).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Images per grid row when decoding several code lists.
    #[arg(long, default_value_t = 4)]
    pub nrow: usize,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

fn load_vae(path: Option<&Path>, config: Option<&Path>) -> anyhow::Result<Vqgan> {
    let builtin;
    let path = match path {
        Some(p) => p,
        None => {
            builtin = rudolph::builtin::dir()?.join("vqgan.safetensors");
            &builtin
        }
    };
    let vae = Vqgan::load(path, config, &Device::Cpu)?;
    if !vae.ignored_keys().is_empty() {
        eprintln!(
            "note: ignoring {} checkpoint tensors the VQGAN does not use (e.g. {})",
            vae.ignored_keys().len(),
            vae.ignored_keys()[0]
        );
    }
    Ok(vae)
}

pub fn encode_image(args: EncodeImageArgs) -> anyhow::Result<()> {
    // Read the picture first: a bad path fails before the (large) checkpoint is loaded.
    let picture = img::load_image(&args.image)?;
    let vae = load_vae(args.vae.as_deref(), args.vae_config.as_deref())?;
    let size = args.size.unwrap_or(vae.config().ddconfig.resolution as u32);
    let f = vae.config().downsample_factor() as u32;
    if size == 0 || !size.is_multiple_of(f) {
        bail!("--size {size} is not a positive multiple of the VQGAN's downsampling factor {f}");
    }
    if size as usize > rudolph::vae::MAX_SIDE {
        bail!(
            "--size {size} is more than the {} pixels a side the VQGAN encodes",
            rudolph::vae::MAX_SIDE
        );
    }
    let x = img::preprocess(&picture, size, &Device::Cpu)?.unsqueeze(0)?;
    let codes = vae.encode_codes(&x)?.squeeze(0)?.to_vec1::<u32>()?;
    let side = (size / f) as usize;
    if args.json {
        println!("{}", serde_json::json!({ "codes": codes, "size": side }));
    } else {
        let width = codes.iter().max().map_or(1, |m| m.to_string().len());
        for row in codes.chunks(side) {
            let cells: Vec<String> = row.iter().map(|c| format!("{c:>width$}")).collect();
            println!("{}", cells.join(" "));
        }
    }
    Ok(())
}

/// The largest codes file read (a grid of 256 pictures of 4096 codes as JSON is under 20 MiB).
const MAX_CODES_FILE: u64 = 64 << 20;

/// The most pictures one `decode-codes` grid holds.
const MAX_PICTURES: usize = 256;

/// Pictures decoded at once.
const DECODE_BATCH: usize = 8;

/// A text file, refused when larger than `limit` bytes.
fn read_capped(path: &Path, limit: u64) -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= limit,
        "{} is larger than {} MiB",
        path.display(),
        limit >> 20
    );
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8 text", path.display()))
}

/// Parses `{"codes": …}` or a bare array into one list of codes per image.
fn parse_codes(text: &str) -> anyhow::Result<Vec<Vec<i64>>> {
    let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let list = match &value {
        serde_json::Value::Object(map) => map
            .get("codes")
            .context("a JSON object must have a \"codes\" field")?,
        other => other,
    };
    let serde_json::Value::Array(items) = list else {
        bail!("codes must be a JSON array of integers, or an array of such arrays");
    };
    let to_code = |v: &serde_json::Value| {
        v.as_i64()
            .with_context(|| format!("code {v} is not an integer"))
    };
    let images: Vec<Vec<i64>> = if items.iter().all(|v| v.is_array()) && !items.is_empty() {
        items
            .iter()
            .map(|row| row.as_array().into_iter().flatten().map(to_code).collect())
            .collect::<anyhow::Result<_>>()?
    } else {
        vec![items.iter().map(to_code).collect::<anyhow::Result<_>>()?]
    };
    if images.iter().any(Vec::is_empty) {
        bail!("no codes to decode (empty list)");
    }
    if images.iter().any(|row| row.len() != images[0].len()) {
        bail!("all code lists must have the same length");
    }
    Ok(images)
}

pub fn decode_codes(args: DecodeCodesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nrow > 0, "--nrow must be at least 1");
    super::common::check_picture_output(&args.output, args.force)?;
    let text = read_capped(&args.codes, MAX_CODES_FILE)?;
    let images =
        parse_codes(&text).with_context(|| format!("bad codes file {}", args.codes.display()))?;
    anyhow::ensure!(
        images.len() <= MAX_PICTURES,
        "{} holds {} code lists; one grid takes at most {MAX_PICTURES}",
        args.codes.display(),
        images.len()
    );
    let images: Vec<Vec<u32>> = images
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|c| u32::try_from(c).map_err(|_| anyhow::anyhow!("code {c} is out of range")))
                .collect()
        })
        .collect::<anyhow::Result<_>>()
        .with_context(|| format!("bad codes file {}", args.codes.display()))?;
    let vae = load_vae(args.vae.as_deref(), args.vae_config.as_deref())?;
    let grids: Vec<&[u32]> = images.iter().map(Vec::as_slice).collect();
    let decoded = decode_pictures(&vae, &grids, DECODE_BATCH, progress(false).as_ref())
        .with_context(|| format!("cannot decode {}", args.codes.display()))?;
    let picture = img::to_rgb8(&img::grid(&decoded, args.nrow)?)?;
    img::save_image(&picture, &args.output)?;
    println!(
        "wrote {} ({}x{})",
        args.output.display(),
        picture.width(),
        picture.height()
    );
    Ok(())
}
