//! Scoring a model on the shapes world against its targets: captioning and text → image on seen and
//! held-out colour+shape pairs, zero-shot retrieval and classification by perplexity, and the
//! grammaticality of generated texts. Everything goes through the library pipelines; pictures
//! are read back with [`read_picture`] and captions with [`parse_caption`].

use super::read::{Attributes, ParsedCaption, parse_caption, read_picture};
use super::render::{SIDE, render};
use super::{Colour, Gender, Scene, Shape, sample};
use crate::error::{Result, invalid};
use crate::folder::Loaded;
use crate::pipelines::captions::CaptionRank;
use crate::pipelines::captions::generate_captions;
use crate::pipelines::classify::{ClassTexts, class_texts};
use crate::pipelines::images::{ImageRank, generate_images, picture_codes};
use crate::pipelines::rerank::score_pairs;
use crate::pipelines::texts::{SpecialIds, TextEnd, cut_text, generate_text_ids, template_prefix};
use crate::pipelines::{Fidelity, GenerateOptions, Warning, defaults};
use crate::progress::{ProgressSink, silent};
use crate::sampling::SamplingParams;
use crate::tokenizer::{lower_strip, python_strip};
use candle_core::Tensor;
use image::RgbImage;
use serde::Serialize;
use std::sync::Arc;

/// Candidates per retrieval question: the true caption and this many minus one others.
pub const RETRIEVAL_CANDIDATES: usize = 10;

/// What to evaluate.
#[derive(Clone)]
pub struct EvalOptions {
    /// Scenes per task.
    pub n: usize,
    /// Seed of the scenes and of every sampled generation.
    pub seed: u64,
    /// Rows per model call where the pipelines batch.
    pub batch_size: usize,
    /// Captions sampled per picture, the best by `rudolph caption`'s joint ranking kept (its
    /// defaults: [`defaults::CAPTIONS`] at [`defaults::CAPTION`]); 0 = one greedy caption.
    pub captions: usize,
    /// Pictures sampled per caption, the one that best explains the caption kept (`rudolph
    /// image`'s defaults: [`defaults::IMAGES`] at [`defaults::IMAGE`]); 1 = the first draw.
    pub images: usize,
    /// Classifier-free guidance scale of the pictures (`rudolph image --guidance`); `None`: the
    /// model folder's, as the CLI takes it.
    pub guidance: Option<f32>,
    /// What the pictures are ranked by (`rudolph image --rank`); `None`: the model folder's.
    pub rank: Option<ImageRank>,
    /// Hears each task's scenes as they are scored (silent by default).
    pub progress: Arc<dyn ProgressSink>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            n: 100,
            seed: 0,
            batch_size: 8,
            captions: defaults::CAPTIONS,
            images: defaults::IMAGES,
            guidance: None,
            rank: None,
            progress: silent(),
        }
    }
}

impl std::fmt::Debug for EvalOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalOptions")
            .field("n", &self.n)
            .field("seed", &self.seed)
            .field("batch_size", &self.batch_size)
            .field("captions", &self.captions)
            .field("images", &self.images)
            .field("guidance", &self.guidance)
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

/// One rate with its counts and, where the world sets one, its target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    pub correct: usize,
    pub n: usize,
    /// `correct / n`.
    pub rate: f64,
    /// The lowest passing rate, if the issue defines one.
    pub target: Option<f64>,
    /// `rate ≥ target`, if there is a target.
    pub pass: Option<bool>,
}

impl Metric {
    pub fn new(correct: usize, n: usize, target: Option<f64>) -> Self {
        let rate = if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        };
        Self {
            correct,
            n,
            rate,
            target,
            pass: target.map(|t| rate >= t),
        }
    }
}

/// Targets of the five attributes (and of grammaticality, for captioning).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttributeTargets {
    pub size: Option<f64>,
    pub colour: Option<f64>,
    pub shape: Option<f64>,
    pub position: Option<f64>,
    pub background: Option<f64>,
    pub grammatical: Option<f64>,
}

