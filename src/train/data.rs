//! Training data: a JSONL file of `{"image": "...", "text": "..."}` lines (or a folder holding
//! one; either key may be left out, and a picture may have a `"prompt"` instead of a text),
//! pictures encoded once to VQGAN codes and cached, a held-out split, and the composition of
//! samples into model sequences.

use crate::config::Config;
use crate::error::{Error, Result, invalid};
use crate::pipelines::{TextProblem, Warning};
use crate::progress::ProgressSink;
use crate::tokenizer::{TextTokenizer, lower_strip};
use crate::vae::Vqgan;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A picture (its `N` codes) with its text.
    Picture { codes: Vec<u32>, text: String },
    /// A text alone: trains only the left-text language model.
    Text { text: String },
    /// A picture alone: trains only the picture, after its prompt as the left text, or after a
    /// blank left text (the unconditional branch that classifier-free guidance pushes away
    /// from) when it has none. A prompt conditions the picture but is not trained as text, so
    /// it may say less than a caption (the recoloured pictures of `rudolph world sample`).
    Image {
        codes: Vec<u32>,
        prompt: Option<String>,
    },
}

/// Which segments of a composed sequence its loss weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The run's loss weights: left text, picture and right text.
    All,
    /// The left text alone.
    Text,
    /// The picture alone.
    Image,
}

/// One JSONL line as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    image: Option<String>,
    text: Option<String>,
    prompt: Option<String>,
}

/// What a picture's line says besides the picture.
enum Words {
    /// `"text"`: trained both ways, as the picture's caption.
    Text(String),
    /// `"prompt"`: only conditions the picture.
    Prompt(String),
    None,
}

/// A line that names a picture, before encoding.
struct Pending {
    line: usize,
    path: PathBuf,
    words: Words,
}

/// The JSONL file for `path`: the file itself, or the one `*.jsonl` in a folder.
pub fn jsonl_path(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        if !path.is_file() {
            return Err(invalid(format!(
                "training data {} does not exist",
                path.display()
            )));
        }
        return Ok(path.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(invalid(format!(
            "{} holds no *.jsonl file (one {{\"image\": ..., \"text\": ...}} per line)",
            path.display()
        ))),
        _ => Err(invalid(format!(
            "{} holds several *.jsonl files; pass the one to use",
            path.display()
        ))),
    }
}

