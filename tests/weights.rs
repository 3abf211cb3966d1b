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
        &["lie.safetensors", "malformed safetensors", "invalid header"],
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
