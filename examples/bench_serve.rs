//! A benchmark of `rudolph serve` from outside, as its clients see it. It starts the server as a
//! child process (`--binary serve --port 0` with `--server-args`), waits for its `listening on`
//! line, measures it over HTTP, and stops it with SIGTERM (also when a measurement fails).
//!
//!     cargo build --release && cargo run --release --example bench_serve -- --soak 2000
//!
//! `--server-args` and `--soak-server-args` are split at spaces. The numbers:
//!
//! Throughput, on `--server-args` (by default the 350M configuration with random weights and a
//! batch of 8). After one warm-up picture, the same `--requests` single-picture requests (`n` =
//! `candidates` = 1, the model's native size from `GET /v1/models`, fixed seeds) are sent one at
//! a time (sequential), then from `--clients` concurrent clients (concurrent).
//! - wall s: from the first request sent to the last answer read.
//! - pictures/s: pictures answered per second of wall time.
//! - p50 s, p99 s: one request's latency, from sending it to reading its whole answer (nearest
//!   rank: with few requests p99 is the slowest).
//! - concurrent / sequential: the concurrent phase's pictures/s over the sequential one's, what
//!   the shared batch gains.
//! - decoding steps, rows per step: the server's `rudolph_decoding_steps_total` over the
//!   concurrent phase, and its `rudolph_decoded_rows_total` over the same phase divided by the
//!   steps: the rows of an average step, what the shared batch holds. A picture drawn with
//!   guidance (the guidance the table's heading names; 1 is none) takes two rows.
//!
//! Soak, with `--soak N` (off by default), on a second server from `--soak-server-args` (by
//! default the built-in model, a batch of 8 and a queue of 16, so that the 32 clients of
//! `--soak-clients` overflow it): N requests, a mix of pictures (1 or 2 candidates), chat texts,
//! chat captions of a picture drawn first, classifications, reranks and health checks, every tenth
//! one malformed (invalid JSON, a missing prompt, a wrong size, an unknown field, wrong types, a
//! remote picture URL, an oversized count, a picture that is not base64, empty labels). It checks
//! - every valid request is answered 200, or 429 with a Retry-After header;
//! - every malformed one is answered 4xx with an `{"error": ...}` body (never 5xx);
//! - no request is lost: each gets a whole HTTP answer (lost: a connection error, a cut body, or
//!   no answer within 660 s, more than the server's default `--timeout`);
//! - the server exits with status 0 on SIGTERM.
//!
//! A client answered 429 waits as its Retry-After says before it sends its next request (the
//! refused one is counted, not sent again), so that the server stays full without every client
//! spinning on refusals.
//!
//! Memory, from the soak server's `/proc/PID/status`: rss baseline is its VmRSS once it is ready
//! (the model loaded); rss peak its VmHWM at the end, the peak having been reset once ready
//! (through `/proc/PID/clear_refs`, so that loading's transient peak does not count; the report
//! says if the kernel refused); rss end its VmRSS at the end. In MiB.
//!
//! Output: a table, then every number as one JSON object on one line (also written to `--json
//! FILE`). The exit status is 1 when a soak check failed or a server exited other than with 0; a
//! throughput request answered other than 200 stops the benchmark with an error.

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures_util::future::join_all;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The prompt every picture is drawn from: one the built-in model knows.
const PROMPT: &str = "большая красная звезда слева на белом фоне";
/// How long the server may take to load its model and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request may wait for its answer before it counts as lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(660);
/// The seed of the throughput phases' first picture; the warm-up draws with the one before.
const FIRST_SEED: u64 = 1000;
/// Lines of the server's stderr kept to explain its failure.
const STDERR_TAIL: usize = 40;
/// Soak failures described in the output; the rest are only counted.
const FAILURES_SHOWN: usize = 20;

