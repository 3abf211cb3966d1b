//! `rudolph serve`: a model behind an HTTP API in OpenAI's shapes, so that the clients written for
//! OpenAI (its SDKs, curl, the tools built on them) draw, caption and write with RuDOLPH.
//!
//! Concurrent generations share one batched decoding loop ([`crate::batching`]): the model steps
//! run on the batcher's thread, and the rest of each request's work (reading pictures, ranking,
//! decoding, PNG) on the blocking pool, never on the async runtime's threads. Every request is
//! checked before it is admitted; a full queue answers 429, a client that goes away frees its
//! rows at the next step, and a request that outlives `timeout` is stopped with a 504.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/images/generations` | text → pictures ([`images`]) |
//! | `POST /v1/chat/completions` | picture → captions, text → texts ([`chat`]) |
//! | `POST /v1/classify` | zero-shot classification ([`classify`]) |
//! | `POST /v1/rerank` | a text's perplexity given each picture ([`rerank`]) |
//! | `GET /v1/models`, `/health`, `/metrics`, `/v1/files/images/{id}` | [`info`] |

mod chat;
mod classify;
pub mod error;
mod files;
mod images;
mod info;
mod metrics;
mod request;
mod rerank;

use crate::batching::Batcher;
use crate::folder::Loaded;
use crate::pipelines::GenerateOptions;
use crate::progress::ProgressSink;
use crate::sampling::SamplingParams;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// How the server runs: its limits and its identity.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The most rows one decoding step takes (a picture drawn with guidance takes two).
    pub max_batch: usize,
    /// The most requests that wait, beyond `max_batch` running; more are answered 429.
    pub max_queue: usize,
    /// When set, every request but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// The largest request body; larger ones are answered 413.
    pub max_body_bytes: usize,
    /// The largest side of a picture sent in a request, in pixels.
    pub max_image_side: u32,
    /// The longest a request may run before it is stopped with a 504.
    pub timeout: Duration,
    /// After a shutdown signal, how long running requests may still take before they are
    /// stopped.
    pub shutdown_grace: Duration,
    /// The name `/v1/models` gives the model, which requests may name.
    pub model_id: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_queue: 64,
            api_key: None,
            max_body_bytes: 32 << 20,
            max_image_side: 4096,
            timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(10),
            model_id: "rudolph".into(),
        }
    }
}

/// Where the server's one line per request goes (JSON: id, method, route, status, latency).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The running server's state, shared by every request.
pub struct Server {
    loaded: Arc<Loaded>,
    batcher: Batcher,
    options: ServeOptions,
    metrics: metrics::Metrics,
    files: files::Files,
    in_progress: AtomicUsize,
    /// Places for requests whose work runs: as many as the batch has rows, since each running
    /// request decodes at least one; the others wait in the queue, holding no memory.
    running: Arc<tokio::sync::Semaphore>,
    next_request: AtomicU64,
    log: Log,
    started: SystemTime,
    /// Set by a shutdown signal: when running requests must stop.
    stop_by: OnceLock<Instant>,
}

impl Server {
    /// A server of `loaded`, with its decoding thread started.
    pub fn new(loaded: Loaded, options: ServeOptions, log: Log) -> crate::Result<Arc<Self>> {
        if options.max_queue == 0 && options.max_batch == 0 {
            return Err(crate::error::invalid("the server needs room for a request"));
        }
        let batcher = Batcher::start(loaded.model.clone(), options.max_batch)?;
        let max_batch = options.max_batch;
        Ok(Arc::new(Self {
            loaded: Arc::new(loaded),
            batcher,
            options,
            metrics: metrics::Metrics::default(),
            files: files::Files::default(),
            in_progress: AtomicUsize::new(0),
            running: Arc::new(tokio::sync::Semaphore::new(max_batch)),
            next_request: AtomicU64::new(1),
            log,
            started: SystemTime::now(),
            stop_by: OnceLock::new(),
        }))
    }

