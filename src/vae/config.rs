//! The VQGAN hyper-parameters: taming-transformers' `ddconfig` plus the Gumbel quantizer sizes,
//! read from a taming/rudalle `.config.yml` or taken from the built-in `vqgan.gumbelf8-sber`
//! preset.

use serde::{Deserialize, Serialize};
use std::path::Path;

use super::VaeError;

/// The taming `Encoder`/`Decoder` constructor arguments (`ddconfig` in the YAML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdConfig {
    /// Base channel count; level `i` has `ch * ch_mult[i]` channels.
    pub ch: usize,
    /// One multiplier per resolution level; the image is downsampled `len − 1` times.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more per level).
    pub num_res_blocks: usize,
    /// Nominal resolutions (`resolution / 2^level`) at which attention blocks follow the residual
    /// blocks. Nominal, not actual: a 128 px input still gets attention at "32".
    pub attn_resolutions: Vec<usize>,
    /// Channels of the latent grid between encoder and quantizer.
    pub z_channels: usize,
    /// Nominal training resolution; fixes which levels have attention, and is the default
    /// pre-processing size of `encode-image`.
    pub resolution: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    /// Must be false: the Gumbel VQ consumes `z_channels`, not a mean/log-variance pair.
    #[serde(default)]
    pub double_z: bool,
    /// Inert at inference (the reference runs with 0.0).
    #[serde(default)]
    pub dropout: f64,
    /// Groups of every GroupNorm. taming hard-codes 32; a small model needs fewer, since with
    /// one channel per group a norm erases each channel's absolute level (a plain background's
    /// colour) and only its spatial pattern survives.
    #[serde(default = "default_norm_groups")]
    pub norm_groups: usize,
}

fn default_norm_groups() -> usize {
    GROUP_NORM_GROUPS
}

/// A Gumbel VQGAN (`taming.models.vqgan.GumbelVQ`) configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqganConfig {
    /// Width of the codebook vectors (`quantize.embed.weight` is `[n_embed, embed_dim]`).
    pub embed_dim: usize,
    /// Codebook size: codes are `0..n_embed`.
    pub n_embed: usize,
    pub ddconfig: DdConfig,
}

/// taming's `Normalize` is `GroupNorm(32, …)`; configs without `norm_groups` get it.
pub const GROUP_NORM_GROUPS: usize = 32;

impl VqganConfig {
    /// ruDALL-E's `vqgan.gumbelf8-sber.config.yml`, used by every published RuDOLPH.
    pub fn gumbelf8_sber() -> Self {
        Self {
            embed_dim: 256,
            n_embed: 8192,
            ddconfig: DdConfig {
                ch: 128,
                ch_mult: vec![1, 1, 2, 4],
                num_res_blocks: 2,
                attn_resolutions: vec![32],
                z_channels: 256,
                resolution: 256,
                in_channels: 3,
                out_ch: 3,
                double_z: false,
                dropout: 0.0,
                norm_groups: GROUP_NORM_GROUPS,
            },
        }
    }

