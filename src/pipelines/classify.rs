//! Zero-shot classification (rc1 `zs_clf`): each class name, after an optional template, is
//! scored as the right text of the picture; the lowest perplexity wins.
//!
//! A template may also hold the class in the middle, as `{}` (rc10's `r_template`): the words
//! after it are scored with the class. A model that never saw a text end right after the class
//! (the built-in one always goes on with a position and a background) otherwise judges each class
//! by how likely the text is to stop there, not by the picture.

use super::rerank::score_pairs;
use super::{Fidelity, Warning};
use crate::error::invalid;
use crate::model::Rudolph;
use crate::tokenizer::{TextTokenizer, lower_strip};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub class: String,
    /// Perplexity of the class tokens (and EOS) given the picture and template.
    pub ppl_text: f32,
    /// The picture's own perplexity (the same for every class under rc1's mask).
    pub ppl_image: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub class: String,
    pub label: usize,
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
                warnings.extend(truncation(tokenizer, class, &name, ts, r));
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
                warnings.extend(truncation(tokenizer, class, &text, 0, r));
                out.push(tokenizer.encode_text(&text, r));
            }
            ts
        }
    };
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
    text: &str,
    before: usize,
    r: usize,
) -> Option<Warning> {
    (tokenizer.bpe().encode(text).len() + before + 2 > r).then(|| Warning::ClassTruncated {
        class: class.to_string(),
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
    let mut label = 0;
    for (i, s) in scores.iter().enumerate() {
        if s.ppl_text < scores[label].ppl_text {
            label = i;
        }
    }
    Ok(Classification {
        class: classes[label].clone(),
        label,
        scores: classes
            .iter()
            .zip(&scores)
            .map(|(c, s)| ClassScore {
                class: c.clone(),
                ppl_text: s.ppl_text,
                ppl_image: s.ppl_image,
            })
            .collect(),
        warnings,
    })
}
