//! taming-transformers' convolutional `Encoder`/`Decoder` (`taming/modules/diffusionmodules/
//! model.py`) as used by ruDALL-E's Gumbel VQGAN: no timestep embedding, dropout inert, resampling
//! with convolutions. Modules are built from a [`VarBuilder`] under the original tensor names
//! (`down.0.block.1.norm1.weight`, `mid.attn_1.q.bias`, …).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::config::DdConfig;
use crate::kernels::{self, ConvGeometry};

/// taming's epsilon: 1e-6, not PyTorch's default 1e-5.
const NORM_EPS: f64 = 1e-6;

/// taming's `Normalize`: `GroupNorm(groups, …)` (32 groups in every published model).
#[derive(Debug, Clone)]
struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

fn normalize(channels: usize, groups: usize, vb: VarBuilder) -> Result<GroupNorm> {
    let gamma = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let beta = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    Ok(GroupNorm {
        gamma,
        beta,
        groups,
    })
}

impl Module for GroupNorm {
    // [B, C, H, W] -> [B, C, H, W]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::group_norm(x, &self.gamma, &self.beta, self.groups, NORM_EPS)
    }
}

pub(crate) fn conv(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv> {
    let padding = if kernel == 3 && stride == 1 { 1 } else { 0 };
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let conv = candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)?;
    Ok(Conv {
        weight: conv.weight().clone(),
        bias: conv.bias().cloned(),
        geometry: ConvGeometry::symmetric(kernel, stride, padding),
    })
}

/// A convolution; [`kernels::conv2d`] runs it as candle's `conv2d` at inference and as the
/// training kernel (im2col and one GEMM per picture, with its own backward) when gradients are
/// tracked: candle's CPU
/// backward of `conv2d` is a naive transposed convolution.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    geometry: ConvGeometry,
}

impl Conv {
    /// The same convolution on an input padded `pad` (top, bottom, left, right) beforehand.
    fn forward_padded(&self, x: &Tensor, pad: [usize; 4]) -> Result<Tensor> {
        let mut geometry = self.geometry;
        geometry
            .pad
            .iter_mut()
            .zip(pad)
            .for_each(|(p, extra)| *p += extra);
        kernels::conv2d(x, &self.weight, self.bias.as_ref(), geometry)
    }
}

impl Module for Conv {
    // [B, C, H, W] -> [B, O, H', W']
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_padded(x, [0; 4])
    }
}

/// `x · sigmoid(x)` (taming's `nonlinearity`).
fn swish(x: &Tensor) -> Result<Tensor> {
    kernels::swish(x)
}

/// Pre-activation residual block; a 1×1 `nin_shortcut` projects the skip path when the channel
/// count changes.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let nin_shortcut = if in_c != out_c {
            Some(conv(in_c, out_c, 1, 1, vb.pp("nin_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: normalize(in_c, groups, vb.pp("norm1"))?,
            conv1: conv(in_c, out_c, 3, 1, vb.pp("conv1"))?,
            norm2: normalize(out_c, groups, vb.pp("norm2"))?,
            conv2: conv(out_c, out_c, 3, 1, vb.pp("conv2"))?,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    // [B, in, H, W] -> [B, out, H, W]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&swish(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&swish(&self.norm2.forward(&h)?)?)?;
        match &self.nin_shortcut {
            Some(nin) => nin.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head spatial self-attention over all `H·W` positions with 1×1-conv projections.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
    channels: usize,
}

impl AttnBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: normalize(channels, groups, vb.pp("norm"))?,
            q: conv(channels, channels, 1, 1, vb.pp("q"))?,
            k: conv(channels, channels, 1, 1, vb.pp("k"))?,
            v: conv(channels, channels, 1, 1, vb.pp("v"))?,
            proj_out: conv(channels, channels, 1, 1, vb.pp("proj_out"))?,
            channels,
        })
    }
}

impl Module for AttnBlock {
    // [B, C, H, W] -> [B, C, H, W]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hn = self.norm.forward(x)?;
        let q = self.q.forward(&hn)?.reshape((b, c, h * w))?;
        let k = self.k.forward(&hn)?.reshape((b, c, h * w))?;
        let v = self.v.forward(&hn)?.reshape((b, c, h * w))?;
        // [B, N(query), C] x [B, C, N(key)] -> [B, N, N], softmax over keys
        let scores =
            (q.transpose(1, 2)?.contiguous()?.matmul(&k)? * (self.channels as f64).powf(-0.5))?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        // o[c, i] = sum_j v[c, j] · A[i, j]: [B, C, N] x [B, N(key), N(query)]
        let o = v
            .matmul(&attn.transpose(1, 2)?.contiguous()?)?
            .reshape((b, c, h, w))?;
        x + self.proj_out.forward(&o)?
    }
}

/// Halves the resolution; taming pads only right and bottom, so the stride-2 grid is anchored at
/// the top-left pixel.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv,
}

impl Module for Downsample {
    // [B, C, H, W] -> [B, C, H/2, W/2]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_padded(x, [0, 1, 0, 1])
    }
}

/// Nearest-neighbour ×2 followed by a 3×3 conv.
#[derive(Debug, Clone)]
struct Upsample {
    conv: Conv,
}

