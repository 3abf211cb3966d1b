//! Checkpoint reading: the fixture files, every dtype and layout torch can write, and errors.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::torch_writer::{Layout, Storage, TensorSpec, TorchFile, write_legacy, write_zip};
use common::{fixture, manifest, scratch};
use half::{bf16, f16};
use rudolph::weights::{Checkpoint, Format, StoredDtype, WeightsError};

const CPU: Device = Device::Cpu;

fn open(path: &Path) -> Checkpoint {
    Checkpoint::open(path).unwrap_or_else(|e| panic!("{e}"))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Loads a tensor the way its stored type calls for: floats as f32, everything else as u8.
fn load_natural(ckpt: &Checkpoint, name: &str) -> Tensor {
    let dtype = if ckpt.info(name).unwrap().dtype.is_float() {
        DType::F32
    } else {
        DType::U8
    };
    ckpt.load(name, dtype, &CPU).unwrap()
}

fn err_text(r: Result<Checkpoint, WeightsError>) -> String {
    match r {
        Ok(c) => panic!("expected an error, opened {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "message {text:?} lacks {p:?}");
    }
}

#[test]
fn pytorch_bin_and_safetensors_agree_with_the_manifest_and_each_other() {
    let expected = manifest("rudolph_tiny/model.safetensors");
    let bin = open(&fixture("rudolph_tiny/pytorch_model.bin"));
    let st = open(&fixture("rudolph_tiny/model.safetensors"));
    assert_eq!(bin.format(), Format::TorchZip);
    assert_eq!(st.format(), Format::Safetensors);
    assert_eq!(bin.len(), expected.len());
    assert_eq!(st.len(), expected.len());
    // The manifest lists the state dict in module order, which is the pickle's order.
    let names: Vec<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(bin.names(), names);
    for (name, dtype, shape) in &expected {
        for ckpt in [&bin, &st] {
            let info = ckpt.info(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!((&info.dtype, &info.shape), (dtype, shape), "{name}");
        }
        let (a, b) = (load_natural(&bin, name), load_natural(&st, name));
        assert_eq!(a.dims(), shape.as_slice());
        if dtype.is_float() {
            assert_eq!(bits(&f32s(&a)), bits(&f32s(&b)), "{name}");
        } else {
            assert_eq!(u8s(&a), u8s(&b), "{name}");
        }
    }
}

#[test]
fn masks_arrive_as_bool_with_the_golden_contents() {
    let bin = open(&fixture("rudolph_tiny/pytorch_model.bin"));
    let golden = open(&fixture("model_goldens/masks.safetensors"));
    assert!(!golden.is_empty());
    for golden_name in golden.names() {
        let name = format!("transformer.{golden_name}");
        assert_eq!(bin.info(&name).unwrap().dtype, StoredDtype::Bool);
        let got = u8s(&bin.load(&name, DType::U8, &CPU).unwrap());
        let want = u8s(&golden.load(golden_name, DType::U8, &CPU).unwrap());
        assert_eq!(got, want, "{name}");
        // The same mask as floats is 0/1.
        let as_f32 = f32s(&bin.load(&name, DType::F32, &CPU).unwrap());
        assert_eq!(
            as_f32,
            want.iter().map(|&v| f32::from(v)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn vqgan_checkpoints_open_through_their_state_dict() {
    for file in [
        "vqgan_tiny/vqgan_tiny.ckpt",
        "vqgan_tiny/vqgan_dwt_tiny.ckpt",
    ] {
        let expected = manifest(file);
        let ckpt = open(&fixture(file));
        assert_eq!(ckpt.format(), Format::TorchZip);
        assert_eq!(ckpt.len(), expected.len(), "{file}");
        for (i, (name, dtype, shape)) in expected.iter().enumerate() {
            let name = name.strip_prefix("state_dict.").expect("manifest prefix");
            assert_eq!(ckpt.names()[i], name);
            let info = ckpt.info(name).unwrap();
            assert_eq!((&info.dtype, &info.shape), (dtype, shape), "{file} {name}");
            assert_eq!(ckpt.load(name, DType::F32, &CPU).unwrap().dims(), shape);
        }
        let all = ckpt.load_all(DType::F32, &CPU).unwrap();
        assert_eq!(all.len(), expected.len());
    }
}

#[test]
fn strip_prefix_gives_a_view_of_the_model_keys() {
    let file = "vqgan_tiny/vqgan_dwt_tiny.ckpt";
    let ckpt = open(&fixture(file));
    let model = ckpt.strip_prefix("model.");
    let with_prefix: Vec<&str> = ckpt
        .names()
        .into_iter()
        .filter(|n| n.starts_with("model."))
        .collect();
    assert!(!model.is_empty());
    assert_eq!(model.len(), with_prefix.len());
    for full in with_prefix {
        let short = &full["model.".len()..];
        assert_eq!(model.info(short), ckpt.info(full));
        let a = f32s(&model.load(short, DType::F32, &CPU).unwrap());
        let b = f32s(&ckpt.load(full, DType::F32, &CPU).unwrap());
        assert_eq!(bits(&a), bits(&b));
    }
    // Errors name the key as it is in the file.
    let e = model
        .load("nope", DType::F32, &CPU)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["model.nope", "vqgan_dwt_tiny.ckpt"]);
}

/// The fixture model as (name, f32 values, shape), masks as 0/1 floats.
fn fixture_tensors() -> Vec<(String, Vec<f32>, Vec<usize>, bool)> {
    let st = open(&fixture("rudolph_tiny/model.safetensors"));
    manifest("rudolph_tiny/model.safetensors")
        .into_iter()
        .map(|(name, dtype, shape)| {
            let v = f32s(&st.load(&name, DType::F32, &CPU).unwrap());
            (name, v, shape, dtype == StoredDtype::Bool)
        })
        .collect()
}

fn encode(dtype: StoredDtype, values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| match dtype {
            StoredDtype::F64 => f64::from(v).to_le_bytes().to_vec(),
            StoredDtype::F32 => v.to_le_bytes().to_vec(),
            StoredDtype::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
            StoredDtype::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
            StoredDtype::I64 => (v as i64).to_le_bytes().to_vec(),
            StoredDtype::I32 => (v as i32).to_le_bytes().to_vec(),
            StoredDtype::I16 => (v as i16).to_le_bytes().to_vec(),
            StoredDtype::I8 => vec![(v as i8) as u8],
            StoredDtype::U8 | StoredDtype::Bool => vec![v as u8],
        })
        .collect()
}

/// What a value becomes after being stored as `dtype` and read back as f32.
fn rounded(dtype: StoredDtype, v: f32) -> f32 {
    match dtype {
        StoredDtype::F16 => f16::from_f32(v).to_f32(),
        StoredDtype::BF16 => bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Re-saves the fixture with floats as `float` and masks as `mask`, one storage per tensor.
fn resaved(float: StoredDtype, mask: StoredDtype, layout: Layout) -> TorchFile {
    let mut file = TorchFile {
        storages: vec![],
        tensors: vec![],
        layout,
    };
    for (name, values, shape, is_mask) in fixture_tensors() {
        let dtype = if is_mask { mask } else { float };
        file.storages.push(Storage {
            dtype,
            bytes: encode(dtype, &values),
        });
        file.tensors.push(TensorSpec {
            name,
            storage: file.storages.len() - 1,
            offset: 0,
            stride: contiguous(&shape),
            shape,
        });
    }
    file
}

/// Adds a transposed-stride tensor, two tensors sharing one storage at an offset, and one tensor
/// of every integer type; returns their expected f32 contents.
fn add_layouts(file: &mut TorchFile) -> Vec<(String, Vec<f32>, StoredDtype)> {
    let mut expected = Vec::new();
    // [3, 4] stored transposed: the storage holds the [4, 3] transpose row-major.
    let logical: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let transposed: Vec<f32> = (0..12).map(|k| logical[(k % 3) * 4 + k / 3]).collect();
    file.storages.push(Storage {
        dtype: StoredDtype::F32,
        bytes: encode(StoredDtype::F32, &transposed),
    });
    file.tensors.push(TensorSpec {
        name: "extra.transposed".into(),
        storage: file.storages.len() - 1,
        offset: 0,
        shape: vec![3, 4],
        stride: vec![1, 3],
    });
    expected.push(("extra.transposed".into(), logical, StoredDtype::F32));
    // Two views of one storage: [2, 3] at offset 0 and [5] at offset 6.
    let shared: Vec<f32> = (0..11).map(|i| i as f32 - 3.5).collect();
    file.storages.push(Storage {
        dtype: StoredDtype::F16,
        bytes: encode(StoredDtype::F16, &shared),
    });
    let s = file.storages.len() - 1;
    for (name, offset, shape) in [
        ("extra.shared_a", 0, vec![2, 3]),
        ("extra.shared_b", 6, vec![5]),
    ] {
        let n: usize = shape.iter().product();
        file.tensors.push(TensorSpec {
            name: name.into(),
            storage: s,
            offset,
            stride: contiguous(&shape),
            shape,
        });
        expected.push((
            name.into(),
            shared[offset..offset + n].to_vec(),
            StoredDtype::F16,
        ));
    }
    for dtype in [
        StoredDtype::I64,
        StoredDtype::I32,
        StoredDtype::I16,
        StoredDtype::I8,
        StoredDtype::U8,
        StoredDtype::Bool,
    ] {
        let values: Vec<f32> = match dtype {
            StoredDtype::Bool => vec![1.0, 0.0, 0.0, 1.0],
            StoredDtype::U8 => vec![0.0, 7.0, 255.0, 1.0],
            _ => vec![-3.0, 0.0, 1.0, 100.0],
        };
        file.storages.push(Storage {
            dtype,
            bytes: encode(dtype, &values),
        });
        let name = format!("extra.{dtype}");
        file.tensors.push(TensorSpec {
            name: name.clone(),
            storage: file.storages.len() - 1,
            offset: 0,
            shape: vec![2, 2],
            stride: vec![2, 1],
        });
        expected.push((name, values, dtype));
    }
    expected
}

fn check_resaved(path: &Path, format: Format, float: StoredDtype, mask: StoredDtype) {
    let ckpt = open(path);
    assert_eq!(ckpt.format(), format, "{}", path.display());
    let golden_masks = open(&fixture("model_goldens/masks.safetensors"));
    for (name, values, shape, is_mask) in fixture_tensors() {
        let info = ckpt.info(&name).unwrap();
        assert_eq!(info.shape, shape);
        assert_eq!(info.dtype, if is_mask { mask } else { float });
        let got = f32s(&ckpt.load(&name, DType::F32, &CPU).unwrap());
        let want: Vec<f32> = values.iter().map(|&v| rounded(info.dtype, v)).collect();
        assert_eq!(bits(&got), bits(&want), "{name} from {}", path.display());
        if is_mask {
            let short = name.strip_prefix("transformer.").unwrap();
            let golden = u8s(&golden_masks.load(short, DType::U8, &CPU).unwrap());
            assert_eq!(
                u8s(&ckpt.load(&name, DType::U8, &CPU).unwrap()),
                golden,
                "{name}"
            );
        } else if let Some(native) = info.dtype.candle() {
            // Read in the stored type, the bits are the ones written.
            let t = ckpt.load(&name, native, &CPU).unwrap();
            let back = f32s(&t.to_dtype(DType::F32).unwrap());
            assert_eq!(bits(&back), bits(&want), "{name} as {native:?}");
        }
    }
}

#[test]
fn every_float_dtype_arrives_from_zip_and_legacy_files() {
    let dir = scratch("weights_dtypes");
    let cases = [
        (StoredDtype::F16, StoredDtype::F16),
        (StoredDtype::BF16, StoredDtype::Bool),
        (StoredDtype::F64, StoredDtype::F32),
        (StoredDtype::F32, StoredDtype::Bool),
    ];
    for (float, mask) in cases {
        let file = resaved(float, mask, Layout::StateDict);
        let zip = dir.join(format!("{float}.bin"));
        write_zip(&file, "archive", &zip);
        check_resaved(&zip, Format::TorchZip, float, mask);
        let legacy = dir.join(format!("{float}.legacy.pt"));
        write_legacy(&file, &legacy);
        check_resaved(&legacy, Format::TorchLegacy, float, mask);
    }
}

#[test]
fn strided_shared_and_integer_tensors_are_materialised() {
    let dir = scratch("weights_layouts");
    for layout in [Layout::StateDict, Layout::Lightning] {
        let mut file = resaved(StoredDtype::F16, StoredDtype::Bool, layout);
        let extra = add_layouts(&mut file);
        let zip = dir.join("layouts.ckpt");
        write_zip(&file, "vqgan_tiny", &zip);
        let legacy = dir.join("layouts.legacy");
        write_legacy(&file, &legacy);
        for path in [&zip, &legacy] {
            let ckpt = open(path);
            assert_eq!(ckpt.len(), file.tensors.len());
            for (name, values, dtype) in &extra {
                let info = ckpt.info(name).unwrap();
                assert_eq!(info.dtype, *dtype, "{name}");
                let got = f32s(&ckpt.load(name, DType::F32, &CPU).unwrap());
                assert_eq!(&got, values, "{name} in {}", path.display());
                if !dtype.is_float() && *dtype != StoredDtype::U8 {
                    let ints = ckpt.load(name, DType::I64, &CPU).unwrap();
                    let ints = ints.flatten_all().unwrap().to_vec1::<i64>().unwrap();
                    let want: Vec<i64> = values.iter().map(|&v| v as i64).collect();
                    assert_eq!(ints, want, "{name}");
                }
            }
            // Integers that do not fit the target are refused, not wrapped.
            let e = ckpt
                .load("extra.int64", DType::U8, &CPU)
                .unwrap_err()
                .to_string();
            assert_contains(&e, &["extra.int64", "out of range"]);
        }
    }
}

#[test]
fn real_esrgan_params_and_params_ema_wrappers_are_unwrapped() {
    let dir = scratch("weights_params");
    for key in ["params", "params_ema"] {
        let file = resaved(StoredDtype::F32, StoredDtype::Bool, Layout::Under(key));
        let path = dir.join(format!("{key}.pth"));
        write_zip(&file, "archive", &path);
        let legacy = dir.join(format!("{key}.legacy.pth"));
        write_legacy(&file, &legacy);
        for p in [&path, &legacy] {
            let ckpt = open(p);
            let names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(ckpt.names(), names, "{}", p.display());
        }
    }
}

fn bytes_of(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn truncated_garbage_and_empty_files_give_clear_errors() {
    let dir = scratch("weights_errors");
    let bin = bytes_of(&fixture("rudolph_tiny/pytorch_model.bin"));
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("truncated.bin", bin[..bin.len() / 2].to_vec(), vec!["zip"]),
        (
            "garbage.bin",
            b"this is not a checkpoint at all".to_vec(),
            vec!["unrecognised file format"],
        ),
        ("empty.bin", vec![], vec!["empty"]),
        (
            "pickle.bin",
            b"\x80\x02}q\x00.".to_vec(),
            vec!["magic number"],
        ),
    ];
    for (name, bytes, parts) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = err_text(Checkpoint::open(&path));
        assert_contains(&e, &[name]);
        assert_contains(&e, &parts);
    }
    // A legacy file cut inside its storage data, and a safetensors file one byte short.
    let legacy = dir.join("full.legacy");
    write_legacy(
        &resaved(StoredDtype::F32, StoredDtype::Bool, Layout::StateDict),
        &legacy,
    );
    let mut bytes = bytes_of(&legacy);
    bytes.truncate(bytes.len() - 100);
    let cut = dir.join("cut.legacy");
    std::fs::write(&cut, bytes).unwrap();
    assert_contains(
        &err_text(Checkpoint::open(&cut)),
        &["cut.legacy", "truncated file"],
    );
    let mut st = bytes_of(&fixture("rudolph_tiny/model.safetensors"));
    st.pop();
    let short = dir.join("short.safetensors");
    std::fs::write(&short, st).unwrap();
    assert_contains(
        &err_text(Checkpoint::open(&short)),
        &["short.safetensors", "malformed safetensors"],
    );
    let missing = dir.join("does_not_exist.bin");
    assert_contains(
        &err_text(Checkpoint::open(&missing)),
        &["does_not_exist.bin", "open"],
    );
}

#[test]
fn malformed_torch_archives_are_reported() {
    use common::torch_writer::{data_pkl, write_zip_entries};
    let dir = scratch("weights_malformed");
    let file = resaved(StoredDtype::F32, StoredDtype::Bool, Layout::StateDict);

    let stored = zip::CompressionMethod::Stored;
    let no_pkl = dir.join("no_pkl.bin");
    write_zip_entries(&no_pkl, "archive", None, &file.storages, stored);
    assert_contains(
        &err_text(Checkpoint::open(&no_pkl)),
        &["no_pkl.bin", "no data.pkl"],
    );

    let bad_pkl = dir.join("bad_pkl.bin");
    write_zip_entries(
        &bad_pkl,
        "archive",
        Some(b"\x80\x02\xff".to_vec()),
        &file.storages,
        stored,
    );
    assert_contains(
        &err_text(Checkpoint::open(&bad_pkl)),
        &["bad_pkl.bin", "opcode 0xff"],
    );

    let mut cut_pkl = data_pkl(&file);
    cut_pkl.truncate(cut_pkl.len() / 3);
    let cut = dir.join("cut_pkl.bin");
    write_zip_entries(&cut, "archive", Some(cut_pkl), &file.storages, stored);
    assert_contains(
        &err_text(Checkpoint::open(&cut)),
        &["cut_pkl.bin", "truncated"],
    );

    // A storage entry shorter than the pickle declares (the pickle is intact).
    let victim = file.tensors[0].clone();
    let mut cut_storages = file.storages.clone();
    cut_storages[victim.storage].bytes.truncate(8);
    let path = dir.join("cut_storage.bin");
    write_zip_entries(
        &path,
        "archive",
        Some(data_pkl(&file)),
        &cut_storages,
        stored,
    );
    assert_contains(
        &err_text(Checkpoint::open(&path)),
        &[
            "cut_storage.bin",
            &victim.name,
            "declares",
            "holds only 8 bytes",
            "truncated file",
        ],
    );

    // A storage (consistently declared) shorter than its tensor needs.
    let mut short = file.clone();
    let victim = short.tensors[0].clone();
    short.storages[victim.storage].bytes.truncate(8);
    let path = dir.join("short_storage.bin");
    write_zip(&short, "archive", &path);
    assert_contains(
        &err_text(Checkpoint::open(&path)),
        &["short_storage.bin", &victim.name, "holds only 8 bytes"],
    );
}

fn expected_from(path: &Path) -> Vec<(String, Vec<usize>)> {
    let c = open(path);
    c.names()
        .into_iter()
        .map(|n| (n.to_string(), c.info(n).unwrap().shape.clone()))
        .collect()
}

#[test]
fn check_reports_every_renamed_key_and_wrong_shape_at_once() {
    let dir = scratch("weights_check");
    let expected = expected_from(&fixture("rudolph_tiny/model.safetensors"));
    let bin = open(&fixture("rudolph_tiny/pytorch_model.bin"));
    bin.check(&expected).unwrap();

    let mut file = resaved(StoredDtype::F32, StoredDtype::Bool, Layout::StateDict);
    let renamed_from = file.tensors[1].name.clone();
    file.tensors[1].name = format!("{renamed_from}_renamed");
    let reshaped = file.tensors[2].clone();
    let flat = vec![reshaped.shape.iter().product::<usize>()];
    file.tensors[2].stride = contiguous(&flat);
    file.tensors[2].shape = flat.clone();
    let path = dir.join("changed.bin");
    write_zip(&file, "changed", &path);
    let ckpt = open(&path);
    let e = ckpt.check(&expected).unwrap_err();
    let WeightsError::Mismatch {
        missing,
        unexpected,
        wrong_shape,
        ..
    } = &e
    else {
        panic!("expected a mismatch, got {e}");
    };
    assert_eq!(missing.len(), 1);
    assert_eq!(unexpected.len(), 1);
    assert_eq!(wrong_shape.len(), 1);
    let text = e.to_string();
    assert_contains(
        &text,
        &[
            "changed.bin",
            "1 missing, 1 unexpected, 1 with a wrong shape",
            &format!("missing key `{renamed_from}`"),
            &format!("unexpected key `{renamed_from}_renamed`"),
            &format!(
                "shape mismatch for `{}`: expected {:?}, found {:?}",
                reshaped.name, reshaped.shape, flat
            ),
        ],
    );
    let e = ckpt
        .load(&renamed_from, DType::F32, &CPU)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["changed.bin", "no tensor named", &renamed_from]);
}

#[test]
fn save_safetensors_round_trips() {
    let dir = scratch("weights_save");
    let bin = open(&fixture("rudolph_tiny/pytorch_model.bin"));
    let mut tensors = Vec::new();
    for name in bin.names() {
        tensors.push((name.to_string(), load_natural(&bin, name)));
    }
    tensors.push((
        "extra.f16".to_string(),
        Tensor::new(&[1.5f32, -2.0, 0.1], &CPU)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    ));
    let path = dir.join("saved.safetensors");
    std::fs::write(&path, b"old contents").unwrap();
    rudolph::weights::save_safetensors(&tensors, &path).unwrap();
    let back = open(&path);
    assert_eq!(back.len(), tensors.len());
    for (name, t) in &tensors {
        let info = back.info(name).unwrap();
        assert_eq!(info.shape, t.dims());
        let got = back.load(name, t.dtype(), &CPU).unwrap();
        let diff = (got.to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    assert_eq!(back.info("extra.f16").unwrap().dtype, StoredDtype::F16);
}

#[test]
fn convert_keeps_names_and_mask_types() {
    use rudolph::weights::convert;
    let dir = scratch("weights_convert");
    let input = fixture("rudolph_tiny/pytorch_model.bin");
    let reference = open(&fixture("rudolph_tiny/model.safetensors"));

    let out = dir.join("same.safetensors");
    let summary = convert(&input, &out, None, false).unwrap();
    assert_eq!(summary.tensors, reference.len());
    let same = open(&out);
    assert_eq!(open(&input).names(), same.names());
    for name in reference.names() {
        assert_eq!(same.info(name), reference.info(name), "{name}");
        let (a, b) = (load_natural(&same, name), load_natural(&reference, name));
        if same.info(name).unwrap().dtype.is_float() {
            assert_eq!(bits(&f32s(&a)), bits(&f32s(&b)));
        } else {
            assert_eq!(u8s(&a), u8s(&b));
        }
    }
    let on_disk = std::fs::metadata(&out).unwrap().len();
    assert!(summary.bytes < on_disk && on_disk < summary.bytes + 65536);

    let e = convert(&input, &out, None, false).unwrap_err().to_string();
    assert_contains(&e, &["same.safetensors", "already exists"]);

    // f16: floats are cast, bool masks stay bool.
    let summary16 = convert(&input, &out, Some(DType::F16), true).unwrap();
    let half = open(&out);
    for name in reference.names() {
        let info = half.info(name).unwrap();
        let want = reference.info(name).unwrap();
        if want.dtype.is_float() {
            assert_eq!(info.dtype, StoredDtype::F16);
            let got = f32s(&half.load(name, DType::F32, &CPU).unwrap());
            let orig = f32s(&reference.load(name, DType::F32, &CPU).unwrap());
            let want: Vec<f32> = orig.iter().map(|&v| rounded(StoredDtype::F16, v)).collect();
            assert_eq!(bits(&got), bits(&want), "{name}");
        } else {
            assert_eq!(info.dtype, want.dtype);
        }
    }
    assert!(summary16.bytes < summary.bytes);

    // Every integer type survives a conversion from a legacy file.
    let mut file = resaved(StoredDtype::BF16, StoredDtype::F16, Layout::Lightning);
    let extra = add_layouts(&mut file);
    let legacy = dir.join("lightning.legacy");
    write_legacy(&file, &legacy);
    let out = dir.join("lightning.safetensors");
    convert(&legacy, &out, Some(DType::F32), false).unwrap();
    let back = open(&out);
    for (name, values, dtype) in extra {
        let info = back.info(&name).unwrap();
        let want_dtype = if dtype.is_float() {
            StoredDtype::F32
        } else {
            dtype
        };
        assert_eq!(info.dtype, want_dtype, "{name}");
        assert_eq!(
            f32s(&back.load(&name, DType::F32, &CPU).unwrap()),
            values,
            "{name}"
        );
    }
}

#[test]
fn a_missing_fixture_folder_fails_loudly() {
    let bogus = std::ffi::OsString::from("/nonexistent/rudolph-fixtures");
    let panic = std::panic::catch_unwind(|| common::fixtures_from(Some(bogus)))
        .expect_err("a missing folder must panic");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert_contains(&msg, &["/nonexistent/rudolph-fixtures", "RUDOLPH_FIXTURES"]);
}

#[test]
fn compressed_zip_entries_are_read_into_memory() {
    use common::torch_writer::{data_pkl, write_zip_entries};
    let dir = scratch("weights_deflate");
    let mut file = resaved(StoredDtype::F32, StoredDtype::Bool, Layout::StateDict);
    let extra = add_layouts(&mut file);
    let path = dir.join("deflated.bin");
    let method = zip::CompressionMethod::Deflated;
    write_zip_entries(
        &path,
        "deflated",
        Some(data_pkl(&file)),
        &file.storages,
        method,
    );
    let ckpt = open(&path);
    check_resaved(&path, Format::TorchZip, StoredDtype::F32, StoredDtype::Bool);
    for (name, values, _) in extra {
        assert_eq!(f32s(&ckpt.load(&name, DType::F32, &CPU).unwrap()), values);
    }
}

#[test]
fn stride_zero_tensors_expand_and_absurd_ones_fail_cleanly() {
    let dir = scratch("weights_expand");
    let mut file = resaved(StoredDtype::F32, StoredDtype::Bool, Layout::StateDict);
    file.storages.push(Storage {
        dtype: StoredDtype::F32,
        bytes: encode(StoredDtype::F32, &[1.0, 2.0, 3.0]),
    });
    let s = file.storages.len() - 1;
    // A row broadcast over 2 rows (`expand`), and an element "broadcast" to 2^50 elements.
    for (name, shape, stride) in [
        ("extra.expanded", vec![2, 3], vec![0, 1]),
        ("extra.absurd", vec![1 << 50], vec![0]),
    ] {
        file.tensors.push(TensorSpec {
            name: name.into(),
            storage: s,
            offset: 0,
            shape,
            stride,
        });
    }
    let path = dir.join("expand.bin");
    write_zip(&file, "archive", &path);
    let ckpt = open(&path);
    let got = f32s(&ckpt.load("extra.expanded", DType::F32, &CPU).unwrap());
    assert_eq!(got, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let e = ckpt
        .load("extra.absurd", DType::F32, &CPU)
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["expand.bin", "extra.absurd", "cannot allocate"]);
}

#[test]
fn a_safetensors_header_lie_is_reported() {
    let dir = scratch("weights_header_lie");
    let bytes = bytes_of(&fixture("rudolph_tiny/model.safetensors"));
    let st = open(&fixture("rudolph_tiny/model.safetensors"));
    let name = st.names()[0].to_string();
    let shape = st.info(&name).unwrap().shape.clone();
    // Same header length, but the first tensor claims one more row than its bytes hold.
    let text = format!("{:?}", shape).replace(' ', "");
    let mut lie = shape.clone();
    lie[0] += 1;
    let lie_text = format!("{lie:?}").replace(' ', "");
    assert_eq!(
        text.len(),
        lie_text.len(),
        "pick a shape whose digit count stays"
    );
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let at = header.find(&format!("\"{name}\"")).unwrap();
    let field = header[at..].find(&text).unwrap() + at;
    let mut changed = bytes.clone();
    changed[8 + field..8 + field + text.len()].copy_from_slice(lie_text.as_bytes());
    let path = dir.join("lie.safetensors");
    std::fs::write(&path, changed).unwrap();
    assert_contains(
        &err_text(Checkpoint::open(&path)),
        &[
            "lie.safetensors",
            "malformed safetensors",
            &format!("tensor `{name}`"),
            &format!("shape {lie:?}"),
        ],
    );
}

/// Deterministic pseudo-random numbers (SplitMix64), so failures reproduce.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn damaged_files_never_panic() {
    use common::torch_writer::{data_pkl, write_zip_entries};
    let dir = scratch("weights_fuzz");
    // Small files (the extra tensors only), so that every truncation length can be tried.
    let mut file = TorchFile {
        storages: vec![],
        tensors: vec![],
        layout: Layout::Lightning,
    };
    add_layouts(&mut file);
    let legacy = dir.join("small.legacy");
    write_legacy(&file, &legacy);
    let zip_path = dir.join("small.bin");
    write_zip(&file, "archive", &zip_path);
    let pkl = data_pkl(&file);
    let originals = [bytes_of(&legacy), bytes_of(&zip_path)];
    let path = dir.join("damaged");
    let try_open = |path: &Path| {
        if let Ok(c) = Checkpoint::open(path) {
            for name in c.names() {
                for dtype in [DType::F32, DType::U8, DType::I64] {
                    let _ = c.load(name, dtype, &CPU);
                }
            }
        }
    };
    let mut rng = 7u64;
    for original in &originals {
        for cut in 0..original.len() {
            std::fs::write(&path, &original[..cut]).unwrap();
            try_open(&path);
        }
        for _ in 0..300 {
            let mut damaged = original.clone();
            for _ in 0..1 + splitmix(&mut rng) % 4 {
                let at = (splitmix(&mut rng) % damaged.len() as u64) as usize;
                damaged[at] = splitmix(&mut rng) as u8;
            }
            std::fs::write(&path, &damaged).unwrap();
            try_open(&path);
        }
    }
    // Damage inside data.pkl itself, with intact storages, exercises the pickle machine.
    for _ in 0..500 {
        let mut damaged = pkl.clone();
        let at = (splitmix(&mut rng) % damaged.len() as u64) as usize;
        damaged[at] = splitmix(&mut rng) as u8;
        let stored = zip::CompressionMethod::Stored;
        write_zip_entries(&path, "archive", Some(damaged), &file.storages, stored);
        try_open(&path);
    }
}

#[test]
fn checkpoints_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<WeightsError>();
}

#[test]
fn convert_command_line() {
    let dir = scratch("weights_cli");
    let exe = env!("CARGO_BIN_EXE_rudolph");
    let input = fixture("vqgan_tiny/vqgan_tiny.ckpt");
    let out = dir.join("vqgan.safetensors");
    let run = |extra: &[&str]| {
        std::process::Command::new(exe)
            .arg("convert")
            .arg(&input)
            .arg(&out)
            .args(extra)
            .output()
            .expect("run rudolph convert")
    };
    let first = run(&["--dtype", "bf16"]);
    assert!(first.status.success(), "{first:?}");
    let line = String::from_utf8(first.stdout).unwrap();
    let ckpt = open(&input);
    assert_contains(&line, &[&format!("wrote {} tensors", ckpt.len()), "bytes"]);
    let back = open(&out);
    assert_eq!(back.names(), ckpt.names());
    assert!(
        back.names()
            .iter()
            .all(|n| back.info(n).unwrap().dtype == StoredDtype::BF16)
    );

    let refused = run(&[]);
    assert!(!refused.status.success());
    assert_contains(
        &String::from_utf8(refused.stderr).unwrap(),
        &["vqgan.safetensors", "already exists", "--force"],
    );
    let forced = run(&["--force"]);
    assert!(forced.status.success(), "{forced:?}");
    let back = open(&out);
    assert!(
        back.names()
            .iter()
            .all(|n| back.info(n).unwrap().dtype == StoredDtype::F32)
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile files: each is built here byte by byte, opened in process (the answer and the time it
// takes) and by the `rudolph inspect` binary under an address-space limit set by this process
// (the memory it takes).

use rudolph::weights::limits;
use std::time::{Duration, Instant};

/// Pieces of a protocol-2 pickle.
struct Pkl(Vec<u8>);

impl Pkl {
    fn new() -> Self {
        Pkl(vec![0x80, 2])
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.0.extend([0x8a, 8]);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.0.push(b'(');
        for &x in v {
            self.int(x);
        }
        self.0.push(b't');
        self
    }
    /// `_rebuild_tensor_v2(<class storage key, numel>, offset, shape, stride, False, {})`.
    fn tensor(
        &mut self,
        class: &str,
        key: &str,
        numel: i64,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        self.op(b"ctorch._utils\n_rebuild_tensor_v2\n((")
            .str("storage")
            .op(format!("ctorch\n{class}\n").as_bytes())
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(stride)
            .op(&[0x89, b'}', b't', b'R'])
    }
    /// The pickle of `{'w': <float32 tensor `shape` over storage '0' of `numel` elements>}`.
    fn one_tensor(numel: i64, shape: &[i64]) -> Vec<u8> {
        let stride: Vec<i64> = (0..shape.len())
            .map(|i| shape[i + 1..].iter().product())
            .collect();
        let mut p = Pkl::new();
        p.op(b"}")
            .str("w")
            .tensor("FloatStorage", "0", numel, 0, shape, &stride)
            .op(b"s.");
        p.0
    }
}

/// Writes a torch-like zip: `archive/data.pkl`, `archive/byteorder` and the storages.
fn hostile_zip(path: &Path, pkl: &[u8], storages: &[(&str, &[u8], zip::CompressionMethod)]) {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = |m| {
        zip::write::SimpleFileOptions::default()
            .compression_method(m)
            .large_file(true)
    };
    z.start_file("archive/data.pkl", opts(zip::CompressionMethod::Stored))
        .unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("archive/byteorder", opts(zip::CompressionMethod::Stored))
        .unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes, method) in storages {
        z.start_file(format!("archive/data/{key}"), opts(*method))
            .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

/// Opens `path` in process within `limit`, returning the result's text (the error, or the
/// tensor names) and failing the test if it took longer.
fn open_within(path: &Path, limit: Duration) -> Result<Checkpoint, String> {
    let start = Instant::now();
    let r = Checkpoint::open(path).map_err(|e| e.to_string());
    let took = start.elapsed();
    assert!(took < limit, "{} took {took:?}", path.display());
    r
}

/// What `rudolph inspect PATH` printed on stderr, run with its address space limited to
/// `bytes` and its wall time to `secs` (killed and failed past it). A process that dies of a
/// signal (an abort on a failed allocation) fails the test.
fn inspect_limited(path: &Path, bytes: u64, secs: u64) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rudolph"));
    cmd.arg("inspect")
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe calls (setrlimit) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("run rudolph inspect");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rudolph inspect {} ran past {secs} s", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        status.code().is_some(),
        "rudolph inspect {} was killed ({status}) under a {bytes}-byte address space: {stderr}",
        path.display()
    );
    stderr
}

/// Address space for `inspect` of a hostile file: the fixture model needs under 200 MB.
const INSPECT_AS: u64 = 512 << 20;

#[test]
fn pickle_aliases_shared_objects_instead_of_copying_them() {
    let dir = scratch("weights_alias");
    // A 100,000-item list wrapped by `_rebuild_parameter` 100,000 times: Python shares the one
    // list, and so must the reader (copies would take 80 GB). The real tensor `w` is wrapped too.
    let mut p = Pkl::new();
    p.op(b"]q\x00(");
    for _ in 0..100_000 {
        p.op(b"K\x00");
    }
    p.op(b"e0ctorch._utils\n_rebuild_parameter\nq\x01");
    for _ in 0..100_000 {
        p.op(b"h\x01h\x00\x85R0");
    }
    p.op(b"}").str("w").op(b"h\x01");
    p.tensor("FloatStorage", "0", 2, 0, &[2], &[1]);
    p.op(b"\x85Rs.");
    assert!(p.0.len() < 1 << 20);
    let path = dir.join("aliased.bin");
    let data = encode(StoredDtype::F32, &[1.5, -2.0]);
    hostile_zip(&path, &p.0, &[("0", &data, zip::CompressionMethod::Stored)]);
    let ckpt = open_within(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(ckpt.names(), vec!["w"]);
    assert_eq!(
        f32s(&ckpt.load("w", DType::F32, &CPU).unwrap()),
        vec![1.5, -2.0]
    );
    assert_contains(
        &inspect_limited(&path, INSPECT_AS, 20),
        &["aliased.bin", "match no preset"],
    );
}

#[test]
fn dicts_are_built_in_linear_time() {
    let dir = scratch("weights_setitem");
    // 60,000 single SETITEMs (each used to rebuild an index of every key), then the tensor.
    let mut p = Pkl::new();
    p.op(b"}");
    for i in 0..60_000 {
        p.str(&format!("k{i:07}")).op(b"K\x01s");
    }
    // The same key set again and again keeps one entry, with the last value.
    for _ in 0..60_000 {
        p.str("k0000000").op(b"K\x02s");
    }
    p.str("w").tensor("FloatStorage", "0", 2, 0, &[2], &[1]);
    p.op(b"s.");
    let path = dir.join("setitem.bin");
    let data = encode(StoredDtype::F32, &[1.0, 2.0]);
    hostile_zip(&path, &p.0, &[("0", &data, zip::CompressionMethod::Stored)]);
    let ckpt = open_within(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(ckpt.names(), vec!["w"]);
    assert_contains(
        &inspect_limited(&path, INSPECT_AS, 20),
        &["setitem.bin", "match no preset"],
    );
}

#[test]
fn pickle_limits_are_enforced_and_named() {
    let dir = scratch("weights_pickle_limits");
    let objects = limits::MAX_OBJECTS.to_string();
    let ops = limits::MAX_OPS.to_string();
    let rank = limits::MAX_RANK.to_string();
    let key = limits::MAX_KEY_LEN.to_string();
    let tensors = limits::MAX_TENSORS.to_string();
    let mut cases: Vec<(&str, Vec<u8>, Vec<&str>)> = Vec::new();
    // Objects: None pushed 3 million times; DUP 3 million times; MARK 3 million times.
    for (name, op) in [("nones", b'N'), ("dups", b'2'), ("marks", b'(')] {
        let mut p = Pkl::new();
        p.op(b"N");
        p.0.resize(3_000_000, op);
        cases.push((name, p.0, vec![objects.as_str(), "objects"]));
    }
    // Opcodes that build nothing: PROTO, 17 million times.
    let mut p = Vec::with_capacity(34_000_010);
    for _ in 0..limits::MAX_OPS + 1000 {
        p.extend([0x80, 2]);
    }
    p.extend(b"}.");
    cases.push(("ops", p, vec![ops.as_str(), "opcodes"]));
    // A tensor of 33 dimensions, and one over a storage with a 300-byte key.
    let shape = vec![1i64; limits::MAX_RANK + 1];
    cases.push((
        "rank",
        Pkl::one_tensor(1, &shape),
        vec!["`w`", &rank, "dimensions"],
    ));
    let mut p = Pkl::new();
    p.op(b"}")
        .str("w")
        .tensor("FloatStorage", &"7".repeat(300), 1, 0, &[1], &[1])
        .op(b"s.");
    cases.push(("key", p.0, vec!["`w`", "300 bytes", &key]));
    // One tensor more than the limit, all over one storage.
    let mut p = Pkl::new();
    p.op(b"}(");
    for i in 0..=limits::MAX_TENSORS {
        p.str(&format!("t{i}"))
            .tensor("FloatStorage", "0", 1, 0, &[1], &[1]);
    }
    p.op(b"u.");
    cases.push(("tensors", p.0, vec![tensors.as_str(), "tensors"]));
    let data = encode(StoredDtype::F32, &[1.0]);
    for (name, pkl, parts) in cases {
        let path = dir.join(format!("{name}.bin"));
        hostile_zip(&path, &pkl, &[("0", &data, zip::CompressionMethod::Stored)]);
        let e = open_within(&path, Duration::from_secs(5)).unwrap_err();
        assert_contains(&e, &[&format!("{name}.bin")]);
        assert_contains(&e, &parts);
        if name != "ops" {
            let msg = inspect_limited(&path, INSPECT_AS, 20);
            assert_contains(&msg, &[&format!("{name}.bin")]);
            assert_contains(&msg, &parts);
        }
    }

    // A data.pkl over the size limit is refused from the zip directory, before inflating it.
    let path = dir.join("big_pkl.bin");
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("archive/data.pkl", deflated).unwrap();
        let block = vec![b'N'; 1 << 20];
        for _ in 0..(limits::MAX_PICKLE_BYTES >> 20) + 1 {
            z.write_all(&block).unwrap();
        }
        z.finish().unwrap();
    }
    assert!(std::fs::metadata(&path).unwrap().len() < 1 << 20);
    let e = open_within(&path, Duration::from_secs(2)).unwrap_err();
    assert_contains(
        &e,
        &[
            "big_pkl.bin",
            "data.pkl",
            &limits::MAX_PICKLE_BYTES.to_string(),
        ],
    );
    // So is a legacy file whose pickle runs past it.
    let mut legacy = vec![0x80, 2, 0x8a, 10];
    legacy.extend(&0x1950a86a20f9469cfc6cu128.to_le_bytes()[..10]);
    legacy.push(b'.');
    legacy.extend([
        0x80, 2, b'M', 0xe9, 0x03, b'.', 0x80, 2, b'}', b'.', 0x80, 2,
    ]);
    // Megabyte byte strings, each dropped again: few opcodes and objects, many bytes.
    for _ in 0..(limits::MAX_PICKLE_BYTES >> 20) + 1 {
        legacy.push(b'B');
        legacy.extend((1u32 << 20).to_le_bytes());
        legacy.resize(legacy.len() + (1 << 20), 0);
        legacy.push(b'0');
    }
    let path = dir.join("big.legacy");
    std::fs::write(&path, legacy).unwrap();
    let e = open_within(&path, Duration::from_secs(5)).unwrap_err();
    assert_contains(&e, &["big.legacy", &limits::MAX_PICKLE_BYTES.to_string()]);
}

#[test]
fn deflated_storages_are_read_only_as_far_as_their_tensors_reach() {
    let dir = scratch("weights_inflate");
    let deflated = zip::CompressionMethod::Deflated;
    let zeros = vec![0u8; 256 << 20];
    // A storage declaring 64 Mi floats, all inflatable, under a one-element tensor: only the
    // four bytes the tensor reaches are inflated.
    let path = dir.join("bomb.bin");
    hostile_zip(
        &path,
        &Pkl::one_tensor(64 << 20, &[1]),
        &[("0", &zeros, deflated)],
    );
    assert!(std::fs::metadata(&path).unwrap().len() < 4 << 20);
    let ckpt = open_within(&path, Duration::from_secs(2)).unwrap();
    assert_eq!(f32s(&ckpt.load("w", DType::F32, &CPU).unwrap()), vec![0.0]);
    assert_contains(
        &inspect_limited(&path, INSPECT_AS, 20),
        &["bomb.bin", "match no preset"],
    );
    // A tensor that does reach all 256 MiB inflates past what the compressed size allows.
    let path = dir.join("full_bomb.bin");
    hostile_zip(
        &path,
        &Pkl::one_tensor(64 << 20, &[64 << 20]),
        &[("0", &zeros, deflated)],
    );
    let e = open_within(&path, Duration::from_secs(2)).unwrap_err();
    assert_contains(
        &e,
        &[
            "full_bomb.bin",
            "archive/data/0",
            "decompression bomb",
            &format!("{} times", limits::INFLATE_RATIO),
        ],
    );
    let msg = inspect_limited(&path, INSPECT_AS, 20);
    assert_contains(&msg, &["full_bomb.bin", "decompression bomb"]);
    // A deflated entry holding less than the pickle declares.
    let path = dir.join("short_deflated.bin");
    hostile_zip(
        &path,
        &Pkl::one_tensor(100, &[100]),
        &[("0", &[0u8; 40], deflated)],
    );
    assert_contains(
        &open_within(&path, Duration::from_secs(2)).unwrap_err(),
        &[
            "short_deflated.bin",
            "`w`",
            "declares 100",
            "holds only 40 bytes",
        ],
    );
    // A byteorder entry of a megabyte is not read.
    let path = dir.join("byteorder.bin");
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default().compression_method(deflated);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(&Pkl::one_tensor(1, &[1])).unwrap();
        z.start_file("archive/byteorder", opts).unwrap();
        z.write_all(&vec![b' '; 1 << 20]).unwrap();
        z.finish().unwrap();
    }
    assert_contains(
        &open_within(&path, Duration::from_secs(2)).unwrap_err(),
        &["byteorder.bin", "byteorder is 1048576 bytes"],
    );
}

#[test]
fn sizes_from_the_pickle_are_checked_before_any_allocation() {
    let dir = scratch("weights_sizes");
    let data = encode(StoredDtype::F32, &[1.0, 2.0, 3.0, 4.0]);
    let big = 1i64 << 40;
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        // Element count × 4 bytes overflows.
        (
            "numel",
            Pkl::one_tensor(i64::MAX, &[1]),
            vec!["`w`", "more bytes than this machine can address"],
        ),
        // The shape's product overflows.
        (
            "shape",
            Pkl::one_tensor(4, &[big, big, big]),
            vec!["`w`", "overflows"],
        ),
        // A view past its storage, through the offset.
        (
            "offset",
            {
                let mut p = Pkl::new();
                p.op(b"}")
                    .str("w")
                    .tensor("FloatStorage", "0", 4, i64::MAX / 2, &[2], &[1])
                    .op(b"s.");
                p.0
            },
            vec!["`w`", "offset"],
        ),
        // Through a stride.
        (
            "stride",
            {
                let mut p = Pkl::new();
                p.op(b"}")
                    .str("w")
                    .tensor("FloatStorage", "0", 4, 0, &[2], &[big])
                    .op(b"s.");
                p.0
            },
            vec!["`w`", "needs", "holds only 16 bytes"],
        ),
        // A negative size.
        (
            "negative",
            Pkl::one_tensor(4, &[-1]),
            vec!["`w`", "malformed offset, size or stride"],
        ),
        // The storage declares more than the entry holds.
        (
            "declared",
            Pkl::one_tensor(5, &[1]),
            vec!["`w`", "declares 5", "holds only 16 bytes"],
        ),
    ];
    for (name, pkl, parts) in cases {
        let path = dir.join(format!("{name}.bin"));
        hostile_zip(&path, &pkl, &[("0", &data, zip::CompressionMethod::Stored)]);
        let e = open_within(&path, Duration::from_secs(2)).unwrap_err();
        assert_contains(&e, &[&format!("{name}.bin")]);
        assert_contains(&e, &parts);
    }
}

/// A safetensors file with `header` (as JSON text) over `data`.
fn safetensors_file(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn safetensors_errors_name_the_file_and_the_tensor() {
    let dir = scratch("weights_safetensors_errors");
    let data = [0u8; 24];
    let ok = r#""a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}"#;
    let cases: Vec<(&str, String, usize, Vec<&str>)> = vec![
        // The shape disagrees with the offsets (was `TensorInvalidInfo`).
        (
            "lie",
            format!(r#"{{{ok}, "b": {{"dtype": "F32", "shape": [5], "data_offsets": [8, 24]}}}}"#),
            24,
            vec!["`b`", "takes 20 bytes", "span 16"],
        ),
        // Bytes after the last tensor (was `MetadataIncompleteBuffer`).
        (
            "trailing",
            format!("{{{ok}}}"),
            24,
            vec!["ends at byte 8", "24 bytes follow the header", "last 16 bytes"],
        ),
        // The data cut short.
        (
            "cut",
            format!(r#"{{{ok}, "b": {{"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}}}"#),
            20,
            vec!["`b`", "reach past the 20 bytes", "truncated file"],
        ),
        // Two tensors over the same bytes.
        (
            "overlap",
            format!(r#"{{{ok}, "b": {{"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}}}"#),
            12,
            vec!["`b`", "`a`", "ends at byte 8", "gaps or overlaps"],
        ),
        // A shape whose size overflows.
        (
            "overflow",
            r#"{"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 8]}}"#.to_string(),
            8,
            vec!["`a`", "more bytes than this machine can address"],
        ),
        // A type this reader does not know.
        (
            "dtype",
            r#"{"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}"#.to_string(),
            8,
            vec!["`a`", "\"F8_E4M3\"", "not one this reader supports"],
        ),
        // A field missing.
        (
            "field",
            r#"{"a": {"dtype": "F32", "data_offsets": [0, 8]}}"#.to_string(),
            8,
            vec!["`a`", "shape"],
        ),
        // Too many dimensions.
        (
            "rank",
            format!(
                r#"{{"a": {{"dtype": "F32", "shape": {:?}, "data_offsets": [0, 4]}}}}"#,
                vec![1; limits::MAX_RANK + 1]
            ),
            4,
            vec!["`a`", "33 dimensions"],
        ),
    ];
    for (name, header, len, parts) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        safetensors_file(&path, &header, &data[..len]);
        let e = err_text(Checkpoint::open(&path));
        assert_contains(
            &e,
            &[&format!("{name}.safetensors"), "malformed safetensors"],
        );
        assert_contains(&e, &parts);
        for debug_name in [
            "TensorInvalidInfo",
            "MetadataIncompleteBuffer",
            "InvalidOffset",
        ] {
            assert!(!e.contains(debug_name), "{e}");
        }
    }
    // A header length past the limit is refused before anything is parsed.
    let path = dir.join("huge_header.safetensors");
    let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(&path, bytes).unwrap();
    assert_contains(
        &err_text(Checkpoint::open(&path)),
        &[
            "huge_header.safetensors",
            &limits::MAX_SAFETENSORS_HEADER.to_string(),
        ],
    );
}

/// Re-saves the fixture model as safetensors with tensor `nan` holding a NaN and `inf` an
/// infinity (floats in `dtype`).
fn poisoned_fixture(path: &Path, nan: &str, inf: &str, dtype: DType) {
    let st = open(&fixture("rudolph_tiny/model.safetensors"));
    let mut tensors = Vec::new();
    for name in st.names() {
        let mut t = load_natural(&st, name);
        if name == nan || name == inf {
            let mut v = f32s(&t);
            let mid = v.len() / 2;
            v[mid] = if name == nan {
                f32::NAN
            } else {
                f32::NEG_INFINITY
            };
            t = Tensor::from_vec(v, t.dims(), &CPU).unwrap();
        }
        if t.dtype() == DType::F32 {
            t = t.to_dtype(dtype).unwrap();
        }
        tensors.push((name.to_string(), t));
    }
    rudolph::weights::save_safetensors_with_bools(&tensors, path, |n| {
        st.info(n).unwrap().dtype == StoredDtype::Bool
    })
    .unwrap();
}

#[test]
fn non_finite_weights_are_refused_by_name_unless_allowed() {
    use rudolph::config::Config;
    use rudolph::model::Rudolph;
    use rudolph::weights::LoadOptions;
    let dir = scratch("weights_non_finite");
    let cfg =
        Config::from_name_or_path(fixture("rudolph_tiny/config.json").to_str().unwrap()).unwrap();
    let sound = open(&fixture("rudolph_tiny/model.safetensors"));
    let (_, report) = Rudolph::from_checkpoint(&sound, &cfg, DType::F32, &CPU).unwrap();
    assert!(report.non_finite.is_empty());

    let floats: Vec<String> = sound
        .names()
        .into_iter()
        .filter(|n| sound.info(n).unwrap().dtype.is_float() && !n.ends_with("_mask"))
        .map(String::from)
        .collect();
    let (nan, inf) = (floats[3].as_str(), floats[floats.len() - 2].as_str());
    for (file, dtype) in [
        ("f32.safetensors", DType::F32),
        ("f16.safetensors", DType::F16),
    ] {
        let path = dir.join(file);
        poisoned_fixture(&path, nan, inf, dtype);
        let ckpt = open(&path);
        let Err(e) = Rudolph::from_checkpoint(&ckpt, &cfg, DType::F32, &CPU) else {
            panic!("{file}: NaN weights must be refused");
        };
        let e = e.to_string();
        assert_contains(
            &e,
            &[
                file,
                "2 tensors hold NaN or infinite values",
                &format!("`{nan}`"),
                &format!("`{inf}`"),
                "--allow-non-finite",
            ],
        );
        let options = LoadOptions {
            allow_non_finite: true,
        };
        let precision = rudolph::model::Precision::Float(DType::F32);
        let (_, report) =
            Rudolph::from_checkpoint_with(&ckpt, &cfg, precision, &CPU, options).unwrap();
        let mut found = report.non_finite.clone();
        found.sort();
        let mut want = vec![nan.to_string(), inf.to_string()];
        want.sort();
        assert_eq!(found, want, "{file}");
    }
    // `inspect` shows them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .arg("inspect")
        .arg(dir.join("f16.safetensors"))
        .arg("--config")
        .arg(fixture("rudolph_tiny/config.json"))
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["non_finite"].as_array().unwrap().len(), 2);

    // The VQGAN: a NaN in one weight is refused by name, unless allowed.
    let vq = open(&fixture("vqgan_tiny/vqgan_tiny.ckpt"));
    let victim = vq
        .names()
        .into_iter()
        .find(|n| n.contains("decoder") && n.ends_with("weight"))
        .unwrap()
        .to_string();
    let mut tensors = Vec::new();
    for name in vq.names() {
        let mut t = vq.load(name, DType::F32, &CPU).unwrap();
        if name == victim {
            let mut v = f32s(&t);
            v[0] = f32::NAN;
            t = Tensor::from_vec(v, t.dims(), &CPU).unwrap();
        }
        tensors.push((name.to_string(), t));
    }
    let path = dir.join("vqgan_tiny.ckpt");
    rudolph::weights::save_safetensors(&tensors, &path).unwrap();
    std::fs::copy(
        fixture("vqgan_tiny/vqgan_tiny.config.yml"),
        dir.join("vqgan_tiny.config.yml"),
    )
    .unwrap();
    let Err(e) = rudolph::vae::Vqgan::load(&path, None, &CPU) else {
        panic!("NaN VQGAN weights must be refused");
    };
    let e = e.to_string();
    assert_contains(&e, &["vqgan_tiny.ckpt", &victim, "1 tensor holds NaN"]);
    let allow = LoadOptions {
        allow_non_finite: true,
    };
    rudolph::vae::Vqgan::load_with(&path, None, &CPU, allow).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The fuzz harness: random byte mutations of small checkpoints in every format, through every
// reader, asserting that nothing panics (errors are fine). It runs for a time budget, outside
// the normal test run: `fuzz/run.sh SECONDS`.

/// The inputs the fuzzer mutates, each with how to write it: whole files in every format, and
/// the `data.pkl` of a zip (mutated, then zipped again, so that the pickle machine sees it).
fn fuzz_seeds(dir: &Path) -> Vec<(String, Vec<u8>, Option<Vec<Storage>>)> {
    use common::torch_writer::data_pkl;
    let mut file = TorchFile {
        storages: vec![],
        tensors: vec![],
        layout: Layout::Lightning,
    };
    add_layouts(&mut file);
    let legacy = dir.join("seed.legacy");
    write_legacy(&file, &legacy);
    let zipped = dir.join("seed.bin");
    write_zip(&file, "archive", &zipped);
    let st = open(&zipped);
    let tensors: Vec<(String, Tensor)> = st
        .names()
        .into_iter()
        .map(|n| {
            let dtype = match st.info(n).unwrap().dtype {
                d if d.is_float() => DType::F32,
                StoredDtype::U8 | StoredDtype::Bool => DType::U8,
                _ => DType::I64,
            };
            (n.to_string(), st.load(n, dtype, &CPU).unwrap())
        })
        .collect();
    let safetensors = dir.join("seed.safetensors");
    rudolph::weights::save_safetensors(&tensors, &safetensors).unwrap();
    let mut deflated_file = file.clone();
    deflated_file.layout = Layout::StateDict;
    let deflated = dir.join("seed_deflated.bin");
    common::torch_writer::write_zip_entries(
        &deflated,
        "archive",
        Some(data_pkl(&deflated_file)),
        &deflated_file.storages,
        zip::CompressionMethod::Deflated,
    );
    vec![
        ("legacy".into(), bytes_of(&legacy), None),
        ("zip".into(), bytes_of(&zipped), None),
        ("deflated zip".into(), bytes_of(&deflated), None),
        ("safetensors".into(), bytes_of(&safetensors), None),
        (
            "fixture safetensors".into(),
            bytes_of(&fixture("rudolph_tiny/model.safetensors")),
            None,
        ),
        (
            "data.pkl".into(),
            data_pkl(&file),
            Some(file.storages.clone()),
        ),
    ]
    .into_iter()
    .chain(model_file_seeds(dir))
    .collect()
}

/// The model folder's other files, each read by its own reader: the tokenizer, the
/// configurations and the pictures. Their seed names start with the kind of file.
fn model_file_seeds(dir: &Path) -> Vec<(String, Vec<u8>, Option<Vec<Storage>>)> {
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes");
    let star = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/star.png");
    let jpeg = dir.join("star.jpg");
    rudolph::image::save_image(&rudolph::image::load_image(&star).unwrap(), &jpeg).unwrap();
    let webp = dir.join("star.webp");
    rudolph::image::save_image(&rudolph::image::load_image(&star).unwrap(), &webp).unwrap();
    [
        ("bpe: built-in", builtin.join("bpe.model")),
        ("bpe: fixture", fixture("tokenizer/bpe.model")),
        ("config: built-in", builtin.join("config.json")),
        ("config: fixture", fixture("rudolph_tiny/config.json")),
        ("yml: built-in", builtin.join("vqgan.config.yml")),
        ("picture: png", star),
        ("picture: fixture png", fixture("images/img_0.png")),
        ("picture: jpeg", jpeg),
        ("picture: webp", webp),
    ]
    .into_iter()
    .map(|(name, path)| (name.to_string(), bytes_of(&path), None))
    .collect()
}

/// Reads a mutated model file with the reader its seed names (see [`model_file_seeds`]), and
/// uses what it read; true when it was read.
fn exercise_model_file(kind: &str, path: &Path) -> bool {
    match kind {
        "bpe" => rudolph::tokenizer::TextTokenizer::load(path).is_ok_and(|t| {
            let ids = t.encode_text("рыжий кот на окне ▁ x", 16);
            let _ = t.decode_text(&ids);
            true
        }),
        "config" => rudolph::config::Config::from_json_file(path).is_ok_and(|c| {
            let _ = (c.total_seq_length(), c.total_vocab(), c.head_dim());
            let _ = rudolph::model::Rudolph::tensor_shapes(&c);
            true
        }),
        "yml" => rudolph::vae::VqganConfig::from_yaml_file(path).is_ok_and(|c| {
            let _ = c.downsample_factor();
            true
        }),
        "picture" => rudolph::image::load_image(path).is_ok_and(|img| {
            let _ = rudolph::image::center_crop_resize(&img, 64);
            true
        }),
        other => panic!("no reader for seed kind {other}"),
    }
}

/// One mutation: what to do, where (a fraction of the length), and with what value.
type Mutation = (u8, u64, u64);

fn mutate(original: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = original.to_vec();
    for &(kind, at, value) in mutations {
        if b.is_empty() {
            b.push(value as u8);
            continue;
        }
        let at = (at % b.len() as u64) as usize;
        // Most mutations keep the layout (so that the file still parses some way in), a few
        // shift or cut it.
        match kind % 16 {
            0..=4 => b[at] = value as u8,
            5..=7 => b[at] ^= 1 << (value % 8),
            // Interesting integers over 1, 2, 4 or 8 bytes: 0, -1, huge, small, powers of two.
            8..=10 => {
                let width = 1usize << (value % 4);
                let v: u64 = match (value >> 2) % 6 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => 1 << 31,
                    3 => (value >> 8) % 64,
                    4 => 1 << ((value >> 8) % 64),
                    _ => u64::MAX >> 1,
                };
                let end = (at + width).min(b.len());
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            11 => b.truncate(at),
            12 => {
                let n = (value % 64) as usize;
                b.drain(at..(at + n).min(b.len()));
            }
            13 => {
                let n = (value % 64) as usize;
                let chunk: Vec<u8> = b[at..(at + n).min(b.len())].to_vec();
                let to = ((value >> 8) % b.len() as u64) as usize;
                b.splice(to..to, chunk);
            }
            14 => b.insert(at, value as u8),
            _ => {
                // An opcode-like byte followed by a length-like word.
                b.insert(at, value as u8);
                let word = ((value >> 8) as u32).to_le_bytes();
                b.splice(at + 1..at + 1, word);
            }
        }
    }
    b
}

/// Opens `path` and reads everything it offers; returns whether it opened.
fn exercise(path: &Path) -> bool {
    let Ok(c) = Checkpoint::open(path) else {
        return false;
    };
    for name in c.names() {
        for dtype in [DType::F32, DType::U8, DType::F16] {
            let _ = c.load(name, dtype, &CPU);
        }
        let _ = c.has_non_finite(name);
    }
    let _ = c.strip_prefix("extra.").load_all(DType::F32, &CPU);
    true
}

#[test]
#[ignore = "fuzzing for a time budget: fuzz/run.sh SECONDS"]
fn fuzz_file_readers() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let seconds: u64 = std::env::var("RUDOLPH_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = scratch("weights_fuzz_budget");
    let seeds = fuzz_seeds(&dir);
    // The case being run stays on disk, so that a hang or an abort leaves it for inspection.
    let path = dir.join("case");
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec(any::<(u8, u64, u64)>(), 1..5),
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // A watchdog: a case that runs past 10 s is a hang; the process stops with status 124, the
    // way `timeout` reports one, and the case's input stays at `path`.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let progress = std::sync::Arc::clone(&progress);
        let path = path.clone();
        std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let now = progress.load(std::sync::atomic::Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(10) {
                    println!(
                        "fuzz: HANG: case {now} ran past 10 s; input: {}",
                        path.display()
                    );
                    std::process::exit(124);
                }
            }
        });
    }
    let (mut cases, mut opened) = (0u64, 0u64);
    let mut per_seed = vec![(0u64, 0u64); seeds.len()];
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let config = Config {
            cases: 256,
            failure_persistence: None,
            max_shrink_iters: 500,
            ..Config::default()
        };
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&round.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let counts = std::cell::RefCell::new((0u64, 0u64, vec![(0u64, 0u64); seeds.len()]));
        let result = runner.run(&strategy, |(which, mutations)| {
            let (_, original, storages) = &seeds[which];
            let bytes = mutate(original, &mutations);
            if let Some(storages) = storages {
                common::torch_writer::write_zip_entries(
                    &path,
                    "archive",
                    Some(bytes),
                    storages,
                    zip::CompressionMethod::Stored,
                );
            } else {
                std::fs::write(&path, &bytes).unwrap();
            }
            let ok = match seeds[which].0.split_once(':') {
                Some((kind, _)) => exercise_model_file(kind, &path),
                None => exercise(&path),
            };
            progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut c = counts.borrow_mut();
            c.0 += 1;
            c.1 += u64::from(ok);
            c.2[which].0 += 1;
            c.2[which].1 += u64::from(ok);
            Ok(())
        });
        let c = counts.into_inner();
        cases += c.0;
        opened += c.1;
        for (total, more) in per_seed.iter_mut().zip(&c.2) {
            total.0 += more.0;
            total.1 += more.1;
        }
        if let Err(e) = result {
            println!("fuzz: {cases} cases, PANIC in round {round}: {e}");
            panic!("a mutated file made a reader panic: {e}");
        }
    }
    for ((name, _, _), (n, ok)) in seeds.iter().zip(&per_seed) {
        println!("fuzz: {name}: {n} cases, {ok} opened");
    }
    println!(
        "fuzz: {cases} cases in {seconds} s, {opened} opened, {} refused with an error, 0 panics",
        cases - opened
    );
}
