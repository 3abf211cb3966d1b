//! What the server tells about itself: the model, its health, its metrics, and the pictures
//! answered as URLs.

use super::error::ApiError;
use super::{Server, unix_now};
use crate::pipelines::defaults;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The loaded model as OpenAI lists models, with its configuration, native size and defaults.
fn describe(server: &Server) -> serde_json::Value {
    let loaded = &server.loaded;
    let cfg = loaded.model.config();
    let created = server
        .started
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sampling = |p: crate::sampling::SamplingParams| serde_json::json!({"top_k": p.top_k, "top_p": p.top_p, "temperature": p.temperature});
    serde_json::json!({
        "id": server.options.model_id,
        "object": "model",
        "created": created,
        "owned_by": "rudolph",
        "native_size": format!("{0}x{0}", cfg.image_size()),
        "config": serde_json::from_str::<serde_json::Value>(&cfg.to_original_json())
            .unwrap_or_default(),
        "can_draw": loaded.vae.is_some(),
        "defaults": {
            "images": {
                "candidates": defaults::IMAGES,
                "guidance_scale": loaded.guidance(None),
                "rank": loaded.image_rank(None),
                "sampling": sampling(defaults::IMAGE),
            },
            "captions": {"candidates": defaults::CAPTIONS, "sampling": sampling(defaults::CAPTION)},
            "texts": {"candidates": 16, "sampling": sampling(defaults::TEXT)},
            "classify_template": loaded.classify_template(None),
        },
        "limits": {
            "max_batch": server.options.max_batch,
            "max_queue": server.options.max_queue,
            "max_body_bytes": server.options.max_body_bytes,
            "max_image_side": server.options.max_image_side,
            "timeout_s": server.options.timeout.as_secs(),
            "left_text_tokens": cfg.l_text_seq_length,
            "right_text_tokens": cfg.r_text_seq_length,
        },
    })
}

pub async fn models(State(server): State<Arc<Server>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"object": "list", "data": [describe(&server)]}))
}

pub async fn model(
    State(server): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    server.model_matches(Some(&id))?;
    Ok(axum::Json(describe(&server)))
}

pub async fn health(State(server): State<Arc<Server>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "ok",
        "model": server.options.model_id,
        "time": unix_now(),
    }))
}

pub async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let text = server.metrics.render(
        server.batcher.stats(),
        server
            .in_progress
            .load(std::sync::atomic::Ordering::Relaxed),
        server.options.max_batch - server.running.available_permits(),
        server.options.max_batch,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub async fn file(
    State(server): State<Arc<Server>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let png = server.files.get(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no picture '{id}': pictures answered as URLs are kept for {} minutes",
                super::files::LIFETIME.as_secs() / 60
            ),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route; see GET /v1/models and the routes in docs/serve.md",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method",
    )
}
