//! `rudolph tokenizer train`: learn a YouTokenToMe BPE model from text files.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use rudolph::tokenizer::{TrainOptions, lower_strip, train_bpe};

#[derive(Debug, clap::Args)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenizerCommand {
    /// Train a BPE model (YTTM's `bpe.model` format) on text files, one text per line.
    Train(TrainArgs),
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Plain text files: every line is one text.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub input: Vec<PathBuf>,
    /// JSONL files with one `{"text": ...}` object per line (as `rudolph train` reads; other
    /// fields are ignored, blank lines skipped).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub jsonl: Vec<PathBuf>,
    /// Number of ids in the model: 4 specials + characters + merges. Fewer result when no
    /// pair occurs twice any more.
    #[arg(long)]
    pub vocab_size: usize,
    /// Where to write the model.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Share of character occurrences the alphabet must cover, in (0, 1]; rarer characters
    /// become <UNK>. YTTM's `coverage`.
    #[arg(long, default_value_t = 1.0)]
    pub coverage: f64,
    /// Apply the pipelines' preprocessing, Python's `text.lower().strip()`, to every text first.
    #[arg(long)]
    pub lower: bool,
}

pub fn run(args: TokenizerArgs) -> anyhow::Result<()> {
    match args.command {
        TokenizerCommand::Train(args) => train(args),
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read training text {}", path.display()))
}

/// The `"text"` of every non-blank line of a JSONL file.
fn jsonl_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let data = read(path)?;
    let mut texts = Vec::new();
    for (i, line) in data.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: not JSON (expected one {{\"text\": ...}} object per line)",
                path.display(),
                i + 1
            )
        })?;
        match value.get("text").and_then(serde_json::Value::as_str) {
            Some(t) => texts.push(t.to_string()),
            None => bail!(
                "{}:{}: expected an object with a string \"text\" field",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(texts)
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    if args.input.is_empty() && args.jsonl.is_empty() {
        bail!("no training text given: pass --input FILE... and/or --jsonl FILE...");
    }
    if !args.force && args.output.exists() {
        bail!(
            "{} already exists; refusing to overwrite it (use --force to replace it)",
            args.output.display()
        );
    }
    let mut texts: Vec<String> = Vec::new();
    for path in &args.input {
        texts.extend(read(path)?.lines().map(str::to_string));
    }
    for path in &args.jsonl {
        texts.extend(jsonl_texts(path)?);
    }
    if args.lower {
        for t in &mut texts {
            *t = lower_strip(t);
        }
    }
    let options = TrainOptions {
        coverage: args.coverage,
    };
    let model = train_bpe(texts.iter().map(String::as_str), args.vocab_size, &options)
        .with_context(|| {
            let files: Vec<String> = (args.input.iter().chain(&args.jsonl))
                .map(|p| p.display().to_string())
                .collect();
            format!("training on {}", files.join(", "))
        })?;
    model.save(&args.output, args.force)?;
    let dropped = match model.n_dropped_chars() {
        0 => String::new(),
        n => format!(" ({n} rare characters dropped)"),
    };
    println!(
        "wrote {}: {} texts, {} characters{dropped}, {} merges, vocab size {}{}",
        args.output.display(),
        texts.len(),
        model.n_chars(),
        model.n_merges(),
        model.vocab_size(),
        if model.vocab_size() < args.vocab_size {
            format!(
                " (asked {}: no pair occurs twice any more)",
                args.vocab_size
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
