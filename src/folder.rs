//! A model folder: the original files found by their original names (`config.json`,
//! `pytorch_model.bin` / `model.safetensors`, `bpe.model`, the VQGAN `*.ckpt` and its
//! `.config.yml`), loaded together, with the folder's own sampling defaults
//! (`generation_config.json`, as Hugging Face model folders carry) if it has them.

use crate::config::Config;
use crate::error::{Result, invalid};
use crate::model::load::LoadReport;
use crate::model::{Precision, Rudolph};
use crate::pipelines::Warning;
use crate::pipelines::images::ImageRank;
use crate::tokenizer::TextTokenizer;
use crate::vae::Vqgan;
use crate::vocabulary::Vocabulary;
use crate::weights::{Checkpoint, LoadOptions};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Where each part comes from; explicit paths override what the folder holds.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    pub dir: Option<PathBuf>,
    /// A preset name or a `config.json` path; default: the folder's `config.json`, else the
    /// preset the weights' shapes match.
    pub config: Option<String>,
    pub weights: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub vae_config: Option<PathBuf>,
    /// Load weights (of the transformer or the VQGAN) that hold NaN or infinite values instead
    /// of refusing them ([`crate::weights::LoadOptions::allow_non_finite`]).
    pub allow_non_finite: bool,
}

/// The files a [`ModelSpec`] resolves to.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: Option<String>,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub vae: Option<PathBuf>,
    pub vae_config: Option<PathBuf>,
}

impl ModelSpec {
    pub fn resolve(&self) -> Result<ModelFiles> {
        let dir = self.dir.as_deref();
        if let Some(d) = dir
            && !d.is_dir()
        {
            return Err(invalid(if d.exists() {
                format!(
                    "{} is a file, not a model folder: put it in a folder with the other files (or name the weights alone with `rudolph inspect`/`convert`)",
                    d.display()
                )
            } else {
                format!("model folder {} does not exist", d.display())
            }));
        }
        let find = |names: &[&str]| {
            dir.and_then(|d| names.iter().map(|n| d.join(n)).find(|p| p.is_file()))
        };
        let weights = match &self.weights {
            Some(p) => p.clone(),
            None => find(&["model.safetensors", "pytorch_model.bin"]).ok_or_else(|| {
                invalid(format!(
                    "no weights: {} holds neither model.safetensors nor pytorch_model.bin",
                    dir.map_or("(no model folder)".into(), |d| d.display().to_string())
                ))
            })?,
        };
        let tokenizer = match &self.tokenizer {
            Some(p) => p.clone(),
            None => find(&["bpe.model"]).ok_or_else(|| {
                invalid("no tokenizer: the model folder has no bpe.model, and none was named")
            })?,
        };
        let vae = match &self.vae {
            Some(p) => Some(p.clone()),
            None => match dir {
                Some(d) => find_vqgan(d)?,
                None => None,
            },
        };
        let config = self
            .config
            .clone()
            .or_else(|| find(&["config.json"]).map(|p| p.display().to_string()));
        Ok(ModelFiles {
            config,
            weights,
            tokenizer,
            vae,
            vae_config: self.vae_config.clone(),
        })
    }
}

/// A [`ModelSpec`] opened: its files, the transformer's checkpoint and the configuration that
/// reads it.
pub struct OpenedModel {
    pub files: ModelFiles,
    pub checkpoint: Checkpoint,
    pub config: Config,
}

impl ModelSpec {
    /// Resolves the files and opens the weights, read with the given configuration (or the
    /// folder's `config.json`), else with the preset their shapes match.
    pub fn open(&self) -> Result<OpenedModel> {
        let files = self.resolve()?;
        let checkpoint = Checkpoint::open(&files.weights)?;
        let config = match &files.config {
            Some(c) => Config::from_name_or_path(c)?,
            None => {
                let preset = Rudolph::preset_of(&checkpoint).ok_or_else(|| {
                    invalid(format!(
                        "{}: no config.json beside it and its shapes match no preset; name its configuration",
                        files.weights.display()
                    ))
                })?;
                Config::preset(preset)?
            }
        };
        Ok(OpenedModel {
            files,
            checkpoint,
            config,
        })
    }
}

/// A VQGAN checkpoint by its name: any `*.ckpt` (the original's), or `vqgan*.safetensors`.
pub(crate) fn is_vqgan_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".ckpt") || (name.starts_with("vqgan") && name.ends_with(".safetensors"))
}

