//! `rudolph world train`: the whole recipe of the built-in model, from nothing, in one
//! resumable command (see [`rudolph::world::recipe`] for the folder layout). Run it again on the
//! same `--out` after an interruption and it continues where it stopped.

use super::progress::progress;
use super::train::print_summary;
use rudolph::world::recipe::{
    Outcome, ROUND_LRS, ROUND_PROMPTED, ROUND_RECOLOURED, Recipe, Round, Stage, VQGAN_GATE,
    WORLD_GUIDANCE,
};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct WorldTrainArgs {
    /// Run folder (created; an existing one is continued where it stopped).
    #[arg(long)]
    pub out: PathBuf,
    /// VQGAN optimizer steps (batch 8; 32 px crops but for the last 150 steps).
    #[arg(long, default_value_t = 7000)]
    pub vqgan_steps: u64,
    /// Training scenes for the transformer (seen colour+shape pairs only).
    #[arg(long, default_value_t = 6000)]
    pub scenes: usize,
    /// Transformer optimizer steps per round.
    #[arg(long, default_value_t = 2500)]
    pub steps: u64,
    /// Samples per optimizer step of the transformer rounds.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// The transformer's rounds, by their peak learning rates (cosine after a 100-step warmup):
    /// one value per round, each round on fresh scenes from the previous round's weights.
    #[arg(long, value_delimiter = ',', default_values_t = ROUND_LRS)]
    pub lr: Vec<f64>,
    /// Pictures without captions added to each round's scenes (one value per round), their
    /// shapes in colours off the palette (never one the reader would name as a held-out pair),
    /// trained as pictures alone.
    #[arg(long, value_delimiter = ',', default_values_t = ROUND_RECOLOURED)]
    pub recoloured: Vec<usize>,
    /// Whether each round's recoloured pictures are prompted by their captions without the
    /// colour (one per round: 0 or 1, false or true) rather than trained after a blank left
    /// text.
    #[arg(long, value_delimiter = ',', default_values_t = ROUND_PROMPTED,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub prompted: Vec<bool>,
    /// Fraction of picture samples trained image → text, with the left text blanked.
    #[arg(long, default_value_t = 0.5)]
    pub i2t_fraction: f64,
    /// Classifier-free guidance scale the model folder sets for its pictures
    /// (`generation_config.json`).
    #[arg(long, default_value_t = WORLD_GUIDANCE)]
    pub guidance: f32,
    /// Train the transformer even if the VQGAN misses the reconstruction gate.
    #[arg(long)]
    pub ignore_gate: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: WorldTrainArgs) -> anyhow::Result<()> {
    let rounds = args.lr.len();
    anyhow::ensure!(rounds >= 1, "--lr needs at least one value (one per round)");
    for (flag, n) in [
        ("--recoloured", args.recoloured.len()),
        ("--prompted", args.prompted.len()),
    ] {
        anyhow::ensure!(
            n == rounds,
            "{flag} has {n} values and --lr {rounds}: give one of each per round"
        );
    }
    let recipe = Recipe {
        vqgan_steps: args.vqgan_steps,
        scenes: args.scenes,
        steps: args.steps,
        batch_size: args.batch_size,
        rounds: (args.lr.iter().zip(&args.recoloured).zip(&args.prompted))
            .map(|((&lr, &recoloured), &prompted)| Round {
                lr,
                recoloured,
                prompted,
            })
            .collect(),
        i2t_fraction: args.i2t_fraction,
        guidance: args.guidance,
        ignore_gate: args.ignore_gate,
    };
    let start = Instant::now();
    let stamp =
        |what: &str| eprintln!("[{:>5.1} min] {what}", start.elapsed().as_secs_f64() / 60.0);
    let mut report = |stage: Stage| match stage {
        Stage::Vqgan(gate) => stamp(&format!(
            "VQGAN: reconstructions read back right on {:.1}% (seen) / {:.1}% (held-out) of attributes",
            100.0 * gate.seen.mean(),
            100.0 * gate.held_out.mean()
        )),
        Stage::Tokenizer {
            vocab,
            longest,
            slots,
        } => stamp(&format!(
            "tokenizer: {vocab} ids, captions take at most {longest} of {slots} slots"
        )),
        Stage::Round {
            round,
            rounds,
            summary,
        } => {
            if !args.quiet {
                print_summary(summary);
            }
            stamp(&format!("transformer round {round} of {rounds}"));
        }
    };
    match recipe.run(&args.out, progress(args.quiet).as_ref(), &mut report)? {
        Outcome::Done(model) => {
            stamp(&format!("done: the model folder is {}", model.display()));
            Ok(())
        }
        Outcome::GateMissed(gate) => anyhow::bail!(
            "the VQGAN misses the gate (≥ {:.0}% of attributes read back right): {}; train it longer with a \
             larger --vqgan-steps on the same --out, or pass --ignore-gate",
            100.0 * VQGAN_GATE,
            serde_json::to_string(&gate)?
        ),
    }
}
