//! The built-in model: a small RuDOLPH with its VQGAN and tokenizer, trained from nothing on the
//! shapes world ([`crate::world`]) by `rudolph world train`, and kept in the repository under
//! `models/shapes/`. Every command uses it when no `--model` is given, so a fresh clone draws,
//! captions and classifies without a download.

use crate::error::{Result, invalid};
use std::path::PathBuf;

/// Overrides where the built-in model folder is (e.g. for an installed binary whose source
/// checkout moved).
pub const ENV: &str = "RUDOLPH_BUILTIN";

/// The built-in model folder: `$RUDOLPH_BUILTIN`, else `models/shapes` of the source tree this
/// binary was built from.
pub fn dir() -> Result<PathBuf> {
    let dir = match std::env::var_os(ENV) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/shapes"),
    };
    if dir.join("model.safetensors").is_file() {
        Ok(dir)
    } else {
        Err(invalid(format!(
            "the built-in model is not at {} (set {ENV} to its folder, or use another model folder)",
            dir.display()
        )))
    }
}
