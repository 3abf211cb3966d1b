//! Loading a [`Vqgan`] from a checkpoint: config discovery, key-layout detection and a complete
//! key/shape check before any tensor is read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::{VaeError, Vqgan, VqganConfig, VqganLayout, dwt};
use crate::weights::{Checkpoint, LoadOptions};

/// A `VarBuilder` backend that hands out shape-only zero tensors (broadcast views, no
/// allocation) and records every request, so building a model lists the tensors it needs.
struct Recorder(Arc<Mutex<TensorList>>);

/// `(name, shape)` pairs, names relative to the `GumbelVQ` level.
pub type TensorList = Vec<(String, Vec<usize>)>;

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut seen) = self.0.lock() {
            seen.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the VQGAN asked for {name} without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Every tensor a model with this config and layout needs, as `(name, shape)` relative to the
/// `GumbelVQ` level (no `model.` prefix), in construction order.
pub fn expected_tensors(config: &VqganConfig, layout: VqganLayout) -> Result<TensorList, VaeError> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(seen.clone())), DType::F32, Device::Cpu);
    Vqgan::new(config, layout, vb)?;
    let names = seen
        .lock()
        .map_err(|_| VaeError::BadInput("tensor recorder poisoned".into()))?
        .clone();
    Ok(names)
}

/// The `.config.yml` beside a checkpoint that shares its name up to some extension:
/// `vqgan_tiny.ckpt` → `vqgan_tiny.config.yml`, `vqgan.gumbelf8-sber.model.ckpt` →
/// `vqgan.gumbelf8-sber.model.config.yml`, then `vqgan.gumbelf8-sber.config.yml`, then
/// `vqgan.config.yml` (longest name first).
pub fn sibling_config(checkpoint: &Path) -> Option<PathBuf> {
    let dir = checkpoint.parent().unwrap_or(Path::new(""));
    let mut stem = checkpoint.file_name()?.to_str()?;
    while let Some((shorter, _ext)) = stem.rsplit_once('.') {
        if shorter.is_empty() {
            break;
        }
        let candidate = dir.join(format!("{shorter}.config.yml"));
        if candidate.is_file() {
            return Some(candidate);
        }
        stem = shorter;
    }
    None
}

/// The configuration for a checkpoint: the explicit `.config.yml` if given, else the sibling
/// found by [`sibling_config`], else the built-in [`VqganConfig::gumbelf8_sber`].
pub fn config_for_checkpoint(
    checkpoint: &Path,
    explicit: Option<&Path>,
) -> Result<VqganConfig, VaeError> {
    match explicit
        .map(Path::to_path_buf)
        .or_else(|| sibling_config(checkpoint))
    {
        Some(path) => VqganConfig::from_yaml_file(&path),
        None => Ok(VqganConfig::gumbelf8_sber()),
    }
}

/// Finds the `GumbelVQ` prefix (`model.` in the DWT / wrapper layout, nothing in the plain
/// Lightning state dict) and which decoder the keys describe.
fn detect_layout(names: &[&str]) -> (&'static str, VqganLayout) {
    let prefix = if names.iter().any(|n| {
        ["model.encoder.", "model.decoder.", "model.quantize."]
            .iter()
            .any(|p| n.starts_with(p))
    }) {
        "model."
    } else {
        ""
    };
    let dwt = names.iter().any(|n| {
        [
            "decoder.decoder.",
            "decoder.idwt.",
            "decoder.post_quant_conv.",
        ]
        .iter()
        .any(|p| n.starts_with(&format!("{prefix}{p}")))
    });
    let layout = if dwt {
        VqganLayout::Dwt
    } else {
        VqganLayout::Plain
    };
    (prefix, layout)
}

impl Vqgan {
    /// Loads a VQGAN checkpoint (torch zip `.ckpt`/`.bin` — a Lightning checkpoint's
    /// `state_dict` — or safetensors) in float32 on `device`.
    ///
    /// The config is `config` if given, else the `.config.yml` beside the checkpoint (see
    /// [`sibling_config`]), else the real `vqgan.gumbelf8-sber` preset. The key layout (plain or
    /// `model.`-prefixed, plain or DWT decoder) is detected from the names. Every tensor the
    /// model needs must be present with the right shape — unlike the reference's `strict=False`
    /// load, which silently leaves missing weights random — and all problems are reported at
    /// once. Other keys (e.g. a training discriminator under `loss.`) are ignored and listed by
    /// [`Vqgan::ignored_keys`].
    ///
    /// Weights holding NaN or infinite values are refused, naming them; see [`Vqgan::load_with`].
    pub fn load(path: &Path, config: Option<&Path>, device: &Device) -> Result<Self, VaeError> {
        Self::load_with(path, config, device, LoadOptions::default())
    }