    /// Reads a taming/rudalle `.config.yml` (`model.params.{embed_dim, n_embed, ddconfig}`; the
    /// scheduler and loss sections are ignored). A bare mapping holding `embed_dim`, `n_embed`
    /// and `ddconfig` at the top level is accepted too. The result is validated.
    pub fn from_yaml_file(path: &Path) -> Result<Self, VaeError> {
        let text = crate::text_file::read(path).map_err(|source| VaeError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml_str(&text).map_err(|e| match e {
            VaeError::ConfigYaml { source, .. } => VaeError::ConfigYaml {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// [`VqganConfig::from_yaml_file`] on an in-memory document (errors name `<string>`).
    pub fn from_yaml_str(text: &str) -> Result<Self, VaeError> {
        let yaml_err = |source| VaeError::ConfigYaml {
            path: "<string>".into(),
            source,
        };
        let root: serde_yaml::Value = serde_yaml::from_str(text).map_err(yaml_err)?;
        let params = root
            .get("model")
            .and_then(|m| m.get("params"))
            .unwrap_or(&root)
            .clone();
        let cfg: VqganConfig = serde_yaml::from_value(params).map_err(yaml_err)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects configurations the taming modules cannot run (they would fail deep inside a
    /// forward pass, or silently compute something else).
    pub fn validate(&self) -> Result<(), VaeError> {
        let dd = &self.ddconfig;
        let bad = |what: String| Err(VaeError::InvalidConfig(what));
        if dd.ch_mult.is_empty() {
            return bad("ddconfig.ch_mult is empty".into());
        }
        if self.n_embed == 0 || self.embed_dim == 0 || dd.ch == 0 || dd.resolution == 0 {
            return bad(
                "n_embed, embed_dim, ddconfig.ch and ddconfig.resolution must be > 0".into(),
            );
        }
        let bounds = [
            ("ddconfig.resolution", dd.resolution, super::MAX_SIDE),
            ("ddconfig.ch", dd.ch, 1024),
            ("ddconfig.ch_mult's length", dd.ch_mult.len(), 6),
            ("ddconfig.num_res_blocks", dd.num_res_blocks, 8),
            ("embed_dim", self.embed_dim, 4096),
            ("n_embed", self.n_embed, 1 << 18),
        ];
        for (name, value, limit) in bounds.into_iter().chain(
            dd.ch_mult
                .iter()
                .map(|&m| ("a ddconfig.ch_mult entry", m, 16)),
        ) {
            if value > limit {
                return bad(format!("{name} is {value}, above the limit of {limit}"));
            }
        }
        if dd.ch_mult.contains(&0) {
            return bad(format!("ddconfig.ch_mult {:?} contains 0", dd.ch_mult));
        }
        for channels in std::iter::once(dd.ch).chain(dd.ch_mult.iter().map(|m| dd.ch * m)) {
            if dd.norm_groups == 0 || channels % dd.norm_groups != 0 {
                return Err(VaeError::GroupNormChannels {
                    channels,
                    groups: dd.norm_groups,
                });
            }
        }
        if dd.z_channels != self.embed_dim {
            return Err(VaeError::EmbedDimMismatch {
                z_channels: dd.z_channels,
                embed_dim: self.embed_dim,
            });
        }
        if dd.double_z {
            return bad("ddconfig.double_z must be false for a Gumbel VQGAN".into());
        }
        if dd.in_channels != 3 || dd.out_ch != 3 {
            return bad(format!(
                "ddconfig.in_channels and out_ch must be 3 (RGB), got {} and {}",
                dd.in_channels, dd.out_ch
            ));
        }
        // Without residual blocks an encoder level keeps `ch` channels, while taming sizes the
        // downsample convs and the mid blocks for `ch * in_ch_mult[level]`.
        let n = dd.ch_mult.len();
        if dd.num_res_blocks == 0 && dd.ch_mult[..n - 1].iter().any(|&m| m != 1) {
            return bad(format!(
                "ddconfig.num_res_blocks = 0 needs ch_mult = [1, …, 1, x], got {:?}",
                dd.ch_mult
            ));
        }
        Ok(())
    }

    /// Pixels per code along each side: `2^(len(ch_mult) − 1)` (8 for the real model).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.ddconfig.ch_mult.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_is_valid_and_f8() {
        let cfg = VqganConfig::gumbelf8_sber();
        cfg.validate().unwrap();
        assert_eq!(cfg.downsample_factor(), 8);
    }

    #[test]
    fn named_validation_errors() {
        let mut cfg = VqganConfig::gumbelf8_sber();
        cfg.ddconfig.ch = 48;
        assert!(matches!(
            cfg.validate(),
            Err(VaeError::GroupNormChannels {
                channels: 48,
                groups: 32
            })
        ));
        let mut cfg = VqganConfig::gumbelf8_sber();
        cfg.embed_dim = 128;
        assert!(matches!(
            cfg.validate(),
            Err(VaeError::EmbedDimMismatch { .. })
        ));
        let mut cfg = VqganConfig::gumbelf8_sber();
        cfg.ddconfig.num_res_blocks = 0;
        assert!(matches!(cfg.validate(), Err(VaeError::InvalidConfig(_))));
    }

    #[test]
    fn yaml_layouts() {
        let flat = "embed_dim: 16\nn_embed: 64\nddconfig:\n  ch: 32\n  ch_mult: [1, 2]\n  \
                    num_res_blocks: 1\n  attn_resolutions: []\n  z_channels: 16\n  resolution: 16\n  \
                    in_channels: 3\n  out_ch: 3\n";
        let cfg = VqganConfig::from_yaml_str(flat).unwrap();
        assert_eq!(cfg.ddconfig.ch_mult, vec![1, 2]);
        let nested = format!(
            "model:\n  params:\n{}",
            flat.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        );
        assert_eq!(VqganConfig::from_yaml_str(&nested).unwrap(), cfg);
        assert!(matches!(
            VqganConfig::from_yaml_str("model: {params: {n_embed: 3}}"),
            Err(VaeError::ConfigYaml { .. })
        ));
    }
}
