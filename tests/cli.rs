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

/// The fixture files as a model: the tiny transformer, its tokenizer and the tiny VQGAN.
fn model_flags() -> Vec<String> {
    vec![
        "--model".into(),
        fixture("rudolph_tiny").display().to_string(),
        "--tokenizer".into(),
        fixture("tokenizer/bpe.model").display().to_string(),
        "--vae".into(),
        fixture("vqgan_tiny/vqgan_tiny.ckpt").display().to_string(),
    ]
}

fn run_with_model(args: &[&str]) -> Output {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(model_flags());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    rudolph(&refs)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    // Under target/, replaced on each run, so that runs do not pile folders up.
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rudolph-cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn classify_reproduces_the_golden_from_the_picture_file() {
    for name in ["zs_clf_0", "zs_clf_2"] {
        let c = json(&format!("pipeline_goldens/{name}.json"));
        let args = &c["args"];
        let classes: Vec<String> = serde_json::from_value(args["classes"].clone()).unwrap();
        let picture = fixture(args["pil_img"].as_str().unwrap());
        let joined = classes.join(",");
        let mut cmd = vec![
            "classify",
            picture.to_str().unwrap(),
            "--classes",
            &joined,
            "--json",
        ];
        let template = args["template"].as_str().unwrap();
        if !template.is_empty() {
            cmd.extend(["--template", template]);
        }
        let doc = stdout_json(&run_with_model(&cmd));
        let want = &c["result"];
        assert_eq!(doc["class"], want["class"], "{name}");
        assert_eq!(doc["label"], want["label"], "{name}");
        for (i, class) in classes.iter().enumerate() {
            let s = &doc["scores"][i];
            assert_eq!(s["class"].as_str().unwrap(), class);
            let (got, w) = (
                s["ppl_text"].as_f64().unwrap(),
                want["ppl_text"][i].as_f64().unwrap(),
            );
            assert!(
                (got - w).abs() <= 1e-4 * w,
                "{name} class {i}: {got} vs {w}"
            );
        }
    }
}

#[test]
fn text_caption_image_and_rerank_commands_work_end_to_end() {
    let dir = temp_dir("e2e");
    let doc = stdout_json(&run_with_model(&[
        "text",
        "на картинке",
        "--texts",
        "3",
        "--seed",
        "1",
        "--json",
    ]));
    assert!(!doc["texts"].as_array().unwrap().is_empty());
    assert_eq!(doc["seed"], 1);

    let picture = fixture("images/img_0.png");
    let doc = stdout_json(&run_with_model(&[
        "caption",
        picture.to_str().unwrap(),
        "--captions",
        "4",
        "--keep",
        "2",
        "--seed",
        "1",
        "--json",
    ]));
    let caps = doc["captions"].as_array().unwrap();
    assert!(!caps.is_empty() && caps.len() <= 2);
    assert_eq!(doc["rank"], "joint");
    let scores: Vec<f64> = caps.iter().map(|c| c["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] <= w[1]),
        "best first: {scores:?}"
    );
    assert!(caps.iter().all(|c| c["ppl_text"].as_f64().unwrap() > 0.0));

    let out = dir.join("grid.png");
    let doc = stdout_json(&run_with_model(&[
        "image",
        "старый маяк",
        "--images",
        "3",
        "--keep",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "-o",
        out.to_str().unwrap(),
        "--save-each",
        "--json",
    ]));
    let images = doc["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    let ppl: Vec<f64> = images
        .iter()
        .map(|i| i["ppl_text"].as_f64().unwrap())
        .collect();
    assert!(
        ppl.windows(2).all(|w| w[0] <= w[1]),
        "ranked best first: {ppl:?}"
    );
    let grid = image::open(&out).unwrap();
    assert!(grid.width() > grid.height(), "two pictures side by side");
    assert!(dir.join("grid_1.png").is_file() && dir.join("grid_2.png").is_file());
    // Nothing is overwritten without --force.
    let again = run_with_model(&[
        "image",
        "старый маяк",
        "--images",
        "1",
        "--keep",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        !again.status.success() && stderr(&again).contains("--force"),
        "{}",
        stderr(&again)
    );

    // Rerank the generated codes, and the pictures.
    let codes = dir.join("codes.json");
    let grids: Vec<&serde_json::Value> = images.iter().map(|i| &i["codes"]).collect();
    std::fs::write(&codes, serde_json::to_string(&grids).unwrap()).unwrap();
    let doc = stdout_json(&run_with_model(&[
        "rerank",
        "старый маяк",
        "--codes",
        codes.to_str().unwrap(),
        "--json",
    ]));
    let got: Vec<f64> = doc["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ppl_text"].as_f64().unwrap())
        .collect();
    for (g, w) in got.iter().zip(&ppl) {
        assert!(
            (g - w).abs() <= 1e-3 * w,
            "rerank of generated codes {g} vs {w}"
        );
    }
    let other = fixture("images/img_1.png");
    let doc = stdout_json(&run_with_model(&[
        "rerank",
        "ёжик",
        picture.to_str().unwrap(),
        other.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(doc["candidates"].as_array().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_inputs_fail_with_a_message_and_no_panic() {
    let dir = temp_dir("bad");
    let missing = dir.join("missing.png");
    let not_image = fixture("tokenizer/bpe.model");
    let picture = fixture("images/img_1.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["caption", missing.to_str().unwrap()], "missing.png"),
        (vec!["caption", not_image.to_str().unwrap()], "bpe.model"),
        (
            vec!["classify", picture.to_str().unwrap(), "--classes", ","],
            "empty",
        ),
        (
            vec!["classify", missing.to_str().unwrap(), "--classes", "a,b"],
            "missing.png",
        ),
        (
            vec![
                "image",
                "кот",
                "--prompt-image",
                picture.to_str().unwrap(),
                "--borders",
                "9,0,0,0",
                "-o",
                "/dev/null",
                "--force",
            ],
            "larger than the image",
        ),
        (
            vec![
                "image",
                "кот",
                "--borders",
                "1,2",
                "-o",
                "/dev/null",
                "--force",
            ],
            "four numbers",
        ),
        (vec!["rerank", "кот"], "--codes"),
        (vec!["text", "--top-p", "1.5"], "top_p"),
    ];
    for (args, needle) in cases {
        let out = run_with_model(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let codes = dir.join("bad.json");
    std::fs::write(&codes, "[[1, 2, 3]]").unwrap();
    let out = run_with_model(&["rerank", "кот", "--codes", codes.to_str().unwrap()]);
    assert!(
        !out.status.success() && stderr(&out).contains("codes"),
        "{}",
        stderr(&out)
    );
    // A text longer than the slots is truncated with a warning, not refused.
    let long = "очень длинный текст ".repeat(10);
    let out = run_with_model(&[
        "image",
        &long,
        "--images",
        "1",
        "--keep",
        "1",
        "-o",
        dir.join("long.png").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// A folder holding the original files under their original names is a complete model.
#[test]
fn a_model_folder_is_found_by_the_original_file_names() {
    let dir = temp_dir("folder");
    for (from, to) in [
        ("rudolph_tiny/config.json", "config.json"),
        ("rudolph_tiny/pytorch_model.bin", "pytorch_model.bin"),
        ("tokenizer/bpe.model", "bpe.model"),
        ("vqgan_tiny/vqgan_tiny.ckpt", "vqgan_tiny.ckpt"),
        ("vqgan_tiny/vqgan_tiny.config.yml", "vqgan_tiny.config.yml"),
    ] {
        std::fs::copy(fixture(from), dir.join(to)).unwrap();
    }
    let picture = fixture("images/img_0.png");
    let doc = stdout_json(&rudolph(&[
        "classify",
        picture.to_str().unwrap(),
        "--classes",
        "кот,дом",
        "--model",
        dir.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(doc["scores"].as_array().unwrap().len(), 2);
    // Without a tokenizer the folder is incomplete, and the error says what is missing.
    std::fs::remove_file(dir.join("bpe.model")).unwrap();
    let out = rudolph(&["text", "--model", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bpe.model"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// A folder's `generation_config.json` sets `rudolph image`'s guidance and ranking unless the
/// flags do; a malformed one is an error naming the file.
#[test]
fn a_model_folder_sets_its_own_guidance_and_ranking() {
    let dir = temp_dir("generation");
    for (from, to) in [
        ("rudolph_tiny/config.json", "config.json"),
        ("rudolph_tiny/model.safetensors", "model.safetensors"),
        ("tokenizer/bpe.model", "bpe.model"),
        ("vqgan_tiny/vqgan_tiny.ckpt", "vqgan_tiny.ckpt"),
        ("vqgan_tiny/vqgan_tiny.config.yml", "vqgan_tiny.config.yml"),
    ] {
        std::fs::copy(fixture(from), dir.join(to)).unwrap();
    }
    let out = dir.join("out.png");
    let draw = |extra: &[&str]| {
        let mut args = vec![
            "image",
            "кот",
            "--images",
            "1",
            "--seed",
            "3",
            "--force",
            "--quiet",
            "--json",
            "--model",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        rudolph(&args)
    };
    let guidance = |o: &Output| stdout_json(o)["guidance"].as_f64().unwrap();
    assert_eq!(guidance(&draw(&[])), 1.0);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"guidance_scale": 2.5}"#,
    )
    .unwrap();
    let guided = draw(&[]);
    assert_eq!(guidance(&guided), 2.5);
    assert_eq!(guidance(&draw(&["--guidance", "1"])), 1.0);
    let codes = |o: &Output| stdout_json(o)["images"][0]["codes"].clone();
    assert_eq!(codes(&guided), codes(&draw(&["--guidance", "2.5"])));
    let ranked_by = |o: &Output| stdout_json(o)["ranked_by"].as_str().unwrap().to_string();
    let decoded = |o: &Output| stdout_json(o)["images"][0]["ppl_decoded"].as_f64();
    assert_eq!(ranked_by(&guided), "codes");
    assert_eq!(decoded(&guided), None);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"guidance_scale": 2.5, "image_rank": "decoded"}"#,
    )
    .unwrap();
    let by_picture = draw(&[]);
    assert_eq!(ranked_by(&by_picture), "decoded");
    assert!(decoded(&by_picture).is_some_and(|p| p.is_finite() && p >= 1.0));
    assert_eq!(
        codes(&by_picture),
        codes(&guided),
        "one candidate, the same draw"
    );
    assert_eq!(ranked_by(&draw(&["--rank", "codes"])), "codes");
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"image_rank": "best"}"#,
    )
    .unwrap();
    let bad = draw(&[]);
    assert!(
        !bad.status.success() && stderr(&bad).contains("image_rank"),
        "{}",
        stderr(&bad)
    );
    std::fs::write(dir.join("generation_config.json"), r#"{"guidance": 2}"#).unwrap();
    let bad = draw(&[]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("generation_config.json"),
        "{}",
        stderr(&bad)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The lines of a JSONL file, parsed.
fn read_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn world_sample_writes_pictures_and_captions() {
    let dir = temp_dir("world").join("scenes");
    let out = rudolph(&[
        "world",
        "sample",
        "--n",
        "5",
        "--out",
        dir.to_str().unwrap(),
        "--seed",
        "9",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = read_jsonl(&dir.join("data.jsonl"));
    assert_eq!(lines.len(), 5);
    for line in &lines {
        let picture = image::open(dir.join(line["image"].as_str().unwrap())).unwrap();
        assert_eq!((picture.width(), picture.height()), (64, 64));
        assert!(line["text"].as_str().unwrap().ends_with("фоне"));
    }
    let again = rudolph(&[
        "world",
        "sample",
        "--n",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(!again.status.success() && stderr(&again).contains("--force"));

    // Recoloured pictures with prompts: the caption without its colour, never a held-out colour.
    let prompted = dir.parent().unwrap().join("prompted");
    let out = rudolph(&[
        "world",
        "sample",
        "--n",
        "2",
        "--recoloured",
        "6",
        "--prompted",
        "--out",
        prompted.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = read_jsonl(&prompted.join("data.jsonl"));
    assert_eq!(lines.len(), 8);
    let colours = ["красн", "оранж", "жёлт", "зелён", "син", "фиолет"];
    for line in &lines[2..8] {
        assert!(line.get("text").is_none(), "{line}");
        let prompt = line["prompt"].as_str().unwrap();
        assert!(!colours.iter().any(|c| prompt.contains(c)), "{prompt}");
        // With a colour put back after the size, it is a whole, grammatical caption.
        let (size, rest) = prompt.split_once(' ').unwrap();
        let noun = rest.split(' ').next().unwrap();
        let shape = rudolph::world::Shape::ALL
            .into_iter()
            .find(|s| s.noun() == noun)
            .unwrap_or_else(|| panic!("{prompt}: no noun after the size"));
        let colour = rudolph::world::Colour::Yellow.adjective(shape.gender());
        let whole = format!("{size} {colour} {rest}");
        let parsed = rudolph::world::read::parse_caption(&whole).unwrap();
        assert!(parsed.grammatical, "{whole}");
        let picture = image::open(prompted.join(line["image"].as_str().unwrap())).unwrap();
        let read = rudolph::world::read::read_picture(&picture.to_rgb8()).unwrap();
        assert!(
            !rudolph::world::HELD_OUT.contains(&(read.colour, read.shape)),
            "{prompt} reads as a held-out pair"
        );
    }
    std::fs::remove_dir_all(dir.parent().unwrap()).ok();
}

/// `rudolph world train` from nothing, twice with the same options (a few steps of each stage):
/// two complete model folders, the same bit for bit — the VQGAN's starting weights, the
/// order its convolution gradients are summed in and the transformer's gradient clipping are
/// all fixed, so the recipe is reproducible (its second round has prompted recoloured pictures).
#[test]
fn the_world_recipe_is_reproducible() {
    let base = temp_dir("world_recipe");
    let run = |name: &str| {
        let out = base.join(name);
        let done = rudolph(&[
            "world",
            "train",
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "4",
            "--vqgan-steps",
            "6",
            "--scenes",
            "64",
            "--lr",
            "1e-3,5e-4",
            "--recoloured",
            "0,16",
            "--prompted",
            "0,1",
            "--ignore-gate",
            "--quiet",
        ]);
        assert!(done.status.success(), "{}", stderr(&done));
        out.join("model")
    };
    let (a, b) = (run("a"), run("b"));
    for file in [
        "model.safetensors",
        "vqgan.safetensors",
        "bpe.model",
        "config.json",
        "vqgan.config.yml",
        "generation_config.json",
        "vocabulary.txt",
    ] {
        let read = |dir: &std::path::Path| std::fs::read(dir.join(file)).unwrap();
        assert!(read(&a) == read(&b), "{file} differs between two runs");
    }
    let generation: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["image_rank"], "decoded");
    assert_eq!(generation["classify_template"], "{caption}");
    // The folder lists the words it was trained on, as the built-in one does.
    let builtin = rudolph::builtin::dir().unwrap();
    assert_eq!(
        std::fs::read(a.join("vocabulary.txt")).unwrap(),
        std::fs::read(builtin.join("vocabulary.txt")).unwrap()
    );
    // Round 2's 16 recoloured pictures are prompted; round 1 has none.
    let prompts = |data: &str| {
        read_jsonl(&base.join("a").join(data).join("data.jsonl"))
            .iter()
            .filter(|line| line.get("prompt").is_some())
            .count()
    };
    assert_eq!((prompts("data"), prompts("data-2")), (0, 16));
    std::fs::remove_dir_all(&base).ok();
}
