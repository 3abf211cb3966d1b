//! How the weights are held: a float dtype (the model computes in it), float32 compute over
//! linear weights stored in f16 or bf16, or float32 compute over linear weights quantized to a
//! ggml block format.

use candle_core::DType;
use candle_core::quantized::GgmlDType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Float(DType),
    /// f32 activations, embeddings and norms; every linear weight stored in this dtype (f16 or
    /// bf16) and widened as it is used. On the CPU, faster than computing in f16 and as exact
    /// as f32 for a checkpoint saved in that dtype (the real RuDOLPH ones are f16).
    HalfWeights(DType),
    /// f32 activations, embeddings and norms; every linear weight in this format.
    Quantized(GgmlDType),
    /// Every linear product in bf16 with f32 accumulation (weights packed once in bf16,
    /// activations rounded as they enter a product), on the CPU's AMX tiles, else its AVX-512
    /// BF16 dot products, else AVX2; see [`crate::kernels::packed_bf16`].
    PackedBf16,
}

impl Precision {
    pub const NAMES: &'static str = "f32, f16, bf16, f16w / bf16w (f16 / bf16 linear weights, f32 compute), \
         q8 (8-bit blocks), q4k (4-bit k-quants) or packed-bf16 (alias amx: bf16 products on Intel AMX tiles, else AVX-512 BF16, else AVX2)";

    /// The dtype to load the checkpoint in (a quantized model is loaded in f32 first).
    pub fn load_dtype(self) -> DType {
        match self {
            Self::Float(d) => d,
            Self::HalfWeights(_) | Self::Quantized(_) | Self::PackedBf16 => DType::F32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Float(DType::F16) => "f16",
            Self::Float(DType::BF16) => "bf16",
            Self::Float(_) => "f32",
            Self::HalfWeights(DType::BF16) => "bf16w",
            Self::HalfWeights(_) => "f16w",
            Self::Quantized(GgmlDType::Q8_0) => "q8",
            Self::Quantized(_) => "q4k",
            Self::PackedBf16 => "packed-bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "f32" => Self::Float(DType::F32),
            "f16" => Self::Float(DType::F16),
            "bf16" => Self::Float(DType::BF16),
            "f16w" => Self::HalfWeights(DType::F16),
            "bf16w" => Self::HalfWeights(DType::BF16),
            "q8" => Self::Quantized(GgmlDType::Q8_0),
            "q4k" => Self::Quantized(GgmlDType::Q4K),
            "packed-bf16" | "amx" => Self::PackedBf16,
            _ => return Err(format!("'{s}': expected {}", Self::NAMES)),
        })
    }
}
