//! ruDALL-E's image tokenizer: a Gumbel VQGAN (taming-transformers `GumbelVQ`, f = 8 for the real
//! model) with the optional wavelet (DWT) decoder.
//!
//! * [`Vqgan::encode_codes`]: images in `[0, 1]` → one code per `f×f` cell, row-major.
//! * [`Vqgan::decode_codes`]: a square grid of codes → images in `[0, 1]` (twice the size with the
//!   DWT decoder).
//!
//! Encoding is deterministic (`argmax` of the quantizer logits). rudalle 0.5.0rc1, which RuDOLPH
//! rc1 pins, draws Gumbel noise even in eval mode, i.e. *samples* a code from
//! `softmax(logits)`; rudalle 1.1.3 / RuDOLPH rc10 use the argmax.

pub mod config;
pub mod dwt;
mod load;
pub mod taming;
pub mod train;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::{DdConfig, VqganConfig};
pub use load::{TensorList, config_for_checkpoint, expected_tensors, sibling_config};
use taming::{Conv, Decoder, Encoder};

/// Why a VQGAN could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid VQGAN .config.yml: {source}")]
    ConfigYaml {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("invalid VQGAN config: {0}")]
    InvalidConfig(String),
    #[error(
        "invalid VQGAN config: {channels} channels is not a multiple of \
         ddconfig.norm_groups = {groups} (taming's GroupNorm default is 32 groups)"
    )]
    GroupNormChannels { channels: usize, groups: usize },
    #[error(
        "invalid VQGAN config: ddconfig.z_channels ({z_channels}) must equal embed_dim \
         ({embed_dim}): quantize.proj takes z_channels inputs but receives quant_conv's output"
    )]
    EmbedDimMismatch { z_channels: usize, embed_dim: usize },
    #[error("cannot read VQGAN checkpoint {path}: {source}")]
    Weights {
        path: String,
        source: Box<crate::weights::WeightsError>,
    },
    #[error("VQGAN checkpoint {path} does not fit the config ({layout:?} layout): {}", problems.join("; "))]
    IncompatibleCheckpoint {
        path: String,
        layout: VqganLayout,
        /// One line per missing tensor or shape mismatch, naming the tensor.
        problems: Vec<String>,
    },
    #[error("decoder.idwt.{name} is not a Haar synthesis filter (only wave='haar' is supported)")]
    NotHaar { name: String },
    #[error("no codes to decode")]
    EmptyCodes,
    #[error("{n} codes per image do not form a square grid")]
    NotSquare { n: usize },
    #[error(
        "code {code} is out of range: the codebook has n_embed = {n_embed} entries (0..{n_embed})"
    )]
    CodeOutOfRange { code: i64, n_embed: usize },
    #[error("bad input: {0}")]
    BadInput(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The largest picture side the VQGAN encodes or decodes: twice the real model's 256. The
/// attention of its middle block holds `(side / 8)⁴` scores, 64 MiB at this side and 16 times
/// that at twice it.
pub const MAX_SIDE: usize = 512;

/// Where the decoder lives in a checkpoint and which decoder it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VqganLayout {
    /// Keys relative to `GumbelVQ` (`encoder.*`, `decoder.*`, `post_quant_conv.*`, …): the
    /// plain decoder, `f·s` pixels for `s×s` codes.
    Plain,
    /// `DecoderDWT` (`decoder.post_quant_conv.*`, `decoder.decoder.*` with 12 output channels,
    /// `decoder.idwt.*` Haar buffers): `2·f·s` pixels. The top-level `post_quant_conv` must be
    /// present but is unused, as in the reference.
    Dwt,
}

/// A Gumbel VQGAN image tokenizer.
#[derive(Debug, Clone)]
pub struct Vqgan {
    config: VqganConfig,
    layout: VqganLayout,
    encoder: Encoder,
    quant_conv: Conv,
    /// `quantize.proj`: latent → one logit per codebook entry.
    proj: Conv,
    /// `quantize.embed.weight`, `[n_embed, embed_dim]`.
    embed: Tensor,
    /// The top-level `post_quant_conv` (plain) or `decoder.post_quant_conv` (DWT).
    post_quant_conv: Conv,
    decoder: Decoder,
    ignored_keys: Vec<String>,
}