impl Module for Upsample {
    // [B, C, H, W] -> [B, C, 2H, 2W]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&kernels::upsample2(x)?)
    }
}

/// One resolution level: residual blocks, each followed by its attention block when the level
/// has attention (taming keeps `attn` empty otherwise).
#[derive(Debug, Clone)]
struct Level<R> {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<R>,
}

impl<R: Module> Level<R> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h)?;
            if let Some(attn) = self.attns.get(i) {
                h = attn.forward(&h)?;
            }
        }
        match &self.resample {
            Some(r) => r.forward(&h),
            None => Ok(h),
        }
    }
}

/// `mid.block_1`, `mid.attn_1`, `mid.block_2`.
#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(channels, channels, groups, vb.pp("block_1"))?,
            attn_1: AttnBlock::new(channels, groups, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(channels, channels, groups, vb.pp("block_2"))?,
        })
    }
}

impl Module for Mid {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

/// The image encoder: `[B, in_channels, H, W]` → `[B, z_channels, H/f, W/f]`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv,
    down: Vec<Level<Downsample>>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    /// Builds the encoder from `vb` rooted at `encoder.` (channel bookkeeping as in taming's
    /// constructor, including the nominal `curr_res` that decides where attention goes).
    pub fn new(dd: &DdConfig, vb: VarBuilder) -> Result<Self> {
        let n_levels = dd.ch_mult.len();
        let conv_in = conv(dd.in_channels, dd.ch, 3, 1, vb.pp("conv_in"))?;
        let mut curr_res = dd.resolution;
        let mut block_in = dd.ch;
        let mut down = Vec::with_capacity(n_levels);
        for level in 0..n_levels {
            let vb_l = vb.pp("down").pp(level);
            // taming's `in_ch_mult = (1,) + ch_mult`
            block_in = dd.ch * if level == 0 { 1 } else { dd.ch_mult[level - 1] };
            let block_out = dd.ch * dd.ch_mult[level];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for i in 0..dd.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    dd.norm_groups,
                    vb_l.pp("block").pp(i),
                )?);
                block_in = block_out;
                if dd.attn_resolutions.contains(&curr_res) {
                    attns.push(AttnBlock::new(
                        block_in,
                        dd.norm_groups,
                        vb_l.pp("attn").pp(i),
                    )?);
                }
            }
            let resample = if level + 1 != n_levels {
                curr_res /= 2;
                Some(Downsample {
                    conv: conv(block_in, block_in, 3, 2, vb_l.pp("downsample").pp("conv"))?,
                })
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            down,
            mid: Mid::new(block_in, dd.norm_groups, vb.pp("mid"))?,
            norm_out: normalize(block_in, dd.norm_groups, vb.pp("norm_out"))?,
            conv_out: conv(block_in, dd.z_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    // [B, 3, H, W] in [-1, 1] -> [B, z_channels, H/f, W/f]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            h = level.forward(&h)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&swish(&self.norm_out.forward(&h)?)?)
    }
}

/// The image decoder: `[B, z_channels, s, s]` → `[B, out_ch, f·s, f·s]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv,
    mid: Mid,
    /// Indexed by level (`up.0` is the full-resolution level); run from the last to the first.
    up: Vec<Level<Upsample>>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    /// Builds the decoder from `vb` rooted at `decoder.` (or `decoder.decoder.` for the DWT
    /// variant); `out_ch` is 3, or 12 for the wavelet decoder.
    pub fn new(dd: &DdConfig, out_ch: usize, vb: VarBuilder) -> Result<Self> {
        let n_levels = dd.ch_mult.len();
        let mut block_in = dd.ch * dd.ch_mult[n_levels - 1];
        let mut curr_res = dd.resolution / (1 << (n_levels - 1));
        let conv_in = conv(dd.z_channels, block_in, 3, 1, vb.pp("conv_in"))?;
        let mid = Mid::new(block_in, dd.norm_groups, vb.pp("mid"))?;
        let mut up = Vec::with_capacity(n_levels);
        for level in (0..n_levels).rev() {
            let vb_l = vb.pp("up").pp(level);
            let block_out = dd.ch * dd.ch_mult[level];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for i in 0..dd.num_res_blocks + 1 {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    dd.norm_groups,
                    vb_l.pp("block").pp(i),
                )?);
                block_in = block_out;
                if dd.attn_resolutions.contains(&curr_res) {
                    attns.push(AttnBlock::new(
                        block_in,
                        dd.norm_groups,
                        vb_l.pp("attn").pp(i),
                    )?);
                }
            }
            let resample = if level != 0 {
                curr_res *= 2;
                Some(Upsample {
                    conv: conv(block_in, block_in, 3, 1, vb_l.pp("upsample").pp("conv"))?,
                })
            } else {
                None
            };
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: normalize(block_in, dd.norm_groups, vb.pp("norm_out"))?,
            conv_out: conv(block_in, out_ch, 3, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    // [B, z_channels, s, s] -> [B, out_ch, f·s, f·s], unclamped
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid.forward(&h)?;
        for level in self.up.iter().rev() {
            h = level.forward(&h)?;
        }
        self.conv_out.forward(&swish(&self.norm_out.forward(&h)?)?)
    }
}
