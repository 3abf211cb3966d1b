//! `POST /v1/rerank`: a text and candidate pictures (or their code grids) → the perplexity of
//! the text given each, best first, as `rudolph rerank` gives them.

use super::error::ApiError;
use super::request::{ApiJson, picture};
use super::{Server, fits};
use crate::pipelines::images::{encode_checked, picture_codes};
use crate::pipelines::rerank::score_pairs;
use crate::tokenizer::lower_strip;
use axum::extract::State;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankRequest {
    text: String,
    /// Pictures: base64 or `data:` URLs.
    images: Option<Vec<String>>,
    /// Or code grids of the model's size.
    codes: Option<Vec<Vec<u32>>>,
    model: Option<String>,
}

pub async fn rerank(
    State(server): State<Arc<Server>>,
    ApiJson(r): ApiJson<RerankRequest>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    server.model_matches(r.model.as_deref())?;
    let loaded = server.loaded.clone();
    let cfg = loaded.model.config().clone();
    fits(&loaded, "text", &r.text, cfg.r_text_seq_length)?;
    enum Candidates {
        Pictures(Vec<image::RgbImage>),
        Codes(Vec<Vec<u32>>),
    }
    let candidates = match (r.images, r.codes) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApiError::invalid(
                "images",
                "give either images (pictures) or codes (code grids) to rerank",
            ));
        }
        (Some(images), None) => {
            check_len("images", images.len())?;
            if loaded.vae.is_none() {
                return Err(ApiError::invalid(
                    "images",
                    "this model has no VQGAN, so it cannot read pictures; send codes",
                ));
            }
            let pictures = images
                .iter()
                .enumerate()
                .map(|(i, p)| picture(&format!("images[{i}]"), p, server.options.max_image_side))
                .collect::<Result<Vec<_>, _>>()?;
            Candidates::Pictures(pictures)
        }
        (None, Some(codes)) => {
            check_len("codes", codes.len())?;
            let n = cfg.image_seq_length();
            for (i, g) in codes.iter().enumerate() {
                if g.len() != n {
                    return Err(ApiError::invalid(
                        &format!("codes[{i}]"),
                        format!("codes[{i}] has {} codes; the model's grid has {n}", g.len()),
                    ));
                }
                if let Some(bad) = g.iter().find(|&&c| c as usize >= cfg.image_vocab_size) {
                    return Err(ApiError::invalid(
                        &format!("codes[{i}]"),
                        format!(
                            "codes[{i}] holds {bad}; the model has {} codes",
                            cfg.image_vocab_size
                        ),
                    ));
                }
            }
            Candidates::Codes(codes)
        }
    };
    let permit = server.admit()?;
    let job = server.job();
    let batch = server.options.max_batch.max(1);
    let text = r.text.clone();
    let (scores, warnings) = server
        .run(permit, job, move |loaded| {
            let grids = match candidates {
                Candidates::Codes(c) => c,
                Candidates::Pictures(p) => picture_codes(&loaded.model, loaded.vae()?, &p)?,
            };
            let (right, warning) = encode_checked(
                &loaded.tokenizer,
                &lower_strip(&text),
                loaded.model.config().r_text_seq_length,
                "text",
            );
            let mut warnings: Vec<_> = loaded.unknown_words("text", &text).into_iter().collect();
            warnings.extend(warning);
            let pairs: Vec<(&[u32], &[u32])> = grids
                .iter()
                .map(|g| (g.as_slice(), right.as_slice()))
                .collect();
            Ok((score_pairs(&loaded.model, &pairs, 1, batch)?, warnings))
        })
        .await?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].ppl_text.total_cmp(&scores[b].ppl_text));
    let results: Vec<serde_json::Value> = order
        .iter()
        .map(|&i| {
            serde_json::json!({
                "index": i,
                "ppl_text": scores[i].ppl_text,
                "ppl_image": scores[i].ppl_image,
            })
        })
        .collect();
    let mut body = serde_json::json!({"text": r.text, "results": results});
    if !warnings.is_empty() {
        body["warnings"] = serde_json::to_value(&warnings).unwrap_or_default();
    }
    Ok(axum::Json(body))
}

fn check_len(field: &str, n: usize) -> Result<(), ApiError> {
    if n == 0 || n > super::MAX_DRAWN {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field} must hold 1 to {} candidates, got {n}",
                super::MAX_DRAWN
            ),
        ));
    }
    Ok(())
}
