//! Model configurations: the published presets and the original constructor arguments
//! (`ruDolphModel.__init__`) as read from a `config.json`.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path} is not a valid RuDOLPH config.json: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("unknown preset '{0}' (known: {known})", known = Config::PRESET_NAMES.join(", "))]
    UnknownPreset(String),
    #[error("inconsistent config: {0}")]
    Inconsistent(String),
}

/// The constructor arguments of the original `ruDolphModel` (rc1 and rc10 share the layout; the
/// rc10-only special-token counts default to 0). Field names are the original argument names so a
/// `config.json` written from Python reads as is; unknown arguments (`device`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub num_layers: usize,
    /// Text vocabulary before the rc10 special tokens: BPE ids + one position token per left slot.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_dropout")]
    pub embedding_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub output_dropout_prob: f64,
    #[serde(default = "default_text_len")]
    pub l_text_seq_length: usize,
    #[serde(default = "default_text_len")]
    pub r_text_seq_length: usize,
    #[serde(default = "default_kernel")]
    pub kernel_size: usize,
    #[serde(default = "default_last_kernel")]
    pub last_kernel_size: usize,
    #[serde(default = "default_tokens_per_dim")]
    pub image_tokens_per_dim: usize,
    #[serde(default = "default_image_vocab")]
    pub image_vocab_size: usize,
    #[serde(default)]
    pub text_special_tokens: usize,
    #[serde(default)]
    pub image_special_tokens: usize,
    #[serde(default = "yes")]
    pub cogview_sandwich_layernorm: bool,
    #[serde(default = "yes")]
    pub cogview_pb_relax: bool,
    #[serde(default)]
    pub cogview_layernorm_prescale: bool,
    #[serde(default)]
    pub custom_relax: bool,
    #[serde(default = "yes")]
    pub is_bool_mask: bool,
    #[serde(default = "default_activation")]
    pub mlp_activation: String,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_text_len() -> usize {
    64
}
fn default_kernel() -> usize {
    7
}
fn default_last_kernel() -> usize {
    9
}
fn default_tokens_per_dim() -> usize {
    16
}
fn default_image_vocab() -> usize {
    8192
}
fn yes() -> bool {
    true
}
fn default_activation() -> String {
    "gelu_jit".into()
}

