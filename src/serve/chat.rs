//! `POST /v1/chat/completions`: the last user message with a picture (an `image_url` part holding
//! a `data:` URL) is captioned, its text, if any, being the caption's beginning; a message of
//! text alone is continued as `rudolph text` continues a template. Choices are the best `n`, in
//! the order the CLI ranks them. With `stream`, the answer comes as `chat.completion.chunk`
//! events once the drafts are ranked.

use super::error::ApiError;
use super::request::{ApiJson, picture};
use super::{Server, count, fits, sampling, unix_now};
use crate::folder::Loaded;
use crate::pipelines::captions::{CaptionRank, generate_captions};
use crate::pipelines::images::picture_codes;
use crate::pipelines::texts::generate_texts;
use crate::pipelines::{GenerateOptions, Warning, add_warnings, defaults};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    model: Option<String>,
    messages: Vec<Message>,
    n: Option<usize>,
    stream: Option<bool>,
    seed: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    /// Drafts drawn (captions or texts), of which the best `n` are answered.
    candidates: Option<usize>,
    /// How captions are ranked: `joint` (the default) or `text`.
    rank: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    // OpenAI's fields that mean nothing here.
    #[allow(dead_code)]
    user: Option<IgnoredAny>,
    #[allow(dead_code)]
    stream_options: Option<IgnoredAny>,
    #[allow(dead_code)]
    frequency_penalty: Option<IgnoredAny>,
    #[allow(dead_code)]
    presence_penalty: Option<IgnoredAny>,
    #[allow(dead_code)]
    stop: Option<IgnoredAny>,
    #[allow(dead_code)]
    metadata: Option<IgnoredAny>,
    #[allow(dead_code)]
    store: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: Option<Content>,
    #[allow(dead_code)]
    name: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageUrl {
    url: String,
    #[allow(dead_code)]
    detail: Option<IgnoredAny>,
}

/// What the last user message asks for.
enum Task {
    Caption {
        picture: Box<image::RgbImage>,
        template: String,
        rank: CaptionRank,
    },
    Text {
        template: String,
    },
}

struct Asked {
    task: Task,
    n: usize,
    candidates: usize,
    stream: bool,
    opts_params: crate::sampling::SamplingParams,
    seed: Option<u64>,
}

fn check(server: &Server, loaded: &Loaded, r: ChatRequest) -> Result<Asked, ApiError> {
    server.model_matches(r.model.as_deref())?;
    let cfg = loaded.model.config();
    let (index, last) = r
        .messages
        .iter()
        .enumerate()
        .rev()
        .find(|(_, m)| m.role == "user")
        .ok_or_else(|| ApiError::invalid("messages", "messages hold no message of role 'user'"))?;
    let field = format!("messages[{index}].content");
    let mut texts = Vec::new();
    let mut pictures = Vec::new();
    match &last.content {
        Some(Content::Text(t)) => texts.push(t.clone()),
        Some(Content::Parts(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                match part {
                    Part::Text { text } => texts.push(text.clone()),
                    Part::ImageUrl { image_url } => pictures
                        .push((format!("{field}[{j}].image_url.url"), image_url.url.clone())),
                }
            }
        }
        None => {}
    }
    let text = texts.join(" ").trim().to_string();
    if pictures.len() > 1 {
        return Err(ApiError::invalid(
            &field,
            "the message holds more than one picture; send one to caption",
        ));
    }
    // The length limit OpenAI clients send: every answer here fits the model's text slots, so a
    // limit below them is refused rather than cut silently.
    let slots = if pictures.is_empty() {
        cfg.l_text_seq_length
    } else {
        cfg.r_text_seq_length
    };
    for (name, limit) in [
        ("max_tokens", r.max_tokens),
        ("max_completion_tokens", r.max_completion_tokens),
    ] {
        if let Some(limit) = limit
            && limit < slots
        {
            return Err(ApiError::invalid(
                name,
                format!(
                    "{name} = {limit} is less than the model's {slots} text tokens, which every answer may fill"
                ),
            ));
        }
    }
    let task = match pictures.pop() {
        Some((name, url)) => {
            fits(loaded, &field, &text, cfg.r_text_seq_length)?;
            if loaded.vae.is_none() {
                return Err(ApiError::invalid(
                    &name,
                    "this model has no VQGAN, so it cannot read pictures",
                ));
            }
            let rank = match r.rank.as_deref() {
                None => CaptionRank::default(),
                Some(s) => s
                    .parse()
                    .map_err(|e: String| ApiError::invalid("rank", e))?,
            };
            Task::Caption {
                picture: Box::new(picture(&name, &url, server.options.max_image_side)?),
                template: text,
                rank,
            }
        }
        None => {
            if r.rank.is_some() {
                return Err(ApiError::invalid("rank", "rank applies to captions only"));
            }
            fits(loaded, &field, &text, cfg.l_text_seq_length)?;
            Task::Text { template: text }
        }
    };
    let (defaults_params, default_candidates) = match task {
        Task::Caption { .. } => (defaults::CAPTION, defaults::CAPTIONS),
        Task::Text { .. } => (defaults::TEXT, 16),
    };
    let n = count("n", r.n.unwrap_or(1), super::MAX_DRAWN)?;
    let candidates = count(
        "candidates",
        r.candidates.unwrap_or(default_candidates.max(n)),
        super::MAX_DRAWN,
    )?;
    Ok(Asked {
        task,
        n,
        candidates,
        stream: r.stream.unwrap_or(false),
        opts_params: sampling(defaults_params, r.top_k, r.top_p, r.temperature)?,
        seed: r.seed,
    })
}