impl Vqgan {
    /// Builds the model from `vb` rooted at the `GumbelVQ` level (so `vb` holds
    /// `encoder.conv_in.weight`, not `model.encoder.conv_in.weight`). Any `VarBuilder` works:
    /// checkpoint tensors, or a `VarMap` for random weights.
    pub fn new(
        config: &VqganConfig,
        layout: VqganLayout,
        vb: VarBuilder,
    ) -> Result<Self, VaeError> {
        config.validate()?;
        let dd = &config.ddconfig;
        let conv1x1 = |i, o, vb| taming::conv(i, o, 1, 1, vb);
        let encoder = Encoder::new(dd, vb.pp("encoder"))?;
        let quant_conv = conv1x1(dd.z_channels, config.embed_dim, vb.pp("quant_conv"))?;
        let proj = conv1x1(dd.z_channels, config.n_embed, vb.pp("quantize").pp("proj"))?;
        let embed = vb
            .pp("quantize")
            .pp("embed")
            .get((config.n_embed, config.embed_dim), "weight")?;
        let top_post_quant_conv =
            conv1x1(config.embed_dim, dd.z_channels, vb.pp("post_quant_conv"))?;
        let (post_quant_conv, decoder) = match layout {
            VqganLayout::Plain => (top_post_quant_conv, Decoder::new(dd, 3, vb.pp("decoder"))?),
            VqganLayout::Dwt => {
                let vb_d = vb.pp("decoder");
                // Required like in the strict reference load; their values are checked by
                // `Vqgan::load`, the transform itself is the Haar closed form.
                for (name, shape, _) in dwt::haar_buffers() {
                    vb_d.pp("idwt").get(shape.to_vec(), name)?;
                }
                (
                    conv1x1(config.embed_dim, dd.z_channels, vb_d.pp("post_quant_conv"))?,
                    Decoder::new(dd, 12, vb_d.pp("decoder"))?,
                )
            }
        };
        Ok(Self {
            config: config.clone(),
            layout,
            encoder,
            quant_conv,
            proj,
            embed,
            post_quant_conv,
            decoder,
            ignored_keys: Vec::new(),
        })
    }

