//! `rudolph text [TEMPLATE]`: generate left texts, ranked by perplexity.

use super::common::{ModelArgs, OutputArgs, SampleArgs, print_warnings};
use rudolph::pipelines::defaults;
use rudolph::pipelines::texts::{GeneratedText, generate_texts};

#[derive(Debug, clap::Args)]
pub struct TextArgs {
    /// Beginning of the texts (may be empty).
    #[arg(default_value = "")]
    pub template: String,
    /// Texts to generate (duplicates are merged).
    #[arg(long, default_value_t = 16)]
    pub texts: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(args: TextArgs) -> anyhow::Result<()> {
    super::common::check_count("--texts", args.texts)?;
    let opts = args.sample.options(defaults::TEXT, args.output.quiet)?;
    let loaded = args.model.load()?;
    // Said before the work, so that nobody waits for what the model makes of words it cannot read.
    print_warnings(loaded.unknown_words("template", &args.template).as_slice());
    let texts = generate_texts(
        &loaded.model,
        &loaded.tokenizer,
        &args.template,
        args.texts,
        &opts,
    )?;
    print_warnings(&texts.warnings);
    anyhow::ensure!(
        !texts.is_empty(),
        "no text: every one drawn was empty after the template «{}» (the model ended each at once)",
        args.template
    );
    if args.output.json {
        let report = Report {
            template: &args.template,
            seed: opts.seed,
            texts: &texts.items,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for t in &texts {
            println!("{:>10.2}  {}", t.ppl_text, t.text);
        }
    }
    Ok(())
}

/// `text --json`.
#[derive(serde::Serialize)]
struct Report<'a> {
    template: &'a str,
    seed: u64,
    texts: &'a [GeneratedText],
}