/// Measures `rudolph serve` over HTTP: throughput with and without concurrent clients, and
/// optionally a soak test of mixed and malformed requests.
#[derive(Parser)]
struct Args {
    /// The server's binary.
    #[arg(long, default_value = "target/release/rudolph")]
    binary: PathBuf,
    /// Arguments after `serve --port 0` for the throughput server.
    #[arg(
        long,
        default_value = "--random-weights 350m --max-batch 8",
        allow_hyphen_values = true
    )]
    server_args: String,
    /// Pictures drawn in the concurrent throughput phase (each client draws its share one after
    /// another).
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Pictures drawn in the sequential phase (default: --requests).
    #[arg(long)]
    sequential_requests: Option<usize>,
    /// Clients of the concurrent throughput phase.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests of the soak test (0: no soak test).
    #[arg(long, default_value_t = 0)]
    soak: usize,
    /// Arguments after `serve --port 0` for the soak test's server.
    #[arg(
        long,
        default_value = "--max-batch 8 --max-queue 16",
        allow_hyphen_values = true
    )]
    soak_server_args: String,
    /// Concurrent clients of the soak test.
    #[arg(long, default_value_t = 32)]
    soak_clients: usize,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> Result<ExitCode> {
    let args = Args::parse();
    ensure!(
        args.requests > 0 && args.clients > 0,
        "--requests and --clients must be at least 1"
    );
    ensure!(args.soak_clients > 0, "--soak-clients must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()?;

    let (throughput, throughput_exit) = with_server(&args.binary, &args.server_args, |url, _| {
        runtime.block_on(measure_throughput(
            &client,
            url,
            args.sequential_requests.unwrap_or(args.requests),
            args.requests,
            args.clients,
        ))
    })?;
    throughput.print(&args.server_args, throughput_exit);
    let mut report = json!({ "throughput": throughput.json(&args.server_args, throughput_exit) });
    let mut passed = throughput_exit.success();

    if args.soak > 0 {
        let (soak, soak_exit) = with_server(&args.binary, &args.soak_server_args, |url, pid| {
            soak(&runtime, &client, url, pid, args.soak, args.soak_clients)
        })?;
        soak.print(&args.soak_server_args, soak_exit);
        report["soak"] = soak.json(&args.soak_server_args, soak_exit);
        passed &= soak.passed() && soak_exit.success();
    }

    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts a server with `server_args`, runs `measure` on its URL and process id, and stops it:
/// the measurement and the server's exit status. The server is stopped on errors too.
fn with_server<T>(
    binary: &Path,
    server_args: &str,
    measure: impl FnOnce(&str, u32) -> Result<T>,
) -> Result<(T, ExitStatus)> {
    let mut server = ServerProcess::start(binary, server_args)?;
    let measured = measure(&server.url, server.child.id())?;
    Ok((measured, server.stop()?))
}

/// `rudolph serve` running as a child process, stopped with SIGTERM when dropped.
struct ServerProcess {
    child: Child,
    /// Where it listens: `http://127.0.0.1:PORT`.
    url: String,
    /// The last lines of its stderr (its request log and errors).
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    /// The thread reading its stderr, which ends when the server exits.
    stderr_reader: Option<JoinHandle<()>>,
    stopped: bool,
}

impl ServerProcess {
    /// Starts `binary serve --port 0 ARGS` and waits for it to listen.
    fn start(binary: &Path, args: &str) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--port", "0"])
            .args(args.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with `cargo build --release`, or name it with \
                     --binary)",
                    binary.display()
                )
            })?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let stderr = child.stderr.take().context("the server's stderr")?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr_tail.clone();
        // Both pipes are read to their end, so that the server never blocks on a full one.
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let (listening, heard) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = listening.send(url.trim().to_string());
                }
            }
        });
        let mut server = Self {
            child,
            url: String::new(),
            stderr_tail,
            stderr_reader: Some(stderr_reader),
            stopped: false,
        };
        eprintln!(
            "bench_serve: starting {} serve --port 0 {args}",
            binary.display()
        );
        match heard.recv_timeout(READY_TIMEOUT) {
            Ok(url) => {
                server.url = url;
                Ok(server)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                "the server did not listen within {} s; its stderr ends:\n{}",
                READY_TIMEOUT.as_secs(),
                server.stderr_tail()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.stop()?;
                bail!(
                    "the server exited ({status}) before listening; its stderr ends:\n{}",
                    server.stderr_tail()
                )
            }
        }
    }

    /// Sends SIGTERM (unless the server has exited) and waits for the exit; kills the server if
    /// it outlives [`STOP_TIMEOUT`].
    fn stop(&mut self) -> Result<ExitStatus> {
        self.stopped = true;
        let status = match self.child.try_wait()? {
            Some(status) => status,
            None => {
                // SAFETY: a plain syscall on our own child's pid, which is not reaped yet (it
                // runs), so it cannot name another process.
                unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    if let Some(status) = self.child.try_wait()? {
                        break status;
                    }
                    if Instant::now() > deadline {
                        self.child.kill()?;
                        self.child.wait()?;
                        bail!(
                            "the server did not exit within {} s of SIGTERM and was killed; its \
                             stderr ends:\n{}",
                            STOP_TIMEOUT.as_secs(),
                            self.stderr_tail()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        Ok(status)
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        Vec::from(tail.clone()).join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.stopped
            && let Err(e) = self.stop()
        {
            eprintln!("bench_serve: {e:#}");
        }
    }
}

/// Runs `work(i)` for every `i` in `0..count` from `clients` concurrent clients, each taking the
/// next `i` once its previous request is answered: the results in the order of `i`, and the wall
/// time.
async fn from_clients<T, F: Future<Output = T>>(
    count: usize,
    clients: usize,
    work: impl Fn(usize) -> F,
) -> (Vec<T>, Duration) {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let loops = (0..clients.min(count)).map(|_| async {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return done;
            }
            done.push((i, work(i).await));
        }
    });
    let mut results: Vec<(usize, T)> = join_all(loops).await.into_iter().flatten().collect();
    let wall = started.elapsed();
    results.sort_by_key(|(i, _)| *i);
    (results.into_iter().map(|(_, t)| t).collect(), wall)
}

/// The served model as `GET /v1/models` describes it.
async fn model_info(client: &reqwest::Client, url: &str) -> Result<Value> {
    let models: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(models["data"][0].clone())
}

/// The model's native size, `WxH`, as requests name it.
fn native_size(model: &Value) -> Result<String> {
    model["native_size"]
        .as_str()
        .map(str::to_string)
        .context("GET /v1/models gave no data[0].native_size")
}

/// A request for the best of `candidates` pictures of [`PROMPT`].
fn picture_request(native_size: &str, seed: u64, candidates: usize) -> Value {
    json!({
        "prompt": PROMPT,
        "n": 1,
        "candidates": candidates,
        "size": native_size,
        "seed": seed,
        "response_format": "b64_json",
    })
}

/// Sends an image request that must be answered 200: the time to its whole answer, and its
/// picture (a base64 PNG).
async fn draw(client: &reqwest::Client, url: &str, request: &Value) -> Result<(Duration, String)> {
    let started = Instant::now();
    let response = client
        .post(format!("{url}/v1/images/generations"))
        .json(request)
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    let latency = started.elapsed();
    ensure!(
        status == reqwest::StatusCode::OK,
        "POST /v1/images/generations {request} was answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let answer: Value = serde_json::from_slice(&body)?;
    let picture = answer["data"][0]["b64_json"]
        .as_str()
        .context("the answer holds no data[0].b64_json")?;
    Ok((latency, picture.to_string()))
}

/// The shared batch's counters from `/metrics`: decoding steps, and rows summed over them.
async fn batch_counters(client: &reqwest::Client, url: &str) -> Result<(u64, u64)> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let counter = |name: &str| {
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .with_context(|| format!("/metrics has no counter {name}"))
    };
    Ok((
        counter("rudolph_decoding_steps_total")?,
        counter("rudolph_decoded_rows_total")?,
    ))
}

/// The throughput test's results.
struct Throughput {
    model: String,
    native_size: String,
    guidance: Option<f64>,
    sequential: Phase,
    concurrent: Phase,
    /// Over the concurrent phase.
    decoding_steps: u64,
    decoded_rows: u64,
}

/// One throughput phase: its clients, wall time, and each request's latency.
struct Phase {
    clients: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

async fn measure_throughput(
    client: &reqwest::Client,
    url: &str,
    sequential_requests: usize,
    requests: usize,
    clients: usize,
) -> Result<Throughput> {
    let model = model_info(client, url).await?;
    let native_size = native_size(&model)?;
    draw(
        client,
        url,
        &picture_request(&native_size, FIRST_SEED - 1, 1),
    )
    .await
    .context("the warm-up picture")?;
    let phase = |requests: usize, clients: usize| {
        let native_size = &native_size;
        async move {
            let (answers, wall) = from_clients(requests, clients, |i| {
                let request = picture_request(native_size, FIRST_SEED + i as u64, 1);
                async move { draw(client, url, &request).await }
            })
            .await;
            let latencies = answers
                .into_iter()
                .map(|a| a.map(|(latency, _)| latency))
                .collect::<Result<_>>()?;
            anyhow::Ok(Phase {
                clients,
                wall,
                latencies,
            })
        }
    };
    let sequential = phase(sequential_requests, 1)
        .await
        .context("the sequential phase")?;
    let (steps_before, rows_before) = batch_counters(client, url).await?;
    let concurrent = phase(requests, clients)
        .await
        .context("the concurrent phase")?;
    let (steps_after, rows_after) = batch_counters(client, url).await?;
    Ok(Throughput {
        model: model["id"].as_str().unwrap_or("?").to_string(),
        native_size,
        guidance: model["defaults"]["images"]["guidance_scale"].as_f64(),
        sequential,
        concurrent,
        decoding_steps: steps_after - steps_before,
        decoded_rows: rows_after - rows_before,
    })
}

impl Phase {
    fn pictures_per_s(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    /// The latency below which a share `p` of the requests were answered (nearest rank), in
    /// seconds.
    fn percentile_s(&self, p: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64()
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.latencies.len(),
            "clients": self.clients,
            "wall_s": self.wall.as_secs_f64(),
            "pictures_per_s": self.pictures_per_s(),
            "p50_s": self.percentile_s(0.50),
            "p99_s": self.percentile_s(0.99),
        })
    }
}

impl Throughput {
    fn ratio(&self) -> f64 {
        self.concurrent.pictures_per_s() / self.sequential.pictures_per_s()
    }

    fn rows_per_step(&self) -> f64 {
        self.decoded_rows as f64 / self.decoding_steps.max(1) as f64
    }

    fn print(&self, server_args: &str, exit: ExitStatus) {
        let guidance = self.guidance.map_or("?".into(), |g| format!("{g:.2}"));
        println!(
            "\nthroughput: {} ({}, guidance {guidance}), serve {server_args}",
            self.model, self.native_size
        );
        println!(
            "{:<11} {:>8} {:>7} {:>9} {:>10} {:>8} {:>8}",
            "phase", "requests", "clients", "wall s", "pictures/s", "p50 s", "p99 s"
        );
        for (name, phase) in [
            ("sequential", &self.sequential),
            ("concurrent", &self.concurrent),
        ] {
            println!(
                "{name:<11} {:>8} {:>7} {:>9.2} {:>10.3} {:>8.2} {:>8.2}",
                phase.latencies.len(),
                phase.clients,
                phase.wall.as_secs_f64(),
                phase.pictures_per_s(),
                phase.percentile_s(0.50),
                phase.percentile_s(0.99)
            );
        }
        println!("concurrent / sequential pictures/s: {:.2}x", self.ratio());
        println!(
            "concurrent phase: {} decoding steps, {} rows, {:.2} rows per step",
            self.decoding_steps,
            self.decoded_rows,
            self.rows_per_step()
        );
        println!("server exit: {exit}");
    }

    fn json(&self, server_args: &str, exit: ExitStatus) -> Value {
        json!({
            "server_args": server_args,
            "model": self.model,
            "native_size": self.native_size,
            "guidance_scale": self.guidance,
            "sequential": self.sequential.json(),
            "concurrent": self.concurrent.json(),
            "concurrent_over_sequential": self.ratio(),
            "decoding_steps": self.decoding_steps,
            "decoded_rows": self.decoded_rows,
            "rows_per_step": self.rows_per_step(),
            "server_exit": exit_json(exit),
        })
    }
}

/// An exit status as JSON: its code, or how it ended without one (a signal).
fn exit_json(exit: ExitStatus) -> Value {
    exit.code()
        .map_or_else(|| exit.to_string().into(), Value::from)
}

/// One request of the soak test.
struct Planned {
    /// What it asks (valid) or how it is wrong (malformed).
    category: &'static str,
    malformed: bool,
    path: &'static str,
    /// The body of a POST; none for a GET.
    body: Option<String>,
}

const IMAGES: &str = "/v1/images/generations";
const CHAT: &str = "/v1/chat/completions";
const CLASSIFY: &str = "/v1/classify";
const RERANK: &str = "/v1/rerank";

/// The soak test's `i`-th request: every tenth one malformed, each malformation in turn; the
/// others each valid kind in turn. `png` is a picture of the model's size, in base64.
fn plan(i: usize, png: &str, native_size: &str) -> Planned {
    let malformed = i % 10 == 9;
    let post = |category, path, body: Value| Planned {
        category,
        malformed,
        path,
        body: Some(body.to_string()),
    };
    let seed = i as u64;
    let chat = |content: Value| json!({"messages": [{"role": "user", "content": content}], "candidates": 2, "seed": seed});
    let caption = |url: &str| chat(json!([{"type": "image_url", "image_url": {"url": url}}]));
    let labels = json!(["звезда", "круг"]);
    if !malformed {
        return match i % 6 {
            0 => post(
                "image",
                IMAGES,
                picture_request(native_size, seed, 1 + (i / 6) % 2),
            ),
            1 => post("chat_text", CHAT, chat(json!("большая"))),
            2 => post(
                "chat_caption",
                CHAT,
                caption(&format!("data:image/png;base64,{png}")),
            ),
            3 => post(
                "classify",
                CLASSIFY,
                json!({"inputs": png, "parameters": {"candidate_labels": labels}}),
            ),
            4 => post(
                "rerank",
                RERANK,
                json!({"text": "красная звезда", "images": [png, png]}),
            ),
            _ => Planned {
                category: "health",
                malformed,
                path: "/health",
                body: None,
            },
        };
    }
    match (i / 10) % 9 {
        0 => Planned {
            category: "invalid_json",
            malformed,
            path: IMAGES,
            body: Some(format!(r#"{{"prompt": "{PROMPT}", "n": "#)),
        },
        1 => post(
            "missing_prompt",
            IMAGES,
            json!({"n": 1, "size": native_size}),
        ),
        2 => post(
            "wrong_size",
            IMAGES,
            json!({"prompt": PROMPT, "size": "100x100"}),
        ),
        3 => post(
            "unknown_field",
            CHAT,
            json!({"messages": [{"role": "user", "content": "большая"}], "colour": "red"}),
        ),
        4 => post("wrong_types", RERANK, json!({"text": 5, "images": "png"})),
        5 => post(
            "remote_image_url",
            CHAT,
            caption("https://example.com/star.png"),
        ),
        6 => post(
            "oversized_count",
            IMAGES,
            json!({"prompt": PROMPT, "n": 100_000, "candidates": 100_000}),
        ),
        7 => post(
            "bad_base64_picture",
            CLASSIFY,
            json!({"inputs": "not base64 at all!", "parameters": {"candidate_labels": labels}}),
        ),
        _ => post(
            "empty_labels",
            CLASSIFY,
            json!({"inputs": png, "parameters": {"candidate_labels": []}}),
        ),
    }
}

/// What a soak request got.
enum Outcome {
    Answered {
        status: u16,
        /// The Retry-After header, in seconds.
        retry_after: Option<Duration>,
        /// Whether the body is `{"error": {...}}`.
        error_body: bool,
        /// The body's beginning, to describe a failure.
        excerpt: String,
    },
    /// No whole answer: why.
    Lost(String),
}

async fn send(client: &reqwest::Client, url: &str, planned: &Planned) -> Outcome {
    let request = match &planned.body {
        Some(body) => client
            .post(format!("{url}{}", planned.path))
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone()),
        None => client.get(format!("{url}{}", planned.path)),
    };
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Lost(format!("{e:#}")),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .map(Duration::from_secs);
    match response.bytes().await {
        Ok(body) => Outcome::Answered {
            status,
            retry_after,
            error_body: serde_json::from_slice::<Value>(&body)
                .is_ok_and(|v| v["error"].is_object()),
            excerpt: String::from_utf8_lossy(&body).chars().take(300).collect(),
        },
        Err(e) => Outcome::Lost(format!("answered {status}, but its body was cut: {e:#}")),
    }
}

/// What is wrong with `outcome` as the answer to `planned`, if anything.
fn fault(planned: &Planned, outcome: &Outcome) -> Option<String> {
    let what = format!(
        "{} {} request ({})",
        if planned.malformed {
            "malformed"
        } else {
            "valid"
        },
        planned.category,
        planned.path
    );
    let (status, retry_after, error_body, excerpt) = match outcome {
        Outcome::Lost(why) => return Some(format!("{what} lost: {why}")),
        Outcome::Answered {
            status,
            retry_after,
            error_body,
            excerpt,
        } => (*status, retry_after.is_some(), *error_body, excerpt),
    };
    let wrong = match (planned.malformed, status) {
        (false, 200) => None,
        (false, 429) if retry_after => None,
        (false, 429) => Some("429 without a Retry-After in seconds"),
        (false, _) => Some("neither 200 nor 429"),
        (true, 400..=499) if error_body => None,
        (true, 400..=499) => Some("4xx without an {\"error\": ...} body"),
        (true, _) => Some("not 4xx"),
    }?;
    Some(format!("{what} answered {status}, {wrong}: {excerpt}"))
}

/// The soak test's results.
struct Soak {
    requests: usize,
    clients: usize,
    wall: Duration,
    /// By category: whether malformed, and its answers by status (`lost`: none).
    categories: BTreeMap<&'static str, (bool, BTreeMap<String, usize>)>,
    failures: Vec<String>,
    /// Resident memory in MiB: once ready, at its peak since, and at the end.
    rss_baseline: f64,
    rss_peak: f64,
    rss_end: f64,
    /// Whether the peak was reset once ready (else it includes loading).
    peak_since_ready: bool,
}

fn soak(
    runtime: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    url: &str,
    pid: u32,
    requests: usize,
    clients: usize,
) -> Result<Soak> {
    let (rss_baseline, _) = memory(pid)?;
    // Writing 5 to clear_refs resets the process's peak resident memory (VmHWM) to now.
    let peak_since_ready = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let (plans, outcomes, wall) = runtime.block_on(async {
        let native_size = native_size(&model_info(client, url).await?)?;
        let (_, png) = draw(client, url, &picture_request(&native_size, 0, 1))
            .await
            .context("the picture the soak test sends")?;
        let plans: Vec<Planned> = (0..requests).map(|i| plan(i, &png, &native_size)).collect();
        let (outcomes, wall) = from_clients(requests, clients, |i| {
            let planned = &plans[i];
            async move {
                let outcome = send(client, url, planned).await;
                // As a polite client, it waits as a 429 asks before its next request.
                if let Outcome::Answered {
                    status: 429,
                    retry_after: Some(wait),
                    ..
                } = outcome
                {
                    tokio::time::sleep(wait).await;
                }
                outcome
            }
        })
        .await;
        anyhow::Ok((plans, outcomes, wall))
    })?;
    let (rss_end, rss_peak) = memory(pid)?;
    let mut categories: BTreeMap<&str, (bool, BTreeMap<String, usize>)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (planned, outcome) in plans.iter().zip(&outcomes) {
        let status = match outcome {
            Outcome::Answered { status, .. } => status.to_string(),
            Outcome::Lost(_) => "lost".to_string(),
        };
        let (_, statuses) = categories
            .entry(planned.category)
            .or_insert_with(|| (planned.malformed, BTreeMap::new()));
        *statuses.entry(status).or_default() += 1;
        failures.extend(fault(planned, outcome));
    }
    Ok(Soak {
        requests,
        clients,
        wall,
        categories,
        failures,
        rss_baseline,
        rss_peak,
        rss_end,
        peak_since_ready,
    })
}

/// The resident memory of process `pid` now (VmRSS) and at its peak (VmHWM), in MiB.
fn memory(pid: u32) -> Result<(f64, f64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().strip_suffix(" kB"))
            .and_then(|kb| kb.trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Answers counted over the categories that are malformed or not.
#[derive(Default)]
struct Tally {
    requests: usize,
    by_status: BTreeMap<String, usize>,
}

impl Soak {
    fn tally(&self, malformed: bool) -> Tally {
        let mut tally = Tally::default();
        for (_, statuses) in self.categories.values().filter(|(m, _)| *m == malformed) {
            for (status, n) in statuses {
                tally.requests += n;
                *tally.by_status.entry(status.clone()).or_default() += n;
            }
        }
        tally
    }

    fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn print(&self, server_args: &str, exit: ExitStatus) {
        println!(
            "\nsoak: {} requests from {} clients in {:.1} s, serve {server_args}",
            self.requests,
            self.clients,
            self.wall.as_secs_f64()
        );
        println!(
            "{:<20} {:<9} {:>8}  answers",
            "category", "kind", "requests"
        );
        for (category, (malformed, statuses)) in &self.categories {
            let kind = if *malformed { "malformed" } else { "valid" };
            let answers: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!(
                "{category:<20} {kind:<9} {:>8}  {}",
                statuses.values().sum::<usize>(),
                answers.join(", ")
            );
        }
        for (kind, tally) in [
            ("valid", self.tally(false)),
            ("malformed", self.tally(true)),
        ] {
            let answers: Vec<String> = tally
                .by_status
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect();
            println!(
                "{kind}: {} requests; {}",
                tally.requests,
                answers.join(", ")
            );
        }
        println!(
            "server rss: baseline {:.1} MiB, peak {:.1} MiB (+{:.1}{}), end {:.1} MiB",
            self.rss_baseline,
            self.rss_peak,
            self.rss_peak - self.rss_baseline,
            if self.peak_since_ready {
                ""
            } else {
                ", peak includes loading"
            },
            self.rss_end
        );
        println!("server exit: {exit}");
        if self.passed() && exit.success() {
            println!("soak checks: passed");
        } else {
            println!(
                "soak checks: FAILED ({} failed requests)",
                self.failures.len()
            );
            for failure in self.failures.iter().take(FAILURES_SHOWN) {
                println!("  {failure}");
            }
        }
    }

    fn json(&self, server_args: &str, exit: ExitStatus) -> Value {
        let categories: serde_json::Map<String, Value> = self
            .categories
            .iter()
            .map(|(category, (malformed, statuses))| {
                let value = json!({
                    "malformed": malformed,
                    "requests": statuses.values().sum::<usize>(),
                    "statuses": statuses,
                });
                (category.to_string(), value)
            })
            .collect();
        let tally = |t: Tally| json!({"requests": t.requests, "statuses": t.by_status});
        let count = |malformed: bool, status: &str| {
            self.tally(malformed)
                .by_status
                .get(status)
                .copied()
                .unwrap_or(0)
        };
        json!({
            "server_args": server_args,
            "requests": self.requests,
            "clients": self.clients,
            "wall_s": self.wall.as_secs_f64(),
            "by_category": categories,
            "valid": tally(self.tally(false)),
            "malformed": tally(self.tally(true)),
            "answered_429": count(false, "429"),
            "lost": count(false, "lost") + count(true, "lost"),
            "failures": self.failures.len(),
            "failure_examples": &self.failures[..self.failures.len().min(FAILURES_SHOWN)],
            "rss_baseline_mb": self.rss_baseline,
            "rss_peak_mb": self.rss_peak,
            "rss_end_mb": self.rss_end,
            "rss_peak_minus_baseline_mb": self.rss_peak - self.rss_baseline,
            "rss_peak_since_ready": self.peak_since_ready,
            "server_exit": exit_json(exit),
            "passed": self.passed() && exit.success(),
        })
    }
}
