//! `rudolph caption IMAGE`: generate captions, rank them by the picture, print the best.

use super::common::{ModelArgs, OutputArgs, SampleArgs, picture_codes};
use crate::pipelines::captions::generate_captions;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct CaptionArgs {
    pub image: PathBuf,
    /// Beginning of every caption.
    #[arg(long, default_value = "")]
    pub template: String,
    /// Captions to generate (duplicates are merged).
    #[arg(long, default_value_t = 16)]
    pub captions: usize,
    /// How many of the best to print.
    #[arg(long, default_value_t = 5)]
    pub keep: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: CaptionArgs) -> anyhow::Result<()> {
    let opts = args.sample.options(32, 0.6, args.output.quiet)?;
    let loaded = args.model.load()?;
    let codes = picture_codes(&loaded, &args.image)?;
    let mut captions = generate_captions(
        &loaded.model,
        &loaded.tokenizer,
        &codes,
        &args.template,
        args.captions,
        &opts,
    )?;
    captions.truncate(args.keep);
    if args.output.json {
        let doc = serde_json::json!({
            "image": args.image.display().to_string(), "seed": opts.seed, "captions": captions,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for c in &captions {
            println!("{:>10.2}  {}", c.ppl, c.text);
        }
    }
    Ok(())
}
