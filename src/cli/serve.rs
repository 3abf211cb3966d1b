//! `rudolph serve`: the model behind an OpenAI-compatible HTTP API (see docs/serve.md).

use super::common::ModelArgs;
use rudolph::serve::{ServeOptions, Server};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the line `listening on ...` tells which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The most rows one decoding step takes, shared by every request (a picture drawn with
    /// guidance takes two). More rows make each step longer and the whole faster.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// The most requests that wait beyond the running ones; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every request but /health (default:
    /// $RUDOLPH_API_KEY; without either, no key is needed).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The largest request body, in MiB; larger ones are answered 413.
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// The largest side of a picture sent in a request, in pixels.
    #[arg(long, default_value_t = 4096)]
    pub max_image_side: u32,
    /// Seconds a request may run before it is stopped with a 504.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Seconds running requests may still take after SIGINT or SIGTERM before they are stopped.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Serve this configuration (a preset such as 350m, or a config.json) with random weights
    /// and a random VQGAN of the real one's size, reading with the folder's tokenizer (the
    /// built-in model's by default): a model to measure the server with, no download needed.
    /// Its pictures are noise.
    #[arg(long, value_name = "PRESET")]
    pub random_weights: Option<String>,
    /// The model's name in /v1/models and in requests (default: the model folder's name, or
    /// rudolph-shapes for the built-in model).
    #[arg(long)]
    pub model_id: Option<String>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_batch > 0, "--max-batch must be at least 1");
    anyhow::ensure!(args.max_body_mb > 0, "--max-body-mb must be at least 1");
    anyhow::ensure!(args.timeout > 0, "--timeout must be at least 1 second");
    anyhow::ensure!(
        args.max_image_side >= 8,
        "--max-image-side must be at least 8 pixels"
    );
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("RUDOLPH_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let model_id = args
        .model_id
        .clone()
        .unwrap_or_else(|| match &args.model.folder.model {
            Some(dir) => dir
                .canonicalize()
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "rudolph".into()),
            None => "rudolph-shapes".into(),
        });
    let model_id = match &args.random_weights {
        Some(preset) if args.model_id.is_none() => format!("random-{preset}"),
        _ => model_id,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Bound before the model loads, so that a taken port is said at once.
    let address = format!("{}:{}", args.host, args.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&address))
        .map_err(|e| anyhow::anyhow!("cannot listen on {address}: {e} (--host, --port)"))?;
    let mut loaded = args.model.load()?;
    if let Some(preset) = &args.random_weights {
        let cfg = rudolph::config::Config::from_name_or_path(preset)
            .map_err(|e| anyhow::anyhow!("--random-weights: {e}"))?;
        let device = super::common::parse_device(&args.model.device)?;
        let precision = super::common::parse_precision(&args.model.dtype)?;
        loaded.model = rudolph::model::Rudolph::random(&cfg, 0, precision, &device)?;
        // The folder's generation defaults are its own model's, not this one's.
        loaded.generation = rudolph::folder::GenerationConfig::default();
        let vae = rudolph::vae::VqganConfig::gumbelf8_sber();
        loaded.vae = Some(rudolph::vae::Vqgan::random(&vae, &device)?);
    }
    let options = ServeOptions {
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        api_key,
        max_body_bytes: args.max_body_mb << 20,
        max_image_side: args.max_image_side,
        timeout: Duration::from_secs(args.timeout),
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        model_id,
    };
    let log: rudolph::serve::Log = Arc::new(|line: &str| eprintln!("{line}"));
    let server = Server::new(loaded, options, log)?;
    let local = listener.local_addr()?;
    println!("listening on http://{local}");
    std::io::stdout().flush()?;
    runtime.block_on(server.serve(listener, shutdown_signal()))?;
    eprintln!("stopped");
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