impl AttributeTargets {
    pub const CAPTIONING_SEEN: Self = Self {
        size: Some(0.97),
        colour: Some(0.90),
        shape: Some(0.90),
        position: Some(0.97),
        background: Some(0.97),
        grammatical: Some(0.97),
    };
    pub const TEXT_TO_IMAGE_SEEN: Self = Self {
        size: Some(0.95),
        colour: Some(0.85),
        shape: Some(0.85),
        position: Some(0.95),
        background: Some(0.95),
        grammatical: None,
    };
    /// Held-out pairs, both directions: every attribute but the shape.
    pub const HELD_OUT: Self = Self {
        size: Some(0.85),
        colour: Some(0.85),
        shape: None,
        position: Some(0.85),
        background: Some(0.85),
        grammatical: None,
    };
}

pub const RETRIEVAL_TARGET: f64 = 0.90;
pub const GENERATED_TEXTS_TARGET: f64 = 0.90;

/// One item of an attribute task: what was asked and what came back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    /// The scene's true caption.
    pub truth: String,
    /// Captioning: the generated caption. Text → image: the picture read back, written as a
    /// caption (empty when no shape was found).
    pub got: String,
    /// The `--seed` with which `rudolph caption` / `rudolph image` (their default sampling and
    /// counts) give exactly this item; none for a greedy caption.
    pub seed: Option<u64>,
}

/// Per-attribute accuracy of captioning or of text → image over `n` scenes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttributeReport {
    pub n: usize,
    pub size: Metric,
    pub colour: Metric,
    pub shape: Metric,
    pub position: Metric,
    pub background: Metric,
    /// All five right at once.
    pub exact: Metric,
    /// Captions that parse / pictures where a shape was found.
    pub readable: Metric,
    /// Captions that parse with agreeing adjectives (captioning only).
    pub grammatical: Option<Metric>,
    pub examples: Vec<Example>,
}

/// Accumulates attribute comparisons; `None` (unparsable caption, unreadable picture) is wrong
/// on every attribute.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    n: usize,
    right: [usize; 5],
    exact: usize,
    readable: usize,
    grammatical: usize,
    examples: Vec<Example>,
}

impl Tally {
    pub fn add(
        &mut self,
        truth: &Scene,
        got: Option<Attributes>,
        grammatical: bool,
        shown: String,
        seed: Option<u64>,
    ) {
        self.n += 1;
        if let Some(g) = got {
            let hits = [
                g.size == truth.size,
                g.colour == truth.colour,
                g.shape == truth.shape,
                g.position == truth.position,
                g.background == truth.background,
            ];
            for (r, hit) in self.right.iter_mut().zip(hits) {
                *r += hit as usize;
            }
            self.exact += hits.iter().all(|&h| h) as usize;
            self.readable += 1;
            self.grammatical += grammatical as usize;
        }
        self.examples.push(Example {
            truth: truth.caption(),
            got: shown,
            seed,
        });
    }

    /// A generated caption against its scene.
    pub fn add_caption(&mut self, truth: &Scene, caption: &str, seed: Option<u64>) {
        let parsed: Option<ParsedCaption> = parse_caption(caption);
        self.add(
            truth,
            parsed.map(|p| p.attributes),
            parsed.is_some_and(|p| p.grammatical),
            caption.to_string(),
            seed,
        );
    }

    /// A generated picture against the scene it was asked for.
    pub fn add_picture(&mut self, truth: &Scene, picture: &RgbImage, seed: Option<u64>) {
        let read = if picture.dimensions() == (SIDE, SIDE) {
            read_picture(picture)
        } else {
            read_picture(&crate::image::center_crop_resize(picture, SIDE))
        };
        let shown = read.map(|a| describe(&a)).unwrap_or_default();
        self.add(truth, read, true, shown, seed);
    }

    pub fn report(self, targets: AttributeTargets, captioning: bool) -> AttributeReport {
        let n = self.n;
        let m = |i: usize, t| Metric::new(self.right[i], n, t);
        AttributeReport {
            n,
            size: m(0, targets.size),
            colour: m(1, targets.colour),
            shape: m(2, targets.shape),
            position: m(3, targets.position),
            background: m(4, targets.background),
            exact: Metric::new(self.exact, n, None),
            readable: Metric::new(self.readable, n, None),
            grammatical: captioning.then(|| Metric::new(self.grammatical, n, targets.grammatical)),
            examples: self.examples,
        }
    }
}

