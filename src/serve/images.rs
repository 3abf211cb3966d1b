//! `POST /v1/images/generations`: text → pictures, as OpenAI's images API answers, with every
//! option of `rudolph image` as extensions; with `stream`, Server-Sent Events of the picture as
//! its rows are drawn.

use super::error::ApiError;
use super::request::{ApiJson, base64, picture};
use super::{Permit, Server, count, fits, sampling, unix_now};
use crate::folder::Loaded;
use crate::pipelines::images::{
    Borders, ImageRank, RankedCodes, check_guidance, decode_pictures, generate_images, image_prompt,
};
use crate::pipelines::{GenerateOptions, Warning, add_warnings, defaults};
use crate::sampling::SamplingParams;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::sync::Arc;
use tokio::sync::mpsc::unbounded_channel;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    prompt: String,
    model: Option<String>,
    /// Pictures answered, the best of the candidates.
    n: Option<usize>,
    size: Option<String>,
    /// `b64_json` (the default) or `url`.
    response_format: Option<String>,
    seed: Option<u64>,
    /// Pictures drawn, of which the best `n` are answered.
    candidates: Option<usize>,
    rank: Option<ImageRank>,
    guidance_scale: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f64>,
    temperature: Option<f64>,
    /// A picture whose borders are kept (base64 or a data URL), with `borders` in tokens.
    image: Option<String>,
    borders: Option<BorderFields>,
    crop_first: Option<bool>,
    stream: Option<bool>,
    partial_images: Option<usize>,
    output_format: Option<String>,
    // OpenAI's fields that mean nothing here.
    #[allow(dead_code)]
    quality: Option<IgnoredAny>,
    #[allow(dead_code)]
    style: Option<IgnoredAny>,
    #[allow(dead_code)]
    user: Option<IgnoredAny>,
    #[allow(dead_code)]
    background: Option<IgnoredAny>,
    #[allow(dead_code)]
    moderation: Option<IgnoredAny>,
    #[allow(dead_code)]
    output_compression: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BorderFields {
    #[serde(default)]
    up: usize,
    #[serde(default)]
    left: usize,
    #[serde(default)]
    right: usize,
    #[serde(default)]
    down: usize,
}

/// A request once checked: everything the work needs.
struct Drawing {
    prompt: String,
    n: usize,
    candidates: usize,
    rank: ImageRank,
    guidance: f32,
    params: SamplingParams,
    seed: Option<u64>,
    image: Option<(image::RgbImage, Borders, bool)>,
    as_url: bool,
    partials: Option<usize>,
}

/// The most partial pictures a stream sends, as OpenAI allows.
const MAX_PARTIALS: usize = 3;

