//! `rudolph world …`: the shapes world that the built-in model learns.

use super::common::{ModelArgs, choices, image_rank_help, print_warnings};
use super::progress::progress;
use rudolph::pipelines::defaults;
use rudolph::pipelines::images::ImageRank;
use rudolph::world::eval::{EvalOptions, evaluate};
use rudolph::world::{self, dataset};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum WorldCommand {
    /// Draw N scenes: pictures plus a data.jsonl of captions that `rudolph train` reads.
    Sample(SampleArgs),
    /// Train the built-in model from nothing: VQGAN, tokenizer, RuDOLPH (resumable).
    Train(super::world_train::WorldTrainArgs),
    /// Score a model on the world: captioning, text → image (seen and held-out pairs),
    /// retrieval, zero-shot classification and generated texts, against the world's targets.
    Eval(EvalArgs),
}

#[derive(Debug, clap::Args)]
pub struct WorldArgs {
    #[command(subcommand)]
    pub command: WorldCommand,
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// Scenes to draw.
    #[arg(long)]
    pub n: usize,
    /// Folder of the pictures and data.jsonl.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Seed of the scenes (the same seed draws the same scenes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw only the held-out colour+shape pairs (for evaluation) instead of the seen ones.
    #[arg(long)]
    pub held_out: bool,
    /// Also draw M pictures without captions, each shape in a colour off the palette (never
    /// one the reader would name as a held-out pair): `rudolph train` trains them as pictures
    /// alone.
    #[arg(long, value_name = "M", default_value_t = 0)]
    pub recoloured: usize,
    /// Give each recoloured picture its caption without the colour as a prompt
    /// («большая звезда слева на белом фоне»): it conditions the picture, and is not trained as
    /// a text (see `rudolph train`'s data format).
    #[arg(long, requires = "recoloured")]
    pub prompted: bool,
    /// Also draw M captioned scenes of the held-out colour+shape pairs (red circle, blue
    /// square, green triangle, orange star): fine-tuning on the mix teaches the model those
    /// pairs while the seen scenes keep what it knows (docs/training.md).
    #[arg(long, value_name = "M", default_value_t = 0)]
    pub with_held_out: usize,
    /// Write into a non-empty folder.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: WorldArgs) -> anyhow::Result<()> {
    match args.command {
        WorldCommand::Sample(a) => sample(a),
        WorldCommand::Train(a) => super::world_train::run(a),
        WorldCommand::Eval(a) => eval(a),
    }
}

fn sample(args: SampleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(
        !(args.held_out && args.recoloured > 0),
        "--recoloured adds training pictures of seen scenes; it does not go with --held-out"
    );
    anyhow::ensure!(
        !(args.held_out && args.with_held_out > 0),
        "--with-held-out adds held-out scenes to seen ones; with --held-out every scene is held \
         out already (raise --n instead)"
    );
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() && !args.force {
        anyhow::bail!(
            "{} is not empty; pass --force to write into it",
            args.out.display()
        );
    }
    let progress = progress(false);
    let jsonl = dataset::write_scenes(
        &world::sample(args.n, args.seed, args.held_out),
        &args.out,
        progress.as_ref(),
    )?;
    if args.recoloured > 0 {
        dataset::append_recoloured(
            args.recoloured,
            args.prompted,
            args.seed,
            &args.out,
            progress.as_ref(),
        )?;
    }
    if args.with_held_out > 0 {
        dataset::append_held_out(args.with_held_out, args.seed, &args.out, progress.as_ref())?;
    }
    println!(
        "wrote {} scenes{}{} and {}",
        args.n,
        match args.with_held_out {
            0 => String::new(),
            m => format!(", {m} of held-out pairs"),
        },
        match args.recoloured {
            0 => String::new(),
            m => format!(" and {m} recoloured pictures"),
        },
        jsonl.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Scenes per task.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Seed of the scenes and of the sampled generations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON document with every number and target instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Sequences run through the model at once (more is faster until memory runs out).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Captions sampled per picture, the best by `rudolph caption`'s ranking scored; 0 = one
    /// greedy caption.
    #[arg(long, default_value_t = defaults::CAPTIONS)]
    pub captions: usize,
    /// Pictures sampled per caption, the one that best explains it scored (as `rudolph image`).
    #[arg(long, default_value_t = defaults::IMAGES)]
    pub images: usize,
    /// Classifier-free guidance scale of the pictures (as `rudolph image --guidance`; default:
    /// the model folder's, else 1).
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub guidance: Option<f32>,
    /// What the pictures are ranked by (as `rudolph image --rank`; default: the model folder's,
    /// else codes).
    #[arg(long, value_parser = choices(ImageRank::ALL, ImageRank::name, image_rank_help))]
    pub rank: Option<ImageRank>,
    /// Also save the generated pictures as PNG grids in DIR (text_to_image_seen.png,
    /// text_to_image_held_out.png).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    super::common::check_count("--images", args.images)?;
    anyhow::ensure!(
        args.captions <= rudolph::pipelines::defaults::MAX_COUNT,
        "--captions {} is more than the {} one run draws",
        args.captions,
        rudolph::pipelines::defaults::MAX_COUNT
    );
    if let Some(g) = args.guidance {
        rudolph::pipelines::images::check_guidance(g)
            .map_err(|e| anyhow::anyhow!("--guidance: {e}"))?;
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    }
    let loaded = args.model.load()?;
    let opts = EvalOptions {
        n: args.n,
        seed: args.seed,
        batch_size: args.batch_size,
        captions: args.captions,
        images: args.images,
        guidance: args.guidance,
        rank: args.rank,
        progress: progress(args.quiet),
    };
    let report = evaluate(&loaded, &opts)?;
    print_warnings(&report.warnings);
    let mut written = Vec::new();
    if let Some(dir) = &args.out {
        for (name, pictures) in [
            ("text_to_image_seen.png", &report.pictures_seen),
            ("text_to_image_held_out.png", &report.pictures_held_out),
        ] {
            let path = dir.join(name);
            save_grid(pictures, &path)?;
            written.push(path.display().to_string());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
        for w in &written {
            println!("wrote {w}");
        }
    }
    Ok(())
}

/// The pictures as one PNG, ten to a row.
fn save_grid(pictures: &[image::RgbImage], path: &std::path::Path) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let tensors = pictures
        .iter()
        .map(|p| rudolph::image::to_tensor(p, &device))
        .collect::<Result<Vec<_>, _>>()?;
    let grid = rudolph::image::grid(&candle_core::Tensor::stack(&tensors, 0)?, 10)?;
    rudolph::image::save_image(&rudolph::image::to_rgb8(&grid)?, path)?;
    Ok(())
}
