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

/// The command `args` failed with an error containing `needle`, and did not panic.
fn assert_refused(out: &Output, args: &[&str], needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
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
    let out_png = dir.join("out.png");
    let out_png = out_png.to_str().unwrap();
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
                out_png,
            ],
            "larger than the image",
        ),
        (
            vec!["image", "кот", "--borders", "1,2", "-o", out_png],
            "four numbers",
        ),
        (vec!["rerank", "кот"], "--codes"),
        (vec!["text", "--top-p", "1.5"], "top_p"),
    ];
    for (args, needle) in cases {
        let out = run_with_model(&args);
        assert_refused(&out, &args, needle);
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

/// The built-in model's command, with no model flags.
fn builtin_rudolph(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(args)
        .env_remove("RUDOLPH_BUILTIN")
        .output()
        .expect("the binary runs")
}

/// Counts of nothing, a `--keep` beyond what is drawn, a guidance scale outside its range, an
/// output name that names no picture format or lies in a missing folder: each is refused at
/// once with a message naming the flag, and nothing is written.
#[test]
fn flags_that_cannot_work_are_refused_before_any_work() {
    let dir = temp_dir("refused");
    let png = dir.join("out.png");
    let png = png.to_str().unwrap();
    let star = dir.join("star.png");
    let out = builtin_rudolph(&[
        "image",
        "большая красная звезда слева на белом фоне",
        "--images",
        "1",
        "--seed",
        "0",
        "-o",
        star.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let star = star.to_str().unwrap();
    let missing_folder = dir.join("no-such-folder/out.png");
    let gif = dir.join("out.gif");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["image", "x", "--images", "0", "-o", png], "--images"),
        (vec!["image", "x", "--keep", "0", "-o", png], "--keep"),
        (vec!["image", "x", "--nrow", "0", "-o", png], "--nrow"),
        (
            vec!["image", "x", "--images", "2", "--keep", "3", "-o", png],
            "--keep 3 is more than the 2 --images",
        ),
        (
            vec!["image", "x", "--guidance", "0", "-o", png],
            "outside 1 to 10",
        ),
        (
            vec!["image", "x", "--guidance", "-2", "-o", png],
            "outside 1 to 10",
        ),
        (
            vec!["image", "x", "--guidance", "100", "-o", png],
            "outside 1 to 10",
        ),
        (
            vec!["image", "x", "--guidance", "NaN", "-o", png],
            "guidance",
        ),
        (
            vec!["image", "x", "-o", gif.to_str().unwrap()],
            "the extension .gif names no format",
        ),
        (
            vec!["image", "x", "-o", missing_folder.to_str().unwrap()],
            "does not exist",
        ),
        (vec!["caption", star, "--captions", "0"], "--captions"),
        (vec!["caption", star, "--keep", "0"], "--keep"),
        (
            vec!["caption", star, "--captions", "2", "--keep", "3"],
            "--keep 3 is more than the 2 --captions",
        ),
        (vec!["text", "--texts", "0"], "--texts"),
    ];
    for (args, needle) in cases {
        let out = builtin_rudolph(&args);
        assert_refused(&out, &args, needle);
        assert!(!std::path::Path::new(png).exists(), "{args:?} wrote {png}");
        assert!(!out.stdout.windows(5).any(|w| w == b"wrote"), "{args:?}");
    }
    // A template of words the model cannot write after says so, instead of printing nothing.
    let out = builtin_rudolph(&["text", "a red", "--texts", "4", "--seed", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no text"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// `-o` writes the format its extension names, for drawn and decoded pictures alike, and the
/// pictures read back as the same picture (JPEG within its loss).
#[test]
fn pictures_are_written_in_the_format_their_extension_names() {
    let dir = temp_dir("formats");
    let text = "большая красная звезда слева на белом фоне";
    let mut pixels = Vec::new();
    for (name, magic) in [
        ("star.png", &b"\x89PNG"[..]),
        ("star.jpg", &b"\xff\xd8\xff"[..]),
        ("star.JPEG", &b"\xff\xd8\xff"[..]),
        ("star.webp", &b"RIFF"[..]),
    ] {
        let path = dir.join(name);
        let out = builtin_rudolph(&[
            "image",
            text,
            "--images",
            "1",
            "--seed",
            "0",
            "-o",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(magic), "{name} is not in its format");
        pixels.push(rudolph::image::load_image(&path).unwrap().into_raw());
    }
    assert_eq!(pixels[0], pixels[3], "lossless WebP holds the PNG's pixels");
    let worst = pixels[0]
        .iter()
        .zip(&pixels[1])
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst < 96,
        "the JPEG is not the same picture (max diff {worst})"
    );
    // decode-codes writes JPEG too, and says what it wrote on stdout like every command.
    let codes = dir.join("codes.json");
    let out = builtin_rudolph(&[
        "encode-image",
        dir.join("star.png").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(&codes, &out.stdout).unwrap();
    let decoded = dir.join("decoded.jpg");
    let out = builtin_rudolph(&[
        "decode-codes",
        codes.to_str().unwrap(),
        "-o",
        decoded.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote"));
    assert!(
        std::fs::read(&decoded)
            .unwrap()
            .starts_with(b"\xff\xd8\xff")
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The binary carries the built-in model: copied away from the source tree and run from another
/// folder, it draws, writing the model's files once into its cache folder, byte for byte the
/// repository's.
#[test]
fn a_copied_binary_runs_the_built_in_model_from_anywhere() {
    let dir = temp_dir("copied");
    let bin = dir.join("rudolph");
    std::fs::copy(env!("CARGO_BIN_EXE_rudolph"), &bin).unwrap();
    let cache = dir.join("cache");
    let run = |args: &[&str]| {
        Command::new(&bin)
            .args(args)
            .current_dir(&dir)
            .env_remove("RUDOLPH_BUILTIN")
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let out = run(&[
            "image",
            "маленький синий круг в центре на белом фоне",
            "--images",
            "1",
            "-o",
            "c.png",
            "--force",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(dir.join("c.png").is_file());
    let folders: Vec<_> = std::fs::read_dir(cache.join("rudolph"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(folders.len(), 1, "one folder for one model: {folders:?}");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes");
    for name in [
        "model.safetensors",
        "vqgan.safetensors",
        "bpe.model",
        "config.json",
    ] {
        assert_eq!(
            std::fs::read(folders[0].join(name)).unwrap(),
            std::fs::read(repo.join(name)).unwrap(),
            "{name}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// JSON names every text perplexity `ppl_text`, and writes the scale it drew with as given.
#[test]
fn json_outputs_name_scores_alike_and_write_numbers_as_given() {
    let out = builtin_rudolph(&["text", "большая", "--texts", "2", "--seed", "1", "--json"]);
    let doc = stdout_json(&out);
    assert!(
        doc["texts"][0]["ppl_text"].as_f64().unwrap() >= 1.0,
        "{doc}"
    );
    assert!(doc["texts"][0].get("ppl").is_none(), "{doc}");
    let dir = temp_dir("json");
    let out = builtin_rudolph(&[
        "image",
        "большая красная звезда слева на белом фоне",
        "--images",
        "1",
        "--seed",
        "0",
        "--json",
        "-o",
        dir.join("a.png").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("\"guidance\": 1.6,"), "{text}");
    // The picture's perplexity is the same for every class, so classify does not repeat it.
    let star = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/star.png");
    let out = builtin_rudolph(&[
        "classify",
        star.to_str().unwrap(),
        "--classes",
        "звезда,круг",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(doc["class"], "звезда", "{doc}");
    for score in doc["scores"].as_array().unwrap() {
        assert!(score.get("ppl_image").is_none(), "{score}");
        assert!(score["ppl_text"].as_f64().unwrap() >= 1.0, "{score}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every flag a user reaches for says what it does, and the top-level help lists every world
/// command.
#[test]
fn help_describes_every_flag() {
    let top = String::from_utf8_lossy(&builtin_rudolph(&["--help"]).stdout).into_owned();
    assert!(
        top.contains("sample") && top.contains("train") && top.contains("eval"),
        "{top}"
    );
    for command in [
        &["image"][..],
        &["caption"],
        &["text"],
        &["classify"],
        &["rerank"],
        &["world", "sample"],
        &["world", "eval"],
        &["world", "train"],
        &["train"],
        &["bench"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let help = String::from_utf8_lossy(&builtin_rudolph(&args).stdout).into_owned();
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let flag = line.trim_start();
            if !flag.starts_with("--")
                || flag.starts_with("--help")
                || flag.starts_with("--version")
            {
                continue;
            }
            // clap puts a flag's help after it on the same line, or indented on the next.
            // A bare "[default: …]" is no description.
            let described = flag
                .split_once("  ")
                .is_some_and(|(_, h)| !h.trim().is_empty() && !h.trim().starts_with('['))
                || lines.get(i + 1).is_some_and(|next| {
                    let next = next.trim_start();
                    lines[i + 1].starts_with("          ")
                        && !next.starts_with('-')
                        && !next.starts_with('[')
                });
            assert!(described, "{command:?}: {flag} has no help");
        }
        let longest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(
            longest <= 400,
            "{command:?}: a help line of {longest} characters"
        );
    }
}

/// A PNG whose header declares `side`×`side` pixels, with no pixels behind it.
fn png_declaring(side: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
    png.extend(((idat.len() - 4) as u32).to_be_bytes());
    png.extend(idat);
    png.extend(crc32(idat).to_be_bytes());
    png
}

/// Numbers from flags, files and the environment that would take the machine's memory or
/// threads are refused with the value and its limit, before anything is allocated.
#[test]
fn hostile_numbers_are_refused_with_their_limits() {
    let dir = temp_dir("hostile");
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    std::fs::write(p("huge.png"), png_declaring(20_000)).unwrap();
    let codes: Vec<u32> = (0..250_000).map(|i| i % 1024).collect();
    std::fs::write(p("codes.json"), serde_json::to_string(&codes).unwrap()).unwrap();
    let yml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes/vqgan.config.yml"),
    )
    .unwrap()
    .replace("resolution: 64", "resolution: 1000000");
    std::fs::write(p("huge.yml"), yml).unwrap();
    // Forty rules, each doubling the piece before it: a piece of 2⁴⁰ characters.
    let mut bpe = "2 40\n9601 4\n97 5\n".to_string();
    for k in 0..40 {
        bpe.push_str(&format!("{} {} {}\n", 5 + k, 5 + k, 6 + k));
    }
    bpe.push_str("1 0 2 3\n");
    std::fs::write(p("doubling.model"), bpe).unwrap();
    // A sparse 20 MiB config.json: never read whole.
    std::fs::File::create(p("big.json"))
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    // Sizes that wrap the sums derived from them, or allocate per layer.
    let builtin_config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let hostile_configs = [
        ("l_text_seq_length", serde_json::json!(u64::MAX)),
        ("image_tokens_per_dim", serde_json::json!(1u64 << 32)),
        ("num_layers", serde_json::json!(1u64 << 31)),
        ("kernel_size", serde_json::json!(1u64 << 31)),
    ];
    for (key, value) in &hostile_configs {
        let mut config = builtin_config.clone();
        config[key] = value.clone();
        std::fs::write(p(&format!("{key}.json")), config.to_string()).unwrap();
    }
    let star = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/star.png");
    let star = star.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["bench".into(), "--threads".into(), "100000".into()],
            "--threads 100000 is more than the",
        ),
        (
            vec![
                "image".into(),
                "x".into(),
                "--images".into(),
                "1000000000".into(),
            ],
            "--images 1000000000 is more than the 10000",
        ),
        (
            vec!["text".into(), "--texts".into(), "1000000000".into()],
            "--texts 1000000000 is more than",
        ),
        (
            vec![
                "encode-image".into(),
                star.into(),
                "--size".into(),
                "4096".into(),
            ],
            "--size 4096 is more than the 512",
        ),
        (
            vec![
                "decode-codes".into(),
                p("codes.json"),
                "-o".into(),
                p("out.png"),
            ],
            "250000 codes per picture make a 4000-pixel side",
        ),
        (vec!["caption".into(), p("huge.png")], "too large a picture"),
        (vec!["config".into(), p("big.json")], "larger than 16 MiB"),
        (
            vec!["config".into(), p("l_text_seq_length.json")],
            "l_text_seq_length is 18446744073709551615, above the limit of 4096",
        ),
        (
            vec!["config".into(), p("image_tokens_per_dim.json")],
            "image_tokens_per_dim is 4294967296, above the limit of 128",
        ),
        (
            vec!["config".into(), p("num_layers.json")],
            "num_layers is 2147483648, above the limit of 256",
        ),
        (
            vec![
                "caption".into(),
                star.into(),
                "--config".into(),
                p("kernel_size.json"),
            ],
            "kernel_size is 2147483648, above the limit of 255",
        ),
        (
            vec![
                "tokenize".into(),
                "--tokenizer".into(),
                p("doubling.model"),
                "a".into(),
            ],
            "more than the 1024 a piece may have",
        ),
        (
            vec![
                "encode-image".into(),
                star.into(),
                "--vae-config".into(),
                p("huge.yml"),
            ],
            "ddconfig.resolution is 1000000, above the limit of 512",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = builtin_rudolph(&args);
        assert_refused(&out, &args, needle);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(["text", "--texts", "1"])
        .env("RAYON_NUM_THREADS", "100000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("RAYON_NUM_THREADS=100000 is more than"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("out.png").exists());
    // One enormous word on standard input is refused, not encoded into gigabytes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(["tokenize", "--stdin", "--tokenizer"])
        .arg(fixture("tokenizer/bpe.model"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all("а".repeat(1_100_000).as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("line 1 of the input has 1100000 characters"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A picture write that fails (here: past the file size limit, as on a full disk) is an error,
/// and the picture it was to replace is left whole.
#[test]
fn a_failed_write_leaves_the_old_picture_whole() {
    use std::os::unix::process::CommandExt;
    let dir = temp_dir("failed-write");
    let path = dir.join("star.png");
    let draw = |limit: Option<u64>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rudolph"));
        command
            .args([
                "image",
                "большая красная звезда слева на белом фоне",
                "--images",
                "1",
            ])
            .args(["--seed", "0", "--force", "-o", path.to_str().unwrap()])
            .env_remove("RUDOLPH_BUILTIN");
        if let Some(bytes) = limit {
            // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command.output().unwrap()
    };
    let out = draw(None);
    assert!(out.status.success(), "{}", stderr(&out));
    let good = std::fs::read(&path).unwrap();
    let out = draw(Some(100));
    assert!(
        !out.status.success(),
        "a truncated write was reported as done"
    );
    assert!(stderr(&out).contains("star.png"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the old picture was damaged"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "star.png")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}
