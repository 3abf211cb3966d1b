//! The built-in model: a small RuDOLPH with its VQGAN and tokenizer, trained from nothing on the
//! shapes world ([`crate::world`]) by `rudolph world train`, and kept in the repository under
//! `models/shapes/`. Every command uses it when no `--model` is given, so a fresh clone draws,
//! captions and classifies without a download.
//!
//! Its files (8.6 MB) are compiled into the library, so a binary that was copied, installed by
//! `cargo install` or moved away from its source tree still has them. The commands read model
//! folders from disk, so the first use writes the files once into a cache folder named after
//! their content, where every later run (and every other binary with the same model) finds them.

use crate::error::{Error, Result, invalid};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Overrides where the built-in model folder is (e.g. to try a retrained one in its place).
pub const ENV: &str = "RUDOLPH_BUILTIN";

/// The folder's files, by name.
const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../models/shapes/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../models/shapes/generation_config.json"),
    ),
    ("bpe.model", include_bytes!("../models/shapes/bpe.model")),
    (
        "vocabulary.txt",
        include_bytes!("../models/shapes/vocabulary.txt"),
    ),
    (
        "model.safetensors",
        include_bytes!("../models/shapes/model.safetensors"),
    ),
    (
        "vqgan.safetensors",
        include_bytes!("../models/shapes/vqgan.safetensors"),
    ),
    (
        "vqgan.config.yml",
        include_bytes!("../models/shapes/vqgan.config.yml"),
    ),
];

/// Written last into a cache folder: a folder without it was interrupted and is rewritten.
const COMPLETE: &str = ".complete";

/// The built-in model folder: `$RUDOLPH_BUILTIN` if set, else the compiled-in files written
/// out once under the user's cache folder (`$XDG_CACHE_HOME/rudolph`, else
/// `~/.cache/rudolph`, else the system's temporary folder).
pub fn dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(ENV) {
        let dir = PathBuf::from(p);
        return if dir.join("model.safetensors").is_file() {
            Ok(dir)
        } else {
            Err(invalid(format!(
                "{ENV}={} holds no built-in model (no model.safetensors); unset it to use the one compiled in",
                dir.display()
            )))
        };
    }
    let dir = cache_root().join(format!("builtin-{}", content_id()));
    if !dir.join(COMPLETE).is_file() {
        write_out(&dir)?;
    }
    Ok(dir)
}

/// A 64-bit FNV-1a hash of every file's name and bytes, in hex: a new model gets a new folder,
/// so an older binary's files are never mistaken for it.
fn content_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, bytes) in FILES {
            for &b in name.as_bytes().iter().chain(*bytes) {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{hash:016x}")
    })
}

fn cache_root() -> PathBuf {
    let from_env = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(xdg) = from_env("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("rudolph");
    }
    if let Some(home) = from_env("HOME") {
        return PathBuf::from(home).join(".cache").join("rudolph");
    }
    std::env::temp_dir().join("rudolph")
}

/// Writes the files into a fresh folder beside `dir` and renames it into place, so that a
/// concurrent run sees either no folder or a whole one; if another run got there first, its
/// folder is as good as ours.
fn write_out(dir: &Path) -> Result<()> {
    let io = |path: &Path, source: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let staging = parent.join(format!(".staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    }
    std::fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
    for (name, bytes) in FILES {
        let path = staging.join(name);
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    let marker = staging.join(COMPLETE);
    std::fs::write(&marker, content_id()).map_err(|e| io(&marker, e))?;
    if dir.exists() {
        // An interrupted earlier run left a folder without its marker: replace it.
        if !dir.join(COMPLETE).is_file() {
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
        }
    }
    match std::fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        Err(_) if dir.join(COMPLETE).is_file() => {
            // Best effort: ours is a duplicate of the folder another run just finished.
            let _ = std::fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(e) => Err(io(dir, e)),
    }
}