/// Attributes written as the world's caption for them.
pub fn describe(a: &Attributes) -> String {
    Scene::exact(a.size, a.colour, a.shape, a.position, a.background).caption()
}

/// How zero-shot classification is set up.
pub const ZERO_SHOT_METHOD: &str = "the scene's true caption with the class in its place, as \
`rudolph classify --template` with {}: shape — the class is the size and colour adjectives and \
the noun, in each candidate's gender (adjectives before the class would give the noun away by \
their gender); colour — the class is the colour adjective agreeing with the scene's noun, after \
its true size adjective; the class tokens and every word after them (and EOS) are scored; a \
class wins only with a strictly lowest perplexity";

/// Zero-shot classification of the seen scenes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroShotReport {
    pub method: &'static str,
    pub shape: Metric,
    pub colour: Metric,
}

/// Texts generated from an empty prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextsReport {
    /// Texts that parse as grammatical world captions.
    pub valid: Metric,
    pub texts: Vec<String>,
}

/// Everything `rudolph world eval` measures.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub n: usize,
    pub seed: u64,
    /// Captions sampled per picture (0 = greedy) and pictures per caption.
    pub captions: usize,
    pub images: usize,
    /// The classifier-free guidance scale the pictures were drawn with.
    pub guidance: f32,
    /// What the pictures were ranked by.
    pub ranked_by: ImageRank,
    pub captioning_seen: AttributeReport,
    pub text_to_image_seen: AttributeReport,
    pub captioning_held_out: AttributeReport,
    pub text_to_image_held_out: AttributeReport,
    /// The true caption among [`RETRIEVAL_CANDIDATES`] by its perplexity given the picture.
    pub retrieval: Metric,
    pub zero_shot: ZeroShotReport,
    pub generated_texts: TextsReport,
    /// Targets met, of those defined.
    pub targets_passed: usize,
    pub targets_total: usize,
    /// The generated pictures (seen, then held-out), for a contact sheet.
    #[serde(skip)]
    pub pictures_seen: Vec<RgbImage>,
    #[serde(skip)]
    pub pictures_held_out: Vec<RgbImage>,
    /// What the pipelines warned of (texts cut to fit their slots), in the order they did.
    #[serde(skip)]
    pub warnings: Vec<Warning>,
}

impl EvalReport {
    /// Every metric, labelled, in table order.
    pub fn metrics(&self) -> Vec<(String, &Metric)> {
        let mut out = Vec::new();
        for (name, r) in self.attribute_rows() {
            for (col, m) in attribute_columns(r) {
                out.push((format!("{name}: {col}"), m));
            }
        }
        out.push(("retrieval".into(), &self.retrieval));
        out.push(("zero-shot: shape".into(), &self.zero_shot.shape));
        out.push(("zero-shot: colour".into(), &self.zero_shot.colour));
        out.push(("generated texts: valid".into(), &self.generated_texts.valid));
        out
    }

