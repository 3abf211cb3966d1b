//! `rudolph tokenize` / `rudolph detokenize`: the YTTM tokenizer from the command line.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, bail};

use rudolph::tokenizer::{TextTokenizer, lower_strip};

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// The YouTokenToMe model (`bpe.model`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Texts to encode, one result each.
    #[arg(conflicts_with = "stdin")]
    pub texts: Vec<String>,
    /// Read the texts from standard input, one per line.
    #[arg(long)]
    pub stdin: bool,
    /// Print one JSON object per text: {"text", "ids", "pieces"} (the text as encoded, raw YTTM
    /// ids without BOS/EOS).
    #[arg(long)]
    pub json: bool,
    /// Apply the pipelines' preprocessing, Python's `text.lower().strip()`, first.
    #[arg(long)]
    pub lower: bool,
}

#[derive(Debug, clap::Args)]
pub struct DetokenizeArgs {
    /// The YouTokenToMe model (`bpe.model`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// One id list, as numbers separated by spaces or commas (brackets allowed).
    #[arg(conflicts_with = "stdin")]
    pub ids: Vec<String>,
    /// Read id lists from standard input, one per line: plain numbers or a JSON object with an
    /// "ids" field (as `tokenize --json` prints).
    #[arg(long)]
    pub stdin: bool,
    /// YTTM's raw decode, which keeps specials as <PAD> <UNK> <BOS> <EOS>; by default ids 0–3
    /// are dropped as ruDALL-E's `decode_text` does.
    #[arg(long)]
    pub raw: bool,
}

/// The longest line `--stdin` encodes: the tokenizer's memory grows with the longest word,
/// about 100 bytes a character.
const MAX_LINE_CHARS: usize = 1 << 20;

fn stdin_lines() -> anyhow::Result<Vec<String>> {
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<_, _>>()
        .context("reading standard input")?;
    if let Some((i, line)) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.chars().nth(MAX_LINE_CHARS).is_some())
    {
        bail!(
            "line {} of the input has {} characters, more than the {MAX_LINE_CHARS} encoded at once",
            i + 1,
            line.chars().count()
        );
    }
    Ok(lines)
}

pub fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let tok = TextTokenizer::load(&args.tokenizer)?;
    let texts = if args.stdin {
        stdin_lines()?
    } else if args.texts.is_empty() {
        bail!("no text given: pass texts as arguments or use --stdin");
    } else {
        args.texts
    };
    for text in texts {
        let text = if args.lower { lower_strip(&text) } else { text };
        let ids = tok.bpe().encode(&text);
        let pieces = tok.bpe().encode_pieces(&text);
        if args.json {
            let line = serde_json::json!({ "text": text, "ids": ids, "pieces": pieces });
            println!("{line}");
        } else {
            let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
            println!("ids: {}", ids.join(" "));
            println!("pieces: {}", serde_json::to_string(&pieces)?);
        }
    }
    Ok(())
}

/// `"12, 34 56"`, `"[12,34]"` or `{"ids": [12, 34], …}` → ids.
fn parse_ids(line: &str) -> anyhow::Result<Vec<u32>> {
    let line = line.trim();
    if line.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(line).context("invalid JSON")?;
        let ids = value
            .get("ids")
            .context("the JSON object has no \"ids\" field")?;
        return serde_json::from_value(ids.clone())
            .context("\"ids\" must be a list of non-negative integers");
    }
    line.split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']'))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("`{s}` is not a token id"))
        })
        .collect()
}

pub fn detokenize(args: DetokenizeArgs) -> anyhow::Result<()> {
    let tok = TextTokenizer::load(&args.tokenizer)?;
    let lists: Vec<(String, Vec<u32>)> = if args.stdin {
        stdin_lines()?
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let what = format!("standard input line {}", i + 1);
                parse_ids(line)
                    .with_context(|| what.clone())
                    .map(|ids| (what, ids))
            })
            .collect::<anyhow::Result<_>>()?
    } else if args.ids.is_empty() {
        bail!("no ids given: pass ids as arguments or use --stdin");
    } else {
        let ids = parse_ids(&args.ids.join(" ")).context("parsing the ids")?;
        vec![("the ids".to_string(), ids)]
    };
    for (what, ids) in lists {
        let text = if args.raw {
            tok.bpe().decode(&ids, &[])
        } else {
            tok.decode_text(&ids)
        };
        println!("{}", text.with_context(|| format!("decoding {what}"))?);
    }
    Ok(())
}