fn check(server: &Server, loaded: &Loaded, r: ImageRequest) -> Result<Drawing, ApiError> {
    server.model_matches(r.model.as_deref())?;
    if r.prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt", "prompt is empty"));
    }
    let cfg = loaded.model.config();
    fits(loaded, "prompt", &r.prompt, cfg.l_text_seq_length)?;
    let native = format!("{0}x{0}", cfg.image_size());
    match r.size.as_deref() {
        None | Some("auto") => {}
        Some(s) if s == native => {}
        Some(s) => {
            return Err(ApiError::invalid(
                "size",
                format!("size '{s}' is not supported: this model draws {native} only"),
            ));
        }
    }
    let n = count("n", r.n.unwrap_or(1), super::MAX_DRAWN)?;
    let candidates = count(
        "candidates",
        r.candidates.unwrap_or(n.max(defaults::IMAGES)),
        super::MAX_DRAWN,
    )?;
    if n > candidates {
        return Err(ApiError::invalid(
            "n",
            format!("n = {n} is more than the {candidates} candidates drawn"),
        ));
    }
    let guidance = loaded.guidance(r.guidance_scale);
    check_guidance(guidance).map_err(|e| ApiError::invalid("guidance_scale", e.to_string()))?;
    if guidance != 1.0 && 2 > server.options.max_batch {
        return Err(ApiError::invalid(
            "guidance_scale",
            "guidance takes two rows per picture, and this server's batch holds one (--max-batch)",
        ));
    }
    let params = sampling(defaults::IMAGE, r.top_k, r.top_p, r.temperature)?;
    let as_url = match r.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(f) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format '{f}' is not one of b64_json, url"),
            ));
        }
    };
    if let Some(f) = r.output_format.as_deref().filter(|f| *f != "png") {
        return Err(ApiError::invalid(
            "output_format",
            format!("output_format '{f}' is not supported: pictures are PNG"),
        ));
    }
    let partials = match (r.stream.unwrap_or(false), r.partial_images) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "partial_images",
                "partial_images needs \"stream\": true",
            ));
        }
        (false, None) => None,
        (true, k) => {
            let k = k.unwrap_or(0);
            if k > MAX_PARTIALS {
                return Err(ApiError::invalid(
                    "partial_images",
                    format!("partial_images must be 0 to {MAX_PARTIALS}, got {k}"),
                ));
            }
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    "a stream answers one picture: n must be 1",
                ));
            }
            Some(k)
        }
    };
    let image = match (r.image, r.borders) {
        (Some(data), borders) => {
            let b = borders.unwrap_or_default();
            let borders = Borders {
                up: b.up,
                left: b.left,
                right: b.right,
                down: b.down,
            };
            borders
                .mask(cfg.image_tokens_per_dim)
                .map_err(|e| ApiError::invalid("borders", e.to_string()))?;
            let img = picture("image", &data, server.options.max_image_side)?;
            Some((img, borders, r.crop_first.unwrap_or(false)))
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "borders",
                "borders need an image whose borders are kept",
            ));
        }
        (None, None) => None,
    };
    if loaded.vae.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "this model has no VQGAN, so it cannot draw pictures",
        ));
    }
    Ok(Drawing {
        prompt: r.prompt,
        n,
        candidates,
        rank: loaded.image_rank(r.rank),
        guidance,
        params,
        seed: r.seed,
        image,
        as_url,
        partials,
    })
}

/// The kept pictures, best first, as PNG with their scores.
struct Drawn {
    pictures: Vec<(RankedCodes, Vec<u8>)>,
    warnings: Vec<Warning>,
}

fn draw(loaded: &Loaded, d: &Drawing, opts: &GenerateOptions) -> Result<Drawn, ApiError> {
    let vae = loaded.vae()?;
    let prompt = match &d.image {
        Some((img, borders, crop_first)) => {
            let size = loaded.model.config().image_size() as u32;
            let pixels = crate::image::preprocess(img, size, vae.device())?;
            Some(image_prompt(vae, &pixels, *borders, *crop_first)?)
        }
        None => None,
    };
    let mut warnings: Vec<Warning> = loaded
        .unknown_words("prompt", &d.prompt)
        .into_iter()
        .collect();
    let ranked = generate_images(
        &loaded.model,
        &loaded.tokenizer,
        &d.prompt,
        d.candidates,
        prompt.as_ref(),
        opts,
    )?;
    let ranked = d.rank.apply(
        &loaded.model,
        &loaded.tokenizer,
        vae,
        &d.prompt,
        ranked,
        opts.batch_size,
        opts.progress.as_ref(),
    )?;
    add_warnings(&mut warnings, ranked.warnings);
    let mut best = ranked.items;
    best.truncate(d.n);
    let grids: Vec<&[u32]> = best.iter().map(|r| r.codes.as_slice()).collect();
    let decoded = decode_pictures(vae, &grids, opts.batch_size, opts.progress.as_ref())?;
    let mut pictures = Vec::with_capacity(best.len());
    for (i, r) in best.into_iter().enumerate() {
        let png = png(&crate::image::to_rgb8(&decoded.get(i)?)?)?;
        pictures.push((r, png));
    }
    Ok(Drawn { pictures, warnings })
}