impl Config {
    pub const PRESET_NAMES: [&'static str; 5] = ["350m", "350m-v2", "1.3b", "2.7b", "2.7b-fbc2"];

    /// A published configuration by name. `350m` is rudolph 0.0.1rc1's model.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let base = |layers, hidden, heads, l, d, r, k, last_k, txt_spc, img_spc| Config {
            num_layers: layers,
            vocab_size: 16384 + l,
            hidden_size: hidden,
            num_attention_heads: heads,
            embedding_dropout_prob: 0.1,
            attention_dropout_prob: 0.1,
            output_dropout_prob: 0.1,
            l_text_seq_length: l,
            r_text_seq_length: r,
            kernel_size: k,
            last_kernel_size: last_k,
            image_tokens_per_dim: d,
            image_vocab_size: 8192,
            text_special_tokens: txt_spc,
            image_special_tokens: img_spc,
            cogview_sandwich_layernorm: true,
            cogview_pb_relax: true,
            cogview_layernorm_prescale: false,
            custom_relax: false,
            is_bool_mask: true,
            mlp_activation: "gelu_jit".into(),
        };
        let cfg = match name.to_ascii_lowercase().as_str() {
            "350m" | "350m-v1" => base(24, 1024, 16, 64, 16, 64, 7, 9, 0, 0),
            "350m-v2" => base(24, 1024, 16, 64, 16, 64, 7, 9, 384, 384),
            "1.3b" => base(24, 2048, 16, 128, 32, 128, 9, 11, 2048, 64),
            "2.7b" | "2.7b-fbc2" => base(32, 2560, 32, 384, 24, 128, 7, 9, 1024, 1024),
            _ => return Err(ConfigError::UnknownPreset(name.to_string())),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a `config.json` holding the original constructor arguments.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = crate::text_file::read(path).map_err(|source| ConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        let cfg: Config = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: shown.clone(),
            source,
        })?;
        cfg.validate()
            .map_err(|e| ConfigError::Inconsistent(format!("{shown}: {e}")))?;
        Ok(cfg)
    }

    /// A preset name, or else a path to a `config.json`.
    pub fn from_name_or_path(spec: &str) -> Result<Self, ConfigError> {
        let path = Path::new(spec);
        if path.is_file() {
            return Self::from_json_file(path);
        }
        if path.is_dir() {
            let file = path.join("config.json");
            if file.is_file() {
                return Self::from_json_file(&file);
            }
            return Err(ConfigError::Inconsistent(format!(
                "{spec} is a folder without a config.json (name a preset or a config.json file)"
            )));
        }
        Self::preset(spec)
    }

    /// Rejects argument combinations the original would build into a broken model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError::Inconsistent(msg));
        let nonzero = [
            ("num_layers", self.num_layers),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("l_text_seq_length", self.l_text_seq_length),
            ("r_text_seq_length", self.r_text_seq_length),
            ("image_tokens_per_dim", self.image_tokens_per_dim),
            ("image_vocab_size", self.image_vocab_size),
            ("kernel_size", self.kernel_size),
            ("last_kernel_size", self.last_kernel_size),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        // Far above every published model (2.7B: 32 layers, 2560 wide, 384 + 576 + 128
        // positions), and low enough that no size derived from them overflows, so that a hostile
        // file is refused here rather than by an allocation or a wrapped sum.
        let bounds = [
            ("num_layers", self.num_layers, 256),
            ("hidden_size", self.hidden_size, 1 << 15),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("l_text_seq_length", self.l_text_seq_length, 1 << 12),
            ("r_text_seq_length", self.r_text_seq_length, 1 << 12),
            ("image_tokens_per_dim", self.image_tokens_per_dim, 128),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("image_vocab_size", self.image_vocab_size, 1 << 20),
            ("text_special_tokens", self.text_special_tokens, 1 << 16),
            ("image_special_tokens", self.image_special_tokens, 1 << 16),
            ("kernel_size", self.kernel_size, 255),
            ("last_kernel_size", self.last_kernel_size, 255),
        ];
        for (name, value, limit) in bounds {
            if value > limit {
                return fail(format!("{name} is {value}, above the limit of {limit}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return fail(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.vocab_size <= self.l_text_seq_length + 4 {
            return fail(format!(
                "vocab_size {} must hold the 4 special ids, the BPE ids and {} left-text position tokens",
                self.vocab_size, self.l_text_seq_length
            ));
        }
        for (name, p) in [
            ("embedding_dropout_prob", self.embedding_dropout_prob),
            ("attention_dropout_prob", self.attention_dropout_prob),
            ("output_dropout_prob", self.output_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return fail(format!("{name} {p} is outside [0, 1)"));
            }
        }
        if self.cogview_layernorm_prescale || self.custom_relax {
            return fail(
                "cogview_layernorm_prescale and custom_relax are off in every published model and not supported".into(),
            );
        }
        if !self.cogview_sandwich_layernorm || !self.cogview_pb_relax {
            return fail("every published model uses cogview_sandwich_layernorm and cogview_pb_relax; turning them off is not supported".into());
        }
        if !matches!(self.mlp_activation.as_str(), "gelu" | "gelu_jit") {
            return fail(format!(
                "mlp_activation '{}' is not 'gelu' or 'gelu_jit'",
                self.mlp_activation
            ));
        }
        Ok(())
    }

    /// The name of the preset this configuration equals, if any (dropouts ignored).
    pub fn matching_preset(&self) -> Option<&'static str> {
        Self::PRESET_NAMES.into_iter().find(|name| {
            let p = Self::preset(name).expect("presets are valid");
            p.num_layers == self.num_layers
                && p.vocab_size == self.vocab_size
                && p.hidden_size == self.hidden_size
                && p.num_attention_heads == self.num_attention_heads
                && p.l_text_seq_length == self.l_text_seq_length
                && p.r_text_seq_length == self.r_text_seq_length
                && p.kernel_size == self.kernel_size
                && p.last_kernel_size == self.last_kernel_size
                && p.image_tokens_per_dim == self.image_tokens_per_dim
                && p.image_vocab_size == self.image_vocab_size
                && p.text_special_tokens == self.text_special_tokens
                && p.image_special_tokens == self.image_special_tokens
        })
    }

    /// The original's constructor arguments as a `config.json`, so that
    /// `ruDolphModel(**json.load(open("config.json")))` builds this model: a model without
    /// special tokens gets rudolph rc1's arguments (the only release whose constructor takes
    /// `cogview_layernorm_prescale` and `custom_relax`), one with special tokens rc10's (which
    /// adds the two special-token counts and drops those two); both with `"device": "cpu"` and
    /// `"gradient_checkpointing": null`, which the constructor requires but which do not
    /// describe the model. [`Config::from_json_file`] reads either back.
    pub fn to_original_json(&self) -> String {
        let json = if self.text_special_tokens == 0 && self.image_special_tokens == 0 {
            serde_json::to_string_pretty(&OriginalArgs::rc1(self))
        } else {
            serde_json::to_string_pretty(&OriginalArgs::rc10(self))
        };
        json.expect("the constructor arguments are plain numbers, booleans and strings")
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Image tokens per picture, `D²`.
    pub fn image_seq_length(&self) -> usize {
        self.image_tokens_per_dim * self.image_tokens_per_dim
    }
    /// `T = l + N + r`.
    pub fn total_seq_length(&self) -> usize {
        self.l_text_seq_length + self.image_seq_length() + self.r_text_seq_length
    }
    /// The model's text vocabulary `V` (BPE + specials + position tokens): head columns `[0, V)`.
    pub fn text_vocab(&self) -> usize {
        self.vocab_size + self.text_special_tokens
    }
    /// The model's image vocabulary `Vi`: head columns `[V, V + Vi)`.
    pub fn image_vocab(&self) -> usize {
        self.image_vocab_size + self.image_special_tokens
    }
    /// The width of the logits, `V + Vi`.
    pub fn total_vocab(&self) -> usize {
        self.text_vocab() + self.image_vocab()
    }
    /// The id that stands for a pad at left-text slot `i`.
    pub fn left_position_token(&self, slot: usize) -> u32 {
        (self.text_vocab() - self.l_text_seq_length + slot) as u32
    }
    /// Side of the picture the model works on, in pixels (8 per token).
    pub fn image_size(&self) -> usize {
        8 * self.image_tokens_per_dim
    }
}

/// `ruDolphModel.__init__`'s arguments in its order; the release-only ones are
/// `None` where that release's constructor does not take them.
#[derive(Serialize)]
struct OriginalArgs<'a> {
    device: &'static str,
    num_layers: usize,
    vocab_size: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    embedding_dropout_prob: f64,
    attention_dropout_prob: f64,
    output_dropout_prob: f64,
    l_text_seq_length: usize,
    r_text_seq_length: usize,
    kernel_size: usize,
    last_kernel_size: usize,
    image_tokens_per_dim: usize,
    image_vocab_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_special_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_special_tokens: Option<usize>,
    cogview_sandwich_layernorm: bool,
    cogview_pb_relax: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    cogview_layernorm_prescale: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom_relax: Option<bool>,
    is_bool_mask: bool,
    mlp_activation: &'a str,
    /// Always written, as `null` (off): the original's default, and the only value its rc10
    /// forward runs with.
    gradient_checkpointing: Option<usize>,
}

impl<'a> OriginalArgs<'a> {
    fn rc1(c: &'a Config) -> Self {
        Self {
            cogview_layernorm_prescale: Some(c.cogview_layernorm_prescale),
            custom_relax: Some(c.custom_relax),
            ..Self::common(c)
        }
    }

    fn rc10(c: &'a Config) -> Self {
        Self {
            text_special_tokens: Some(c.text_special_tokens),
            image_special_tokens: Some(c.image_special_tokens),
            ..Self::common(c)
        }
    }

    fn common(c: &'a Config) -> Self {
        Self {
            device: "cpu",
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_attention_heads: c.num_attention_heads,
            embedding_dropout_prob: c.embedding_dropout_prob,
            attention_dropout_prob: c.attention_dropout_prob,
            output_dropout_prob: c.output_dropout_prob,
            l_text_seq_length: c.l_text_seq_length,
            r_text_seq_length: c.r_text_seq_length,
            kernel_size: c.kernel_size,
            last_kernel_size: c.last_kernel_size,
            image_tokens_per_dim: c.image_tokens_per_dim,
            image_vocab_size: c.image_vocab_size,
            text_special_tokens: None,
            image_special_tokens: None,
            cogview_sandwich_layernorm: c.cogview_sandwich_layernorm,
            cogview_pb_relax: c.cogview_pb_relax,
            cogview_layernorm_prescale: None,
            custom_relax: None,
            is_bool_mask: c.is_bool_mask,
            mlp_activation: &c.mlp_activation,
            gradient_checkpointing: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_head_widths() {
        for (name, width, seq) in [
            ("350m", 24640, 384),
            ("350m-v2", 25408, 384),
            ("1.3b", 26816, 1280),
            ("2.7b", 27008, 1088),
            ("2.7b-fbc2", 27008, 1088),
        ] {
            let c = Config::preset(name).unwrap();
            assert_eq!(c.total_vocab(), width, "{name}");
            assert_eq!(c.total_seq_length(), seq, "{name}");
            assert_eq!(
                c.matching_preset().map(|p| Config::preset(p).unwrap()),
                Some(c)
            );
        }
    }

    #[test]
    fn inconsistent_configs_are_rejected_with_a_reason() {
        let mut c = Config::preset("350m").unwrap();
        c.num_attention_heads = 15;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");
        assert!(Config::preset("9b").is_err());
    }

    /// The rc1 constructor's arguments exactly, in its order; rc10's without the
    /// two rc1-only ones and with the special-token counts. Each reads back as the same model.
    #[test]
    fn the_original_constructor_arguments_are_written_exactly() {
        let keys = |c: &Config| -> Vec<String> {
            let text = c.to_original_json();
            let back: Config = serde_json::from_str(&text).unwrap();
            assert_eq!(&back, c);
            // The order of the text, not of a parsed map.
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["device"], "cpu");
            assert!(v["gradient_checkpointing"].is_null());
            let mut keys: Vec<(usize, String)> = v
                .as_object()
                .unwrap()
                .keys()
                .map(|k| (text.find(&format!("\"{k}\"")).unwrap(), k.clone()))
                .collect();
            keys.sort();
            keys.into_iter().map(|(_, k)| k).collect()
        };
        let common_head = [
            "device",
            "num_layers",
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "embedding_dropout_prob",
            "attention_dropout_prob",
            "output_dropout_prob",
            "l_text_seq_length",
            "r_text_seq_length",
            "kernel_size",
            "last_kernel_size",
            "image_tokens_per_dim",
            "image_vocab_size",
        ];
        let rc1: Vec<&str> = common_head
            .iter()
            .copied()
            .chain([
                "cogview_sandwich_layernorm",
                "cogview_pb_relax",
                "cogview_layernorm_prescale",
                "custom_relax",
                "is_bool_mask",
                "mlp_activation",
                "gradient_checkpointing",
            ])
            .collect();
        let rc10: Vec<&str> = common_head
            .iter()
            .copied()
            .chain([
                "text_special_tokens",
                "image_special_tokens",
                "cogview_sandwich_layernorm",
                "cogview_pb_relax",
                "is_bool_mask",
                "mlp_activation",
                "gradient_checkpointing",
            ])
            .collect();
        assert_eq!(keys(&Config::preset("350m").unwrap()), rc1);
        assert_eq!(keys(&Config::preset("1.3b").unwrap()), rc10);
    }
}