/// Reads the data at `path` (a JSONL file or a folder with one), in file order, encoding each
/// picture with `vae` (at `cfg`'s picture size) unless `cache` already holds its codes. A
/// malformed line or a missing picture is an error naming the file and line; texts that
/// `tokenizer` cannot spell whole, or that `cfg`'s text slots cut, are warned of by line.
pub fn load_dataset(
    path: &Path,
    vae: Option<&Vqgan>,
    cfg: &Config,
    tokenizer: &TextTokenizer,
    cache: &mut CodesCache,
    progress: &dyn ProgressSink,
) -> Result<(Vec<Sample>, Vec<Warning>)> {
    let file = jsonl_path(path)?;
    let text = std::fs::read_to_string(&file).map_err(|source| Error::Io {
        path: file.clone(),
        source,
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut samples: Vec<Option<Sample>> = Vec::new();
    let mut pending = Vec::new();
    let mut texts = TextChecks::default();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| {
            invalid(format!(
                "{}:{line_no}: {e} (expected {{\"image\": \"path\", \"text\": \"...\"}}, {{\"text\": \"...\"}}, {{\"image\": \"path\"}} or {{\"image\": \"path\", \"prompt\": \"...\"}})",
                file.display()
            ))
        })?;
        // A picture's text is read in both text segments, a text alone or a prompt in the left.
        let slots = match (&line.image, &line.text) {
            (Some(_), Some(_)) => cfg.l_text_seq_length.min(cfg.r_text_seq_length),
            _ => cfg.l_text_seq_length,
        };
        for text in line.text.iter().chain(&line.prompt) {
            texts.check(tokenizer, line_no, text, slots);
        }
        let words = match (line.text, line.prompt) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "{}:{line_no}: the line has both \"text\" and \"prompt\"; a picture's text is trained as its caption, a prompt only conditions it",
                    file.display()
                )));
            }
            (Some(text), None) => Words::Text(text),
            (None, Some(prompt)) => Words::Prompt(prompt),
            (None, None) => Words::None,
        };
        match (line.image, words) {
            (None, Words::None) => {
                return Err(invalid(format!(
                    "{}:{line_no}: the line has neither \"image\" nor \"text\"",
                    file.display()
                )));
            }
            (None, Words::Prompt(_)) => {
                return Err(invalid(format!(
                    "{}:{line_no}: a \"prompt\" conditions a picture, and the line has no \"image\"",
                    file.display()
                )));
            }
            (None, Words::Text(text)) => samples.push(Some(Sample::Text { text })),
            (Some(img), words) => {
                let p = base.join(&img);
                if !p.is_file() {
                    return Err(invalid(format!(
                        "{}:{line_no}: picture {} does not exist",
                        file.display(),
                        p.display()
                    )));
                }
                pending.push((
                    samples.len(),
                    Pending {
                        line: line_no,
                        path: p,
                        words,
                    },
                ));
                samples.push(None);
            }
        }
    }
    if samples.is_empty() {
        return Err(invalid(format!("{} holds no samples", file.display())));
    }
    progress.start(pending.len() as u64, "encoding pictures", "pictures");
    for (slot, p) in pending {
        let key = CodesCache::key(&p.path)?;
        let codes = match cache.codes.get(&key) {
            Some(c) if c.len() == cfg.image_seq_length() => c.clone(),
            _ => {
                let vae = vae.ok_or_else(|| {
                    invalid(format!(
                        "{}:{}: a picture needs the VQGAN: name it, or start from a model folder with one",
                        file.display(),
                        p.line
                    ))
                })?;
                let codes = encode(vae, cfg, &p.path).map_err(|e| {
                    invalid(format!(
                        "{}:{}: {}: {e}",
                        file.display(),
                        p.line,
                        p.path.display()
                    ))
                })?;
                if codes.len() != cfg.image_seq_length() {
                    return Err(invalid(format!(
                        "{}: the VQGAN gives {} codes, the model expects {}",
                        p.path.display(),
                        codes.len(),
                        cfg.image_seq_length()
                    )));
                }
                cache.codes.insert(key, codes.clone());
                codes
            }
        };
        samples[slot] = Some(match p.words {
            Words::Text(text) => Sample::Picture { codes, text },
            Words::Prompt(prompt) => Sample::Image {
                codes,
                prompt: Some(prompt),
            },
            Words::None => Sample::Image {
                codes,
                prompt: None,
            },
        });
        progress.advance(1);
    }
    progress.finish();
    let warnings = texts.warnings(&file, cfg);
    Ok((samples.into_iter().flatten().collect(), warnings))
}

/// The lines of a data file whose texts the model cannot learn whole.
#[derive(Default)]
struct TextChecks {
    unknown: Vec<(usize, String)>,
    long: Vec<(usize, String)>,
}

impl TextChecks {
    fn check(&mut self, tokenizer: &TextTokenizer, line: usize, text: &str, slots: usize) {
        let unknown = tokenizer.unknown_words(text);
        if !unknown.is_empty() {
            let words: Vec<String> = unknown.iter().map(|w| format!("«{w}»")).collect();
            self.unknown.push((line, words.join(", ")));
        }
        let tokens = tokenizer.bpe().encode(&lower_strip(text)).len() + 2;
        if tokens > slots {
            self.long.push((
                line,
                format!(
                    "«{}» needs {tokens} tokens",
                    crate::tokenizer::python_strip(text)
                ),
            ));
        }
    }