fn png(img: &image::RgbImage) -> Result<Vec<u8>, ApiError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode PNG: {e}"),
            )
        })?;
    Ok(out.into_inner())
}

/// One answered picture: its PNG (inline or as a URL) and its scores.
fn datum(
    server: &Server,
    host: &str,
    d: &Drawing,
    r: &RankedCodes,
    png: Vec<u8>,
) -> serde_json::Value {
    let mut item = serde_json::json!({
        "revised_prompt": null,
        "ppl_text": r.ppl_text,
        "ppl_image": r.ppl_image,
    });
    if let Some(p) = r.ppl_decoded {
        item["ppl_decoded"] = p.into();
    }
    if d.as_url {
        let id = server.files.put(png);
        item["url"] = format!("http://{host}/v1/files/images/{id}").into();
    } else {
        item["b64_json"] = base64(&png).into();
    }
    item
}

pub async fn generations(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ImageRequest>,
) -> Result<Response, ApiError> {
    let loaded = server.loaded.clone();
    let drawing = check(&server, &loaded, request)?;
    let permit = server.admit()?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    if drawing.partials.is_some() {
        return Ok(stream(server, permit, drawing).into_response());
    }
    let job = server.job();
    let opts = server.generate_options(&job, drawing.params, drawing.seed);
    let seed = opts.seed;
    let drawing = Arc::new(drawing);
    let d = drawing.clone();
    let drawn = server
        .run(permit, job, move |loaded| {
            let mut opts = opts;
            opts.guidance = d.guidance;
            draw(loaded, &d, &opts)
        })
        .await?;
    let data: Vec<serde_json::Value> = drawn
        .pictures
        .into_iter()
        .map(|(r, png)| datum(&server, &host, &drawing, &r, png))
        .collect();
    let mut body = serde_json::json!({
        "created": unix_now(),
        "data": data,
        "usage": usage(&loaded, &drawing),
        "output_format": "png",
        "size": format!("{0}x{0}", loaded.model.config().image_size()),
        "seed": seed,
    });
    if !drawn.warnings.is_empty() {
        body["warnings"] = serde_json::to_value(&drawn.warnings).unwrap_or_default();
    }
    Ok(axum::Json(body).into_response())
}

/// What the drawing thread tells the stream.
enum Update {
    /// The first candidate's codes so far, the `index`th partial picture.
    Partial {
        index: usize,
        codes: Vec<u32>,
    },
    Done(Result<Drawn, ApiError>),
}

