//! The built-in shapes-world model (`models/shapes/`): it loads with no flags, and what it draws
//! and says reads back as the world it learnt.

use candle_core::{DType, Device, Tensor};
use rudolph::folder::{Loaded, ModelSpec};
use rudolph::model::Precision;
use rudolph::pipelines::captions::{CaptionRank, generate_captions};
use rudolph::pipelines::classify::{self, class_texts};
use rudolph::pipelines::images::{ImageRank, generate_images, picture_codes, rerank_decoded};
use rudolph::pipelines::rerank::score_pairs;
use rudolph::pipelines::{Fidelity, GenerateOptions, defaults};
use rudolph::world::read::{parse_caption, read_picture};
use rudolph::world::{Background, Colour, Position, Scene, Shape, Size};
use std::process::Command;

fn builtin() -> Loaded {
    builtin_as(Precision::Float(DType::F32))
}

fn builtin_as(precision: Precision) -> Loaded {
    let dir = rudolph::builtin::dir().expect("the built-in model is in the repository");
    Loaded::load_as(
        &ModelSpec {
            dir: Some(dir),
            ..Default::default()
        },
        &Device::Cpu,
        precision,
    )
    .expect("the built-in model loads")
}

/// The README's first command, through the library: the best of eight drawings of «большая
/// красная звезда слева на белом фоне» (ranked as the folder says, by the decoded pictures) is a
/// big red star, on the left, on white — for at least four of five seeds (sampling can go wrong:
/// the evaluator finds all five attributes right in about 95 % of text → image draws of seen pairs).
#[test]
fn draws_the_shape_colour_and_position_it_is_asked_for() {
    draws_a_big_red_star_on_the_left(&builtin());
}

/// The same with every linear product in bf16 (`--dtype packed-bf16`: on the AMX tiles, AVX-512 BF16
/// or AVX2, whichever this CPU has).
#[test]
fn draws_it_with_bf16_tile_products_too() {
    draws_a_big_red_star_on_the_left(&builtin_as(Precision::PackedBf16));
}

fn draws_a_big_red_star_on_the_left(loaded: &Loaded) {
    let vae = loaded.vae().unwrap();
    let n = loaded.model.config().image_seq_length();
    let mut right = Vec::new();
    for seed in 1..=5 {
        let mut opts = GenerateOptions::new(defaults::IMAGE);
        opts.seed = seed;
        let ranked = generate_images(
            &loaded.model,
            &loaded.tokenizer,
            "большая красная звезда слева на белом фоне",
            defaults::IMAGES,
            None,
            &opts,
        )
        .unwrap();
        assert_eq!(loaded.image_rank(None), ImageRank::Decoded);
        let ranked = rerank_decoded(
            &loaded.model,
            &loaded.tokenizer,
            vae,
            "большая красная звезда слева на белом фоне",
            ranked.items,
            8,
            &rudolph::progress::Silent,
        )
        .unwrap();
        let codes = Tensor::from_vec(ranked[0].codes.clone(), (1, n), vae.device()).unwrap();
        let picture = vae.decode_codes(&codes).unwrap().get(0).unwrap();
        let read = read_picture(&rudolph::image::to_rgb8(&picture).unwrap());
        right.push(read.is_some_and(|r| {
            r.shape == Shape::Star
                && r.size == Size::Big
                && r.colour == Colour::Red
                && r.position == Position::Left
                && r.background == Background::White
        }));
    }
    let hits = right.iter().filter(|&&r| r).count();
    assert!(hits >= 4, "only {hits} of 5 seeds drew it right: {right:?}");
}