    fn warnings(self, file: &Path, cfg: &Config) -> Vec<Warning> {
        let mut out = Vec::new();
        for (problem, lines) in [
            (TextProblem::UnknownWords, self.unknown),
            (
                TextProblem::TooLong {
                    left: cfg.l_text_seq_length,
                    right: cfg.r_text_seq_length,
                },
                self.long,
            ),
        ] {
            if !lines.is_empty() {
                out.push(Warning::TrainingTexts {
                    file: file.to_path_buf(),
                    problem,
                    lines,
                });
            }
        }
        out
    }
}

fn encode(vae: &Vqgan, cfg: &Config, path: &Path) -> Result<Vec<u32>> {
    let img = crate::image::load_image(path)?;
    let pixels = crate::image::preprocess(&img, cfg.image_size() as u32, vae.device())?;
    let codes = vae.encode_codes(&pixels.unsqueeze(0)?)?;
    Ok(codes.flatten_all()?.to_vec1::<u32>()?)
}

/// `n` samples of random codes and empty texts, for measuring speed and memory.
pub fn synthetic(cfg: &Config, n: usize, seed: u64) -> Vec<Sample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| Sample::Picture {
            codes: (0..cfg.image_seq_length())
                .map(|_| rng.next_u32() % cfg.image_vocab_size as u32)
                .collect(),
            text: String::new(),
        })
        .collect()
}

/// Codes of pictures already encoded, keyed by path, size and modification time, so that a
/// changed file is encoded again.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CodesCache {
    /// Identifies the VQGAN that made the codes; a different one empties the cache.
    pub vae: String,
    pub codes: HashMap<String, Vec<u32>>,
}

impl CodesCache {
    /// The cache at `path` if it exists and was made by `vae`, else an empty one for it.
    pub fn open(path: &Path, vae: &str) -> Result<Self> {
        let fresh = || Self {
            vae: vae.to_string(),
            codes: HashMap::new(),
        };
        if !path.is_file() {
            return Ok(fresh());
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cache: Self = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{}: not a codes cache: {e}", path.display())))?;
        Ok(if cache.vae == vae { cache } else { fresh() })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| invalid(e.to_string()))?;
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    fn key(path: &Path) -> Result<String> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(format!("{}|{}|{mtime}", abs.display(), meta.len()))
    }
}

/// Splits `n` sample indices into (training, held-out): a `fraction` of them, chosen by
/// `seed`, at least one when the fraction is positive and two or more samples exist.
pub fn split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut ChaCha8Rng::seed_from_u64(seed ^ 0x5_9117));
    let mut held = (fraction * n as f64).round() as usize;
    if fraction > 0.0 && n >= 2 {
        held = held.max(1);
    }
    held = held.min(n.saturating_sub(1));
    let mut val = order.split_off(n - held);
    order.sort_unstable();
    val.sort_unstable();
    (order, val)
}

/// Fisher–Yates with our own generator, so the order is the same on every platform.
pub fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// The training-set index of the `k`-th sample drawn (0-based, over all epochs): each epoch is
/// a fresh permutation of the `n` samples from `seed` and the epoch number. A function of `k`
/// alone, so a resumed run draws the same samples as an uninterrupted one.
pub fn draw(k: u64, n: usize, seed: u64) -> usize {
    let epoch = k / n as u64;
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(
        &mut order,
        &mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9))),
    );
    order[(k % n as u64) as usize]
}

/// How samples become sequences.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Compose {
    /// Probability of blanking the left text of a picture sample, so that the right text
    /// (captioning) must be learnt from the picture rather than copied from the left.
    pub i2t_fraction: f64,
    /// BPE-dropout probability (0: plain encoding).
    pub bpe_dropout: f64,
}

