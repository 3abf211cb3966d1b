//! Shared helpers of the integration tests: where the fixtures are, reading goldens, comparing.
#![allow(dead_code)] // each test binary uses a different subset

pub mod torch_writer;

use candle_core::{DType, Device, Tensor};
use rudolph::weights::StoredDtype;
use std::collections::HashMap;
use std::path::PathBuf;

/// The golden fixture folder: `$RUDOLPH_FIXTURES`, else `../shared/fixtures`. A missing folder
/// fails the test: parity that was not checked must not look green.
pub fn fixtures() -> PathBuf {
    fixtures_from(std::env::var_os("RUDOLPH_FIXTURES"))
}

/// The fixture folder named by `value` (the `RUDOLPH_FIXTURES` variable), or the default.
pub fn fixtures_from(value: Option<std::ffi::OsString>) -> PathBuf {
    let dir = match value {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.join("manifest.json").is_file(),
        "fixture folder {} is missing or incomplete (set RUDOLPH_FIXTURES to the golden fixtures)",
        dir.display()
    );
    dir
}

/// A fresh empty folder under the target dir, named after the test binary and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}-{name}", env!("CARGO_CRATE_NAME")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

/// Where the model and pipeline tests compute: `$RUDOLPH_TEST_DEVICE` (`cpu`, `cuda` or
/// `cuda:N`, as `--device` reads it), else the CPU. With a `--features cuda` build those two
/// suites run unchanged on a GPU this way.
pub fn device() -> Device {
    let name = std::env::var("RUDOLPH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    rudolph::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("RUDOLPH_TEST_DEVICE={name}: {e}"))
}

pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

pub fn json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn goldens(rel: &str) -> HashMap<String, Tensor> {
    goldens_on(rel, &Device::Cpu)
}

/// The goldens on the [`device`] the tiny model is built on, for feeding them to it.
pub fn device_goldens(rel: &str) -> HashMap<String, Tensor> {
    goldens_on(rel, &device())
}

fn goldens_on(rel: &str, device: &Device) -> HashMap<String, Tensor> {
    let p = fixture(rel);
    candle_core::safetensors::load(&p, device).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("golden tensor '{key}' is missing"))
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` everywhere, reporting the worst element.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f64> = flat_f64(got);
    let w: Vec<f64> = flat_f64(want);
    let mut worst = (0.0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        if excess > worst.0 || a.is_nan() != b.is_nan() {
            worst = (excess.max(f64::MIN_POSITIVE), i);
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: element {} differs: got {}, want {} (rtol {rtol}, atol {atol})",
        worst.1,
        g[worst.1],
        w[worst.1]
    );
}

pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn flat_u32(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| u32::try_from(v).unwrap())
        .collect()
}

pub fn tiny_config() -> rudolph::config::Config {
    rudolph::config::Config::from_json_file(&fixture("rudolph_tiny/config.json")).unwrap()
}

/// The tiny fixture model, read from its safetensors file.
pub fn tiny_model() -> rudolph::model::Rudolph {
    tiny_model_with_bias(&serde_json::Value::Null)
}

/// Every tensor of the tiny model, read by the library's checkpoint reader (masks as 0/1).
pub fn tiny_tensors() -> HashMap<String, Tensor> {
    let ckpt =
        rudolph::weights::Checkpoint::open(fixture("rudolph_tiny/model.safetensors")).unwrap();
    ckpt.load_all(DType::F32, &Device::Cpu).unwrap()
}

/// The tiny model with a golden's `logit_bias` (`{token_id: delta}`) added to the head bias.
pub fn tiny_model_with_bias(logit_bias: &serde_json::Value) -> rudolph::model::Rudolph {
    let cfg = tiny_config();
    let mut map = tiny_tensors();
    if let Some(bias) = logit_bias.as_object() {
        let head = map.get_mut("to_logits.1.bias").unwrap();
        let mut values = head.to_vec1::<f32>().unwrap();
        for (id, delta) in bias {
            values[id.parse::<usize>().unwrap()] += delta.as_f64().unwrap() as f32;
        }
        *head = Tensor::new(values, &Device::Cpu).unwrap();
    }
    let device = device();
    let map = map
        .into_iter()
        .map(|(k, t)| (k, t.to_device(&device).unwrap()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, &device);
    let masks = rudolph::model::Rudolph::masks_from(&cfg, &vb).unwrap();
    rudolph::model::Rudolph::new(&cfg, vb, masks).unwrap()
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
