//! The VQGAN image tokenizer and the image pre-processing against the reference goldens in
//! `$RUDOLPH_FIXTURES` (default `../shared/fixtures`). Shapes, sizes and file lists come from
//! the fixtures themselves, so any folder of the same layout works.

mod common;

use common::{assert_close, fixtures, goldens, json, scratch};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, IndexOp, Tensor};
use rudolph::image::{self as img, ImageError};
use rudolph::vae::{VaeError, Vqgan, VqganConfig, VqganLayout};

fn plain_ckpt() -> PathBuf {
    fixtures().join("vqgan_tiny/vqgan_tiny.ckpt")
}

fn dwt_ckpt() -> PathBuf {
    fixtures().join("vqgan_tiny/vqgan_dwt_tiny.ckpt")
}

fn load(path: &Path) -> Vqgan {
    Vqgan::load(path, None, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn to_i64(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    to_f32(t).iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// The PNG paths of the encode goldens (`vae.json: encode.input_images`).
fn encode_inputs() -> Vec<PathBuf> {
    json("vae_goldens/vae.json")["encode"]["input_images"]
        .as_array()
        .expect("vae.json encode.input_images")
        .iter()
        .map(|p| fixtures().join(p.as_str().unwrap()))
        .collect()
}

// --- image pre-processing ---------------------------------------------------------------

#[test]
fn preprocessing_matches_image_transform_exactly() {
    let goldens = goldens("pipeline_goldens/pipelines.safetensors");
    let mut checked = 0;
    let mut non_square = 0;
    for (key, want) in &goldens {
        let Some(png) = key.strip_prefix("image_transform.") else {
            continue;
        };
        let picture = img::load_image(&fixtures().join("images").join(png)).unwrap();
        if picture.width() != picture.height() {
            non_square += 1;
        }
        let (_, h, w) = want.dims3().unwrap();
        assert_eq!(h, w, "{key}: golden not square");
        let got = img::preprocess(&picture, h as u32, &Device::Cpu).unwrap();
        assert_eq!(got.dims(), want.dims(), "{key}");
        let (g, e) = (to_f32(&got), to_f32(want));
        let bad = g.iter().zip(&e).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{key}: {bad} of {} values differ", e.len());
        checked += 1;
    }
    assert!(checked > 0, "no image_transform.* goldens");
    assert!(
        non_square > 0,
        "no non-square picture exercises the crop path"
    );
}

#[test]
fn encode_golden_images_are_the_preprocessed_pngs() {
    let goldens = goldens("vae_goldens/encode.safetensors");
    let images = &goldens["images"];
    let (_, _, h, _) = images.dims4().unwrap();
    for (i, path) in encode_inputs().iter().enumerate() {
        let picture = img::load_image(path).unwrap();
        let got = img::preprocess(&picture, h as u32, &Device::Cpu).unwrap();
        assert_eq!(
            to_f32(&got),
            to_f32(&images.i(i).unwrap()),
            "{}",
            path.display()
        );
    }
}

#[test]
fn unreadable_and_non_image_files_fail_clearly() {
    let missing = fixtures().join("images/no_such_picture.png");
    let err = img::load_image(&missing).unwrap_err();
    assert!(matches!(err, ImageError::Open { .. }));
    assert!(err.to_string().contains("no_such_picture.png"), "{err}");

    let not_image = fixtures().join("vae_goldens/vae.json");
    let err = img::load_image(&not_image).unwrap_err();
    assert!(matches!(err, ImageError::Decode { .. }));
    assert!(err.to_string().contains("vae.json"), "{err}");

    let dir = scratch("truncated");
    let truncated = dir.join("cut.png");
    let bytes = std::fs::read(&encode_inputs()[0]).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = img::load_image(&truncated).unwrap_err();
    assert!(err.to_string().contains("cut.png"), "{err}");
}

#[test]
fn greyscale_and_rgba_pictures_become_rgb() {
    let dir = scratch("modes");
    let grey = image::GrayImage::from_fn(10, 6, |x, y| image::Luma([(x * 20 + y) as u8]));
    grey.save(dir.join("grey.png")).unwrap();
    let rgb = img::load_image(&dir.join("grey.png")).unwrap();
    assert_eq!(rgb.get_pixel(3, 2).0, [62, 62, 62]);
    let rgba = image::RgbaImage::from_pixel(4, 4, image::Rgba([10, 20, 30, 0]));
    rgba.save(dir.join("rgba.png")).unwrap();
    let rgb = img::load_image(&dir.join("rgba.png")).unwrap();
    assert_eq!(rgb.get_pixel(1, 1).0, [10, 20, 30]);
    let out = img::preprocess(&rgb, 8, &Device::Cpu).unwrap();
    assert_eq!(out.dims(), &[3, 8, 8]);
}

// --- configuration ----------------------------------------------------------------------

#[test]
fn fixture_configs_parse_and_validate() {
    for name in ["vqgan_tiny.config.yml", "vqgan_dwt_tiny.config.yml"] {
        let cfg = VqganConfig::from_yaml_file(&fixtures().join("vqgan_tiny").join(name)).unwrap();
        assert_eq!(cfg.embed_dim, cfg.ddconfig.z_channels, "{name}");
    }
    let err =
        VqganConfig::from_yaml_file(&fixtures().join("vqgan_tiny/absent.config.yml")).unwrap_err();
    assert!(err.to_string().contains("absent.config.yml"), "{err}");
}

#[test]
fn expected_tensors_are_exactly_the_fixture_checkpoint_keys() {
    let manifest = json("manifest.json");
    for ckpt in [plain_ckpt(), dwt_ckpt()] {
        let rel = ckpt
            .strip_prefix(fixtures())
            .unwrap()
            .to_str()
            .unwrap()
            .replace('\\', "/");
        let entries = manifest["files"][&rel]
            .as_object()
            .expect("checkpoint in manifest");
        let stored: std::collections::BTreeMap<String, Vec<usize>> = entries
            .iter()
            .map(|(k, v)| {
                let k = k.strip_prefix("state_dict.").unwrap_or(k);
                let k = k.strip_prefix("model.").unwrap_or(k);
                let shape = v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize);
                (k.to_string(), shape.collect())
            })
            .collect();
        let layout = if stored.keys().any(|k| k.starts_with("decoder.decoder.")) {
            VqganLayout::Dwt
        } else {
            VqganLayout::Plain
        };
        let cfg = rudolph::vae::config_for_checkpoint(&ckpt, None).unwrap();
        let expected: std::collections::BTreeMap<String, Vec<usize>> =
            rudolph::vae::expected_tensors(&cfg, layout)
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(expected, stored, "{rel}");
    }
}

// --- encoder ----------------------------------------------------------------------------

#[test]
fn encoder_matches_goldens() {
    let vae = load(&plain_ckpt());
    assert_eq!(vae.layout(), VqganLayout::Plain);
    let g = goldens("vae_goldens/encode.safetensors");
    let images = &g["images"];
    assert_close(
        "encoder_out",
        &vae.encoder_out(images).unwrap(),
        &g["encoder_out"],
        1e-4,
        5e-5,
    );
    assert_close(
        "quant_conv_out",
        &vae.quant_conv_out(images).unwrap(),
        &g["quant_conv_out"],
        1e-4,
        5e-5,
    );
    let logits = &g["proj_logits"];
    let atol = 1e-5 * max_abs(logits) as f64;
    assert_close(
        "proj_logits",
        &vae.proj_logits(images).unwrap(),
        logits,
        0.0,
        atol,
    );
    let codes = vae.encode_codes(images).unwrap();
    assert_eq!(codes.dtype(), DType::U32);
    assert_eq!(codes.dims(), g["indices"].dims());
    assert_eq!(to_i64(&codes), to_i64(&g["indices"]), "indices");
}

#[test]
fn encoding_the_pngs_gives_the_golden_codes() {
    let vae = load(&plain_ckpt());
    let g = goldens("vae_goldens/encode.safetensors");
    let size = vae.config().ddconfig.resolution as u32;
    let batch: Vec<Tensor> = encode_inputs()
        .iter()
        .map(|p| img::preprocess(&img::load_image(p).unwrap(), size, &Device::Cpu).unwrap())
        .collect();
    let codes = vae
        .encode_codes(&Tensor::stack(&batch, 0).unwrap())
        .unwrap();
    assert_eq!(to_i64(&codes), to_i64(&g["indices"]));
}

#[test]
fn encoder_rejects_bad_image_shapes() {
    let vae = load(&plain_ckpt());
    let f = vae.config().downsample_factor();
    let odd = Tensor::zeros((1, 3, f + 1, f), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(vae.encode_codes(&odd), Err(VaeError::BadInput(_))));
    let grey = Tensor::zeros((1, 1, f, f), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        vae.encode_codes(&grey),
        Err(VaeError::BadInput(_))
    ));
}

// --- decoder ----------------------------------------------------------------------------

#[test]
fn plain_decoder_matches_goldens() {
    let vae = load(&plain_ckpt());
    let g = goldens("vae_goldens/decode.safetensors");
    let codes = &g["indices"];
    assert_close("z", &vae.embed_codes(codes).unwrap(), &g["z"], 0.0, 1e-6);
    assert_close(
        "decoded_preclamp",
        &vae.decode_preclamp(codes).unwrap(),
        &g["decoded_preclamp"],
        0.0,
        1e-4,
    );
    assert_close(
        "decoded",
        &vae.decode_codes(codes).unwrap(),
        &g["decoded"],
        0.0,
        1e-4,
    );
}

#[test]
fn dwt_decoder_matches_goldens() {
    let vae = load(&dwt_ckpt());
    assert_eq!(vae.layout(), VqganLayout::Dwt);
    let g = goldens("vae_goldens/decode.safetensors");
    let codes = &g["indices"];
    assert_close(
        "dwt_z",
        &vae.embed_codes(codes).unwrap(),
        &g["dwt_z"],
        0.0,
        1e-6,
    );
    let pre = vae.decode_preclamp(codes).unwrap();
    assert_close(
        "dwt_decoded_preclamp",
        &pre,
        &g["dwt_decoded_preclamp"],
        0.0,
        1e-4,
    );
    let (_, n) = codes.dims2().unwrap();
    let side = vae.decoded_size(n.isqrt());
    assert_eq!(pre.dims()[2..], [side, side]);
    let want =
        ((g["dwt_decoded_preclamp"].clamp(-1f32, 1f32).unwrap() + 1.0).unwrap() * 0.5).unwrap();
    assert_close(
        "dwt decoded",
        &vae.decode_codes(codes).unwrap(),
        &want,
        0.0,
        1e-4,
    );
}

#[test]
fn bad_codes_are_rejected_with_named_errors() {
    let vae = load(&plain_ckpt());
    let n_embed = vae.config().n_embed as i64;
    let dev = Device::Cpu;
    let mut codes = vec![0i64; 9];
    codes[4] = n_embed;
    let err = vae
        .decode_codes(&Tensor::from_vec(codes, (1, 9), &dev).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, VaeError::CodeOutOfRange { code, .. } if code == n_embed),
        "{err}"
    );
    assert!(err.to_string().contains(&n_embed.to_string()));
    let err = vae
        .decode_codes(&Tensor::from_vec(vec![0i64, -1, 0, 0], (1, 4), &dev).unwrap())
        .unwrap_err();
    assert!(
        matches!(err, VaeError::CodeOutOfRange { code: -1, .. }),
        "{err}"
    );
    let err = vae
        .decode_codes(&Tensor::zeros((2, 8), DType::U32, &dev).unwrap())
        .unwrap_err();
    assert!(matches!(err, VaeError::NotSquare { n: 8 }), "{err}");
    let err = vae
        .decode_codes(&Tensor::zeros((1, 0), DType::U32, &dev).unwrap())
        .unwrap_err();
    assert!(matches!(err, VaeError::EmptyCodes), "{err}");
}

