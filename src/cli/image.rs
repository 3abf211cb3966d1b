//! `rudolph image TEXT`: draw candidates, rerank them by the text, save the best as a PNG grid.

use super::common::{
    ModelArgs, OutputArgs, SampleArgs, check_picture_output, choices, image_rank_help,
    print_warnings,
};
use rudolph::pipelines::defaults;
use rudolph::pipelines::images::{
    Borders, ImageRank, decode_pictures, generate_images, image_prompt,
};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// What to draw.
    pub text: String,
    /// Candidates to generate.
    #[arg(long, default_value_t = defaults::IMAGES)]
    pub images: usize,
    /// Best candidates to decode and save (one: the picture itself; more: a grid).
    #[arg(long, default_value_t = 1)]
    pub keep: usize,
    /// The picture to write: .png, .jpg/.jpeg or .webp (lossless).
    #[arg(short, long, default_value = "rudolph.png")]
    pub output: PathBuf,
    /// Also write each kept picture next to the grid (OUT_1.png, OUT_2.png, …, in the
    /// grid's format).
    #[arg(long)]
    pub save_each: bool,
    /// Pictures per grid row.
    #[arg(long, default_value_t = 4)]
    pub nrow: usize,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    /// Continue this picture's borders (it is resized to the model's size first).
    #[arg(long, value_name = "PATH")]
    pub prompt_image: Option<PathBuf>,
    /// Borders of the prompt picture to keep, in tokens: up,left,right,down.
    #[arg(long, default_value = "0,0,0,0")]
    pub borders: String,
    /// Encode each border strip separately (ruDALL-E's crop_first).
    #[arg(long)]
    pub crop_first: bool,
    /// Classifier-free guidance: sample from `u + S·(c − u)`, the logits after the text (c)
    /// pushed away from those after an empty one (u); 1 = off, up to 10. Costs a second model row per
    /// picture; needs a model trained with pictures alone (`rudolph train --i2t-fraction`).
    /// Default: the model folder's `generation_config.json`, else 1.
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub guidance: Option<f32>,
    /// Rank candidates by the text given their sampled codes (`codes`, as the original) or
    /// given the codes of the decoded picture encoded again (`decoded`). Default: the model
    /// folder's `generation_config.json` (the built-in model's says decoded), else codes.
    #[arg(long, value_parser = choices(ImageRank::ALL, ImageRank::name, image_rank_help))]
    pub rank: Option<ImageRank>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn parse_borders(s: &str) -> anyhow::Result<Borders> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            anyhow::anyhow!("--borders takes four numbers up,left,right,down, got '{s}'")
        })?;
    anyhow::ensure!(
        v.len() == 4,
        "--borders takes four numbers up,left,right,down, got '{s}'"
    );
    Ok(Borders {
        up: v[0],
        left: v[1],
        right: v[2],
        down: v[3],
    })
}

/// `out.png` → `out_3.png`.
fn numbered(path: &std::path::Path, i: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or("png".into(), |e| e.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}_{i}.{ext}"))
}

pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    super::common::check_count("--images", args.images)?;
    anyhow::ensure!(args.keep > 0, "--keep must be at least 1");
    anyhow::ensure!(args.nrow > 0, "--nrow must be at least 1");
    anyhow::ensure!(
        args.keep <= args.images,
        "--keep {} is more than the {} --images drawn",
        args.keep,
        args.images
    );
    let keep = args.keep;
    check_picture_output(&args.output, args.force)?;
    if args.save_each {
        for i in 1..=keep {
            check_picture_output(&numbered(&args.output, i), args.force)?;
        }
    }
    let mut opts = args.sample.options(defaults::IMAGE, args.out.quiet)?;
    if let Some(g) = args.guidance {
        rudolph::pipelines::images::check_guidance(g)
            .map_err(|e| anyhow::anyhow!("--guidance: {e}"))?;
    }
    let borders = parse_borders(&args.borders)?;
    let loaded = args.model.load()?;
    // Said before the work, so that nobody waits for what the model makes of words it cannot read.
    print_warnings(loaded.unknown_words("text", &args.text).as_slice());
    opts.guidance = loaded.guidance(args.guidance);
    let vae = loaded.vae()?;
    let prompt = match &args.prompt_image {
        Some(p) => {
            let size = loaded.model.config().image_size();
            let img = rudolph::image::load_image(p)?;
            let pixels = rudolph::image::preprocess(&img, size as u32, vae.device())?;
            Some(image_prompt(vae, &pixels, borders, args.crop_first)?)
        }
        None => {
            anyhow::ensure!(
                borders == Borders::default(),
                "--borders needs --prompt-image"
            );
            None
        }
    };
    let ranked = generate_images(
        &loaded.model,
        &loaded.tokenizer,
        &args.text,
        args.images,
        prompt.as_ref(),
        &opts,
    )?;
    let rank = loaded.image_rank(args.rank);
    let ranked = rank.apply(
        &loaded.model,
        &loaded.tokenizer,
        vae,
        &args.text,
        ranked,
        opts.batch_size,
        opts.progress.as_ref(),
    )?;
    print_warnings(&ranked.warnings);
    let best: Vec<&[u32]> = ranked[..keep].iter().map(|r| r.codes.as_slice()).collect();
    let pictures = decode_pictures(vae, &best, opts.batch_size, opts.progress.as_ref())?;
    let grid = rudolph::image::grid(&pictures, args.nrow)?;
    rudolph::image::save_image(&rudolph::image::to_rgb8(&grid)?, &args.output)?;
    let mut files = Vec::new();
    if args.save_each {
        for i in 0..keep {
            let path = numbered(&args.output, i + 1);
            rudolph::image::save_image(&rudolph::image::to_rgb8(&pictures.get(i)?)?, &path)?;
            files.push(path.display().to_string());
        }
    }
    if args.out.json {
        let images = ranked
            .iter()
            .enumerate()
            .map(|(i, r)| Candidate {
                rank: i + 1,
                ppl_text: r.ppl_text,
                ppl_image: r.ppl_image,
                ppl_decoded: r.ppl_decoded,
                codes: &r.codes,
                kept: i < keep,
                file: files.get(i).map(String::as_str),
            })
            .collect();
        let report = Report {
            text: &args.text,
            seed: opts.seed,
            guidance: opts.guidance,
            ranked_by: rank,
            grid: args.output.display().to_string(),
            images,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (i, r) in ranked.iter().take(keep).enumerate() {
            let decoded = r
                .ppl_decoded
                .map(|p| format!("  ppl_decoded {p:>10.2}"))
                .unwrap_or_default();
            println!(
                "#{:<3} ppl_text {:>10.2}  ppl_image {:>10.2}{decoded}",
                i + 1,
                r.ppl_text,
                r.ppl_image
            );
        }
        println!("wrote {}", args.output.display());
        for f in &files {
            println!("wrote {f}");
        }
    }
    Ok(())
}

/// `image --json`: every candidate, best first.
#[derive(serde::Serialize)]
struct Report<'a> {
    text: &'a str,
    seed: u64,
    guidance: f32,
    ranked_by: ImageRank,
    grid: String,
    images: Vec<Candidate<'a>>,
}

#[derive(serde::Serialize)]
struct Candidate<'a> {
    rank: usize,
    ppl_text: f32,
    ppl_image: f32,
    ppl_decoded: Option<f32>,
    codes: &'a [u32],
    kept: bool,
    file: Option<&'a str>,
}
