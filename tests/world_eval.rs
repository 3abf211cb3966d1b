//! `world::eval` end to end on a small world-shaped model with random weights: a tokenizer
//! trained on the world's captions, a 2-layer RuDOLPH for 8×8 codes and a random 64 px VQGAN.
//! A random model fails every target; these tests check that the report is complete and sane.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use rudolph::config::Config;
use rudolph::folder::{Loaded, ModelSpec};
use rudolph::model::{LayerMaskKind, LayerMasks, MaskVariant, Rudolph};
use rudolph::pipelines::images::ImageRank;
use rudolph::tokenizer::{TrainOptions, train_bpe};
use rudolph::vae::{Vqgan, VqganConfig, VqganLayout};
use rudolph::world::eval::{EvalOptions, EvalReport, Metric, evaluate};
use rudolph::world::sample;
use std::path::{Path, PathBuf};
use std::process::Command;

const VQGAN_YML: &str = "embed_dim: 32\nn_embed: 64\nddconfig:\n  double_z: false\n  \
    z_channels: 32\n  resolution: 64\n  in_channels: 3\n  out_ch: 3\n  ch: 32\n  \
    ch_mult: [1, 1, 2, 2]\n  num_res_blocks: 1\n  attn_resolutions: []\n  dropout: 0.0\n";

/// Writes a world-shaped model folder (config.json, model.safetensors, bpe.model, vqgan.ckpt
/// in safetensors format, vqgan.config.yml) into a fresh folder named `name`.
fn world_model_folder(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let device = Device::Cpu;

    let captions: Vec<String> = sample(2000, 0, false)
        .iter()
        .chain(&sample(200, 0, true))
        .map(|s| s.caption())
        .collect();
    let bpe = train_bpe(
        captions.iter().map(String::as_str),
        300,
        &TrainOptions::default(),
    )
    .unwrap();
    bpe.save(dir.join("bpe.model"), false).unwrap();

    let cfg: Config = serde_json::from_value(serde_json::json!({
        "num_layers": 2,
        "vocab_size": bpe.vocab_size() + 12,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "l_text_seq_length": 12,
        "r_text_seq_length": 12,
        "image_tokens_per_dim": 8,
        "image_vocab_size": 64,
        "kernel_size": 7,
        "last_kernel_size": 9,
        "mlp_activation": "gelu",
    }))
    .unwrap();
    cfg.validate().unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = Rudolph::random_weights(&cfg, 1, &device)
        .unwrap()
        .into_iter()
        .collect();
    let masks = LayerMasks::build(&cfg, MaskVariant::Rc1, &device).unwrap();
    for kind in LayerMaskKind::ALL {
        tensors.push((
            format!("transformer.{}", kind.buffer_name()),
            masks.get(kind).clone(),
        ));
    }
    rudolph::weights::save_safetensors_with_bools(&tensors, &dir.join("model.safetensors"), |n| {
        n.ends_with("_mask")
    })
    .unwrap();

    let vq_cfg = VqganConfig::from_yaml_str(VQGAN_YML).unwrap();
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    Vqgan::new(&vq_cfg, VqganLayout::Plain, vb).unwrap();
    // A VarMap creates the codebook as zeros (every code would decode to the same picture).
    let codebook = candle_core::Tensor::randn(0f32, 1f32, (64, 32), &device).unwrap();
    varmap.set_one("quantize.embed.weight", codebook).unwrap();
    // Safetensors under the .ckpt name: the loader detects the format from the content.
    varmap.save(dir.join("vqgan.ckpt")).unwrap();
    std::fs::write(dir.join("vqgan.config.yml"), VQGAN_YML).unwrap();
    dir
}