// --- checkpoint handling ----------------------------------------------------------------

/// The fixture checkpoint's tensors (with their original names) written as safetensors next to
/// a copy of its config, after `edit`.
fn rewrite_as_safetensors(
    src: &Path,
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let ckpt = rudolph::weights::Checkpoint::open(src).unwrap();
    let mut tensors = ckpt.load_all(DType::F32, &Device::Cpu).unwrap();
    edit(&mut tensors);
    let stem = src.file_stem().unwrap().to_str().unwrap();
    let out = dir.join(format!("{stem}.safetensors"));
    candle_core::safetensors::save(&tensors, &out).unwrap();
    std::fs::copy(
        src.with_file_name(format!("{stem}.config.yml")),
        dir.join(format!("{stem}.config.yml")),
    )
    .unwrap();
    out
}

#[test]
fn safetensors_copies_of_both_layouts_load_and_extra_keys_are_ignored() {
    let dir = scratch("safetensors");
    let codes = goldens("vae_goldens/decode.safetensors")["indices"].clone();
    for src in [plain_ckpt(), dwt_ckpt()] {
        let reference = load(&src).decode_preclamp(&codes).unwrap();
        let copy = rewrite_as_safetensors(&src, &dir, |t| {
            let extra = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
            t.insert("loss.discriminator.main.0.weight".into(), extra);
        });
        let vae = load(&copy);
        assert_eq!(vae.ignored_keys(), ["loss.discriminator.main.0.weight"]);
        assert_close(
            "safetensors copy",
            &vae.decode_preclamp(&codes).unwrap(),
            &reference,
            0.0,
            0.0,
        );
    }
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let dir = scratch("missing");
    let mut removed = String::new();
    let copy = rewrite_as_safetensors(&plain_ckpt(), &dir, |t| {
        removed = t
            .keys()
            .filter(|k| k.contains("decoder.") && k.ends_with("conv2.weight"))
            .min()
            .expect("a decoder conv2 weight")
            .clone();
        t.remove(&removed);
    });
    let err = Vqgan::load(&copy, None, &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, VaeError::IncompatibleCheckpoint { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&removed),
        "{err} should name {removed}"
    );

    let dir = scratch("misshapen");
    let copy = rewrite_as_safetensors(&dwt_ckpt(), &dir, |t| {
        let key = t
            .keys()
            .find(|k| k.ends_with("quantize.embed.weight"))
            .unwrap()
            .clone();
        t.insert(
            key,
            Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = Vqgan::load(&copy, None, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string()
            .contains("quantize.embed.weight has shape [3, 5]"),
        "{err}"
    );
}

#[test]
fn wrong_config_is_reported_not_silently_used() {
    // The real preset does not fit the tiny checkpoint: every problem is listed.
    let dir = scratch("preset");
    let copy = dir.join("renamed.ckpt");
    std::fs::copy(plain_ckpt(), &copy).unwrap();
    let err = Vqgan::load(&copy, None, &Device::Cpu).unwrap_err();
    let VaeError::IncompatibleCheckpoint { problems, .. } = &err else {
        panic!("{err}")
    };
    assert!(problems.len() > 1, "{err}");
    // …and an explicit config makes it load.
    let cfg = fixtures().join("vqgan_tiny/vqgan_tiny.config.yml");
    Vqgan::load(&copy, Some(&cfg), &Device::Cpu).unwrap();
}

// --- command line -----------------------------------------------------------------------

fn rudolph(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(args)
        .output()
        .expect("run rudolph")
}

macro_rules! os {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new(&$a)),*] };
}

