//! `rudolph rerank TEXT (--codes FILE | IMAGES...)`: perplexity of each candidate picture.

use super::common::{ModelArgs, OutputArgs, picture_codes, print_warnings};
use rudolph::pipelines::rerank::score_pairs;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RerankArgs {
    pub text: String,
    /// Pictures to score.
    #[arg(conflicts_with = "codes")]
    pub images: Vec<PathBuf>,
    /// A JSON file of code grids: `{"codes": [...]}`, a list of lists, or a list of such objects.
    #[arg(long, value_name = "FILE")]
    pub codes: Option<PathBuf>,
    /// Sequences run through the model at once (more is faster until memory runs out).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Code grids from the JSON layouts `encode-image --json` and `image --json` print.
pub fn read_code_grids(path: &std::path::Path) -> anyhow::Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
    fn grid(v: &serde_json::Value) -> Option<Vec<u32>> {
        let v = v.get("codes").unwrap_or(v);
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|c| u32::try_from(c).ok()))
            .collect()
    }
    let grids: Option<Vec<Vec<u32>>> = match &v {
        serde_json::Value::Object(o) if o.contains_key("images") => o["images"]
            .as_array()
            .and_then(|a| a.iter().map(grid).collect()),
        serde_json::Value::Array(a) if a.first().is_some_and(|x| !x.is_number()) => {
            a.iter().map(grid).collect()
        }
        other => grid(other).map(|g| vec![g]),
    };
    match grids {
        Some(g) if !g.is_empty() && g.iter().all(|x| !x.is_empty()) => Ok(g),
        _ => anyhow::bail!(
            "{}: expected code grids as {{\"codes\": [...]}} or lists of non-negative integers",
            path.display()
        ),
    }
}

pub fn run(args: RerankArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.codes.is_some() || !args.images.is_empty(),
        "give pictures or --codes FILE to rerank"
    );
    let loaded = args.model.load()?;
    // Said before the work, so that nobody waits for what the model makes of words it cannot read.
    print_warnings(loaded.unknown_words("text", &args.text).as_slice());
    let n = loaded.model.config().image_seq_length();
    let (sources, grids): (Vec<String>, Vec<Vec<u32>>) = match &args.codes {
        Some(file) => {
            let grids = read_code_grids(file)?;
            for (i, g) in grids.iter().enumerate() {
                anyhow::ensure!(
                    g.len() == n,
                    "{}: grid {i} has {} codes, the model needs {n}",
                    file.display(),
                    g.len()
                );
                if let Some(bad) = g
                    .iter()
                    .find(|&&c| c as usize >= loaded.model.config().image_vocab_size)
                {
                    anyhow::bail!("{}: code {bad} in grid {i} is out of range", file.display());
                }
            }
            (
                (0..grids.len())
                    .map(|i| format!("{}#{i}", file.display()))
                    .collect(),
                grids,
            )
        }
        None => {
            let mut grids = Vec::new();
            for p in &args.images {
                grids.push(picture_codes(&loaded, p)?);
            }
            (
                args.images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                grids,
            )
        }
    };
    let (text, warning) = rudolph::pipelines::images::encode_checked(
        &loaded.tokenizer,
        &rudolph::tokenizer::lower_strip(&args.text),
        loaded.model.config().r_text_seq_length,
        "text",
    );
    print_warnings(warning.as_slice());
    let pairs: Vec<(&[u32], &[u32])> = grids
        .iter()
        .map(|g| (g.as_slice(), text.as_slice()))
        .collect();
    let scores = score_pairs(&loaded.model, &pairs, 1, args.batch_size)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].ppl_text.total_cmp(&scores[b].ppl_text));
    let rows: Vec<Candidate> = order
        .iter()
        .enumerate()
        .map(|(rank, &i)| Candidate {
            rank: rank + 1,
            source: &sources[i],
            ppl_text: scores[i].ppl_text,
            ppl_image: scores[i].ppl_image,
        })
        .collect();
    if args.output.json {
        let report = Report {
            text: &args.text,
            candidates: rows,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in rows {
            println!(
                "#{:<3} ppl_text {:>10.2}  ppl_image {:>10.2}  {}",
                c.rank, c.ppl_text, c.ppl_image, c.source
            );
        }
    }
    Ok(())
}

/// `rerank --json`: the candidates, best first.
#[derive(serde::Serialize)]
struct Report<'a> {
    text: &'a str,
    candidates: Vec<Candidate<'a>>,
}

#[derive(serde::Serialize)]
struct Candidate<'a> {
    rank: usize,
    source: &'a str,
    ppl_text: f32,
    ppl_image: f32,
}
