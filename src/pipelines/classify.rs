//! Zero-shot classification (rc1 `zs_clf`): each class name, after an optional template, is
//! scored as the right text of the picture; the lowest perplexity wins.
//!
//! A template may also hold the class in the middle, as `{}` (rc10's `r_template`): the words
//! after it are scored with the class. A model that never saw a text end right after the class
//! (the built-in one always goes on with a position and a background) otherwise judges each class
//! by how likely the text is to stop there, not by the picture.
//!
//! A class of one word fits no fixed template of a language whose words agree with each other
//! («большая {}» suits «звезда» but not «круг»), and alone it is a text the model never saw. The
//! [`CAPTION_TEMPLATE`] mode ([`classify_by_caption`]) needs no template: it captions the picture
//! with the model itself and puts the class in place of each word of the best captions in turn,
//! so the class is read in the kind of text the model knows.

use super::captions::{CaptionRank, generate_captions};
use super::rerank::{joint_nll, score_pairs};
use super::{Fidelity, GenerateOptions, Warning, add_warnings, defaults};
use crate::error::invalid;
use crate::model::Rudolph;
use crate::tokenizer::{Bpe, TextTokenizer, lower_strip, python_strip};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub class: String,
    /// The text the class was scored in: the template filled with it, or, in the caption mode,
    /// the best of the captions with the class in place of some of its words.
    pub text: String,
    /// What the classes are ranked by, lower is better: `ppl_text` with a template; in the
    /// caption mode the joint NLL of `text` and the picture in nats (see
    /// [`classify_by_caption`]).
    pub score: f32,
    /// Perplexity of the class tokens (and EOS) given the picture and template; in the caption
    /// mode, of the whole `text`.
    pub ppl_text: f32,
    /// The picture's own perplexity, as rc1's `zs_clf` returns it: the picture comes before
    /// every class, so it is the same for all, and the JSON leaves it out.
    #[serde(skip)]
    pub ppl_image: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub class: String,
    pub label: usize,
    /// The template the classes were put in, as given ([`CAPTION_TEMPLATE`] for the caption
    /// mode).
    pub template: String,
    /// In the caption mode, the picture's captions the classes were put in, best first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub captions: Vec<String>,
    /// In the order the classes were given.
    pub scores: Vec<ClassScore>,
    /// Class names cut to fit the text slots.
    #[serde(skip)]
    pub warnings: Vec<Warning>,
}

/// The right texts of the classes, ready to score.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassTexts {
    /// Each class's right-text ids, in the order the classes were given.
    pub texts: Vec<Vec<u32>>,
    /// Template tokens before the class (the scoring starts after them).
    pub template_tokens: usize,
    /// Class names cut to fit the text slots.
    pub warnings: Vec<Warning>,
}

/// Where the class goes in a template: after all of it, or in place of its one `{}`.
const SLOT: &str = "{}";

