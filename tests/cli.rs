//! The `rudolph` binary end to end on the fixture folder.

mod common;

use common::*;
use std::process::{Command, Output};

fn rudolph(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn inspect_reports_preset_parameters_dtypes_and_mask_version() {
    let manifest = json("manifest.json");
    let tensors = manifest["files"]["rudolph_tiny/model.safetensors"]
        .as_object()
        .unwrap();
    let parameters: u64 = tensors
        .iter()
        .filter(|(name, _)| !name.ends_with("_mask"))
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    for file in ["rudolph_tiny", "rudolph_tiny/pytorch_model.bin"] {
        let path = fixture(file);
        let doc = stdout_json(&rudolph(&["inspect", path.to_str().unwrap(), "--json"]));
        assert_eq!(doc["parameters"].as_u64(), Some(parameters), "{file}");
        assert_eq!(doc["mask_version"], "rc1", "{file}");
        assert_eq!(doc["dtypes"]["bool"], 4, "{file}");
        assert_eq!(
            doc["tensors"].as_u64(),
            Some(tensors.len() as u64),
            "{file}"
        );
    }
    let text = rudolph(&["inspect", fixture("rudolph_tiny").to_str().unwrap()]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("parameters"));
}

#[test]
fn inspect_of_a_non_checkpoint_fails_with_a_message() {
    let out = rudolph(&["inspect", fixture("tokenizer/bpe.model").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bpe.model"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