#[test]
fn cli_encode_then_decode_round_trip() {
    let dir = scratch("cli");
    let ckpt = plain_ckpt();
    let png = &encode_inputs()[0];
    let out = rudolph(os!["encode-image", png, "--vae", ckpt, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<i64> = v["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_i64().unwrap())
        .collect();
    let side = v["size"].as_u64().unwrap() as usize;
    assert_eq!(codes.len(), side * side);
    let golden = to_i64(
        &goldens("vae_goldens/encode.safetensors")["indices"]
            .i(0)
            .unwrap(),
    );
    assert_eq!(codes, golden);

    let vae = load(&ckpt);
    let bigger = (2 * vae.config().ddconfig.resolution).to_string();
    let big = rudolph(os![
        "encode-image",
        png,
        "--vae",
        ckpt,
        "--json",
        "--size",
        bigger
    ]);
    assert!(
        big.status.success(),
        "{}",
        String::from_utf8_lossy(&big.stderr)
    );
    let v_big: serde_json::Value = serde_json::from_slice(&big.stdout).unwrap();
    assert_eq!(v_big["size"].as_u64().unwrap() as usize, 2 * side);
    assert_eq!(v_big["codes"].as_array().unwrap().len(), 4 * side * side);

    let grid = rudolph(os!["encode-image", png, "--vae", ckpt]);
    assert!(grid.status.success());
    assert_eq!(String::from_utf8_lossy(&grid.stdout).lines().count(), side);

    let codes_file = dir.join("codes.json");
    std::fs::write(&codes_file, &out.stdout).unwrap();
    let png_out = dir.join("out.png");
    let dec = rudolph(os![
        "decode-codes",
        codes_file,
        "--vae",
        ckpt,
        "-o",
        png_out
    ]);
    assert!(
        dec.status.success(),
        "{}",
        String::from_utf8_lossy(&dec.stderr)
    );
    let vae = load(&ckpt);
    let decoded = image::open(&png_out).unwrap();
    assert_eq!(decoded.width() as usize, vae.decoded_size(side));
    assert_eq!(decoded.height() as usize, vae.decoded_size(side));

    // Refuses to overwrite without --force.
    let again = rudolph(os![
        "decode-codes",
        codes_file,
        "--vae",
        ckpt,
        "-o",
        png_out
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = rudolph(os![
        "decode-codes",
        codes_file,
        "--vae",
        ckpt,
        "-o",
        png_out,
        "--force"
    ]);
    assert!(forced.status.success());

    // Several code lists make a grid (padding 2 around and between).
    let list = format!("[{0:?}, {0:?}, {0:?}]", codes);
    std::fs::write(&codes_file, list).unwrap();
    let grid_png = dir.join("grid.png");
    let dec = rudolph(os![
        "decode-codes",
        codes_file,
        "--vae",
        ckpt,
        "-o",
        grid_png,
        "--nrow",
        "2"
    ]);
    assert!(
        dec.status.success(),
        "{}",
        String::from_utf8_lossy(&dec.stderr)
    );
    let s = vae.decoded_size(side) as u32;
    let g = image::open(&grid_png).unwrap();
    assert_eq!((g.width(), g.height()), (2 * (s + 2) + 2, 2 * (s + 2) + 2));
}

#[test]
fn cli_rejects_bad_codes_files() {
    let dir = scratch("cli-bad");
    let ckpt = plain_ckpt();
    let n_embed = load(&ckpt).config().n_embed;
    let cases = [
        ("empty.json", "[]".to_string(), "empty"),
        ("malformed.json", "{\"codes\": [1, 2,".to_string(), "JSON"),
        (
            "nonsquare.json",
            "{\"codes\": [1, 2, 3]}".to_string(),
            "square",
        ),
        (
            "range.json",
            format!("[0, 0, 0, {n_embed}]"),
            "out of range",
        ),
        ("float.json", "[0, 1.5, 0, 0]".to_string(), "integer"),
        (
            "ragged.json",
            "[[0], [0, 0, 0, 0]]".to_string(),
            "same length",
        ),
    ];
    for (name, text, expect) in cases {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let out_png = dir.join(format!("{name}.png"));
        let out = rudolph(os!["decode-codes", file, "--vae", ckpt, "-o", out_png]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} should fail");
        assert!(stderr.contains(expect), "{name}: {stderr}");
        assert!(!out_png.exists(), "{name}: wrote an image");
    }
    let out = rudolph(os![
        "encode-image",
        fixtures().join("vae_goldens/vae.json"),
        "--vae",
        ckpt
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vae.json"));
}
