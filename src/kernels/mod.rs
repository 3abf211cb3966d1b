//! The computations the models are made of, each behind one function that picks how to run it:
//! candle's ops, a fused inference kernel, or a training kernel with its own backward pass.
//!
//! The models call only the functions in this file and never see an instruction set: what the
//! CPU can run is found once ([`cpu::Cpu`], capped by `$RUDOLPH_CPU`) and every kernel picks its
//! instructions from it. Nothing here imports from the crate above it.
//!
//! | file | computes |
//! | --- | --- |
//! | `cpu.rs` | what this CPU can run, and loops compiled per vector width |
//! | `activation.rs` | bias + GELU in one pass; the vectorisable `tanh` and `exp` |
//! | `attention.rs` | the masked softmax and fused attention, for inference |
//! | `differentiable.rs` | GELU, swish, LayerNorm and the masked softmax with their backward passes |
//! | `few_rows.rs` | `x·Wᵀ` for decoding steps (at most 8 rows), f32/f16/bf16 weights |
//! | `packed_bf16.rs` | `x·Wᵀ` on weights packed in bf16 (AMX tiles, AVX-512 BF16, AVX2) |
//! | `conv.rs` | the VQGAN's convolution, group norm and ×2 upsampling for training |

pub mod activation;
pub mod attention;
pub mod conv;
pub mod cpu;
mod differentiable;
pub mod few_rows;
pub mod packed_bf16;

pub use activation::exp;
pub use conv::ConvGeometry;
pub use cpu::{CPU_ENV, Cpu, Level};
pub use packed_bf16::PackedWeight;

use candle_core::{CpuStorage, D, DType, Layout, Module, Result, Tensor};

/// Masked attention scores become exactly −10000, not −inf: a fully masked row then attends
/// uniformly to every key of the call (future ones included) instead of producing NaN, as the
/// original does.
pub const MASK_VALUE: f64 = 10000.0;

/// PB-relax divides the scores by this before subtracting their maximum, then multiplies back.
const PB_RELAX_ALPHA: f64 = 32.0;

/// `(x − mean) / √(var + eps) · weight + bias` over the last dimension. `differentiable`: the
/// result must carry gradients (training).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    differentiable: bool,
) -> Result<Tensor> {
    if !differentiable {
        return candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32);
    }
    if differentiable::applies(x) {
        return differentiable::layer_norm(x, weight, bias, eps);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// `y + bias`, then GELU (tanh form) when `gelu`. `y`: `[…, out]`, `bias`: `[out]`.
pub fn bias_activation(y: Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    activation::bias_activation(y, bias, gelu)
}

/// The original's masking `s·m − 10000·(1−m)` then a softmax over the keys, with CogView's
/// PB-relax. `scores`: `[B, heads, Sq, Sk]`; `keep`: `[B or 1, 1, Sq, Sk]` of 0/1; `penalty`:
/// `10000·(1 − keep)`.
pub fn masked_softmax(
    scores: Tensor,
    keep: &Tensor,
    penalty: &Tensor,
    differentiable: bool,
) -> Result<Tensor> {
    if !differentiable {
        // Inference skips PB-relax's four passes over [B, heads, Sq, Sk]: softmax already
        // subtracts each row's maximum, so only rounding differs (far inside float32 parity).
        // Masking and softmax then share one pass on all cores.
        return attention::masked_softmax(scores, keep, penalty);
    }
    if differentiable::applies(&scores) {
        // PB-relax (scores / 32, minus their maximum, times 32) only shifts each row, which
        // softmax ignores: the training kernel does the same maths in one pass each way.
        return differentiable::masked_softmax(&scores, keep);
    }
    let scores = scores.broadcast_mul(keep)?.broadcast_sub(penalty)?;
    // PB-relax as the original computes it, for other devices.
    let t = scores.affine(1.0 / PB_RELAX_ALPHA, 0.0)?;
    let max = t
        .detach()
        .flatten_from(2)?
        .max_keepdim(D::Minus1)?
        .unsqueeze(D::Minus1)?;
    let scores = t.broadcast_sub(&max)?.affine(PB_RELAX_ALPHA, 0.0)?;
    candle_nn::ops::softmax(&scores, D::Minus1)
}

/// Attention fused from `scale · q·kᵀ` through the masked softmax to the context, for inference
/// on the CPU: `q` `[B, heads, Sq, hd]`, `k` and `v` `[B, heads, Sk, hd]` with contiguous rows
/// (views of the KV cache are), `keep` `[B or 1, 1, Sq, Sk]`. Returns the context
/// `[B, Sq, heads·hd]`, or `None` when the tensors do not suit the kernels (the caller then
/// computes it with candle's ops and [`masked_softmax`]).
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    match attention::decode_attention(q, k, v, keep, scale)? {
        Some(context) => Ok(Some(context)),
        None => attention::attention(q, k, v, keep, scale),
    }
}

