//! `rudolph inspect PATH`: what a checkpoint file or model folder holds.

use candle_core::Device;
use rudolph::config::Config;
use rudolph::model::Rudolph;
use rudolph::model::load::LoadReport;
use rudolph::weights::Checkpoint;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A checkpoint (pytorch_model.bin, model.safetensors) or a model folder.
    pub path: PathBuf,
    /// Config to check the file against (default: config.json beside it, else the matching preset).
    #[arg(long)]
    pub config: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let (file, dir) = if args.path.is_dir() {
        let found = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|n| args.path.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} holds neither model.safetensors nor pytorch_model.bin",
                    args.path.display()
                )
            })?;
        (found, Some(args.path.clone()))
    } else {
        (
            args.path.clone(),
            args.path.parent().map(|p| p.to_path_buf()),
        )
    };
    let ckpt = Checkpoint::open(&file)?;
    let preset = Rudolph::preset_of(&ckpt);
    let config_source = args.config.clone().or_else(|| {
        dir.as_ref()
            .map(|d| d.join("config.json"))
            .filter(|p| p.is_file())
            .map(|p| p.display().to_string())
    });
    let cfg = match (&config_source, preset) {
        (Some(src), _) => Config::from_name_or_path(src)?,
        (None, Some(p)) => Config::preset(p)?,
        (None, None) => anyhow::bail!(
            "{}: its tensor shapes match no preset and there is no config.json beside it; pass --config",
            file.display()
        ),
    };
    // Only the masks and shapes are needed: load the buffers, not the whole model.
    ckpt.check(&Rudolph::tensor_shapes(&cfg))?;
    let masks = rudolph::model::load::masks_from_checkpoint(&ckpt, &Device::Cpu)?;
    let report = LoadReport::of(&ckpt, &cfg, &masks)?;
    let matching = cfg.matching_preset();
    if args.json {
        let doc = serde_json::json!({
            "path": file.display().to_string(),
            "format": ckpt.format().to_string(),
            "tensors": ckpt.len(),
            "preset": matching,
            "parameters": report.parameters,
            "dtypes": report.dtypes,
            "mask_version": report.mask_variant.map_or("custom", |v| v.short_name()),
            "non_finite": report.non_finite,
            "config": cfg,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "file        {} ({}, {} tensors)",
            file.display(),
            ckpt.format(),
            ckpt.len()
        );
        println!("preset      {}", matching.unwrap_or("none (custom config)"));
        println!(
            "parameters  {} ({:.1} M)",
            report.parameters,
            report.parameters as f64 / 1e6
        );
        let dtypes: Vec<String> = report
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} ×{n}"))
            .collect();
        println!("dtypes      {}", dtypes.join(", "));
        println!(
            "masks       {}",
            report
                .mask_variant
                .map_or("custom (neither rc1 nor rc10)".to_string(), |v| v
                    .to_string())
        );
        if !report.non_finite.is_empty() {
            let shown: Vec<&str> = report
                .non_finite
                .iter()
                .take(5)
                .map(String::as_str)
                .collect();
            println!(
                "non-finite  {} tensors hold NaN or infinite values: {}{}",
                report.non_finite.len(),
                shown.join(", "),
                if report.non_finite.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            );
        }
        println!(
            "layout      {} layers, hidden {}, {} heads, text {}+{}, image {}×{}, vocab {}+{}",
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.l_text_seq_length,
            cfg.r_text_seq_length,
            cfg.image_tokens_per_dim,
            cfg.image_tokens_per_dim,
            cfg.text_vocab(),
            cfg.image_vocab()
        );
    }
    Ok(())
}
