//! Shared helpers for the integration tests: the fixture folder and its manifest.

#![allow(dead_code)] // each test crate uses a different subset of these helpers

pub mod torch_writer;

use std::path::{Path, PathBuf};

use rudolph::weights::StoredDtype;

/// The fixture folder named by `value` (the `RUDOLPH_FIXTURES` variable), or the default
/// `../shared/fixtures` next to the crate. A missing folder is a test failure, never a skip.
pub fn fixtures_from(value: Option<std::ffi::OsString>) -> PathBuf {
    let dir = value
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        dir.is_dir(),
        "fixture folder {} does not exist; set RUDOLPH_FIXTURES to the folder holding manifest.json",
        dir.display()
    );
    dir
}

pub fn fixtures() -> PathBuf {
    fixtures_from(std::env::var_os("RUDOLPH_FIXTURES"))
}

pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// `manifest.json` entries of one file: (name, dtype, shape) in manifest order.
pub fn manifest(file: &str) -> Vec<(String, StoredDtype, Vec<usize>)> {
    let path = fixture("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    let entries = json["files"][file]
        .as_object()
        .unwrap_or_else(|| panic!("manifest.json has no tensor list for {file}"));
    // serde_json's map is sorted; the manifest lists tensors in state-dict order, so recover that
    // order from where each key appears in this file's section of the text.
    let section = text
        .find(&format!("\"{file}\""))
        .unwrap_or_else(|| panic!("{file} not found in manifest.json"));
    let position = |name: &str| {
        let key = serde_json::to_string(name).expect("name as JSON") + ":";
        text[section..]
            .find(&key)
            .map(|p| p + section)
            .unwrap_or(usize::MAX)
    };
    let mut entries: Vec<_> = entries.iter().collect();
    entries.sort_by_key(|(name, _)| position(name));
    entries
        .into_iter()
        .map(|(name, v)| {
            let dtype = parse_dtype(v["dtype"].as_str().expect("dtype is a string"));
            let shape = v["shape"]
                .as_array()
                .expect("shape is a list")
                .iter()
                .map(|d| d.as_u64().expect("dims are integers") as usize)
                .collect();
            (name.clone(), dtype, shape)
        })
        .collect()
}

pub fn parse_dtype(s: &str) -> StoredDtype {
    match s {
        "float64" => StoredDtype::F64,
        "float32" => StoredDtype::F32,
        "float16" => StoredDtype::F16,
        "bfloat16" => StoredDtype::BF16,
        "int64" => StoredDtype::I64,
        "int32" => StoredDtype::I32,
        "int16" => StoredDtype::I16,
        "int8" => StoredDtype::I8,
        "uint8" => StoredDtype::U8,
        "bool" => StoredDtype::Bool,
        other => panic!("unknown manifest dtype {other}"),
    }
}

/// A fresh, empty scratch folder under cargo's per-target temporary directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}
