//! Zero-shot classification (rc1 `zs_clf`): each class name, after an optional template, is
//! scored as the right text of the picture; the lowest perplexity wins.

use super::rerank::score_pairs;
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
}

/// The right-text ids of each class after the template, and the number of template tokens.
pub fn class_texts(
    tokenizer: &TextTokenizer,
    classes: &[String],
    template: &str,
    r: usize,
) -> crate::Result<(Vec<Vec<u32>>, usize)> {
    if classes.is_empty() {
        return Err(invalid("the class list is empty"));
    }
    let template_encoded = tokenizer.encode_text(&lower_strip(template), r);
    // Template BPE tokens: all but BOS and EOS.
    let ts = template_encoded
        .iter()
        .filter(|&&t| t != 0)
        .count()
        .saturating_sub(2);
    if ts + 3 > r {
        return Err(invalid(format!(
            "the template «{template}» leaves no room for a class in the {r} text slots"
        )));
    }
    let mut out = Vec::with_capacity(classes.len());
    for class in classes {
        let name = lower_strip(class);
        if name.is_empty() {
            return Err(invalid("a class name is empty"));
        }
        let c = tokenizer.encode_text(&format!(" {name}"), r);
        if tokenizer.bpe().encode(&name).len() + ts + 2 > r {
            eprintln!(
                "warning: class «{class}» does not fit the text slots after the template; it was truncated"
            );
        }
        // Same ids as encoding `template + ' ' + class`: YTTM encodes word by word.
        let ids = if ts > 0 {
            [&template_encoded[..ts + 1], &c[1..r - ts]].concat()
        } else {
            c
        };
        out.push(ids);
    }
    Ok((out, ts))
}

/// Classifies a picture (`N` codes) among `classes`.
pub fn classify(
    model: &Rudolph,
    tokenizer: &TextTokenizer,
    codes: &[u32],
    classes: &[String],
    template: &str,
    batch: usize,
) -> crate::Result<Classification> {
    let r = model.config().r_text_seq_length;
    let (texts, ts) = class_texts(tokenizer, classes, template, r)?;
    let pairs: Vec<(&[u32], &[u32])> = texts.iter().map(|t| (codes, t.as_slice())).collect();
    let scores = score_pairs(model, &pairs, ts + 1, batch)?;
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
    })
}