/// The one VQGAN checkpoint (see [`is_vqgan_file`]) in a folder; several are an error naming
/// them.
fn find_vqgan(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| crate::Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_vqgan_file(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(invalid(format!(
            "{} holds several VQGAN checkpoints ({}); name the one to use",
            dir.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Defaults a model folder sets for its own generation (`generation_config.json`); a command-
/// line flag still overrides each.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Classifier-free guidance scale for pictures (`rudolph image --guidance`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f32>,
    /// What `rudolph image` ranks its candidates by (`--rank`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_rank: Option<ImageRank>,
    /// The template `rudolph classify` puts each class in (`--template`): a text with the
    /// class's place marked `{}`, or `{caption}` to put it in the picture's own captions
    /// ([`classify_by_caption`](crate::pipelines::classify::classify_by_caption)). Without it
    /// the class is the whole text, as in the original.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classify_template: Option<String>,
}

impl GenerationConfig {
    pub const FILE: &'static str = "generation_config.json";

    /// The folder's `generation_config.json`, or the defaults when it has none.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = crate::text_file::read(&path).map_err(|source| crate::Error::Io {
            path: path.clone(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            invalid(format!(
                "{}: {e} (expected {{\"guidance_scale\": number, \"image_rank\": \"codes\" or \"decoded\", \"classify_template\": text}}, each optional)",
                path.display()
            ))
        })?;
        if let Some(g) = config.guidance_scale {
            crate::pipelines::images::check_guidance(g)
                .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        }
        Ok(config)
    }
}

/// A loaded model with its tokenizer and, when present, its VQGAN.
pub struct Loaded {
    pub model: Rudolph,
    pub tokenizer: TextTokenizer,
    pub vae: Option<Vqgan>,
    pub report: LoadReport,
    pub files: ModelFiles,
    /// The folder's generation defaults (empty without a folder or the file).
    pub generation: GenerationConfig,
    /// The words of the model's training texts, when its folder lists them
    /// (`vocabulary.txt`).
    pub vocabulary: Option<Vocabulary>,
}

impl Loaded {
    /// Loads every part on `device`; the transformer's weights in `dtype` (f32 is exact; f16 and
    /// bf16 halve the memory and suit GPUs).
    pub fn load(spec: &ModelSpec, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_as(spec, device, Precision::Float(dtype))
    }

    /// As [`Loaded::load`] in any [`Precision`]: a quantized model is quantized layer by layer
    /// as it is read, so the float weights are never all in memory.
    pub fn load_as(spec: &ModelSpec, device: &Device, precision: Precision) -> Result<Self> {
        let OpenedModel {
            files,
            checkpoint,
            config,
        } = spec.open()?;
        let (generation, vocabulary) = match &spec.dir {
            Some(d) => (GenerationConfig::read(d)?, Vocabulary::read(d)?),
            None => (GenerationConfig::default(), None),
        };
        let options = LoadOptions {
            allow_non_finite: spec.allow_non_finite,
        };
        let (model, report) =
            Rudolph::from_checkpoint_with(&checkpoint, &config, precision, device, options)?;
        let tokenizer = TextTokenizer::load(&files.tokenizer)?;
        let vae = match &files.vae {
            Some(p) => Some(Vqgan::load_with(
                p,
                files.vae_config.as_deref(),
                device,
                options,
            )?),
            None => None,
        };
        Ok(Self {
            model,
            tokenizer,
            vae,
            report,
            files,
            generation,
            vocabulary,
        })
    }

    /// The guidance scale for pictures: `flag` if given, else the folder's, else none (1).
    pub fn guidance(&self, flag: Option<f32>) -> f32 {
        flag.or(self.generation.guidance_scale)
            .unwrap_or(crate::pipelines::defaults::GUIDANCE)
    }

    /// What to rank generated pictures by: `flag` if given, else the folder's, else by codes
    /// (rc1).
    pub fn image_rank(&self, flag: Option<ImageRank>) -> ImageRank {
        flag.or(self.generation.image_rank).unwrap_or_default()
    }

    /// The template to classify with: `flag` if given, else the folder's, else none (the class
    /// is the whole text, as in the original).
    pub fn classify_template(&self, flag: Option<&str>) -> String {
        flag.or(self.generation.classify_template.as_deref())
            .unwrap_or_default()
            .to_string()
    }

    /// The warning for the words of `text` the model cannot read (`what` names the text):
    /// those its folder's vocabulary lacks, or, without one, those its tokenizer cannot spell
    /// (see [`crate::vocabulary::check`]).
    pub fn unknown_words(&self, what: &str, text: &str) -> Option<Warning> {
        crate::vocabulary::check(&self.tokenizer, self.vocabulary.as_ref(), what, text)
    }

    /// The VQGAN, or an error saying the task needs one.
    pub fn vae(&self) -> Result<&Vqgan> {
        self.vae.as_ref().ok_or_else(|| {
            invalid("this task needs the VQGAN: put its .ckpt in the model folder or name it")
        })
    }
}
