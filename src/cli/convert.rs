//! `rudolph convert`: rewrite any checkpoint the library reads as safetensors.

use candle_core::DType;
use rudolph::weights::WeightsError;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
}

impl From<FloatDtype> for DType {
    fn from(d: FloatDtype) -> Self {
        match d {
            FloatDtype::F32 => DType::F32,
            FloatDtype::F16 => DType::F16,
            FloatDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Input checkpoint: safetensors, torch zip (`.bin`, `.ckpt`, `.pth`) or legacy torch file.
    pub input: PathBuf,
    /// Output `.safetensors` file.
    pub output: PathBuf,
    /// Cast float tensors to this type (default: keep each tensor's stored type). Integer and
    /// bool tensors always keep theirs.
    #[arg(long, value_enum)]
    pub dtype: Option<FloatDtype>,
    /// Overwrite OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let summary = rudolph::weights::convert(
        &args.input,
        &args.output,
        args.dtype.map(DType::from),
        args.force,
    )
    .map_err(|e| match e {
        WeightsError::Exists { .. } => anyhow::anyhow!("{e} (pass --force to overwrite it)"),
        e => e.into(),
    })?;
    println!(
        "wrote {} tensors ({} bytes of data) to {}",
        summary.tensors,
        summary.bytes,
        args.output.display()
    );
    Ok(())
}
