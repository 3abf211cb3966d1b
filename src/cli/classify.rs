//! `rudolph classify IMAGE --classes a,b,c`: zero-shot classification by perplexity.

use super::common::{ModelArgs, OutputArgs, picture_codes, print_warnings};
use rudolph::pipelines::Fidelity;
use rudolph::pipelines::classify::classify;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    pub image: PathBuf,
    /// Class names, comma-separated (the flag may be repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub classes: Vec<String>,
    /// Text before each class name, e.g. "на картинке"; or a text with the class's place
    /// marked `{}`, e.g. "{} слева на белом фоне" (the words after the class are scored too).
    #[arg(long, default_value = "")]
    pub template: String,
    /// Sequences run through the model at once (more is faster until memory runs out).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Compute exactly what rudolph 0.0.1rc1 computes, also where it is wrong (a template that
    /// fills the text slots is then cut, and each class scored by its first token alone).
    #[arg(long)]
    pub original: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let classes: Vec<String> = args
        .classes
        .iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    anyhow::ensure!(
        !classes.is_empty(),
        "--classes is empty: give at least one class name"
    );
    let loaded = args.model.load()?;
    let codes = picture_codes(&loaded, &args.image)?;
    let result = classify(
        &loaded.model,
        &loaded.tokenizer,
        &codes,
        &classes,
        &args.template,
        args.batch_size,
        if args.original {
            Fidelity::Original
        } else {
            Fidelity::Fixed
        },
    )
    .map_err(|e| anyhow::anyhow!("{e} (--original computes what the original computes)"))?;
    print_warnings(&result.warnings);
    if args.output.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!("{}", result.class);
        for s in &result.scores {
            let mark = if s.class == result.class { "*" } else { " " };
            println!("{mark} {:>10.2}  {}", s.ppl_text, s.class);
        }
    }
    Ok(())
}