    /// The hyper-parameters the model was built with.
    /// A VQGAN of `config` with random weights (candle's default initialisation), for
    /// benchmarks.
    pub fn random(config: &VqganConfig, device: &Device) -> Result<Self, VaeError> {
        // Random init through a VarMap, then detached copies: weights that are `Var`s would make
        // candle record the autograd graph and keep every activation alive.
        let varmap = candle_nn::VarMap::new();
        Self::new(
            config,
            VqganLayout::Plain,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let weights: std::collections::HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        Self::new(config, VqganLayout::Plain, vb)
    }

    pub fn config(&self) -> &VqganConfig {
        &self.config
    }

    /// Plain or DWT decoder.
    pub fn layout(&self) -> VqganLayout {
        self.layout
    }

    /// Checkpoint tensors that the model does not use (a training discriminator `loss.*`, …),
    /// sorted; empty for a model built with [`Vqgan::new`].
    pub fn ignored_keys(&self) -> &[String] {
        &self.ignored_keys
    }

    /// Side of the decoded image for `codes_per_side × codes_per_side` codes.
    pub fn decoded_size(&self, codes_per_side: usize) -> usize {
        let f = self.config.downsample_factor() * codes_per_side;
        match self.layout {
            VqganLayout::Plain => f,
            VqganLayout::Dwt => 2 * f,
        }
    }

    fn check_images(&self, images: &Tensor) -> Result<(), VaeError> {
        let f = self.config.downsample_factor();
        match images.dims() {
            &[_, 3, h, w] if h > 0 && w > 0 && h % f == 0 && w % f == 0 => Ok(()),
            dims => Err(VaeError::BadInput(format!(
                "images must be [B, 3, H, W] with H and W positive multiples of {f}, got {dims:?}"
            ))),
        }
    }

    /// `Encoder(2x − 1)`: `[B, 3, H, W]` in `[0, 1]` → `[B, z_channels, H/f, W/f]`.
    pub fn encoder_out(&self, images: &Tensor) -> Result<Tensor, VaeError> {
        self.check_images(images)?;
        let x = images.to_dtype(DType::F32)?.affine(2.0, -1.0)?;
        Ok(self.encoder.forward(&x)?)
    }

    /// `quant_conv(encoder_out)`: `[B, embed_dim, H/f, W/f]`.
    pub fn quant_conv_out(&self, images: &Tensor) -> Result<Tensor, VaeError> {
        Ok(self.quant_conv.forward(&self.encoder_out(images)?)?)
    }

    /// The quantizer logits `quantize.proj(quant_conv_out)`: `[B, n_embed, H/f, W/f]`.
    pub fn proj_logits(&self, images: &Tensor) -> Result<Tensor, VaeError> {
        if let Ok((_, _, h, w)) = images.dims4()
            && (h > MAX_SIDE || w > MAX_SIDE)
        {
            return Err(VaeError::BadInput(format!(
                "a {w}×{h} picture is larger than the {MAX_SIDE} pixels a side the VQGAN encodes"
            )));
        }
        Ok(self.proj.forward(&self.quant_conv_out(images)?)?)
    }

    /// Image → codes: `[B, 3, H, W]` in `[0, 1]` → `[B, (H/f)·(W/f)]` u32, row-major over the
    /// code grid. Deterministic argmax of [`Vqgan::proj_logits`] (see the module docs).
    pub fn encode_codes(&self, images: &Tensor) -> Result<Tensor, VaeError> {
        let logits = self.proj_logits(images)?;
        let (b, _, h, w) = logits.dims4()?;
        Ok(logits.argmax(1)?.reshape((b, h * w))?)
    }

    /// Codes → latent grid: `[B, n]` (any integer dtype) → `[B, embed_dim, s, s]`,
    /// `s = √n`. Fails on an empty, non-square or out-of-range input.
    pub fn embed_codes(&self, codes: &Tensor) -> Result<Tensor, VaeError> {
        let (b, n) = codes.dims2().map_err(|_| {
            VaeError::BadInput(format!("codes must be [B, n], got {:?}", codes.dims()))
        })?;
        if b == 0 || n == 0 {
            return Err(VaeError::EmptyCodes);
        }
        let s = n.isqrt();
        if s * s != n {
            return Err(VaeError::NotSquare { n });
        }
        let side = s.saturating_mul(self.config().downsample_factor());
        if side > MAX_SIDE {
            return Err(VaeError::BadInput(format!(
                "{n} codes per picture make a {side}-pixel side, more than the {MAX_SIDE} the VQGAN decodes"
            )));
        }
        let values = match codes.dtype() {
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 => {
                return Err(VaeError::BadInput(format!(
                    "codes must be integers, got {:?}",
                    codes.dtype()
                )));
            }
            _ => codes
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?,
        };
        let n_embed = self.config.n_embed;
        if let Some(&code) = values
            .iter()
            .find(|&&c| c < 0 || c as u64 >= n_embed as u64)
        {
            return Err(VaeError::CodeOutOfRange { code, n_embed });
        }
        let idx: Vec<u32> = values.iter().map(|&c| c as u32).collect();
        let idx = Tensor::from_vec(idx, b * n, self.embed.device())?;
        // [B·n, C] -> [B, s, s, C] -> [B, C, s, s]
        let z = self.embed.index_select(&idx, 0)?;
        Ok(z.reshape((b, s, s, self.config.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// Latent grid → unclamped decoder output `[B, 3, S, S]` (roughly in `[−1, 1]`).
    pub fn decode_z_preclamp(&self, z: &Tensor) -> Result<Tensor, VaeError> {
        let h = self.post_quant_conv.forward(z)?;
        let out = self.decoder.forward(&h)?;
        Ok(match self.layout {
            VqganLayout::Plain => out,
            VqganLayout::Dwt => dwt::inverse_haar(&out)?,
        })
    }

    /// Codes → unclamped decoder output: `[B, n]` → `[B, 3, S, S]` with
    /// `S = `[`Vqgan::decoded_size`]`(√n)`.
    pub fn decode_preclamp(&self, codes: &Tensor) -> Result<Tensor, VaeError> {
        self.decode_z_preclamp(&self.embed_codes(codes)?)
    }

    /// Codes → images in `[0, 1]`: `(clamp(decode_preclamp, −1, 1) + 1) / 2`, `[B, 3, S, S]`.
    pub fn decode_codes(&self, codes: &Tensor) -> Result<Tensor, VaeError> {
        let x = self.decode_preclamp(codes)?.clamp(-1f32, 1f32)?;
        Ok(((x + 1.0)? * 0.5)?)
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn small_config() -> VqganConfig {
        VqganConfig::from_yaml_str(
            "embed_dim: 8\nn_embed: 10\nddconfig:\n  ch: 32\n  ch_mult: [1, 2, 1]\n  \
             num_res_blocks: 1\n  attn_resolutions: [4]\n  z_channels: 8\n  resolution: 16\n  \
             in_channels: 3\n  out_ch: 3\n",
        )
        .unwrap()
    }

    #[test]
    fn random_weights_shapes_both_layouts() {
        let dev = Device::Cpu;
        let cfg = small_config();
        for (layout, scale) in [(VqganLayout::Plain, 1), (VqganLayout::Dwt, 2)] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let vae = Vqgan::new(&cfg, layout, vb).unwrap();
            let images = Tensor::rand(0f32, 1f32, (2, 3, 24, 16), &dev).unwrap();
            assert_eq!(vae.encoder_out(&images).unwrap().dims(), &[2, 8, 6, 4]);
            assert_eq!(vae.proj_logits(&images).unwrap().dims(), &[2, 10, 6, 4]);
            let codes = vae.encode_codes(&images).unwrap();
            assert_eq!(codes.dims(), &[2, 24]);
            let square =
                Tensor::from_vec((0u32..18).map(|c| c % 10).collect(), (2, 9), &dev).unwrap();
            let out = vae.decode_codes(&square).unwrap();
            assert_eq!(out.dims(), &[2, 3, 12 * scale, 12 * scale]);
            assert_eq!(vae.decoded_size(3), 12 * scale);
            let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }
}