fn load(dir: &Path) -> Loaded {
    let spec = ModelSpec {
        dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    Loaded::load(&spec, &Device::Cpu, DType::F32).unwrap()
}

fn check_metric(name: &str, m: &Metric, n: usize) {
    assert_eq!(m.n, n, "{name}: count");
    assert!(m.correct <= m.n, "{name}: {} of {}", m.correct, m.n);
    assert!((0.0..=1.0).contains(&m.rate), "{name}: rate {}", m.rate);
    assert_eq!(m.pass, m.target.map(|t| m.rate >= t), "{name}: pass mark");
}

fn check_report(report: &EvalReport, n: usize) {
    assert_eq!(report.n, n);
    let metrics = report.metrics();
    for (name, m) in &metrics {
        check_metric(name, m, n);
    }
    // The world's targets: captioning 6 + text→image 5 (seen), 4 + 4 held-out, retrieval, texts.
    let targeted = metrics.iter().filter(|(_, m)| m.target.is_some()).count();
    assert_eq!(targeted, 21);
    assert_eq!(report.targets_total, 21);
    assert!(report.targets_passed <= report.targets_total);
    let t = |m: &Metric| m.target.unwrap();
    assert_eq!(t(&report.captioning_seen.size), 0.97);
    assert_eq!(t(&report.captioning_seen.shape), 0.90);
    assert_eq!(
        t(report.captioning_seen.grammatical.as_ref().unwrap()),
        0.97
    );
    assert_eq!(t(&report.text_to_image_seen.colour), 0.85);
    assert_eq!(report.text_to_image_held_out.shape.target, None);
    assert_eq!(t(&report.captioning_held_out.colour), 0.85);
    assert_eq!(t(&report.retrieval), 0.90);
    assert_eq!(t(&report.generated_texts.valid), 0.90);
    assert_eq!(report.captioning_seen.examples.len(), n);
    assert_eq!(report.generated_texts.texts.len(), n);
    assert_eq!(report.pictures_seen.len(), n);
    assert_eq!(report.pictures_held_out.len(), n);
    assert!(
        report
            .pictures_seen
            .iter()
            .all(|p| p.dimensions() == (64, 64))
    );
    // Each caption gets its own picture (the random codebook decodes codes differently).
    assert!(
        report
            .pictures_seen
            .iter()
            .any(|p| p != &report.pictures_seen[0])
    );
    let table = report.table();
    for row in [
        "captioning (seen)",
        "text→image (held-out)",
        "retrieval",
        "generated texts",
    ] {
        assert!(table.contains(row), "{row} missing from\n{table}");
    }
}

#[test]
fn evaluate_scores_a_random_world_model() {
    let dir = world_model_folder("world_eval_lib");
    let loaded = load(&dir);
    let opts = EvalOptions {
        n: 3,
        seed: 5,
        batch_size: 2,
        captions: 3,
        images: 2,
        guidance: None,
        rank: None,
        progress: rudolph::progress::silent(),
    };
    let report = evaluate(&loaded, &opts).unwrap();
    check_report(&report, 3);
    assert_eq!(
        report.ranked_by,
        ImageRank::Codes,
        "a folder without a choice ranks by codes"
    );
    // The same seed gives the same numbers.
    let again = evaluate(&loaded, &opts).unwrap();
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        serde_json::to_value(&again).unwrap()
    );
    // Greedy captions (captions = 0) are a different measurement, equally reproducible.
    let greedy = EvalOptions {
        captions: 0,
        images: 1,
        ..opts.clone()
    };
    let g = evaluate(&loaded, &greedy).unwrap();
    check_report(&g, 3);
    assert_eq!((g.captions, g.images), (0, 1));
    assert!(g.table().contains("one greedy caption"), "{}", g.table());
    // Ranked by the decoded pictures: the same draws, reproducibly, and the table says so.
    let decoded = EvalOptions {
        rank: Some(ImageRank::Decoded),
        ..opts
    };
    let d = evaluate(&loaded, &decoded).unwrap();
    check_report(&d, 3);
    assert_eq!(d.ranked_by, ImageRank::Decoded);
    assert!(d.table().contains("ranked decoded"), "{}", d.table());
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::to_value(evaluate(&loaded, &decoded).unwrap()).unwrap()
    );
}

#[test]
fn evaluate_needs_a_vqgan_and_a_scene() {
    let dir = world_model_folder("world_eval_novae");
    let mut loaded = load(&dir);
    let no_scene = EvalOptions {
        n: 0,
        ..Default::default()
    };
    let no_picture = EvalOptions {
        images: 0,
        ..Default::default()
    };
    for (opts, want) in [
        (no_scene, "at least one scene"),
        (no_picture, "one picture per caption"),
    ] {
        let err = evaluate(&loaded, &opts).err().unwrap();
        assert!(err.to_string().contains(want), "{err}");
    }
    loaded.vae = None;
    let err = evaluate(&loaded, &EvalOptions::default()).err().unwrap();
    assert!(
        err.to_string().contains("world eval needs a VQGAN"),
        "{err}"
    );
}

#[test]
fn cli_world_eval_prints_json_and_saves_grids() {
    let dir = world_model_folder("world_eval_cli");
    let out = dir.join("eval-out");
    let run = Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args([
            "world", "eval", "--n", "2", "--seed", "1", "--json", "--quiet",
        ])
        .arg("--model")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(doc["n"], 2);
    assert_eq!(
        (doc["captions"].clone(), doc["images"].clone()),
        (
            rudolph::pipelines::defaults::CAPTIONS.into(),
            rudolph::pipelines::defaults::IMAGES.into()
        )
    );
    assert_eq!(doc["targets_total"], 21);
    assert_eq!(doc["retrieval"]["target"], 0.9);
    assert_eq!(doc["captioning_seen"]["size"]["n"], 2);
    for f in ["text_to_image_seen.png", "text_to_image_held_out.png"] {
        assert!(out.join(f).is_file(), "{f} not written");
    }
    // The first seen caption is exactly what `rudolph caption` (its defaults) ranks first for
    // that picture with the example's seed.
    let scene = sample(2, 1, false)[0];
    let png = dir.join("scene0.png");
    rudolph::image::save_image(&rudolph::world::render::render(&scene), &png).unwrap();
    let example = &doc["captioning_seen"]["examples"][0];
    assert_eq!(example["truth"], scene.caption());
    let seed = example["seed"]
        .as_u64()
        .expect("a sampled caption has its seed");
    let caption = Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .arg("caption")
        .arg(&png)
        .args(["--seed", &seed.to_string(), "--json", "--quiet", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(caption.status.success());
    let captions: serde_json::Value = serde_json::from_slice(&caption.stdout).unwrap();
    let want = captions["captions"][0]["text"].as_str().unwrap_or("");
    assert_eq!(example["got"], want);

    let table = Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(["world", "eval", "--n", "1", "--quiet"])
        .arg("--model")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.contains("targets met: "), "{text}");
    assert!(text.contains("captioning (seen)"), "{text}");
}