    /// Every route, behind the request log, the API key check and the body limit.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/images/generations", post(images::generations))
            .route("/v1/chat/completions", post(chat::completions))
            .route("/v1/classify", post(classify::classify))
            .route("/v1/rerank", post(rerank::rerank))
            .route("/v1/models", get(info::models))
            .route("/v1/models/{id}", get(info::model))
            .route("/v1/files/images/{id}", get(info::file))
            .route("/health", get(info::health))
            .route("/metrics", get(info::metrics))
            .fallback(info::not_found)
            .method_not_allowed_fallback(info::method_not_allowed)
            .layer(DefaultBodyLimit::max(self.options.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                around_each_request,
            ))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes; then stops accepting, gives running
    /// requests [`ServeOptions::shutdown_grace`] to finish, stops the rest, and returns when
    /// every connection is closed.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let server = self.clone();
        let signal = async move {
            shutdown.await;
            let _ = server
                .stop_by
                .set(Instant::now() + server.options.shutdown_grace);
        };
        axum::serve(listener, self.router())
            .with_graceful_shutdown(signal)
            .await
    }

    pub fn options(&self) -> &ServeOptions {
        &self.options
    }

    /// Takes a place among the requests in progress, or answers 429 when running and waiting
    /// ones fill the batch and the queue.
    fn admit(self: &Arc<Self>) -> Result<Permit, ApiError> {
        let limit = self.options.max_batch + self.options.max_queue;
        let before = self.in_progress.fetch_add(1, Ordering::SeqCst);
        let permit = Permit(self.clone());
        if before >= limit {
            drop(permit);
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server is busy: {limit} requests are in progress (--max-batch {} + \
                     --max-queue {}); try again shortly",
                    self.options.max_batch, self.options.max_queue
                ),
            )
            .code("queue_full");
            e.retry_after = Some(1);
            return Err(e);
        }
        Ok(permit)
    }

    /// A new job's progress sink: it ends the work when the client goes, the request times out
    /// or the server stops.
    fn job(self: &Arc<Self>) -> Arc<Job> {
        Arc::new(Job {
            server: self.clone(),
            gone: AtomicBool::new(false),
            deadline: Instant::now() + self.options.timeout,
            drawn: Mutex::new(None),
        })
    }

    /// Generation settings for a job: `params` and `seed` (or one from the clock), decoding in
    /// the shared batch.
    fn generate_options(
        &self,
        job: &Arc<Job>,
        params: SamplingParams,
        seed: Option<u64>,
    ) -> GenerateOptions {
        let mut opts = GenerateOptions::new(params);
        opts.seed = seed.unwrap_or_else(clock_seed);
        opts.batch_size = 1;
        opts.progress = job.clone();
        opts.shared = Some(self.batcher.clone());
        opts
    }

    /// Runs `work` on the blocking pool once a place among the running requests is free (it
    /// holds `permit` until done) and answers with its result; a job stopped by its deadline is a 504, by the server's shutdown a 503. Dropping
    /// the future (the client went away) stops the work at its next step.
    fn run<T: Send + 'static>(
        &self,
        permit: Permit,
        job: Arc<Job>,
        work: impl FnOnce(&Loaded) -> Result<T, ApiError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static {
        let server = job.server.clone();
        async move {
            let _cancel_when_dropped = CancelOnDrop(job.clone());
            let Ok(place) = server.running.clone().acquire_owned().await else {
                return Err(job.explain(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down",
                )));
            };
            let loaded = server.loaded.clone();
            let handle = tokio::task::spawn_blocking(move || {
                let _held = (permit, place);
                work(&loaded)
            });
            match handle.await {
                Ok(Ok(t)) => Ok(t),
                Ok(Err(e)) => Err(job.explain(e)),
                Err(e) => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the request's work failed: {e}"),
                )),
            }
        }
    }

    fn model_matches(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.options.model_id => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model '{m}' is not served here; this server serves '{}'",
                    self.options.model_id
                ),
            )
            .param("model")
            .code("model_not_found")),
            _ => Ok(()),
        }
    }
}