    /// As [`Vqgan::load`] with [`LoadOptions`] (`allow_non_finite` loads weights holding NaN or
    /// infinite values, which spoil every picture decoded, instead of refusing them).
    pub fn load_with(
        path: &Path,
        config: Option<&Path>,
        device: &Device,
        options: LoadOptions,
    ) -> Result<Self, VaeError> {
        let config = config_for_checkpoint(path, config)?;
        let shown = path.display().to_string();
        let weights_err = |source| VaeError::Weights {
            path: shown.clone(),
            source: Box::new(source),
        };
        let ckpt = Checkpoint::open(path).map_err(weights_err)?;
        let names = ckpt.names();
        let (prefix, layout) = detect_layout(&names);
        let expected = expected_tensors(&config, layout)?;

        let mut problems = Vec::new();
        for (name, shape) in &expected {
            let full = format!("{prefix}{name}");
            match ckpt.info(&full) {
                None => problems.push(format!("missing tensor {full} {shape:?}")),
                Some(info) if info.shape != *shape => problems.push(format!(
                    "{full} has shape {:?}, expected {shape:?}",
                    info.shape
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(VaeError::IncompatibleCheckpoint {
                path: shown,
                layout,
                problems,
            });
        }

        if !options.allow_non_finite {
            let full: Vec<String> = expected
                .iter()
                .map(|(n, _)| format!("{prefix}{n}"))
                .collect();
            ckpt.check_finite(full.iter().map(String::as_str))
                .map_err(weights_err)?;
        }

        let mut tensors = HashMap::with_capacity(expected.len());
        for (name, _) in &expected {
            let full = format!("{prefix}{name}");
            tensors.insert(
                name.clone(),
                ckpt.load(&full, DType::F32, device).map_err(weights_err)?,
            );
        }
        if layout == VqganLayout::Dwt {
            for (name, _, taps) in dwt::haar_buffers() {
                let stored = tensors[&format!("decoder.idwt.{name}")]
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if stored.iter().zip(taps).any(|(s, t)| (s - t).abs() > 1e-6) {
                    return Err(VaeError::NotHaar { name: name.into() });
                }
            }
        }
        let wanted: BTreeSet<String> = expected
            .iter()
            .map(|(n, _)| format!("{prefix}{n}"))
            .collect();
        let ignored = names
            .iter()
            .filter(|n| !wanted.contains(**n))
            .map(|n| n.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();

        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let mut model = Vqgan::new(&config, layout, vb)?;
        model.ignored_keys = ignored;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published checkpoints: 301 tensors (68,995,971 values) for the plain model, 307
    /// (69,072,148) with the DWT decoder.
    #[test]
    fn real_config_key_counts_match_the_reference() {
        let cfg = VqganConfig::gumbelf8_sber();
        for (layout, keys, values) in [
            (VqganLayout::Plain, 301, 68_995_971),
            (VqganLayout::Dwt, 307, 69_072_148),
        ] {
            let list = expected_tensors(&cfg, layout).unwrap();
            assert_eq!(list.len(), keys, "{layout:?}");
            let total: usize = list.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            assert_eq!(total, values, "{layout:?}");
        }
        let plain = expected_tensors(&cfg, VqganLayout::Plain).unwrap();
        let find = |n: &str| plain.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
        assert_eq!(
            find("encoder.down.3.attn.1.q.weight"),
            Some(vec![512, 512, 1, 1])
        );
        assert_eq!(find("decoder.up.3.attn.2.proj_out.bias"), Some(vec![512]));
        assert_eq!(
            find("decoder.up.1.block.0.nin_shortcut.weight"),
            Some(vec![128, 256, 1, 1])
        );
        assert_eq!(find("quantize.embed.weight"), Some(vec![8192, 256]));
        assert_eq!(find("encoder.down.3.downsample.conv.weight"), None);
    }

    #[test]
    fn layout_detection() {
        assert_eq!(
            detect_layout(&["encoder.conv_in.weight", "decoder.conv_in.weight", "loss.x"]),
            ("", VqganLayout::Plain)
        );
        assert_eq!(
            detect_layout(&[
                "model.encoder.conv_in.weight",
                "model.decoder.conv_in.weight"
            ]),
            ("model.", VqganLayout::Plain)
        );
        assert_eq!(
            detect_layout(&["model.encoder.conv_in.weight", "model.decoder.idwt.g0_col"]),
            ("model.", VqganLayout::Dwt)
        );
    }

    #[test]
    fn sibling_config_strips_extensions_progressively() {
        let dir = std::env::temp_dir().join(format!("rudolph-vae-sibling-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("vqgan.gumbelf8-sber.config.yml");
        std::fs::write(&cfg, "").unwrap();
        let found = sibling_config(&dir.join("vqgan.gumbelf8-sber.model.ckpt"));
        assert_eq!(found.as_deref(), Some(cfg.as_path()));
        assert_eq!(
            sibling_config(&dir.join("vqgan.gumbelf8-sber-dwt.model.ckpt")),
            None
        );
        assert_eq!(sibling_config(&dir.join("other.ckpt")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
