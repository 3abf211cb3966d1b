//! Building a [`Rudolph`] from an original checkpoint: key check, weights, and the checkpoint's
//! own layer masks (which win over the built ones; their version is reported).

use super::Rudolph;
use super::masks::{self, LayerMaskKind, LayerMasks, MaskVariant};
use crate::config::Config;
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// What a loaded checkpoint held.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Which released version the four mask buffers equal; `None` = neither (custom masks).
    pub mask_variant: Option<MaskVariant>,
    /// Number of tensors stored in each dtype.
    pub dtypes: BTreeMap<String, usize>,
    /// Parameters (mask buffers excluded).
    pub parameters: usize,
}

impl LoadReport {
    pub fn of(ckpt: &Checkpoint, cfg: &Config, masks: &LayerMasks) -> crate::Result<Self> {
        let mut dtypes = BTreeMap::new();
        let mut parameters = 0;
        for name in ckpt.names() {
            let info = ckpt.info(name).expect("listed");
            *dtypes.entry(info.dtype.to_string()).or_insert(0) += 1;
            if !name.ends_with("_mask") {
                parameters += info.shape.iter().product::<usize>();
            }
        }
        Ok(Self {
            mask_variant: masks::detect_variant(cfg, &masks.to_bytes()?),
            dtypes,
            parameters,
        })
    }
}

impl Rudolph {
    /// Loads an original checkpoint (`pytorch_model.bin` or `model.safetensors`) for `cfg`.
    /// Every missing, unexpected or mis-shaped tensor is reported at once. Weights are converted
    /// to `dtype` as they are read from the memory map, so they are held once.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        cfg: &Config,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<(Self, LoadReport)> {
        ckpt.check(&Self::tensor_shapes(cfg))?;
        let mut tensors = std::collections::HashMap::new();
        for (name, _) in Self::tensor_shapes(cfg) {
            if !name.ends_with("_mask") {
                let t = ckpt.load(&name, dtype, device)?;
                tensors.insert(name, t);
            }
        }
        let masks = masks_from_checkpoint(ckpt, device)?;
        let report = LoadReport::of(ckpt, cfg, &masks)?;
        let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
        Ok((Self::new(cfg, vb, masks)?, report))
    }

    /// The published preset whose tensor shapes a checkpoint has, if any.
    pub fn preset_of(ckpt: &Checkpoint) -> Option<&'static str> {
        Config::PRESET_NAMES.into_iter().find(|name| {
            let cfg = Config::preset(name).expect("presets are valid");
            ckpt.check(&Self::tensor_shapes(&cfg)).is_ok()
        })
    }
}

/// The four layer-mask buffers of a checkpoint (stored as bool or as 0/1 floats) as 0/1 f32.
pub fn masks_from_checkpoint(ckpt: &Checkpoint, device: &Device) -> crate::Result<LayerMasks> {
    let mask = |kind: LayerMaskKind| -> crate::Result<Tensor> {
        let name = format!("transformer.{}", kind.buffer_name());
        Ok(ckpt.load(&name, DType::U8, device)?.to_dtype(DType::F32)?)
    };
    Ok(LayerMasks::new([
        mask(LayerMaskKind::Row)?,
        mask(LayerMaskKind::Col)?,
        mask(LayerMaskKind::Conv)?,
        mask(LayerMaskKind::LastConv)?,
    ]))
}