/// A place among the requests in progress, given back when dropped.
struct Permit(Arc<Server>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one request's work hears and tells: whether to stop, and (for streams) each step drawn.
struct Job {
    server: Arc<Server>,
    gone: AtomicBool,
    deadline: Instant,
    drawn: Mutex<Option<DrawnHook>>,
}

/// Hears each step drawn; answers whether anyone still listens.
type DrawnHook = Box<dyn FnMut(usize, &[Vec<u32>]) -> bool + Send>;

impl Job {
    fn timed_out(&self) -> bool {
        Instant::now() > self.deadline
    }

    fn stopping(&self) -> bool {
        self.server
            .stop_by
            .get()
            .is_some_and(|by| Instant::now() > *by)
    }

    /// The answer for a failed job: why it was stopped, if it was.
    fn explain(&self, e: ApiError) -> ApiError {
        if self.timed_out() {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the request took longer than the server's limit of {} s (--timeout)",
                    self.server.options.timeout.as_secs()
                ),
            )
            .code("timeout")
        } else if self.stopping() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down; try again later",
            )
            .code("shutting_down")
        } else {
            e
        }
    }
}

impl ProgressSink for Job {
    fn drawn(&self, first: usize, rows: &[Vec<u32>]) {
        if let Some(hook) = self
            .drawn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            && !hook(first, rows)
        {
            self.gone.store(true, Ordering::Relaxed);
        }
    }

    fn cancelled(&self) -> bool {
        self.gone.load(Ordering::Relaxed) || self.timed_out() || self.stopping()
    }
}

/// Stops a job when the request that waits for it is dropped (its client went away).
struct CancelOnDrop(Arc<Job>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.gone.store(true, Ordering::Relaxed);
    }
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64 % (u32::MAX as u64))
}

/// Seconds since the Unix epoch, as OpenAI's `created` fields count.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Names each request, checks its key, and logs and counts it once answered.
async fn around_each_request(
    State(server): State<Arc<Server>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = format!(
        "req-{}",
        server.next_request.fetch_add(1, Ordering::Relaxed)
    );
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = request.method().to_string();
    let open = matches!(route.as_str(), "/health" | "/v1/files/images/{id}");
    let mut response = match &server.options.api_key {
        Some(key) if !open && !authorized(&request, key) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs an API key: send the header 'Authorization: Bearer KEY'",
        )
        .code("invalid_api_key")
        .into_response(),
        _ => next.run(request).await,
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = response.status().as_u16();
    let latency = started.elapsed();
    server.metrics.record(&route, status, latency);
    let line = serde_json::json!({
        "ts": unix_now(),
        "request_id": id,
        "method": method,
        "route": route,
        "status": status,
        "latency_ms": (latency.as_secs_f64() * 1e4).round() / 10.0,
    });
    (server.log)(&line.to_string());
    response
}

fn authorized(request: &Request, key: &str) -> bool {
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(given) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    // Compared in full whatever the first difference, so that the time taken tells nothing.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Checks the sampling fields every generating route takes, from the task's defaults.
fn sampling(
    defaults: SamplingParams,
    top_k: Option<usize>,
    top_p: Option<f64>,
    temperature: Option<f64>,
) -> Result<SamplingParams, ApiError> {
    let params = SamplingParams {
        top_k: top_k.unwrap_or(defaults.top_k),
        top_p: top_p.unwrap_or(defaults.top_p),
        temperature: temperature.unwrap_or(defaults.temperature),
    };
    params.validate().map_err(|e| {
        let field = e.split_whitespace().next().unwrap_or("temperature");
        ApiError::invalid(field, e.clone())
    })?;
    Ok(params)
}

/// Checks that a count field lies in `1..=max`.
fn count(field: &str, value: usize, max: usize) -> Result<usize, ApiError> {
    if value == 0 || value > max {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be 1 to {max}, got {value}"),
        ));
    }
    Ok(value)
}

/// The most sequences one request may draw (pictures, captions or texts).
const MAX_DRAWN: usize = 256;

/// Checks that `text` fits `slots` tokens with BOS and EOS; `field` names it.
fn fits(loaded: &Loaded, field: &str, text: &str, slots: usize) -> Result<(), ApiError> {
    if text.chars().count() > crate::tokenizer::MAX_TEXT_CHARS {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field} has more than {} characters",
                crate::tokenizer::MAX_TEXT_CHARS
            ),
        ));
    }
    let tokens = loaded
        .tokenizer
        .bpe()
        .encode(&crate::tokenizer::lower_strip(text))
        .len()
        + 2;
    if tokens > slots {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field} needs {tokens} tokens with BOS and EOS; the model's text holds {slots}"
            ),
        )
        .code("text_too_long"));
    }
    Ok(())
}