/// `x` `[m, k]` · `w` `[n, k]`ᵀ → `[m, n]` in `x`'s dtype; an f16 or bf16 `w` under f32 `x` is
/// widened as it is read. Decoding steps (few rows) stream each weight row once on all cores.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if few_rows::applies(x, w) {
        return few_rows::matmul_t(x, w);
    }
    if w.dtype() != x.dtype() {
        return x.matmul(&w.to_dtype(x.dtype())?.t()?);
    }
    x.matmul(&w.t()?)
}

/// `x` `[m, k]` · the packed weight's rows `cols`, transposed → `[m, cols.len()]` (f32).
pub fn packed_matmul_t(
    x: &Tensor,
    w: &PackedWeight,
    cols: std::ops::Range<usize>,
) -> Result<Tensor> {
    packed_bf16::matmul_t(x, w, cols)
}

/// Whether the VQGAN's kernels of our own take `x`: f32 on the CPU, with or without gradients.
/// They split one picture's work over every core, where candle's group norm, swish and
/// upsampling run on one (a 128-px decode took 1.4 s with candle's ops, 0.8 s with ours), and
/// candle's CPU backward of a convolution is a naive transposed convolution.
fn cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A 2-D convolution `[B, C, H, W]` → `[B, O, H', W']` with `weight` `[O, C, k, k]`, the padding
/// and stride of `geometry`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: ConvGeometry,
) -> Result<Tensor> {
    if cpu_f32(x)
        && let Some(bias) = bias
    {
        return conv::conv2d(x, weight, bias, geometry);
    }
    // candle pads symmetrically; what one side has beyond that is added as zeros first.
    let [top, bottom, left, right] = geometry.pad;
    let common = top.min(bottom).min(left).min(right);
    let x = if [top, bottom, left, right] == [common; 4] {
        x.clone()
    } else {
        x.pad_with_zeros(2, top - common, bottom - common)?
            .pad_with_zeros(3, left - common, right - common)?
    };
    let y = x.conv2d(weight, common, geometry.stride, 1, 1)?;
    match bias {
        None => Ok(y),
        Some(bias) => y.broadcast_add(&bias.reshape((1, bias.dims1()?, 1, 1))?),
    }
}

/// taming's `GroupNorm` over `[B, C, H, W]` with `groups` groups.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    if cpu_f32(x) {
        return conv::group_norm(x, gamma, beta, groups, eps);
    }
    candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), gamma.dim(0)?, groups, eps)?.forward(x)
}

/// `x · sigmoid(x)` (taming's `nonlinearity`).
pub fn swish(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        return differentiable::swish(x);
    }
    x * candle_nn::ops::sigmoid(x)?
}

/// Nearest-neighbour upsampling ×2: `[B, C, H, W]` → `[B, C, 2H, 2W]`.
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        return conv::upsample2(x);
    }
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(2 * h, 2 * w)
}

/// A fresh (or read-only) f32 tensor in one contiguous block on the CPU, outside any graph.
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && !t.track_op()
}

/// A contiguous f32 tensor's elements.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel on a strided tensor".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

fn slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel on a strided tensor".into()))?;
    match storage {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("kernel on a non-f32 tensor"),
    }
}

#[cfg(test)]
mod tests {
    /// The kernels sit below the models: no file here names anything of the crate outside
    /// `kernels`.
    #[test]
    fn kernels_import_nothing_from_above() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/kernels");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = without_strings(line.split("//").next().unwrap_or(""));
                let code = code.as_str();
                for word in ["crate::", "super::super::"] {
                    for (at, _) in code.match_indices(word) {
                        let rest = &code[at + word.len()..];
                        let inside = word == "crate::" && rest.starts_with("kernels");
                        let own_tests = word == "super::super::"
                            && (rest.starts_with("activation")
                                || rest.starts_with("differentiable"));
                        assert!(
                            inside || own_tests,
                            "{}:{}: `{}` reaches above the kernels",
                            path.display(),
                            n + 1,
                            line.trim()
                        );
                    }
                }
            }
            files += 1;
        }
        assert!(files >= 7, "only {files} kernel files found");
    }

    /// The line with its string literals blanked.
    fn without_strings(line: &str) -> String {
        let mut inside = false;
        let mut escaped = false;
        line.chars()
            .map(|c| {
                let quote = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                if quote {
                    inside = !inside;
                }
                if inside || quote { ' ' } else { c }
            })
            .collect()
    }
}
