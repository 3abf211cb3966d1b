//! Building a [`Rudolph`] from an original checkpoint: key check, weights, and the checkpoint's
//! own layer masks (which win over the built ones; their version is reported).

use super::masks::{self, LayerMasks, MaskVariant};
use super::{Precision, Rudolph};
use crate::config::Config;
use crate::weights::{Checkpoint, LoadOptions};
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
    /// Tensors holding NaN or infinite values, named as in the file (empty for sound weights;
    /// a model loads with them only when [`LoadOptions::allow_non_finite`] asks for it).
    pub non_finite: Vec<String>,
}

impl LoadReport {
    pub fn of(ckpt: &Checkpoint, cfg: &Config, masks: &LayerMasks) -> crate::Result<Self> {
        let mut dtypes = BTreeMap::new();
        let mut parameters = 0usize;
        for name in ckpt.names() {
            let info = ckpt.info(name).expect("listed");
            *dtypes.entry(info.dtype.to_string()).or_insert(0) += 1;
            if !name.ends_with("_mask") {
                let n = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                parameters = n
                    .and_then(|n| parameters.checked_add(n))
                    .unwrap_or(usize::MAX);
            }
        }
        Ok(Self {
            mask_variant: masks::detect_variant(cfg, &masks.to_bytes()?),
            dtypes,
            parameters,
            non_finite: ckpt.non_finite(ckpt.names())?,
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
        Self::from_checkpoint_as(ckpt, cfg, Precision::Float(dtype), device)
    }

    /// As [`Rudolph::from_checkpoint`] in any [`Precision`]. Tensors are read when their layer
    /// is built, so a quantized model never holds more than one layer's float weights.
    pub fn from_checkpoint_as(
        ckpt: &Checkpoint,
        cfg: &Config,
        precision: Precision,
        device: &Device,
    ) -> crate::Result<(Self, LoadReport)> {
        Self::from_checkpoint_with(ckpt, cfg, precision, device, LoadOptions::default())
    }

    /// As [`Rudolph::from_checkpoint_as`] with [`LoadOptions`]. Weights holding NaN or infinite
    /// values are refused ([`crate::weights::WeightsError::NonFinite`]) unless `options` allows
    /// them; the report lists them either way.
    pub fn from_checkpoint_with(
        ckpt: &Checkpoint,
        cfg: &Config,
        precision: Precision,
        device: &Device,
        options: LoadOptions,
    ) -> crate::Result<(Self, LoadReport)> {
        ckpt.check(&Self::tensor_shapes(cfg))?;
        let masks = masks_from_checkpoint(ckpt, device)?;
        let report = LoadReport::of(ckpt, cfg, &masks)?;
        if !options.allow_non_finite {
            ckpt.refuse_non_finite(&report.non_finite)?;
        }
        let vb = candle_nn::VarBuilder::from_backend(
            Box::new(Lazy(ckpt)),
            precision.load_dtype(),
            device.clone(),
        );
        Ok((Self::build(cfg, vb, masks, precision)?, report))
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
    LayerMasks::read(|name| -> crate::Result<Tensor> { Ok(ckpt.load(name, DType::U8, device)?) })
}

/// A checkpoint read tensor by tensor as the model asks for them (shapes were checked up front).
struct Lazy<'a>(&'a Checkpoint);

impl candle_nn::var_builder::SimpleBackend for Lazy<'_> {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, device)?;
        if t.shape() != &shape {
            candle_core::bail!("{name}: shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .load(name, dtype, device)
            .map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.info(name).is_some()
    }
}