    fn attribute_rows(&self) -> [(&'static str, &AttributeReport); 4] {
        [
            ("captioning (seen)", &self.captioning_seen),
            ("text→image (seen)", &self.text_to_image_seen),
            ("captioning (held-out)", &self.captioning_held_out),
            ("text→image (held-out)", &self.text_to_image_held_out),
        ]
    }

    fn count_targets(&mut self) {
        let passes: Vec<bool> = self.metrics().iter().filter_map(|(_, m)| m.pass).collect();
        self.targets_total = passes.len();
        self.targets_passed = passes.iter().filter(|&&p| p).count();
    }

    /// A readable table: one row per task, percentages, the target after each (✓ met, ✗ not).
    pub fn table(&self) -> String {
        const COLS: [&str; 8] = [
            "size",
            "colour",
            "shape",
            "position",
            "background",
            "grammatical",
            "all five",
            "accuracy",
        ];
        let cell = |m: Option<&Metric>| match m {
            None => String::new(),
            Some(m) => {
                let mark = match (m.target, m.pass) {
                    (Some(t), Some(true)) => format!(" ✓≥{:.0}", t * 100.0),
                    (Some(t), _) => format!(" ✗≥{:.0}", t * 100.0),
                    _ => String::new(),
                };
                format!("{:5.1}%{mark}", m.rate * 100.0)
            }
        };
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        for (name, r) in self.attribute_rows() {
            let mut cells: Vec<String> = [&r.size, &r.colour, &r.shape, &r.position, &r.background]
                .into_iter()
                .map(|m| cell(Some(m)))
                .collect();
            cells.push(cell(r.grammatical.as_ref()));
            cells.push(cell(Some(&r.exact)));
            cells.push(String::new());
            rows.push((name.into(), cells));
        }
        let mut sparse = |name: &str, at: &[(usize, &Metric)]| {
            let mut cells = vec![String::new(); COLS.len()];
            for (i, m) in at {
                cells[*i] = cell(Some(m));
            }
            rows.push((name.into(), cells));
        };
        sparse(
            &format!("retrieval (1 of {RETRIEVAL_CANDIDATES})"),
            &[(7, &self.retrieval)],
        );
        sparse(
            "zero-shot classify",
            &[(1, &self.zero_shot.colour), (2, &self.zero_shot.shape)],
        );
        sparse("generated texts", &[(5, &self.generated_texts.valid)]);
        let name_w = rows
            .iter()
            .map(|(n, _)| n.chars().count())
            .max()
            .unwrap_or(0);
        let widths: Vec<usize> = (0..COLS.len())
            .map(|i| {
                rows.iter()
                    .map(|(_, c)| c[i].chars().count())
                    .chain([COLS[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let pad =
            |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
        let captions = match self.captions {
            0 => "one greedy caption".to_string(),
            n => format!("best of {n} captions"),
        };
        let guidance = if self.guidance == 1.0 {
            String::new()
        } else {
            format!(" at guidance {}", self.guidance)
        };
        let ranked = match self.ranked_by {
            ImageRank::Codes => "",
            ImageRank::Decoded => " (ranked decoded)",
        };
        let mut out = format!(
            "shapes world eval: n = {} per task, seed {}; {captions} per picture, best of {} \
             pictures per caption{guidance}{ranked}\n",
            self.n, self.seed, self.images
        );
        out.push_str(&pad("task", name_w));
        for (c, w) in COLS.iter().zip(&widths) {
            out.push_str("  ");
            out.push_str(&pad(c, *w));
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        for (name, cells) in &rows {
            out.push_str(&pad(name, name_w));
            for (c, w) in cells.iter().zip(&widths) {
                out.push_str("  ");
                out.push_str(&pad(c, *w));
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
        }
        out.push_str(&format!(
            "targets met: {}/{}\nzero-shot: {}\n",
            self.targets_passed, self.targets_total, self.zero_shot.method
        ));
        out
    }
}

fn attribute_columns(r: &AttributeReport) -> Vec<(&'static str, &Metric)> {
    let mut out = vec![
        ("size", &r.size),
        ("colour", &r.colour),
        ("shape", &r.shape),
        ("position", &r.position),
        ("background", &r.background),
    ];
    if let Some(g) = &r.grammatical {
        out.push(("grammatical", g));
    }
    out.push(("all five", &r.exact));
    out
}

/// A seed for item `i` of task `task`, so that items draw from unrelated streams.
fn item_seed(seed: u64, task: u64, i: usize) -> u64 {
    // splitmix64 finaliser over the three.
    let mut z = seed
        .wrapping_add(task.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn options(params: SamplingParams, seed: u64, batch: usize) -> GenerateOptions {
    GenerateOptions {
        params,
        seed,
        batch_size: batch,
        fidelity: Fidelity::Fixed,
        guidance: 1.0,
        progress: silent(),
        shared: None,
    }
}

/// Greedy decoding: only the most likely token survives the filter.
const GREEDY: SamplingParams = SamplingParams {
    top_k: 1,
    top_p: 1.0,
    temperature: 1.0,
};

/// The VQGAN codes of each scene's rendered picture, pre-processed as `rudolph caption` does.
pub fn scene_codes(loaded: &Loaded, scenes: &[Scene], batch: usize) -> Result<Vec<Vec<u32>>> {
    let vae = world_vae(loaded)?;
    let mut out = Vec::with_capacity(scenes.len());
    for chunk in scenes.chunks(batch.max(1)) {
        let pictures: Vec<RgbImage> = chunk.iter().map(render).collect();
        out.extend(picture_codes(&loaded.model, vae, &pictures)?);
    }
    Ok(out)
}

fn world_vae(loaded: &Loaded) -> Result<&crate::vae::Vqgan> {
    loaded.vae.as_ref().ok_or_else(|| {
        invalid("world eval needs a VQGAN: put its .ckpt in the model folder or name it")
    })
}

/// The best of `opts.captions` sampled captions per picture, as `rudolph caption` prints it, or
/// one greedy caption (empty template either way).
fn caption_scenes(
    loaded: &Loaded,
    scenes: &[Scene],
    codes: &[Vec<u32>],
    opts: &EvalOptions,
    task: u64,
    what: &str,
    warnings: &mut Vec<Warning>,
) -> Result<AttributeReport> {
    opts.progress.start(scenes.len() as u64, what, "scenes");
    let (params, count) = match opts.captions {
        0 => (GREEDY, 1),
        n => (defaults::CAPTION, n),
    };
    let mut tally = Tally::default();
    for (i, (scene, c)) in scenes.iter().zip(codes).enumerate() {
        let seed = item_seed(opts.seed, task, i);
        let sampling = options(params, seed, opts.batch_size);
        let captions = generate_captions(
            &loaded.model,
            &loaded.tokenizer,
            c,
            "",
            count,
            CaptionRank::Joint,
            &sampling,
        )?;
        warnings.extend_from_slice(&captions.warnings);
        let text = captions.first().map(|c| c.text.as_str()).unwrap_or("");
        tally.add_caption(scene, text, (opts.captions > 0).then_some(seed));
        opts.progress.advance(1);
    }
    opts.progress.finish();
    Ok(tally.report(AttributeTargets::CAPTIONING_SEEN, true))
}

/// The best of `opts.images` sampled pictures per caption (as `rudolph image` keeps it),
/// decoded and read back.
fn draw_scenes(
    loaded: &Loaded,
    scenes: &[Scene],
    opts: &EvalOptions,
    task: u64,
    what: &str,
    warnings: &mut Vec<Warning>,
) -> Result<(Tally, Vec<RgbImage>)> {
    let vae = world_vae(loaded)?;
    let n_codes = loaded.model.config().image_seq_length();
    opts.progress.start(scenes.len() as u64, what, "scenes");
    let mut tally = Tally::default();
    let mut pictures = Vec::with_capacity(scenes.len());
    let batch = opts.batch_size.max(1);
    for (k, chunk) in scenes.chunks(batch).enumerate() {
        let mut codes = Vec::with_capacity(chunk.len() * n_codes);
        for (j, scene) in chunk.iter().enumerate() {
            let sampling = GenerateOptions {
                guidance: loaded.guidance(opts.guidance),
                ..options(
                    defaults::IMAGE,
                    item_seed(opts.seed, task, k * batch + j),
                    opts.batch_size,
                )
            };
            let ranked = generate_images(
                &loaded.model,
                &loaded.tokenizer,
                &scene.caption(),
                opts.images,
                None,
                &sampling,
            )?;
            let ranked = loaded.image_rank(opts.rank).apply(
                &loaded.model,
                &loaded.tokenizer,
                vae,
                &scene.caption(),
                ranked,
                opts.batch_size,
                sampling.progress.as_ref(),
            )?;
            warnings.extend_from_slice(&ranked.warnings);
            let best = ranked
                .into_iter()
                .next()
                .ok_or_else(|| invalid("image generation returned no picture"))?;
            codes.extend(best.codes);
            opts.progress.advance(1);
        }
        let decoded = vae.decode_codes(&Tensor::from_vec(
            codes,
            (chunk.len(), n_codes),
            vae.device(),
        )?)?;
        for (j, scene) in chunk.iter().enumerate() {
            let picture = crate::image::to_rgb8(&decoded.get(j)?)?;
            tally.add_picture(
                scene,
                &picture,
                Some(item_seed(opts.seed, task, k * batch + j)),
            );
            pictures.push(picture);
        }
    }
    opts.progress.finish();
    Ok((tally, pictures))
}

/// `n` distinct seen captions other than `truth`, drawn from `world::sample` with `seed`.
pub fn distractors(truth: &str, count: usize, seed: u64) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(count);
    let mut draws = 4 * count + 8;
    loop {
        for scene in sample(draws, seed, false) {
            let c = scene.caption();
            if c != truth && !out.contains(&c) {
                out.push(c);
                if out.len() == count {
                    return out;
                }
            }
        }
        // Unlucky draw (or very many wanted): start again with more.
        out.clear();
        draws *= 2;
    }
}

/// True when `scores[truth]` is strictly lower than every other score (ties lose, so a model
/// that scores everything alike gets no credit).
pub fn strict_best(scores: &[f32], truth: usize) -> bool {
    scores
        .iter()
        .enumerate()
        .all(|(i, &s)| i == truth || scores[truth] < s)
}

/// Picks the true caption among [`RETRIEVAL_CANDIDATES`] for each scene by the perplexity of
/// each caption given the picture.
fn retrieval(
    loaded: &Loaded,
    scenes: &[Scene],
    codes: &[Vec<u32>],
    opts: &EvalOptions,
) -> Result<Metric> {
    let r = loaded.model.config().r_text_seq_length;
    opts.progress
        .start(scenes.len() as u64, "retrieval", "scenes");
    let mut correct = 0;
    for (i, (scene, c)) in scenes.iter().zip(codes).enumerate() {
        let truth = scene.caption();
        let mut candidates =
            distractors(&truth, RETRIEVAL_CANDIDATES - 1, item_seed(opts.seed, 5, i));
        let at = i % RETRIEVAL_CANDIDATES;
        candidates.insert(at, truth);
        let encoded: Vec<Vec<u32>> = candidates
            .iter()
            .map(|t| loaded.tokenizer.encode_text(&lower_strip(t), r))
            .collect();
        let pairs: Vec<(&[u32], &[u32])> = encoded
            .iter()
            .map(|e| (c.as_slice(), e.as_slice()))
            .collect();
        let scores = score_pairs(&loaded.model, &pairs, 1, opts.batch_size)?;
        let ppl: Vec<f32> = scores.iter().map(|s| s.ppl_text).collect();
        correct += strict_best(&ppl, at) as usize;
        opts.progress.advance(1);
    }
    opts.progress.finish();
    Ok(Metric::new(correct, scenes.len(), Some(RETRIEVAL_TARGET)))
}

/// Perplexity of each `(template, class)` given the picture, with `classify`'s text layout
/// (`class_texts`): the tokens from the class on are scored.
fn class_ppls(
    loaded: &Loaded,
    codes: &[u32],
    items: &[(String, String)],
    batch: usize,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<f32>> {
    let r = loaded.model.config().r_text_seq_length;
    let mut out = Vec::with_capacity(items.len());
    for (template, class) in items {
        let ClassTexts {
            texts,
            template_tokens,
            warnings: cut,
        } = class_texts(
            &loaded.tokenizer,
            std::slice::from_ref(class),
            template,
            r,
            Fidelity::Fixed,
        )?;
        let pairs: Vec<(&[u32], &[u32])> = texts.iter().map(|t| (codes, t.as_slice())).collect();
        out.push(score_pairs(&loaded.model, &pairs, template_tokens + 1, batch)?[0].ppl_text);
        warnings.extend(cut);
    }
    Ok(out)
}

/// Zero-shot shape and colour classification of the seen scenes (method: [`ZERO_SHOT_METHOD`]).
fn zero_shot(
    loaded: &Loaded,
    scenes: &[Scene],
    codes: &[Vec<u32>],
    opts: &EvalOptions,
    warnings: &mut Vec<Warning>,
) -> Result<ZeroShotReport> {
    opts.progress
        .start(scenes.len() as u64, "zero-shot", "scenes");
    let (mut shape_ok, mut colour_ok) = (0, 0);
    for (scene, c) in scenes.iter().zip(codes) {
        let shapes: Vec<(String, String)> = Shape::ALL
            .iter()
            .map(|&shape| {
                let candidate = Scene { shape, ..*scene };
                (format!("{{}} {}", scene.place()), candidate.noun_phrase())
            })
            .collect();
        let truth = Shape::ALL
            .iter()
            .position(|&s| s == scene.shape)
            .expect("listed");
        shape_ok += strict_best(
            &class_ppls(loaded, c, &shapes, opts.batch_size, warnings)?,
            truth,
        ) as usize;
        let g: Gender = scene.shape.gender();
        let colours: Vec<(String, String)> = Colour::ALL
            .iter()
            .map(|&k| {
                let template = format!(
                    "{} {{}} {} {}",
                    scene.size.adjective(g),
                    scene.shape.noun(),
                    scene.place()
                );
                (template, k.adjective(g))
            })
            .collect();
        let truth = Colour::ALL
            .iter()
            .position(|&k| k == scene.colour)
            .expect("listed");
        colour_ok += strict_best(
            &class_ppls(loaded, c, &colours, opts.batch_size, warnings)?,
            truth,
        ) as usize;
        opts.progress.advance(1);
    }
    opts.progress.finish();
    Ok(ZeroShotReport {
        method: ZERO_SHOT_METHOD,
        shape: Metric::new(shape_ok, scenes.len(), None),
        colour: Metric::new(colour_ok, scenes.len(), None),
    })
}

/// `n` left texts from an empty prompt, sampled as `rudolph text` does (every one kept, no
/// merging of duplicates), and the share that parse as grammatical world captions.
fn generated_texts(
    loaded: &Loaded,
    opts: &EvalOptions,
    warnings: &mut Vec<Warning>,
) -> Result<TextsReport> {
    let model = &loaded.model;
    let l = model.config().l_text_seq_length;
    let (prefix, cut) = template_prefix(&loaded.tokenizer.encode_text("", l), l, "template");
    warnings.extend(cut);
    opts.progress
        .start(((l - prefix.len()) * opts.n) as u64, "texts", "tokens");
    let rows = generate_text_ids(
        model,
        &prefix,
        opts.n,
        &opts.batch_size.into(),
        &defaults::TEXT,
        item_seed(opts.seed, 6, 0),
        SpecialIds::AllPositionTokens,
        opts.progress.as_ref(),
    )?;
    opts.progress.finish();
    let mut texts = Vec::with_capacity(rows.len());
    for row in &rows {
        let text = loaded
            .tokenizer
            .decode_text(cut_text(row, TextEnd::FirstEos))?;
        texts.push(python_strip(&text).to_string());
    }
    let valid = texts
        .iter()
        .filter(|t| parse_caption(t).is_some_and(|p| p.grammatical))
        .count();
    Ok(TextsReport {
        valid: Metric::new(valid, texts.len(), Some(GENERATED_TEXTS_TARGET)),
        texts,
    })
}

/// Scores `loaded` on the shapes world. Needs the VQGAN; takes `opts.n` scenes per task.
pub fn evaluate(loaded: &Loaded, opts: &EvalOptions) -> Result<EvalReport> {
    if opts.n == 0 {
        return Err(invalid("world eval needs at least one scene (n ≥ 1)"));
    }
    if opts.batch_size == 0 {
        return Err(invalid("world eval needs a batch size of at least 1"));
    }
    if opts.images == 0 {
        return Err(invalid("world eval needs at least one picture per caption"));
    }
    world_vae(loaded)?;
    let seen = sample(opts.n, opts.seed, false);
    let held = sample(opts.n, opts.seed, true);
    let seen_codes = scene_codes(loaded, &seen, opts.batch_size)?;
    let held_codes = scene_codes(loaded, &held, opts.batch_size)?;

    let mut warnings = Vec::new();
    let w = &mut warnings;
    let captioning_seen = caption_scenes(loaded, &seen, &seen_codes, opts, 3, "captions", w)?;
    let mut captioning_held_out = caption_scenes(
        loaded,
        &held,
        &held_codes,
        opts,
        4,
        "captions (held-out)",
        w,
    )?;
    retarget(&mut captioning_held_out, AttributeTargets::HELD_OUT);
    let (t, pictures_seen) = draw_scenes(loaded, &seen, opts, 1, "images", w)?;
    let text_to_image_seen = t.report(AttributeTargets::TEXT_TO_IMAGE_SEEN, false);
    let (t, pictures_held_out) = draw_scenes(loaded, &held, opts, 2, "images (held-out)", w)?;
    let text_to_image_held_out = t.report(AttributeTargets::HELD_OUT, false);
    let retrieval = retrieval(loaded, &seen, &seen_codes, opts)?;
    let zero_shot = zero_shot(loaded, &seen, &seen_codes, opts, w)?;
    let generated_texts = generated_texts(loaded, opts, w)?;

    let mut report = EvalReport {
        n: opts.n,
        seed: opts.seed,
        captions: opts.captions,
        images: opts.images,
        guidance: loaded.guidance(opts.guidance),
        ranked_by: loaded.image_rank(opts.rank),
        captioning_seen,
        text_to_image_seen,
        captioning_held_out,
        text_to_image_held_out,
        retrieval,
        zero_shot,
        generated_texts,
        targets_passed: 0,
        targets_total: 0,
        pictures_seen,
        pictures_held_out,
        warnings,
    };
    report.count_targets();
    Ok(report)
}

/// Replaces a report's targets (and pass marks).
fn retarget(r: &mut AttributeReport, t: AttributeTargets) {
    for (m, target) in [
        (&mut r.size, t.size),
        (&mut r.colour, t.colour),
        (&mut r.shape, t.shape),
        (&mut r.position, t.position),
        (&mut r.background, t.background),
    ] {
        *m = Metric::new(m.correct, m.n, target);
    }
    if let Some(g) = &mut r.grammatical {
        *g = Metric::new(g.correct, g.n, t.grammatical);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_captions_and_rendered_pictures_score_full_marks() {
        let scenes: Vec<Scene> = sample(40, 11, false)
            .into_iter()
            .chain(sample(20, 12, true))
            .collect();
        let (mut caps, mut pics) = (Tally::default(), Tally::default());
        for s in &scenes {
            caps.add_caption(s, &s.caption(), None);
            pics.add_picture(s, &render(s), None);
        }
        for report in [
            caps.report(AttributeTargets::CAPTIONING_SEEN, true),
            pics.report(AttributeTargets::TEXT_TO_IMAGE_SEEN, false),
        ] {
            assert_eq!(report.n, 60);
            for (name, m) in attribute_columns(&report) {
                assert_eq!(m.correct, 60, "{name}");
                assert_eq!(m.rate, 1.0);
                assert_ne!(m.pass, Some(false), "{name}");
            }
            assert_eq!(report.readable.rate, 1.0);
        }
    }

    #[test]
    fn unreadable_is_wrong_everywhere_and_ungrammatical_is_counted() {
        let s = sample(1, 3, false)[0];
        let mut t = Tally::default();
        t.add_caption(&s, "рыжий кот на окне", None);
        t.add_picture(
            &s,
            &RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255])),
            None,
        );
        let r = t.report(AttributeTargets::CAPTIONING_SEEN, true);
        assert_eq!(r.n, 2);
        for (_, m) in attribute_columns(&r) {
            assert_eq!(m.correct, 0);
            assert_eq!(m.pass, m.target.map(|_| false));
        }
        let mut t = Tally::default();
        // Wrong agreement, otherwise right.
        let g = s.shape.gender();
        let other = [Gender::Masculine, Gender::Feminine, Gender::Neuter]
            .into_iter()
            .find(|&x| x != g)
            .unwrap();
        let caption = s
            .caption()
            .replacen(s.size.adjective(g), s.size.adjective(other), 1);
        t.add_caption(&s, &caption, None);
        let r = t.report(AttributeTargets::CAPTIONING_SEEN, true);
        assert_eq!(r.exact.correct, 1);
        assert_eq!(r.grammatical.unwrap().correct, 0);
    }

    #[test]
    fn retrieval_helpers() {
        let truth = sample(1, 0, false)[0].caption();
        let d = distractors(&truth, 9, 42);
        assert_eq!(d.len(), 9);
        assert!(!d.contains(&truth));
        let mut sorted = d.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9);
        assert!(strict_best(&[1.0, 2.0, 3.0], 0));
        assert!(!strict_best(&[1.0, 1.0, 3.0], 0));
        assert!(!strict_best(&[2.0, 1.0], 0));
    }
}
