//! Saving what training made: the model under its original tensor names (masks as bool, as
//! the original's buffers), and checkpoints that let a run continue exactly.
//!
//! A checkpoint folder holds `model.safetensors`, `config.json`, `optimizer.safetensors`
//! (`exp_avg.<name>`, `exp_avg_sq.<name>`) and `state.json` ([`State`]).

use super::run::RunSpec;
use super::trainer::Trainer;
use crate::config::Config;
use crate::error::{Error, Result, invalid};
use crate::model::LayerMasks;
use crate::model::load::masks_from_checkpoint;
use crate::weights::{Checkpoint, save_safetensors, save_safetensors_with_bools};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where a run stands, beside the tensors of a checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Optimizer steps taken; with the run's batch sizes it also fixes the next sample drawn.
    pub step: u64,
    /// The dropout generator's word position (a decimal string: it is a u128).
    pub dropout_position: String,
    pub run: RunSpec,
}

/// What [`load_checkpoint`] reads back.
pub struct Restored {
    pub config: Config,
    pub weights: HashMap<String, Tensor>,
    pub masks: LayerMasks,
    pub moments: HashMap<String, Tensor>,
    pub state: State,
}

/// Writes `model.safetensors` (original names, masks as bool) and `config.json` (the original's
/// constructor arguments) into `dir`.
pub fn save_model(trainer: &Trainer, dir: &Path) -> Result<()> {
    create_dir(dir)?;
    save_safetensors_with_bools(
        &trainer.state_dict()?,
        &dir.join("model.safetensors"),
        |name| name.ends_with("_mask"),
    )?;
    write(
        &dir.join("config.json"),
        &trainer.config().to_original_json(),
    )
}

/// Writes a full checkpoint of `trainer` into `dir`.
pub fn save_checkpoint(trainer: &Trainer, run: &RunSpec, dir: &Path) -> Result<()> {
    save_model(trainer, dir)?;
    save_safetensors(
        &trainer.optimizer_state(),
        &dir.join("optimizer.safetensors"),
    )?;
    let state = State {
        step: trainer.step(),
        dropout_position: trainer.dropout_position().to_string(),
        run: run.clone(),
    };
    let text = serde_json::to_string_pretty(&state).map_err(|e| invalid(e.to_string()))?;
    // Written last: a folder with a state.json is a complete checkpoint.
    write(&dir.join("state.json"), &text)
}

/// The checkpoint folder `path` names: itself if it holds a `state.json`, else its
/// `checkpoint-<step>` folder with the highest step.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("state.json").is_file())
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse::<u64>()
                .ok()?;
            Some((step, p))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
        .ok_or_else(|| {
            invalid(format!(
                "{} is no checkpoint (no state.json) and holds no checkpoint-<step> folder",
                path.display()
            ))
        })
}

/// Reads a checkpoint folder written by [`save_checkpoint`].
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<Restored> {
    let config = Config::from_json_file(&dir.join("config.json"))?;
    let model = Checkpoint::open(dir.join("model.safetensors"))?;
    let masks = masks_from_checkpoint(&model, device)?;
    let mut weights = HashMap::new();
    for name in model.names() {
        if !name.ends_with("_mask") {
            weights.insert(name.to_string(), model.load(name, DType::F32, device)?);
        }
    }
    let optimizer = Checkpoint::open(dir.join("optimizer.safetensors"))?;
    let moments = optimizer.load_all(DType::F32, device)?;
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|source| Error::Io {
        path: state_path.clone(),
        source,
    })?;
    let state: State = serde_json::from_str(&text).map_err(|e| {
        invalid(format!(
            "{}: not a training state: {e}",
            state_path.display()
        ))
    })?;
    Ok(Restored {
        config,
        weights,
        masks,
        moments,
        state,
    })
}

impl State {
    /// The dropout position as a number.
    pub fn dropout_position(&self) -> Result<u128> {
        self.dropout_position.parse().map_err(|_| {
            invalid(format!(
                "state.json: dropout_position '{}' is not a whole number",
                self.dropout_position
            ))
        })
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
