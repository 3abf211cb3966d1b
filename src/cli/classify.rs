//! `rudolph classify IMAGE --classes a,b,c`: zero-shot classification by perplexity.

use super::common::{ModelArgs, OutputArgs, picture_codes, print_warnings};
use rudolph::pipelines::classify::{
    CAPTION_TEMPLATE, CaptionClassify, classify, classify_by_caption,
};
use rudolph::pipelines::{Fidelity, defaults};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    pub image: PathBuf,
    /// Class names, comma-separated (the flag may be repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub classes: Vec<String>,
    /// Where each class goes: text before it ("на картинке"), a text marking its place with
    /// `{}`, or `{caption}` (in place of words of the picture's own captions, for single words).
    /// Default: the folder's `generation_config.json` (the built-in's says {caption}), else
    /// the class alone, as the original.
    #[arg(long)]
    pub template: Option<String>,
    /// Captions drawn for the {caption} template.
    #[arg(long, default_value_t = defaults::CLASSIFY_CAPTIONS)]
    pub captions: usize,
    /// Seed of the captions of the {caption} template (fixed, so that a picture is always
    /// classified the same way).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences run through the model at once (more is faster until memory runs out).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Compute exactly what rudolph 0.0.1rc1 computes, also where it is wrong (a template that
    /// fills the text slots is then cut, and each class scored by its first token alone).
    /// Without --template the class is then the whole text.
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
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let loaded = args.model.load()?;
    // The original has no template of its own folder: its default is the class alone.
    let template = match (&args.template, args.original) {
        (None, true) => String::new(),
        (flag, _) => loaded.classify_template(flag.as_deref()),
    };
    let by_caption = template.trim() == CAPTION_TEMPLATE;
    anyhow::ensure!(
        !(by_caption && args.original),
        "the original has no {CAPTION_TEMPLATE} template; give --original a --template of words"
    );
    let mut warnings: Vec<_> = classes
        .iter()
        .filter_map(|c| loaded.unknown_words("class", c))
        .collect();
    if !by_caption {
        warnings.extend(loaded.unknown_words("template", &template.replace("{}", " ")));
    }
    print_warnings(&warnings);
    let codes = picture_codes(&loaded, &args.image)?;
    let result = if by_caption {
        anyhow::ensure!(args.captions > 0, "--captions must be at least 1");
        let mut how = CaptionClassify::new(args.seed);
        how.captions = args.captions;
        how.generate.batch_size = args.batch_size;
        how.generate.progress = super::progress::progress(args.output.quiet);
        classify_by_caption(&loaded.model, &loaded.tokenizer, &codes, &classes, &how)?
    } else {
        classify(
            &loaded.model,
            &loaded.tokenizer,
            &codes,
            &classes,
            &template,
            args.batch_size,
            if args.original {
                Fidelity::Original
            } else {
                Fidelity::Fixed
            },
        )
        .map_err(|e| {
            let e = e.to_string();
            // The one refusal where the original computes something all the same.
            if e.contains("no room") {
                anyhow::anyhow!("{e} (--original computes what the original computes)")
            } else {
                anyhow::anyhow!(e)
            }
        })?
    };
    print_warnings(&result.warnings);
    if args.output.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!("{}", result.class);
        for s in &result.scores {
            let mark = if s.class == result.class { "*" } else { " " };
            if by_caption {
                println!("{mark} {:>10.2}  {}  ({})", s.score, s.class, s.text);
            } else {
                println!("{mark} {:>10.2}  {}", s.score, s.class);
            }
        }
    }
    Ok(())
}
