//! `rudolph world …`: the shapes world that the built-in model learns.

use crate::world;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum WorldCommand {
    /// Draw N scenes: pictures plus a data.jsonl of captions that `rudolph train` reads.
    Sample(SampleArgs),
    /// Train the built-in model from nothing: VQGAN, tokenizer, RuDOLPH (resumable).
    Train(TrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct WorldArgs {
    #[command(subcommand)]
    pub command: WorldCommand,
}

#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    #[arg(long)]
    pub n: usize,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw only the held-out colour+shape pairs (for evaluation) instead of the seen ones.
    #[arg(long)]
    pub held_out: bool,
    /// Write into a non-empty folder.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: WorldArgs) -> anyhow::Result<()> {
    match args.command {
        WorldCommand::Sample(a) => sample(a),
        WorldCommand::Train(a) => train(a),
    }
}

fn sample(args: SampleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() && !args.force {
        anyhow::bail!(
            "{} is not empty; pass --force to write into it",
            args.out.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.out.display()))?;
    let jsonl = args.out.join("data.jsonl");
    let mut lines = std::io::BufWriter::new(
        std::fs::File::create(&jsonl).map_err(|e| anyhow::anyhow!("{}: {e}", jsonl.display()))?,
    );
    let progress = crate::progress::Progress::new(args.n as u64, "scenes", true);
    for (i, scene) in world::sample(args.n, args.seed, args.held_out)
        .iter()
        .enumerate()
    {
        let name = format!("{i:06}.png");
        crate::image::save_png(&world::render::render(scene), &args.out.join(&name))?;
        // Exactly the trainer's format; the caption states every attribute of the scene.
        let line = serde_json::json!({ "image": name, "text": scene.caption() });
        writeln!(lines, "{line}")?;
        progress.inc(1);
    }
    progress.finish();
    lines.flush()?;
    println!("wrote {} scenes and {}", args.n, jsonl.display());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Run folder (created; an existing one is continued where it stopped).
    #[arg(long)]
    pub out: PathBuf,
    /// VQGAN optimizer steps.
    #[arg(long, default_value_t = 600)]
    pub vqgan_steps: u64,
    /// Stop after this stage: vqgan, tokenizer or all.
    #[arg(long, default_value = "all")]
    pub until: String,
    #[arg(long, short)]
    pub quiet: bool,
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    use crate::world::recipe::{RunDirs, VqganStage, train_vqgan, vqgan_gate};
    let dirs = RunDirs::new(&args.out);
    let mut stage = VqganStage::default();
    stage.train.steps = args.vqgan_steps;
    let start = std::time::Instant::now();
    let vae = train_vqgan(&dirs.vqgan, &stage, !args.quiet)?;
    let gate = vqgan_gate(&vae, 200, 7)?;
    eprintln!(
        "VQGAN after {:.0?}: {}",
        start.elapsed(),
        serde_json::to_string(&gate)?
    );
    Ok(())
}