/// The answers, best first, and the prompt's size in tokens.
struct Answers {
    texts: Vec<String>,
    prompt_tokens: usize,
    warnings: Vec<Warning>,
}

fn answer(loaded: &Loaded, asked: &Asked, opts: &GenerateOptions) -> Result<Answers, ApiError> {
    let bpe = loaded.tokenizer.bpe();
    let mut warnings = Vec::new();
    let (texts, prompt_tokens) = match &asked.task {
        Task::Caption {
            picture,
            template,
            rank,
        } => {
            warnings.extend(loaded.unknown_words("caption's beginning", template));
            let codes =
                picture_codes(&loaded.model, loaded.vae()?, &[(**picture).clone()])?.remove(0);
            let captions = generate_captions(
                &loaded.model,
                &loaded.tokenizer,
                &codes,
                template,
                asked.candidates,
                *rank,
                opts,
            )?;
            add_warnings(&mut warnings, captions.warnings.iter().cloned());
            let texts = captions.items.into_iter().map(|c| c.text).collect();
            (texts, codes.len() + bpe.encode(template).len())
        }
        Task::Text { template } => {
            warnings.extend(loaded.unknown_words("text", template));
            let texts = generate_texts(
                &loaded.model,
                &loaded.tokenizer,
                template,
                asked.candidates,
                opts,
            )?;
            add_warnings(&mut warnings, texts.warnings.iter().cloned());
            let texts = texts.items.into_iter().map(|t| t.text).collect();
            (texts, bpe.encode(template).len())
        }
    };
    let mut texts: Vec<String> = texts;
    texts.truncate(asked.n);
    Ok(Answers {
        texts,
        prompt_tokens,
        warnings,
    })
}

pub async fn completions(
    State(server): State<Arc<Server>>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let loaded = server.loaded.clone();
    let asked = check(&server, &loaded, request)?;
    let permit = server.admit()?;
    let job = server.job();
    let opts = server.generate_options(&job, asked.opts_params, asked.seed);
    let seed = opts.seed;
    let stream = asked.stream;
    let id = format!("chatcmpl-{}", super::files::random_id());
    let model = server.options.model_id.clone();
    let created = unix_now();
    let answers = server.run(permit, job, move |loaded| answer(loaded, &asked, &opts));
    if stream {
        return Ok(stream_answers(id, model, created, answers).into_response());
    }
    let answers = answers.await?;
    let bpe = loaded.tokenizer.bpe();
    let completion_tokens: usize = answers.texts.iter().map(|t| bpe.encode(t).len()).sum();
    let choices: Vec<serde_json::Value> = answers
        .texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            serde_json::json!({
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": answers.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": answers.prompt_tokens + completion_tokens,
        },
        "system_fingerprint": null,
        "seed": seed,
    });
    if !answers.warnings.is_empty() {
        body["warnings"] = serde_json::to_value(&answers.warnings).unwrap_or_default();
    }
    Ok(axum::Json(body).into_response())
}

/// The answers as OpenAI streams them: each choice's role, then its text, then its end, and
/// `[DONE]`; an `error` event if the work fails.
fn stream_answers(
    id: String,
    model: String,
    created: u64,
    answers: impl std::future::Future<Output = Result<Answers, ApiError>> + Send + 'static,
) -> impl IntoResponse {
    let chunk = move |choices: serde_json::Value| -> Event {
        Event::default().data(
            serde_json::json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": null,
                "choices": choices,
            })
            .to_string(),
        )
    };
    let events = futures_util::stream::once(async move {
        let events: Vec<Event> = match answers.await {
            Ok(a) => {
                let mut events = Vec::new();
                for (i, text) in a.texts.iter().enumerate() {
                    events.push(chunk(serde_json::json!([{
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": null,
                        "finish_reason": null,
                    }])));
                    events.push(chunk(serde_json::json!([{
                        "index": i,
                        "delta": {"content": text},
                        "logprobs": null,
                        "finish_reason": null,
                    }])));
                    events.push(chunk(serde_json::json!([{
                        "index": i,
                        "delta": {},
                        "logprobs": null,
                        "finish_reason": "stop",
                    }])));
                }
                events.push(Event::default().data("[DONE]"));
                events
            }
            Err(e) => vec![Event::default().event("error").data(e.body().to_string())],
        };
        futures_util::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))
    });
    use futures_util::StreamExt;
    Sse::new(events.flatten()).keep_alive(KeepAlive::default())
}
