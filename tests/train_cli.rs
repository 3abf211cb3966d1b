//! `rudolph train` end to end on the tiny fixture model: data, logging, saving, resuming and
//! bad input.

mod common;

use candle_core::{DType, Device};
use common::*;
use rudolph::model::Rudolph;
use rudolph::model::masks::causal_mask;
use rudolph::weights::Checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixture pictures, each with a caption, one text-only line and one picture alone, as a
/// JSONL in `dir` (pictures named relative to it).
fn write_dataset(dir: &Path) -> PathBuf {
    let mut pictures: Vec<PathBuf> = std::fs::read_dir(fixture("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    pictures.sort();
    assert!(
        pictures.len() >= 2,
        "the fixtures need at least two pictures"
    );
    let images = dir.join("pics");
    std::fs::create_dir_all(&images).unwrap();
    let captions = ["a red square on grass", "a blue circle", "a wide picture"];
    let mut lines = Vec::new();
    for (i, p) in pictures.iter().enumerate() {
        let name = p.file_name().unwrap().to_str().unwrap();
        std::fs::copy(p, images.join(name)).unwrap();
        let text = captions[i % captions.len()];
        lines.push(serde_json::json!({"image": format!("pics/{name}"), "text": text}).to_string());
    }
    lines.push(serde_json::json!({"text": "just a sentence"}).to_string());
    let first = pictures[0].file_name().unwrap().to_str().unwrap();
    lines.push(serde_json::json!({"image": format!("pics/{first}")}).to_string());
    lines.push(
        serde_json::json!({"image": format!("pics/{first}"), "prompt": "a picture"}).to_string(),
    );
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn model_flags(data: &Path) -> Vec<String> {
    [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        fixture("rudolph_tiny").to_str().unwrap(),
        "--tokenizer",
        fixture("tokenizer/bpe.model").to_str().unwrap(),
        "--vae",
        fixture("vqgan_tiny/vqgan_tiny.ckpt").to_str().unwrap(),
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

fn rudolph(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[String]) {
    let out = rudolph(args);
    assert!(
        out.status.success(),
        "rudolph {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn failure(args: &[String]) -> String {
    let out = rudolph(args);
    assert!(!out.status.success(), "rudolph {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn with(mut base: Vec<String>, more: &[&str]) -> Vec<String> {
    base.extend(more.iter().map(|s| s.to_string()));
    base
}

/// Overfitting a handful of examples: the loss must fall to a third. A deep, narrow model (ten
/// layers of width 32) takes about three times the steps of the shared fixtures' model to get
/// there, so the run is long enough for any tiny configuration.
#[test]
fn training_through_the_cli_drives_the_loss_down_and_saves_a_loadable_model() {
    let dir = scratch("overfit");
    let data = write_dataset(&dir);
    let out = dir.join("out");
    let args = with(
        model_flags(&data),
        &[
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "120",
            "--lr",
            "3e-3",
            "--batch-size",
            "2",
            "--val-fraction",
            "0",
            "--log-every",
            "1",
            "--save-every",
            "0",
        ],
    );
    ok(&args);
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 120);
    for (i, line) in log.iter().enumerate() {
        assert_eq!(line["step"].as_u64(), Some(i as u64 + 1));
        for key in ["loss", "l_text_loss", "image_loss", "r_text_loss", "lr"] {
            assert!(line[key].as_f64().unwrap().is_finite(), "{key} at {line}");
        }
    }
    let loss = |l: &serde_json::Value| l["loss"].as_f64().unwrap();
    let first = loss(&log[0]);
    let last = log[log.len() - 3..].iter().map(loss).sum::<f64>() / 3.0;
    assert!(last < first / 3.0, "loss fell only from {first} to {last}");
    for f in [
        "model.safetensors",
        "config.json",
        "loss.png",
        "codes-cache.json",
    ] {
        assert!(out.join(f).is_file(), "{f} was not written");
    }
    // The original's constructor arguments, exactly as the fixture's config.json (which the
    // original wrote from its constructor's signature).
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        read(&out.join("config.json")),
        read(&fixture("rudolph_tiny/config.json"))
    );
    let ckpt = Checkpoint::open(out.join("model.safetensors")).unwrap();
    let cfg =
        rudolph::config::Config::from_json_file(&out.join("config.json")).expect("config.json");
    assert_eq!(cfg, tiny_config());
    let (model, _) = Rudolph::from_checkpoint(&ckpt, &cfg, DType::F32, &Device::Cpu).unwrap();
    let mask_dtype = ckpt
        .info("transformer.row_mask")
        .expect("row mask saved")
        .dtype;
    assert_eq!(mask_dtype, rudolph::weights::StoredDtype::Bool);
    let t = cfg.total_seq_length();
    let ids = candle_core::Tensor::zeros((1, t), DType::U32, &Device::Cpu).unwrap();
    let logits = model
        .forward(&ids, &causal_mask(1, t, &Device::Cpu).unwrap())
        .unwrap();
    assert!(flat_f64(&logits).iter().all(|x| x.is_finite()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_resumed_run_ends_with_the_same_parameters_as_an_uninterrupted_one() {
    let dir = scratch("resume");
    let data = write_dataset(&dir);
    let common = with(
        model_flags(&data),
        &[
            "--steps",
            "8",
            "--lr",
            "3e-3",
            "--batch-size",
            "2",
            "--accumulate",
            "2",
            "--val-fraction",
            "0.25",
            "--eval-every",
            "3",
            "--bpe-dropout",
            "0.1",
            "--schedule",
            "cosine",
            "--warmup",
            "2",
        ],
    );
    let straight = dir.join("straight");
    ok(&with(
        common.clone(),
        &["--out", straight.to_str().unwrap(), "--save-every", "0"],
    ));
    let interrupted = dir.join("interrupted");
    ok(&with(
        common,
        &["--out", interrupted.to_str().unwrap(), "--save-every", "4"],
    ));
    // A new output folder holding only the half-way checkpoint: the resumed process knows
    // nothing but what the checkpoint saved.
    let resumed = dir.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoint-4")).unwrap();
    for f in std::fs::read_dir(interrupted.join("checkpoint-4")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(
            &f,
            resumed.join("checkpoint-4").join(f.file_name().unwrap()),
        )
        .unwrap();
    }
    // As a checkpoint saved before runs recorded the starting folder's generation_config.json.
    let state_path = resumed.join("checkpoint-4/state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["run"]
        .as_object_mut()
        .unwrap()
        .remove("generation_config")
        .expect("the state records the generation config");
    std::fs::write(&state_path, state.to_string()).unwrap();
    ok(&[
        "train".into(),
        "--resume".into(),
        resumed.to_str().unwrap().into(),
        "--quiet".into(),
    ]);
    let a = Checkpoint::open(straight.join("model.safetensors")).unwrap();
    let b = Checkpoint::open(resumed.join("model.safetensors")).unwrap();
    let a_all = a.load_all(DType::F32, &Device::Cpu).unwrap();
    let b_all = b.load_all(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(a_all.len(), b_all.len());
    for (name, ta) in &a_all {
        let tb = b_all.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let (va, vb) = (flat_f64(ta), flat_f64(tb));
        assert!(
            va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after resuming"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_lines_and_missing_pictures_are_reported_with_file_and_line() {
    let dir = scratch("bad");
    let data = write_dataset(&dir);
    let good = std::fs::read_to_string(&data).unwrap();

    let broken = dir.join("broken.jsonl");
    std::fs::write(
        &broken,
        format!("{good}{{\"image\": 3, \"text\": \"x\"}}\n"),
    )
    .unwrap();
    let line = good.lines().count() + 1;
    let err = failure(&with(
        model_flags(&broken),
        &["--out", dir.join("o1").to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!("broken.jsonl:{line}")),
        "error does not name the file and line {line}: {err}"
    );

    let missing = dir.join("missing.jsonl");
    std::fs::write(
        &missing,
        format!("{good}{{\"image\": \"pics/nowhere.png\", \"text\": \"x\"}}\n"),
    )
    .unwrap();
    let err = failure(&with(
        model_flags(&missing),
        &["--out", dir.join("o2").to_str().unwrap()],
    ));
    assert!(
        err.contains("nowhere.png") && err.contains(&format!("missing.jsonl:{line}")),
        "error does not name the missing picture and its line: {err}"
    );

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, format!("{good}{{}}\n")).unwrap();
    let err = failure(&with(
        model_flags(&empty),
        &["--out", dir.join("o3").to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!("empty.jsonl:{line}")) && err.contains("neither"),
        "error does not say the line has neither key: {err}"
    );

    let first: serde_json::Value = serde_json::from_str(good.lines().next().unwrap()).unwrap();
    let picture = first["image"].as_str().unwrap();
    for (name, bad, says) in [
        (
            "both.jsonl",
            serde_json::json!({"image": picture, "text": "a", "prompt": "b"}).to_string(),
            "both",
        ),
        (
            "lone.jsonl",
            "{\"prompt\": \"b\"}".to_string(),
            "no \"image\"",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, format!("{good}{bad}\n")).unwrap();
        let err = failure(&with(
            model_flags(&path),
            &["--out", dir.join("o4").to_str().unwrap()],
        ));
        assert!(
            err.contains(&format!("{name}:{line}")) && err.contains(says),
            "error does not say {says:?} at {name}:{line}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_existing_output_folder_is_refused_without_force() {
    let dir = scratch("refuse");
    let data = write_dataset(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let args = with(
        model_flags(&data),
        &[
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
            "--val-fraction",
            "0",
        ],
    );
    let err = failure(&args);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    // With --force the run completes the model folder, and says which file it replaced.
    std::fs::write(out.join("bpe.model"), "not this model's tokenizer").unwrap();
    let forced = rudolph(&with(args, &["--force"]));
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(forced.status.success(), "{stderr}");
    assert!(out.join("model.safetensors").is_file());
    assert!(
        stderr.contains("warning: replaced") && stderr.contains("bpe.model"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("bpe.model")).unwrap(),
        std::fs::read(fixture("tokenizer/bpe.model")).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `n` shapes-world scenes (pictures and `data.jsonl`) in `dir`, and `held_out` more of the
/// held-out colour+shape pairs, drawn by the binary as a user would.
fn world_scenes(dir: &Path, n: usize, held_out: usize) -> PathBuf {
    ok(&[
        "world",
        "sample",
        "--n",
        &n.to_string(),
        "--with-held-out",
        &held_out.to_string(),
        "--out",
        dir.to_str().unwrap(),
        "--seed",
        "1",
    ]
    .map(String::from));
    dir.join("data.jsonl")
}

/// A few steps on the built-in model (two, no checkpoints unless `more` says otherwise).
fn builtin_train(data: &Path, out: &Path, more: &[&str]) -> Vec<String> {
    let mut args = with(
        [
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "2",
            "--val-fraction",
            "0",
            "--quiet",
        ]
        .map(String::from)
        .to_vec(),
        more,
    );
    for (flag, value) in [("--steps", "2"), ("--save-every", "0")] {
        if !more.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args
}

/// Without `--model` (and without `--config`) `train` fine-tunes the built-in model, as every
/// task command uses it, and its output folder is a whole model folder: the drawing and
/// captioning commands read it as it is.
#[test]
fn the_built_in_model_fine_tunes_by_default_into_a_folder_every_command_reads() {
    let dir = scratch("builtin-default");
    let data = world_scenes(&dir.join("scenes"), 3, 1);
    // Three seen scenes and one of a held-out pair, as the docs' recipe mixes them.
    let lines = std::fs::read_to_string(&data).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(lines.contains("held-out-000000.png"), "{lines}");
    let out = dir.join("out");
    ok(&builtin_train(&data, &out, &[]));
    let builtin = rudolph::builtin::dir().unwrap();
    for f in [
        "bpe.model",
        "vqgan.safetensors",
        "vqgan.config.yml",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap_or_default(),
            std::fs::read(builtin.join(f)).unwrap(),
            "{f} is not the built-in model's"
        );
    }
    // The loss curve names its axes and, in a legend, its curve: dark label pixels under the
    // x axis's tick labels and above the y axis, the training line's blue beside its name.
    let plot = image::open(out.join("loss.png")).unwrap().to_rgb8();
    let (w, h) = plot.dimensions();
    let any =
        |xs: std::ops::Range<u32>, ys: std::ops::Range<u32>, hit: &dyn Fn([u8; 3]) -> bool| {
            xs.flat_map(|x| ys.clone().map(move |y| (x, y)))
                .any(|(x, y)| hit(plot.get_pixel(x, y).0))
        };
    let black = |p: [u8; 3]| p == [0, 0, 0];
    assert!(
        any(w / 2 - 20..w / 2 + 20, h - 20..h - 10, &black),
        "no x-axis name"
    );
    assert!(any(0..40, 15..30, &black), "no y-axis name");
    assert!(
        any(w / 2..w, 15..30, &|p| p == [30, 90, 200]) && any(w / 2..w, 15..30, &black),
        "no legend"
    );
    let picture = dir.join("drawn.png");
    let model = out.to_str().unwrap();
    ok(&[
        "image",
        "большой красный круг в центре на белом фоне",
        "--model",
        model,
        "--images",
        "2",
        "--keep",
        "1",
        "--seed",
        "0",
        "-o",
        picture.to_str().unwrap(),
        "--quiet",
    ]
    .map(String::from));
    assert!(picture.is_file());
    ok(&[
        "caption",
        picture.to_str().unwrap(),
        "--model",
        model,
        "--captions",
        "2",
        "--seed",
        "0",
        "--quiet",
    ]
    .map(String::from));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in model's 1024 codes do not fit its 168 text classes, so the original's labels
/// cannot train it: the error says which flag asked for them, before any picture is read (the
/// data here names a missing one) and before the output folder exists.
#[test]
fn original_labels_that_cannot_fit_are_refused_first_naming_the_flag() {
    let dir = scratch("original-labels");
    let data = world_scenes(&dir.join("scenes"), 2, 0);
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(
        &data,
        format!("{text}{{\"image\": \"nowhere.png\", \"text\": \"x\"}}\n"),
    )
    .unwrap();
    let out = dir.join("out");
    let err = failure(&builtin_train(&data, &out, &["--original"]));
    assert!(
        err.contains("drop --original") && err.contains("1024") && !err.contains("nowhere"),
        "{err}"
    );
    assert!(!out.exists(), "the refused run left {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whatever is wrong with the model, the tokenizer or the data is found before the output
/// folder is made, so the retry needs no `--force`.
#[test]
fn bad_input_is_found_before_the_output_folder_is_made() {
    let dir = scratch("validate-first");
    let data = world_scenes(&dir.join("scenes"), 2, 0);
    let out = dir.join("out");
    let bad_data = dir.join("bad.jsonl");
    std::fs::write(&bad_data, "{\"image\": \"nowhere.png\", \"text\": \"x\"}\n").unwrap();
    for (args, says) in [
        (
            builtin_train(
                &data,
                &out,
                &["--model", dir.join("no-model").to_str().unwrap()],
            ),
            "no-model",
        ),
        (
            builtin_train(
                &data,
                &out,
                &["--tokenizer", dir.join("no-bpe.model").to_str().unwrap()],
            ),
            "no-bpe.model",
        ),
        (builtin_train(&bad_data, &out, &[]), "nowhere.png"),
        (
            builtin_train(&data, &out, &["--lr", "nan"]),
            "lr must be a positive number",
        ),
        (
            builtin_train(&data, &out, &["--lr", "inf"]),
            "lr must be a positive number",
        ),
        (
            builtin_train(&data, &out, &["--lr", "-1"]),
            "lr must be a positive number",
        ),
        (
            builtin_train(&data, &out, &["--clip", "nan"]),
            "clip_norm must be a positive",
        ),
        (
            builtin_train(&data, &out, &["--clip", "-1"]),
            "clip_norm must be a positive",
        ),
        (
            builtin_train(&data, &out, &["--weight-decay", "nan"]),
            "weight_decay must be a number of at least 0",
        ),
        (
            builtin_train(&data, &out, &["--weight-decay", "-1"]),
            "weight_decay must be a number of at least 0",
        ),
    ] {
        let err = failure(&args);
        assert!(err.contains(says), "error does not name {says}: {err}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    ok(&builtin_train(&data, &out, &[]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run that fails on the way removes the folder it made unless a checkpoint is in it; then
/// the error says how to continue. A learning rate of 1e30 makes the second step's loss NaN.
#[test]
fn a_failed_run_leaves_no_folder_behind_unless_it_saved_a_checkpoint() {
    let dir = scratch("failed-run");
    let data = world_scenes(&dir.join("scenes"), 2, 0);
    let out = dir.join("out");
    let diverging = ["--lr", "1e30"];
    let err = failure(&builtin_train(&data, &out, &diverging));
    assert!(err.contains("diverged"), "{err}");
    assert!(!out.exists(), "the failed run left {}", out.display());

    let err = failure(&builtin_train(
        &data,
        &out,
        &["--lr", "1e30", "--save-every", "1"],
    ));
    assert!(
        err.contains(&format!("--resume {}", out.display())),
        "the error does not say how to continue: {err}"
    );
    assert!(out.join("checkpoint-1/state.json").is_file());

    // A folder the user had stays, with what it held.
    let theirs = dir.join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("keep.txt"), "precious").unwrap();
    failure(&builtin_train(&data, &theirs, &["--lr", "1e30", "--force"]));
    assert_eq!(
        std::fs::read_to_string(theirs.join("keep.txt")).unwrap(),
        "precious"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