/// The ids `[l + N + r]` of `sample` and the part its loss weighs. `draw` numbers the draw, so
/// the random choices (blanking, BPE-dropout) are a function of it and `seed` alone.
///
/// A text-only sample gets zero codes and an empty right text; its loss then weights only the
/// left text, which under the causal mask never sees them. A picture alone gets a blank left
/// text, as a picture trained image → text does, and an empty right text of weight 0.
pub fn compose(
    sample: &Sample,
    cfg: &Config,
    tokenizer: &TextTokenizer,
    how: Compose,
    seed: u64,
    draw: u64,
) -> Result<(Vec<u32>, Part)> {
    let (l, n, r) = (
        cfg.l_text_seq_length,
        cfg.image_seq_length(),
        cfg.r_text_seq_length,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ draw.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut enc = |text: &str, len: usize| -> Result<Vec<u32>> {
        let text = lower_strip(text);
        Ok(if how.bpe_dropout > 0.0 {
            tokenizer.encode_text_with_dropout(&text, len, how.bpe_dropout, &mut rng)?
        } else {
            tokenizer.encode_text(&text, len)
        })
    };
    let mut ids = Vec::with_capacity(l + n + r);
    match sample {
        Sample::Text { text } => {
            ids.extend(enc(text, l)?);
            ids.resize(l + n, 0);
            // An empty right text (BOS, EOS, pads) rather than all pads: its term is weighted
            // 0, but a mean over no targets would be NaN and poison the total.
            ids.extend(tokenizer.encode_text("", r));
            Ok((ids, Part::Text))
        }
        Sample::Image { codes, prompt } => {
            match prompt {
                Some(prompt) => ids.extend(enc(prompt, l)?),
                None => ids.resize(l, 0),
            }
            ids.extend(codes);
            ids.extend(tokenizer.encode_text("", r));
            Ok((ids, Part::Image))
        }
        Sample::Picture { codes, text } => {
            let left = enc(text, l)?;
            let right = enc(text, r)?;
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if u < how.i2t_fraction {
                ids.resize(l, 0);
            } else {
                ids.extend(left);
            }
            ids.extend(codes);
            ids.extend(right);
            Ok((ids, Part::All))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_holds_out_at_least_one_and_keeps_one_for_training() {
        assert_eq!(split(10, 0.2, 1).1.len(), 2);
        assert_eq!(split(3, 0.01, 1).1.len(), 1);
        assert_eq!(split(1, 0.5, 1), (vec![0], vec![]));
        let (train, val) = split(7, 0.3, 5);
        let mut all: Vec<usize> = train.into_iter().chain(val).collect();
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    /// The built-in model's tokenizer, the world recipe's config and its segment lengths
    /// (left text, image, right text).
    fn world_tokenizer_and_config() -> (TextTokenizer, Config, (usize, usize, usize)) {
        let dir = crate::builtin::dir().unwrap();
        let tokenizer = TextTokenizer::load(dir.join("bpe.model")).unwrap();
        let cfg = crate::world::recipe::model_config(tokenizer.bpe().vocab_size());
        let lengths = (
            cfg.l_text_seq_length,
            cfg.image_seq_length(),
            cfg.r_text_seq_length,
        );
        (tokenizer, cfg, lengths)
    }

    /// A picture alone trains as the unconditional branch: a blank left text (as a picture
    /// trained image → text has), its codes, and an empty right text.
    #[test]
    fn a_picture_alone_has_a_blank_left_text_and_an_empty_right_one() {
        let (tokenizer, cfg, (l, n, r)) = world_tokenizer_and_config();
        let codes: Vec<u32> = (0..n as u32).collect();
        let how = Compose {
            i2t_fraction: 0.0,
            bpe_dropout: 0.0,
        };
        let sample = Sample::Image {
            codes: codes.clone(),
            prompt: None,
        };
        let (ids, part) = compose(&sample, &cfg, &tokenizer, how, 0, 0).unwrap();
        assert_eq!(part, Part::Image);
        assert_eq!(ids[..l], vec![0; l][..]);
        assert_eq!(ids[l..l + n], codes[..]);
        assert_eq!(ids[l + n..], tokenizer.encode_text("", r)[..]);
        // With every picture blanked, a captioned one has the same left text.
        let captioned = Sample::Picture {
            codes,
            text: "большая красная звезда".into(),
        };
        let blank = Compose {
            i2t_fraction: 1.0,
            ..how
        };
        let (ids2, part2) = compose(&captioned, &cfg, &tokenizer, blank, 0, 0).unwrap();
        assert_eq!(part2, Part::All);
        assert_eq!(ids2[..l + n], ids[..l + n]);
    }

    /// A prompted picture has its prompt as the left text, encoded as a caption's would be,
    /// and still trains the picture alone.
    #[test]
    fn a_prompted_picture_has_its_prompt_as_the_left_text() {
        let (tokenizer, cfg, (l, n, r)) = world_tokenizer_and_config();
        let codes: Vec<u32> = (0..n as u32).rev().collect();
        let how = Compose {
            i2t_fraction: 1.0,
            bpe_dropout: 0.0,
        };
        let prompt = "Большой круг слева";
        let sample = Sample::Image {
            codes: codes.clone(),
            prompt: Some(prompt.into()),
        };
        let (ids, part) = compose(&sample, &cfg, &tokenizer, how, 0, 0).unwrap();
        assert_eq!(part, Part::Image);
        assert_eq!(ids[..l], tokenizer.encode_text("большой круг слева", l)[..]);
        assert_ne!(ids[..l], vec![0; l][..]);
        assert_eq!(ids[l..l + n], codes[..]);
        assert_eq!(ids[l + n..], tokenizer.encode_text("", r)[..]);
    }

    /// Texts the tokenizer cannot spell, and texts the slots cut, are warned of by line; many
    /// lines are summed up after the first few.
    #[test]
    fn texts_the_model_cannot_learn_whole_are_warned_of_by_line() {
        let (tokenizer, cfg, _) = world_tokenizer_and_config();
        let dir =
            std::env::temp_dir().join(format!("rudolph-data-warnings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("data.jsonl");
        let long = "большая красная звезда слева на белом фоне на белом фоне";
        let mut lines = vec![
            r#"{"text": "большая красная звезда слева на белом фоне"}"#.to_string(),
            r#"{"text": "a red star"}"#.to_string(),
            format!(r#"{{"text": "{long}"}}"#),
        ];
        lines.extend((0..7).map(|i| format!(r#"{{"text": "звезда {i}"}}"#)));
        std::fs::write(&file, lines.join("\n")).unwrap();
        let (samples, warnings) = load_dataset(
            &file,
            None,
            &cfg,
            &tokenizer,
            &mut CodesCache::default(),
            &crate::progress::Silent,
        )
        .unwrap();
        assert_eq!(samples.len(), 10);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let unknown = warnings[0].to_string();
        assert!(unknown.starts_with("8 texts of "), "{unknown}");
        assert!(
            unknown.contains("data.jsonl:2: «a», «red», «star»"),
            "{unknown}"
        );
        assert!(unknown.contains("data.jsonl:4: «0»"), "{unknown}");
        assert!(unknown.ends_with("… and 3 more"), "{unknown}");
        let long_warning = warnings[1].to_string();
        assert!(
            long_warning.starts_with("1 text of ") && long_warning.contains("(left 12, right 12)"),
            "{long_warning}"
        );
        assert!(
            long_warning.contains(&format!("data.jsonl:3: «{long}» needs")),
            "{long_warning}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_epoch_draws_every_sample_once() {
        for epoch in 0..3u64 {
            let mut drawn: Vec<usize> = (0..5).map(|k| draw(epoch * 5 + k, 5, 9)).collect();
            drawn.sort_unstable();
            assert_eq!(drawn, vec![0, 1, 2, 3, 4]);
        }
    }
}
