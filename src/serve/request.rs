//! Reading requests: JSON bodies whose errors name the field at fault, and pictures sent as
//! base64 or `data:` URLs.

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use base64::Engine as _;
use serde::de::DeserializeOwned;

/// A JSON body: malformed JSON, a missing or unknown field or a value of the wrong type is a 400
/// that names the field; a body over the server's limit is a 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is larger than the server's limit (--max-body-mb)",
                )
                .code("body_too_large")
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// `bytes` as a `T`, or the 400 that says where and what is wrong.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request has no body: send a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let syntax = matches!(
            inner.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        let message = match () {
            _ if syntax => format!("the body is not valid JSON: {inner}"),
            _ if path == "." => format!("{inner}"),
            _ => format!("{path}: {inner}"),
        };
        if syntax {
            return ApiError::new(StatusCode::BAD_REQUEST, message).code("invalid_json");
        }
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, message).code("invalid_body");
        // A missing field is reported at its parent; name the field itself.
        let field = missing_field(&inner.to_string()).map(|f| match path.as_str() {
            "." => f.to_string(),
            p => format!("{p}.{f}"),
        });
        if let Some(p) = field.or((path != ".").then_some(path)) {
            err = err.param(&p);
        }
        err
    })
}

fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// The bytes of a picture sent as base64, bare or as a `data:image/...;base64,` URL; `field`
/// names it in errors. Other URLs are refused: the server fetches nothing.
pub fn picture_bytes(field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    let value = value.trim();
    let data = if let Some(rest) = value.strip_prefix("data:") {
        let (kind, data) = rest.split_once(',').ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{field}: a data URL needs a comma before its data"),
            )
        })?;
        if !kind.ends_with(";base64") {
            return Err(ApiError::invalid(
                field,
                format!("{field}: the data URL must be base64 (data:image/png;base64,...)"),
            ));
        }
        data
    } else if value.starts_with("http://") || value.starts_with("https://") {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field}: the server does not fetch remote pictures; send the picture itself as a \
                 data URL (data:image/png;base64,...)"
            ),
        )
        .code("remote_url_not_supported"));
    } else {
        value
    };
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| {
            ApiError::invalid(field, format!("{field}: not a base64 picture ({e})"))
                .code("invalid_image")
        })
}

/// A picture sent as [`picture_bytes`], decoded (PNG, JPEG or WebP) within `max_side` pixels a
/// side.
pub fn picture(field: &str, value: &str, max_side: u32) -> Result<image::RgbImage, ApiError> {
    let bytes = picture_bytes(field, value)?;
    crate::image::decode_image_within(&bytes, field, max_side)
        .map_err(|e| ApiError::invalid(field, e.to_string()).code("invalid_image"))
}

/// `bytes` as base64.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
