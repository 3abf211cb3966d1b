//! `rudolph world train`: the whole recipe of the built-in model, from nothing, in one
//! resumable command (see [`rudolph::world::recipe`] for the folder layout). Run it again on the
//! same `--out` after an interruption and it continues where it stopped.

use super::train::TrainArgs;
use super::world::{append_recoloured, write_scenes};
use anyhow::Context;
use rudolph::folder::GenerationConfig;
use rudolph::tokenizer::TextTokenizer;
use rudolph::train::Freeze;
use rudolph::train::schedule::Schedule;
use rudolph::world::recipe::{
    ROUND_LRS, ROUND_PROMPTED, ROUND_RECOLOURED, RunDirs, VQGAN_GATE, VqganStage, WORLD_GUIDANCE,
    all_seen_captions, model_config, save_vqgan, train_vqgan, vqgan_gate,
};
use rudolph::world::sample;
use rudolph::world::tokenizer::world_bpe;
use std::path::{Path, PathBuf};
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
    anyhow::ensure!(
        args.lr.iter().all(|lr| lr.is_finite() && *lr > 0.0),
        "--lr values must be positive numbers"
    );
    anyhow::ensure!(
        args.guidance.is_finite(),
        "--guidance must be a finite number"
    );
    let dirs = RunDirs::new(&args.out);
    let progress = !args.quiet;
    let start = Instant::now();
    let stamp =
        |what: &str| eprintln!("[{:>5.1} min] {what}", start.elapsed().as_secs_f64() / 60.0);

    // 1. The VQGAN, gated on reading its reconstructions back.
    let mut stage = VqganStage::default();
    stage.train.steps = args.vqgan_steps;
    let vae = train_vqgan(&dirs.vqgan, &stage, progress)?;
    let gate = vqgan_gate(&vae, 200, 7)?;
    std::fs::write(
        dirs.vqgan.join("gate.json"),
        serde_json::to_string_pretty(&gate)?,
    )?;
    stamp(&format!(
        "VQGAN: reconstructions read back right on {:.1}% (seen) / {:.1}% (held-out) of attributes",
        100.0 * gate.seen.mean(),
        100.0 * gate.held_out.mean()
    ));
    if !gate.passes() && !args.ignore_gate {
        anyhow::bail!(
            "the VQGAN misses the gate (≥ {:.0}% of attributes read back right): {}; train it longer with a \
             larger --vqgan-steps on the same --out, or pass --ignore-gate",
            100.0 * VQGAN_GATE,
            serde_json::to_string(&gate)?
        );
    }
    std::fs::create_dir_all(&dirs.model)?;
    save_vqgan(&vae, &dirs.vqgan.join("weights.safetensors"), &dirs.model)?;

    // 2. The tokenizer, from the captions' grammar: adjectives as stem + ending, so that every
    // held-out caption is spelled with pieces the seen ones use (see world::tokenizer).
    let bpe_path = dirs.model.join("bpe.model");
    let captions = all_seen_captions();
    if !bpe_path.is_file() {
        world_bpe().save(&bpe_path, false)?;
    }
    let tokenizer = TextTokenizer::load(&bpe_path)?;
    let cfg = model_config(tokenizer.bpe().vocab_size());
    let longest = captions
        .iter()
        .map(|c| tokenizer.bpe().encode(c).len() + 2)
        .max()
        .unwrap_or(0);
    anyhow::ensure!(
        longest <= cfg.l_text_seq_length,
        "the longest caption needs {longest} tokens with BOS and EOS, more than the {} text slots",
        cfg.l_text_seq_length
    );
    let cfg_path = args.out.join("model-config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;
    stamp(&format!(
        "tokenizer: {} ids, captions take at most {longest} of {} slots",
        tokenizer.bpe().vocab_size(),
        cfg.l_text_seq_length
    ));

    // 3–4. The transformer, by `rudolph train`, in rounds: each round draws fresh scenes (6000
    // scenes are seen a dozen times in one round, and the image loss starts to overfit them)
    // and continues from the previous round's weights with a fresh cosine cycle at its own
    // peak learning rate; the last rounds add pictures without captions whose shapes are in
    // colours off the palette, so that the model draws every outline in many colours; in a
    // prompted round they follow their colourless caption, so that the words for an outline
    // call it up in any colour.
    for round in 1..=rounds {
        let (recoloured, prompted) = (args.recoloured[round - 1], args.prompted[round - 1]);
        let (data, run_dir) = dirs.round(round);
        let jsonl = data.join("data.jsonl");
        if !jsonl.is_file() {
            // Written aside and renamed, so that an interrupted write is not taken for data.
            let partial = data.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            write_scenes(
                &sample(args.scenes, round as u64, false),
                &partial,
                progress,
            )?;
            if recoloured > 0 {
                append_recoloured(recoloured, prompted, round as u64, &partial, progress)?;
            }
            let _ = std::fs::remove_dir_all(&data);
            std::fs::rename(&partial, &data)
                .with_context(|| format!("renaming {} to {}", partial.display(), data.display()))?;
        }
        if run_dir.join("model.safetensors").is_file() {
            continue;
        }
        let resume = latest_checkpoint(&run_dir);
        let train = TrainArgs {
            data: Some(jsonl),
            model: (round > 1).then(|| dirs.round(round - 1).1),
            config: (round == 1).then(|| cfg_path.display().to_string()),
            tokenizer: Some(bpe_path.clone()),
            vae: Some(dirs.model.join("vqgan.safetensors")),
            vae_config: Some(dirs.model.join("vqgan.config.yml")),
            out: Some(run_dir.clone()),
            resume: resume.clone(),
            steps: args.steps,
            batch_size: args.batch_size,
            accumulate: 1,
            lr: args.lr[round - 1],
            schedule: Schedule::Cosine,
            warmup: 100,
            clip: 1.0,
            weight_decay: 0.01,
            loss_weights: "1,2,1".into(),
            freeze: Freeze::Nothing,
            dropout: Some(0.0),
            bpe_dropout: 0.0,
            val_fraction: 0.02,
            eval_every: 250,
            save_every: 250,
            log_every: 10,
            seed: round as u64 - 1,
            corrected_labels: true,
            i2t_fraction: args.i2t_fraction,
            synthetic: None,
            quiet: args.quiet,
            force: resume.is_none(),
        };
        super::train::run(train)?;
        stamp(&format!("transformer round {round} of {rounds}"));
    }
    let (_, last) = dirs.round(rounds);
    for name in ["model.safetensors", "config.json"] {
        std::fs::copy(last.join(name), dirs.model.join(name))
            .with_context(|| format!("copying {name} into {}", dirs.model.display()))?;
    }
    let generation = GenerationConfig {
        guidance_scale: Some(args.guidance),
        image_rank: Some(rudolph::world::recipe::WORLD_IMAGE_RANK),
    };
    std::fs::write(
        dirs.model.join(GenerationConfig::FILE),
        serde_json::to_string_pretty(&generation)?,
    )?;
    stamp(&format!(
        "done: the model folder is {}",
        dirs.model.display()
    ));
    Ok(())
}

/// The newest `checkpoint-<step>` of a `rudolph train` run, if any.
fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let step: u64 = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
}