/// The stream of a drawing: `image_generation.partial_image` events of the first candidate's
/// rows so far (the picture below them blank), then `image_generation.completed` with the best
/// picture, as OpenAI sends them.
fn stream(server: Arc<Server>, permit: Permit, drawing: Drawing) -> impl IntoResponse {
    let (tx, rx) = unbounded_channel::<Update>();
    let job = server.job();
    let cfg = server.loaded.model.config();
    let side = cfg.image_tokens_per_dim;
    let partials = drawing.partials.unwrap_or(0);
    // Partial `i` is sent once the first candidate's row `side·(i+1)/(partials+1)` is drawn.
    let thresholds: Vec<usize> = (1..=partials)
        .map(|i| (side * i).div_ceil(partials + 1).max(1))
        .collect();
    let hook_tx = tx.clone();
    let mut sent = 0;
    *job.drawn.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move |first, rows| {
        if first == 0 && sent < thresholds.len() && rows[0].len() >= thresholds[sent] * side {
            let _ = hook_tx.send(Update::Partial {
                index: sent,
                codes: rows[0].clone(),
            });
            sent += 1;
        }
        !hook_tx.is_closed()
    }));
    let opts = server.generate_options(&job, drawing.params, drawing.seed);
    let size = format!("{0}x{0}", cfg.image_size());
    let seed = opts.seed;
    let used = usage(&server.loaded, &drawing);
    let runner = server.clone();
    tokio::spawn(async move {
        let result = runner
            .run(permit, job, move |loaded| {
                let mut opts = opts;
                opts.guidance = drawing.guidance;
                draw(loaded, &drawing, &opts)
            })
            .await;
        let _ = tx.send(Update::Done(result));
    });
    let events =
        futures_util::stream::unfold((rx, server, false), move |(mut rx, server, done)| {
            let (size, used) = (size.clone(), used.clone());
            async move {
                if done {
                    return None;
                }
                let update = rx.recv().await?;
                let (event, done) = match update {
                    Update::Partial { index, codes } => {
                        let loaded = server.loaded.clone();
                        let picture =
                            tokio::task::spawn_blocking(move || partial_png(&loaded, &codes))
                                .await
                                .map_err(|e| {
                                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                                })
                                .and_then(|r| r);
                        match picture {
                            Ok(png) => (
                                {
                                    let kind = "image_generation.partial_image";
                                    let mut data = image_event(kind, &png, &size);
                                    data["partial_image_index"] = index.into();
                                    event_json(kind, data)
                                },
                                false,
                            ),
                            Err(e) => (event_json("error", e.body()), true),
                        }
                    }
                    Update::Done(Ok(drawn)) => {
                        let (r, png) = drawn.pictures.into_iter().next()?;
                        let kind = "image_generation.completed";
                        let mut data = image_event(kind, &png, &size);
                        data["usage"] = used;
                        data["seed"] = seed.into();
                        data["ppl_text"] = r.ppl_text.into();
                        data["ppl_image"] = r.ppl_image.into();
                        if let Some(p) = r.ppl_decoded {
                            data["ppl_decoded"] = p.into();
                        }
                        (event_json(kind, data), true)
                    }
                    Update::Done(Err(e)) => (event_json("error", e.body()), true),
                };
                Some((Ok::<_, std::convert::Infallible>(event), (rx, server, done)))
            }
        });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// Tokens read and written, as OpenAI's images API counts them: the prompt's text tokens in, the
/// drawn candidates' image codes out.
fn usage(loaded: &Loaded, d: &Drawing) -> serde_json::Value {
    let text = loaded
        .tokenizer
        .bpe()
        .encode(&crate::tokenizer::lower_strip(&d.prompt))
        .len()
        + 2;
    let image = if d.image.is_some() {
        loaded.model.config().image_seq_length()
    } else {
        0
    };
    let output = d.candidates * loaded.model.config().image_seq_length();
    serde_json::json!({
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output,
        "total_tokens": text + image + output,
    })
}

/// The fields every picture event of a stream has, as OpenAI sends them.
fn image_event(kind: &str, png: &[u8], size: &str) -> serde_json::Value {
    serde_json::json!({
        "type": kind,
        "b64_json": base64(png),
        "created_at": unix_now(),
        "size": size,
        "output_format": "png",
        "background": "opaque",
        "quality": "auto",
    })
}

fn event_json(name: &str, data: serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// The picture of a partly drawn grid: the rows drawn so far decoded, the rest blank.
fn partial_png(loaded: &Loaded, codes: &[u32]) -> Result<Vec<u8>, ApiError> {
    let vae = loaded.vae()?;
    let cfg = loaded.model.config();
    let (n, side) = (cfg.image_seq_length(), cfg.image_tokens_per_dim);
    let rows = codes.len().min(n) / side;
    let mut grid = codes[..rows * side].to_vec();
    grid.resize(n, 0);
    let decoded = decode_pictures(vae, &[&grid], 1, &crate::progress::Silent)?;
    let mut img = crate::image::to_rgb8(&decoded.get(0)?)?;
    let drawn_px = (rows * img.height() as usize / side) as u32;
    for y in drawn_px..img.height() {
        for x in 0..img.width() {
            img.put_pixel(x, y, image::Rgb([255, 255, 255]));
        }
    }
    png(&img)
}