/// Five rendered pictures captioned as `rudolph caption` does by default (48 draws, the best
/// by the joint ranking): at least four come back with exactly their own caption (the evaluator
/// finds all five attributes right for 96–98 % of seen scenes), and every one is grammatical.
#[test]
fn captions_rendered_pictures() {
    let loaded = builtin();
    let vae = loaded.vae().unwrap();
    let mut exact = Vec::new();
    for (i, scene) in rudolph::world::sample(5, 3, false).iter().enumerate() {
        let img = rudolph::world::render::render(scene);
        let pixels = rudolph::image::to_tensor(&img, vae.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let codes = vae.encode_codes(&pixels).unwrap().flatten_all().unwrap();
        let mut opts = GenerateOptions::new(defaults::CAPTION);
        opts.seed = i as u64;
        let captions = generate_captions(
            &loaded.model,
            &loaded.tokenizer,
            &codes.to_vec1::<u32>().unwrap(),
            "",
            defaults::CAPTIONS,
            CaptionRank::Joint,
            &opts,
        )
        .unwrap();
        let best = &captions[0].text;
        let parsed = parse_caption(best).expect("a world caption");
        assert!(parsed.grammatical, "{best}");
        exact.push(*best == scene.caption());
    }
    let hits = exact.iter().filter(|&&r| r).count();
    assert!(hits >= 4, "only {hits} of 5 captions were exact: {exact:?}");
}

/// `rudolph image` and `rudolph caption` with no model flags use the built-in model.
#[test]
fn cli_runs_without_model_flags() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("builtin-cli");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let star = dir.join("star.png");
    let bin = env!("CARGO_BIN_EXE_rudolph");
    let out = Command::new(bin)
        .args(["image", "маленький синий круг справа на сером фоне", "-o"])
        .arg(&star)
        .args(["--seed", "2", "--quiet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let picture = image::open(&star).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (64, 64));
    let out = Command::new(bin)
        .arg("caption")
        .arg(&star)
        .args(["--json", "--quiet", "--seed", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let best = doc["captions"][0]["text"].as_str().unwrap();
    assert!(parse_caption(best).is_some(), "not a world caption: {best}");
}

/// The shipped folder draws as the recipe that made it says (`rudolph world train` writes its
/// `generation_config.json` from these constants), so the README's measurements of the recipe
/// are measurements of the built-in model.
#[test]
fn the_folder_generates_as_the_recipe_sets() {
    let dir = rudolph::builtin::dir().unwrap();
    let generation = rudolph::folder::GenerationConfig::read(&dir).unwrap();
    assert_eq!(
        generation,
        rudolph::folder::GenerationConfig {
            guidance_scale: Some(rudolph::world::recipe::WORLD_GUIDANCE),
            image_rank: Some(rudolph::world::recipe::WORLD_IMAGE_RANK),
        }
    );
}

/// Ranking by the decoded picture keeps every candidate, sorts them by `ppl_decoded`, and that
/// score is the text's perplexity given the codes of the picture saved as 8-bit RGB and encoded
/// again, computed here step by step.
#[test]
fn ranks_by_the_picture_as_it_is_shown() {
    let loaded = builtin();
    let vae = loaded.vae().unwrap();
    let cfg = loaded.model.config();
    let text = "маленький синий круг снизу на чёрном фоне";
    let mut opts = GenerateOptions::new(defaults::IMAGE);
    opts.seed = 7;
    let by_codes = generate_images(&loaded.model, &loaded.tokenizer, text, 6, None, &opts).unwrap();
    assert!(by_codes.iter().all(|r| r.ppl_decoded.is_none()));
    let by_picture = rerank_decoded(
        &loaded.model,
        &loaded.tokenizer,
        vae,
        text,
        by_codes.to_vec(),
        4,
        &rudolph::progress::Silent,
    )
    .unwrap();
    let key = |r: &rudolph::pipelines::images::RankedCodes| r.ppl_decoded.unwrap();
    assert!(by_picture.windows(2).all(|w| key(&w[0]) <= key(&w[1])));
    let mut before: Vec<_> = by_codes.iter().map(|r| r.codes.clone()).collect();
    let mut after: Vec<_> = by_picture.iter().map(|r| r.codes.clone()).collect();
    before.sort();
    after.sort();
    assert_eq!(before, after, "the same candidates, reordered");

    let n = cfg.image_seq_length();
    let (right, _) = rudolph::pipelines::images::encode_checked(
        &loaded.tokenizer,
        text,
        cfg.r_text_seq_length,
        "text",
    );
    for r in &by_picture {
        let codes = Tensor::from_vec(r.codes.clone(), (1, n), vae.device()).unwrap();
        let shown =
            rudolph::image::to_rgb8(&vae.decode_codes(&codes).unwrap().get(0).unwrap()).unwrap();
        let pixels =
            rudolph::image::preprocess(&shown, cfg.image_size() as u32, vae.device()).unwrap();
        let again = vae
            .encode_codes(&pixels.unsqueeze(0).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let want = score_pairs(&loaded.model, &[(again.as_slice(), right.as_slice())], 1, 1)
            .unwrap()[0]
            .ppl_text;
        let got = key(r);
        assert!(
            (got - want).abs() <= 1e-4 * want,
            "ppl_decoded {got} against {want}"
        );
    }
    let mut short = by_codes.items;
    short[0].codes.pop();
    let err = rerank_decoded(
        &loaded.model,
        &loaded.tokenizer,
        vae,
        text,
        short,
        4,
        &rudolph::progress::Silent,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(&format!("needs {n} codes")),
        "{err}"
    );
}

/// Zero-shot shape classification with the class in the middle of a caption template (`{}`):
/// for each rendered scene the classes are the size, colour and noun in each shape's gender, and
/// the template is the rest of its caption. At least four of five pick the true shape (the
/// world eval finds the true shape for 86–94 % of seen scenes).
#[test]
fn classifies_shapes_with_the_class_inside_the_template() {
    let loaded = builtin();
    let vae = loaded.vae().unwrap();
    let mut right = 0;
    let scenes = rudolph::world::sample(5, 4, false);
    let pictures: Vec<_> = scenes.iter().map(rudolph::world::render::render).collect();
    let codes = picture_codes(&loaded.model, vae, &pictures).unwrap();
    for (scene, codes) in scenes.iter().zip(&codes) {
        let classes: Vec<String> = Shape::ALL
            .iter()
            .map(|&shape| Scene { shape, ..*scene }.noun_phrase())
            .collect();
        let template = format!("{{}} {}", scene.place());
        let got = classify::classify(
            &loaded.model,
            &loaded.tokenizer,
            codes,
            &classes,
            &template,
            8,
            Fidelity::Fixed,
        )
        .unwrap();
        right += (Shape::ALL[got.label] == scene.shape) as usize;
    }
    assert!(right >= 4, "only {right} of 5 shapes right");
}

/// Text slots too few for any class (a configuration may have a single right-text slot): a
/// named error by default, the original's layout under its fidelity, never a panic.
#[test]
fn a_template_in_one_text_slot_is_refused_or_laid_out_as_the_original() {
    let loaded = builtin();
    let classes = vec!["красная звезда".to_string()];
    for r in [1, 2] {
        let err = class_texts(&loaded.tokenizer, &classes, "большая", r, Fidelity::Fixed);
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("no room") && err.contains(&format!("{r} text slots")),
            "{err}"
        );
        let laid = class_texts(
            &loaded.tokenizer,
            &classes,
            "большая",
            r,
            Fidelity::Original,
        )
        .unwrap();
        assert_eq!(laid.template_tokens, 0);
        assert_eq!(laid.texts[0].len(), r);
    }
}

/// A `{}` at the end of a template lays the texts out exactly as the plain template does (the
/// original's `zs_clf` layout), and a template with two `{}` or no room left is refused.
#[test]
fn a_slot_at_the_end_is_the_plain_template() {
    let loaded = builtin();
    let r = loaded.model.config().r_text_seq_length;
    let classes = vec!["красная звезда".to_string(), "синий круг".to_string()];
    let plain = class_texts(&loaded.tokenizer, &classes, "большая", r, Fidelity::Fixed).unwrap();
    let slot = class_texts(
        &loaded.tokenizer,
        &classes,
        "большая {}",
        r,
        Fidelity::Fixed,
    )
    .unwrap();
    assert_eq!(plain, slot);
    assert_eq!(
        plain.template_tokens,
        loaded.tokenizer.bpe().encode("большая").len()
    );
    let inside = class_texts(
        &loaded.tokenizer,
        &classes,
        "большая {} слева",
        r,
        Fidelity::Fixed,
    )
    .unwrap();
    assert_eq!(inside.template_tokens, plain.template_tokens);
    assert_eq!(
        inside.texts[0],
        loaded
            .tokenizer
            .encode_text("большая красная звезда слева", r)
    );
    let two = class_texts(&loaded.tokenizer, &classes, "{} и {}", r, Fidelity::Fixed).unwrap_err();
    assert!(two.to_string().contains("more than one"), "{two}");
    let long = "большая ".repeat(r);
    let full = class_texts(
        &loaded.tokenizer,
        &classes,
        &format!("{long}{{}}"),
        r,
        Fidelity::Fixed,
    )
    .unwrap_err();
    assert!(full.to_string().contains("no room"), "{full}");
    // A plain template that fills the slots: refused by default; the original's layout keeps
    // BOS, the first r − 2 template tokens and the class's first token, and scores that token.
    let plain_long = class_texts(&loaded.tokenizer, &classes, &long, r, Fidelity::Fixed);
    assert!(plain_long.unwrap_err().to_string().contains("no room"));
    let classify::ClassTexts {
        texts,
        template_tokens: ts,
        ..
    } = class_texts(&loaded.tokenizer, &classes, &long, r, Fidelity::Original).unwrap();
    assert_eq!(ts, r - 2);
    let template_ids = loaded.tokenizer.bpe().encode(long.trim());
    for (text, class) in texts.iter().zip(&classes) {
        let first = loaded.tokenizer.bpe().encode(&format!(" {class}"))[0];
        let want: Vec<u32> = std::iter::once(2)
            .chain(template_ids[..r - 2].iter().copied())
            .chain([first])
            .collect();
        assert_eq!(text, &want, "{class}");
    }
}