/// The right-text ids of each class in the template, and the number of template tokens before
/// the class. A class that does not fit is cut, with a warning.
///
/// A template that leaves no room for BOS, a whole class token and EOS is refused, unless
/// `fidelity` is the original's: rc1 then keeps at most `r − 2` template tokens and scores
/// whatever of each class still fits (its first token alone, without EOS, when the template
/// fills the slots).
pub fn class_texts(
    tokenizer: &TextTokenizer,
    classes: &[String],
    template: &str,
    r: usize,
    fidelity: Fidelity,
) -> crate::Result<ClassTexts> {
    if classes.is_empty() {
        return Err(invalid("the class list is empty"));
    }
    if template.contains(CAPTION_TEMPLATE) {
        return Err(invalid(format!(
            "the template «{template}» holds {CAPTION_TEMPLATE}, which is a template of its own \
             (the class put in the picture's captions), not a part of one"
        )));
    }
    if template.matches(SLOT).count() > 1 {
        return Err(invalid(format!(
            "the template «{template}» has more than one {SLOT}: it marks the one place of the class"
        )));
    }
    let mut out = Vec::with_capacity(classes.len());
    let mut warnings = Vec::new();
    let ts = match template.split_once(SLOT) {
        None => {
            let ts = match (template_tokens(tokenizer, template, r), fidelity) {
                (Ok(ts), _) => ts,
                (Err(_), Fidelity::Original) => tokenizer
                    .bpe()
                    .encode(&lower_strip(template))
                    .len()
                    .min(r.saturating_sub(2)),
                (Err(e), Fidelity::Fixed) => return Err(e),
            };
            let template_encoded = tokenizer.encode_text(&lower_strip(template), r);
            for class in classes {
                let name = class_name(class)?;
                let c = tokenizer.encode_text(&format!(" {name}"), r);
                warnings.extend(truncation(tokenizer, class, template, &name, ts, r));
                // Same ids as encoding `template + ' ' + class`: YTTM encodes word by word.
                out.push(if ts > 0 {
                    [&template_encoded[..ts + 1], &c[1..r - ts]].concat()
                } else {
                    c
                });
            }
            ts
        }
        Some((before, after)) => {
            let ts = template_tokens(tokenizer, before, r)?;
            let prefix = tokenizer.bpe().encode(&lower_strip(before));
            for class in classes {
                let name = class_name(class)?;
                let text = lower_strip(&format!("{before}{name}{after}"));
                let ids = tokenizer.bpe().encode(&text);
                if ids.len() < ts || ids[..ts] != prefix[..] {
                    return Err(invalid(format!(
                        "in the template «{template}», {SLOT} must stand apart from the words \
                         before it (with «{class}» the text «{text}» splits differently)"
                    )));
                }
                warnings.extend(truncation(tokenizer, class, template, &text, 0, r));
                out.push(tokenizer.encode_text(&text, r));
            }
            ts
        }
    };
    if fidelity == Fidelity::Fixed {
        distinct(tokenizer, classes, &out, r)?;
    }
    Ok(ClassTexts {
        texts: out,
        template_tokens: ts,
        warnings,
    })
}

/// Template BPE tokens (its encoding without BOS and EOS), checked to leave room for a class.
fn template_tokens(tokenizer: &TextTokenizer, template: &str, r: usize) -> crate::Result<usize> {
    let ts = tokenizer.bpe().encode(&lower_strip(template)).len();
    if ts + 3 > r {
        let cut = if ts + 2 > r {
            format!(
                ", and rc1 would cut the template itself to {} tokens",
                r.saturating_sub(2)
            )
        } else {
            String::new()
        };
        return Err(invalid(format!(
            "the template «{template}» leaves no room for a class in the {r} text slots: it \
             takes {ts} tokens, and BOS, EOS and at least one class token need 3 more (the \
             original would score each class by its first token alone, without EOS{cut})"
        )));
    }
    Ok(ts)
}

fn class_name(class: &str) -> crate::Result<String> {
    let name = lower_strip(class);
    if name.is_empty() {
        return Err(invalid("a class name is empty"));
    }
    Ok(name)
}

/// The warning for `class` if its `text`, after `before` template tokens, does not fit `r` slots.
fn truncation(
    tokenizer: &TextTokenizer,
    class: &str,
    template: &str,
    text: &str,
    before: usize,
    r: usize,
) -> Option<Warning> {
    let tokens = tokenizer.bpe().encode(text).len() + before + 2;
    (tokens > r).then(|| Warning::ClassTruncated {
        class: class.to_string(),
        template: template.to_string(),
        tokens,
        slots: r,
    })
}

/// Classifies a picture (`N` codes) among `classes`; `fidelity` as [`class_texts`].
pub fn classify(
    model: &Rudolph,
    tokenizer: &TextTokenizer,
    codes: &[u32],
    classes: &[String],
    template: &str,
    batch: usize,
    fidelity: Fidelity,
) -> crate::Result<Classification> {
    let r = model.config().r_text_seq_length;
    let ClassTexts {
        texts,
        template_tokens,
        warnings,
    } = class_texts(tokenizer, classes, template, r, fidelity)?;
    let pairs: Vec<(&[u32], &[u32])> = texts.iter().map(|t| (codes, t.as_slice())).collect();
    let scores = score_pairs(model, &pairs, template_tokens + 1, batch)?;
    let scores: Vec<ClassScore> = classes
        .iter()
        .zip(&scores)
        .map(|(c, s)| ClassScore {
            class: c.clone(),
            text: filled(template, c),
            score: s.ppl_text,
            ppl_text: s.ppl_text,
            ppl_image: s.ppl_image,
        })
        .collect();
    let label = best(&scores);
    Ok(Classification {
        class: classes[label].clone(),
        label,
        template: template.to_string(),
        captions: Vec::new(),
        scores,
        warnings,
    })
}

