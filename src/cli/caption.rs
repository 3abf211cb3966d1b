//! `rudolph caption IMAGE`: draw captions, rank them against the picture, print the best.

use super::common::{ModelArgs, OutputArgs, SampleArgs, choices, picture_codes, print_warnings};
use rudolph::pipelines::captions::{Caption, CaptionRank, generate_captions};
use rudolph::pipelines::defaults;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct CaptionArgs {
    pub image: PathBuf,
    /// Beginning of every caption.
    #[arg(long, default_value = "")]
    pub template: String,
    /// Captions to generate (duplicates are merged).
    #[arg(long, default_value_t = defaults::CAPTIONS)]
    pub captions: usize,
    /// Ranking: joint = p(caption | picture) by Bayes' rule through the text → image direction;
    /// text = the caption's perplexity given the picture (rc1; the default with --original).
    #[arg(long, value_parser = choices(CaptionRank::ALL, CaptionRank::name, rank_help))]
    pub rank: Option<CaptionRank>,
    /// How many of the best to print (default 5, or as many as are drawn when fewer).
    #[arg(long)]
    pub keep: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn rank_help(rank: CaptionRank) -> &'static str {
    match rank {
        CaptionRank::Joint => {
            "By p(caption | picture) through Bayes' rule: the caption's NLL as the left text plus \
             the picture's NLL after it, which reads shapes far better (docs/commands.md)"
        }
        CaptionRank::Text => "By the perplexity of the caption given the picture, as rc1 did",
    }
}

pub fn run(args: CaptionArgs) -> anyhow::Result<()> {
    super::common::check_count("--captions", args.captions)?;
    let keep = match args.keep {
        Some(keep) => {
            anyhow::ensure!(keep > 0, "--keep must be at least 1");
            anyhow::ensure!(
                keep <= args.captions,
                "--keep {keep} is more than the {} --captions drawn",
                args.captions
            );
            keep
        }
        None => args.captions.min(5),
    };
    let opts = args.sample.options(defaults::CAPTION, args.output.quiet)?;
    let rank = args.rank.unwrap_or(if args.sample.original {
        CaptionRank::Text
    } else {
        CaptionRank::Joint
    });
    let loaded = args.model.load()?;
    // Said before the work, so that nobody waits for what the model makes of words it cannot read.
    print_warnings(loaded.unknown_words("template", &args.template).as_slice());
    let codes = picture_codes(&loaded, &args.image)?;
    let captions = generate_captions(
        &loaded.model,
        &loaded.tokenizer,
        &codes,
        &args.template,
        args.captions,
        rank,
        &opts,
    )?;
    print_warnings(&captions.warnings);
    anyhow::ensure!(
        !captions.is_empty(),
        "no caption: every one drawn was empty (the model ended each at once)"
    );
    let captions = &captions[..keep.min(captions.len())];
    if args.output.json {
        let report = Report {
            image: args.image.display().to_string(),
            seed: opts.seed,
            rank,
            captions,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in captions {
            println!("{:>10.2}  {}", c.score, c.text);
        }
    }
    Ok(())
}

/// `caption --json`.
#[derive(serde::Serialize)]
struct Report<'a> {
    image: String,
    seed: u64,
    rank: CaptionRank,
    captions: &'a [Caption],
}
