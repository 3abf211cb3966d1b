//! `POST /v1/classify`: zero-shot classification in the shape Hugging Face's inference API uses
//! for it: `{"inputs": picture, "parameters": {"candidate_labels", "hypothesis_template"}}` →
//! `[{"label", "score"}]`, best first, the scores summing to 1.

use super::error::ApiError;
use super::request::{ApiJson, picture};
use super::{Server, fits};
use crate::folder::Loaded;
use crate::pipelines::classify::{
    CAPTION_TEMPLATE, CaptionClassify, Classification, classify as by_template, classify_by_caption,
};
use crate::pipelines::images::picture_codes;
use crate::pipelines::{Fidelity, GenerateOptions, defaults};
use axum::extract::State;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// The picture: base64, or a `data:` URL.
    inputs: String,
    parameters: Parameters,
    model: Option<String>,
    /// Seeds the captions of the caption mode.
    seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Parameters {
    candidate_labels: Labels,
    hypothesis_template: Option<String>,
    multi_label: Option<bool>,
}

/// Labels as a list, or as one text of comma-separated labels (both are Hugging Face's).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Labels {
    List(Vec<String>),
    Text(String),
}

/// A label and its share of the probability, with what it was scored in.
#[derive(Debug, serde::Serialize)]
pub struct LabelScore {
    label: String,
    score: f64,
    /// The text the label was scored in (the template filled, or a caption).
    text: String,
    /// The perplexity of that text given the picture.
    ppl_text: f32,
}

pub async fn classify(
    State(server): State<Arc<Server>>,
    ApiJson(r): ApiJson<ClassifyRequest>,
) -> Result<axum::Json<Vec<LabelScore>>, ApiError> {
    server.model_matches(r.model.as_deref())?;
    let loaded = server.loaded.clone();
    let labels: Vec<String> = match r.parameters.candidate_labels {
        Labels::List(l) => l,
        Labels::Text(t) => t.split(',').map(str::to_string).collect(),
    }
    .into_iter()
    .map(|l| l.trim().to_string())
    .filter(|l| !l.is_empty())
    .collect();
    if labels.is_empty() {
        return Err(ApiError::invalid(
            "parameters.candidate_labels",
            "candidate_labels is empty: give at least one label",
        ));
    }
    if labels.len() > super::MAX_DRAWN {
        return Err(ApiError::invalid(
            "parameters.candidate_labels",
            format!("at most {} labels, got {}", super::MAX_DRAWN, labels.len()),
        ));
    }
    let slots = loaded.model.config().r_text_seq_length;
    for (i, l) in labels.iter().enumerate() {
        fits(
            &loaded,
            &format!("parameters.candidate_labels[{i}]"),
            l,
            slots,
        )?;
    }
    if r.parameters.multi_label == Some(true) {
        return Err(ApiError::invalid(
            "parameters.multi_label",
            "multi_label is not supported: the labels share one probability",
        ));
    }
    let template = loaded.classify_template(r.parameters.hypothesis_template.as_deref());
    let by_caption = template.trim() == CAPTION_TEMPLATE;
    if !by_caption {
        fits(
            &loaded,
            "parameters.hypothesis_template",
            &template.replace("{}", " "),
            slots,
        )?;
    }
    if loaded.vae.is_none() {
        return Err(ApiError::invalid(
            "inputs",
            "this model has no VQGAN, so it cannot read pictures",
        ));
    }
    let img = picture("inputs", &r.inputs, server.options.max_image_side)?;
    let permit = server.admit()?;
    let job = server.job();
    let opts = server.generate_options(&job, defaults::CAPTION, r.seed);
    let result = server
        .run(permit, job, move |loaded| {
            run(loaded, &img, &labels, &template, by_caption, opts)
        })
        .await?;
    Ok(axum::Json(probabilities(&result, by_caption)))
}

fn run(
    loaded: &Loaded,
    img: &image::RgbImage,
    labels: &[String],
    template: &str,
    by_caption: bool,
    opts: GenerateOptions,
) -> Result<Classification, ApiError> {
    let codes = picture_codes(&loaded.model, loaded.vae()?, std::slice::from_ref(img))?.remove(0);
    Ok(if by_caption {
        let mut how = CaptionClassify::new(opts.seed);
        how.generate = opts;
        classify_by_caption(&loaded.model, &loaded.tokenizer, &codes, labels, &how)?
    } else {
        by_template(
            &loaded.model,
            &loaded.tokenizer,
            &codes,
            labels,
            template,
            opts.batch_size,
            Fidelity::Fixed,
        )?
    })
}

/// Each label's share: a softmax over the labels of the text's log-likelihood given the picture,
/// `−ln ppl_text` per token with a template, `−NLL` of the caption with the picture in the
/// caption mode; best first.
fn probabilities(result: &Classification, by_caption: bool) -> Vec<LabelScore> {
    let logits: Vec<f64> = result
        .scores
        .iter()
        .map(|s| {
            if by_caption {
                -(s.score as f64)
            } else {
                -(s.score as f64).ln()
            }
        })
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out: Vec<LabelScore> = result
        .scores
        .iter()
        .zip(weights)
        .map(|(s, w)| LabelScore {
            label: s.class.clone(),
            score: w / total,
            text: s.text.clone(),
            ppl_text: s.ppl_text,
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}