/// The first class of the lowest score.
fn best(scores: &[ClassScore]) -> usize {
    let mut label = 0;
    for (i, s) in scores.iter().enumerate() {
        if s.score < scores[label].score {
            label = i;
        }
    }
    label
}

/// The text a template makes of a class, lowercased as the model reads it.
fn filled(template: &str, class: &str) -> String {
    let class = python_strip(class);
    lower_strip(&match template.split_once(SLOT) {
        Some((before, after)) => format!("{before}{class}{after}"),
        None => format!("{template} {class}"),
    })
}

/// An error if two classes are the same text to the model (`texts`, their ids in the order of
/// `classes`): its answer between them would be a tie, decided by their order.
fn distinct(
    tokenizer: &TextTokenizer,
    classes: &[String],
    texts: &[Vec<u32>],
    r: usize,
) -> crate::Result<()> {
    for j in 1..texts.len() {
        let Some(i) = (0..j).find(|&i| texts[i] == texts[j]) else {
            continue;
        };
        let (a, b) = (&classes[i], &classes[j]);
        let why = if python_strip(a) == python_strip(b) {
            return Err(invalid(format!("class «{a}» is given twice")));
        } else if lower_strip(a) == lower_strip(b) {
            "the model lowercases every text".to_string()
        } else if crate::vocabulary::text_words(a) == crate::vocabulary::text_words(b) {
            "only the spaces between their words differ".to_string()
        } else {
            let mut unknown = tokenizer.unknown_words(a);
            unknown.extend(tokenizer.unknown_words(b));
            if unknown.is_empty() {
                format!("once cut to the {r} text slots")
            } else {
                format!(
                    "{} are words the tokenizer cannot spell, which all become the one unknown \
                     token",
                    unknown
                        .iter()
                        .map(|w| format!("«{w}»"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        };
        return Err(invalid(format!(
            "classes «{a}» and «{b}» are the same text to the model ({why}), so it cannot tell \
             them apart"
        )));
    }
    Ok(())
}

/// The template of the caption mode ([`classify_by_caption`]).
pub const CAPTION_TEMPLATE: &str = "{caption}";

/// How [`classify_by_caption`] captions the picture.
#[derive(Debug, Clone)]
pub struct CaptionClassify {
    /// Captions drawn (duplicates merged), ranked as `rudolph caption` ranks them.
    pub captions: usize,
    /// How many of the best the classes are put in.
    pub keep: usize,
    /// Sampling, seed and batch size of the captions (and the batch size of the scoring).
    pub generate: GenerateOptions,
}

impl CaptionClassify {
    /// The CLI's defaults, with the captions drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut generate = GenerateOptions::new(defaults::CAPTION);
        generate.seed = seed;
        Self {
            captions: defaults::CLASSIFY_CAPTIONS,
            keep: defaults::CLASSIFY_CAPTIONS_KEPT,
            generate,
        }
    }
}

/// Classifies a picture (`N` codes) among `classes` by the picture's own captions
/// ([`CAPTION_TEMPLATE`]): the model captions the picture (as [`generate_captions`] does, the
/// best by the joint ranking), and each class is put in place of each word, and of each pair of
/// neighbouring words, of the `keep` best captions in turn (as many words as it has, if more).
/// Each such text is scored by its joint NLL with the picture ([`joint_nll`], the ranking that
/// reads captions best), and a class scores as its best text; the lowest wins.
///
/// No template fits every word of a language with agreement, and the caption carries the
/// agreement the picture calls for: the right class, put in the place of the word it stands for,
/// makes a caption of the picture, while every other class makes a text that the picture (or
/// the grammar) contradicts. A class that fits nowhere in the captions is cut, with a warning.
pub fn classify_by_caption(
    model: &Rudolph,
    tokenizer: &TextTokenizer,
    codes: &[u32],
    classes: &[String],
    how: &CaptionClassify,
) -> crate::Result<Classification> {
    let cfg = model.config();
    let (l, r) = (cfg.l_text_seq_length, cfg.r_text_seq_length);
    if classes.is_empty() {
        return Err(invalid("the class list is empty"));
    }
    if how.captions == 0 || how.keep == 0 {
        return Err(invalid(
            "the caption mode needs at least one caption drawn and kept",
        ));
    }
    let names = classes
        .iter()
        .map(|c| class_name(c))
        .collect::<crate::Result<Vec<_>>>()?;
    let encoded: Vec<Vec<u32>> = names.iter().map(|n| tokenizer.bpe().encode(n)).collect();
    distinct(tokenizer, classes, &encoded, r)?;
    let drawn = generate_captions(
        model,
        tokenizer,
        codes,
        "",
        how.captions,
        CaptionRank::Joint,
        &how.generate,
    )?;
    let mut warnings = drawn.warnings;
    let kept: Vec<String> = drawn
        .items
        .into_iter()
        .take(how.keep)
        .map(|c| c.text)
        .collect();
    // The left text is what the joint NLL reads, the right text what the perplexity reads.
    let slots = l.min(r);
    let mut texts: Vec<String> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (k, (class, name)) in classes.iter().zip(&names).enumerate() {
        let all = substitutions(&kept, name);
        let tokens = |t: &String| tokenizer.bpe().encode(t).len() + 2;
        let fitting: Vec<String> = all.iter().filter(|t| tokens(t) <= slots).cloned().collect();
        let chosen = if fitting.is_empty() {
            let shortest = all.iter().map(tokens).min().unwrap_or(0);
            add_warnings(
                &mut warnings,
                [Warning::ClassTruncated {
                    class: class.clone(),
                    template: CAPTION_TEMPLATE.to_string(),
                    tokens: shortest,
                    slots,
                }],
            );
            all
        } else {
            fitting
        };
        owner.extend(std::iter::repeat_n(k, chosen.len()));
        texts.extend(chosen);
    }
    let left: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode_text(t, l)).collect();
    let nll = joint_nll(model, codes, &left, how.generate.batch_size)?;
    let mut chosen: Vec<Option<usize>> = vec![None; classes.len()];
    for (i, (&k, &v)) in owner.iter().zip(&nll).enumerate() {
        if chosen[k].is_none_or(|b| v < nll[b]) {
            chosen[k] = Some(i);
        }
    }
    let chosen: Vec<usize> = chosen
        .into_iter()
        .map(|c| c.expect("every class has a text"))
        .collect();
    let right: Vec<Vec<u32>> = chosen
        .iter()
        .map(|&i| tokenizer.encode_text(&texts[i], r))
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = right.iter().map(|t| (codes, t.as_slice())).collect();
    let ppl = score_pairs(model, &pairs, 1, how.generate.batch_size)?;
    let scores: Vec<ClassScore> = classes
        .iter()
        .zip(&chosen)
        .zip(&ppl)
        .map(|((class, &i), p)| ClassScore {
            class: class.clone(),
            text: texts[i].clone(),
            score: nll[i],
            ppl_text: p.ppl_text,
            ppl_image: p.ppl_image,
        })
        .collect();
    let label = best(&scores);
    Ok(Classification {
        class: classes[label].clone(),
        label,
        template: CAPTION_TEMPLATE.to_string(),
        captions: kept,
        scores,
        warnings,
    })
}

/// Every text made of a caption by putting `class` in place of a run of its words: runs of one
/// and two words, and of as many words as the class has; each text once. A caption without
/// words gives the class alone.
fn substitutions(captions: &[String], class: &str) -> Vec<String> {
    let class_words = Bpe::words(class).count();
    let mut out: Vec<String> = Vec::new();
    let mut add = |t: String| {
        if !out.contains(&t) {
            out.push(t);
        }
    };
    for caption in captions {
        let words: Vec<&str> = Bpe::words(caption).collect();
        if words.is_empty() {
            add(class.to_string());
        }
        let mut lengths = vec![1, 2, class_words];
        lengths.sort_unstable();
        lengths.dedup();
        for len in lengths.into_iter().filter(|&n| n >= 1 && n <= words.len()) {
            for start in 0..=words.len() - len {
                let mut t: Vec<&str> = words[..start].to_vec();
                t.push(class);
                t.extend(&words[start + len..]);
                add(t.join(" "));
            }
        }
    }
    out
}
