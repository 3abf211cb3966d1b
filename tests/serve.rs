//! `rudolph serve` from outside: the binary on an ephemeral loopback port with the built-in model,
//! called over real HTTP, and by the official `openai` Python package.

use base64::Engine as _;
use rudolph::world::{Background, Colour, Position, Scene, Shape, Size};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `rudolph serve`, stopped when dropped.
struct Served {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Served {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rudolph"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rudolph serve");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "no 'listening on' line: {line:?}; stderr: {}",
                    log.lock().unwrap()
                )
            })
            .to_string();
        Self { child, url, log }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// SIGTERM, then the exit status and everything logged.
    fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        (status, self.log.lock().unwrap().clone())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// POSTs `body` and returns the status and the JSON answer.
fn post(s: &Served, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(s.url(path)).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

fn post_raw(s: &Served, path: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(s.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

fn get(s: &Served, path: &str) -> (u16, String) {
    let r = client().get(s.url(path)).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// Server-Sent Events as (event name, data) pairs.
fn events(s: &Served, path: &str, body: &Value) -> Vec<(String, String)> {
    let text = client()
        .post(s.url(path))
        .json(body)
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.split("\n\n")
        .filter(|block| block.lines().any(|l| l.starts_with("data:")))
        .map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .filter_map(|l| l.strip_prefix(name))
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            (field("event:"), field("data:"))
        })
        .collect()
}

fn png_of(b64: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

fn b64_png(img: &image::RgbImage) -> String {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

fn scene(shape: Shape, colour: Colour) -> image::RgbImage {
    rudolph::world::render::render(&Scene::exact(
        Size::Big,
        colour,
        shape,
        Position::Left,
        Background::White,
    ))
}

/// Asserts an OpenAI error answer: the status, the field named, and words of the message.
fn assert_error(answer: (u16, Value), status: u16, param: Option<&str>, words: &[&str]) {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    let e = &body["error"];
    let message = e["message"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(e["type"].is_string(), "{body}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
    for w in words {
        assert!(message.contains(w), "«{w}» not in {message}");
    }
}

const STAR: &str = "большая красная звезда слева на белом фоне";

fn draw(s: &Served, seed: u64) -> String {
    let (status, body) = post(
        s,
        "/v1/images/generations",
        &json!({"prompt": STAR, "seed": seed, "candidates": 2}),
    );
    assert_eq!(status, 200, "{body}");
    body["data"][0]["b64_json"].as_str().unwrap().to_string()
}

#[test]
fn the_api_answers_as_openai_does_and_batches_concurrent_requests() {
    let s = Served::start(&["--max-batch", "8"]);
    let (status, health) = get(&s, "/health");
    assert_eq!(status, 200);
    assert!(health.contains("\"ok\""));
    let (_, models) = get(&s, "/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "rudolph-shapes");
    assert_eq!(models["data"][0]["native_size"], "64x64");

    // Pictures: PNG of the native size, the same for the same seed, and the same when drawn
    // beside other requests as alone.
    let (status, body) = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": STAR, "seed": 3, "n": 2, "candidates": 3, "size": "64x64"}),
    );
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(body["created"].is_u64());
    for d in data {
        let img = png_of(d["b64_json"].as_str().unwrap());
        assert_eq!(img.dimensions(), (64, 64));
        assert!(d["revised_prompt"].is_null());
        assert!(d["ppl_text"].as_f64().unwrap() > 0.0);
    }
    // The built-in model ranks its pictures as shown (its generation_config.json).
    let key = |d: &Value| d["ppl_decoded"].as_f64().unwrap();
    assert!(key(&data[0]) <= key(&data[1]), "{body}");
    let alone: Vec<String> = (10..16).map(|seed| draw(&s, seed)).collect();
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (10..16)
            .map(|seed| {
                let s = &s;
                scope.spawn(move || draw(s, seed))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        together, alone,
        "a picture drawn beside others is the one drawn alone"
    );
    assert!(metric(&s, "rudolph_decoding_steps_total") > 0.0);

    // As a URL, served for an hour.
    let (_, body) = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": STAR, "seed": 10, "candidates": 2, "response_format": "url"}),
    );
    let url = body["data"][0]["url"].as_str().unwrap();
    let png = client().get(url).send().unwrap().bytes().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(&png),
        alone[0]
    );

    // An image prompt: the top half of a picture on black is kept, under a prompt that asks for
    // white, so that the kept rows are the prompt's and not what the text would draw.
    let scene_png = rudolph::world::render::render(&Scene::exact(
        Size::Big,
        Colour::Green,
        Shape::Square,
        Position::Left,
        Background::Black,
    ));
    let (status, body) = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": "большой зелёный квадрат слева на белом фоне", "seed": 5,
                "candidates": 1, "image": b64_png(&scene_png), "borders": {"up": 4}}),
    );
    assert_eq!(status, 200, "{body}");
    let drawn = png_of(body["data"][0]["b64_json"].as_str().unwrap());
    let top_diff: u64 = (0..64)
        .flat_map(|x| (0..24).map(move |y| (x, y)))
        .map(|(x, y)| {
            let (a, b) = (drawn.get_pixel(x, y), scene_png.get_pixel(x, y));
            (0..3).map(|c| a[c].abs_diff(b[c]) as u64).sum::<u64>()
        })
        .sum();
    // The kept rows come back as the VQGAN reconstructs them: close to the scene, not equal.
    assert!(
        top_diff / (64 * 24 * 3) < 40,
        "mean difference {}",
        top_diff / (64 * 24 * 3)
    );

    // Streamed: partial pictures, then the one the same request draws without a stream.
    let stream = events(
        &s,
        "/v1/images/generations",
        &json!({"prompt": STAR, "seed": 4, "candidates": 1, "stream": true, "partial_images": 2}),
    );
    let names: Vec<&str> = stream.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (i, (_, data)) in stream[..2].iter().enumerate() {
        let d: Value = serde_json::from_str(data).unwrap();
        assert_eq!(d["partial_image_index"], i);
        assert_eq!(
            png_of(d["b64_json"].as_str().unwrap()).dimensions(),
            (64, 64)
        );
    }
    let done: Value = serde_json::from_str(&stream[2].1).unwrap();
    let (_, plain) = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": STAR, "seed": 4, "candidates": 1}),
    );
    assert_eq!(done["b64_json"], plain["data"][0]["b64_json"]);

    // Captions of a star, texts, classification and reranking.
    let star = b64_png(&scene(Shape::Star, Colour::Red));
    let circle = b64_png(&scene(Shape::Circle, Colour::Blue));
    let caption_request = json!({
        "model": "rudolph-shapes",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{star}")}}
        ]}],
        "n": 3,
        "seed": 1,
    });
    let (status, body) = post(&s, "/v1/chat/completions", &caption_request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let best = choices[0]["message"]["content"].as_str().unwrap();
    assert!(best.contains("звезда"), "{best}");
    assert_eq!(choices[0]["finish_reason"], "stop");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let mut streamed = caption_request.clone();
    streamed["stream"] = true.into();
    streamed["n"] = 1.into();
    let chunks = events(&s, "/v1/chat/completions", &streamed);
    assert_eq!(chunks.last().unwrap().1, "[DONE]");
    let text: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|(_, d)| {
            let d: Value = serde_json::from_str(d).unwrap();
            assert_eq!(d["object"], "chat.completion.chunk");
            d["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(text, best);

    let (status, body) = post(
        &s,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "маленький"}], "seed": 2}),
    );
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("маленький"), "{text}");

    let (status, body) = post(
        &s,
        "/v1/classify",
        &json!({"inputs": star, "parameters": {"candidate_labels": ["круг", "звезда", "квадрат"]}}),
    );
    assert_eq!(status, 200, "{body}");
    let labels = body.as_array().unwrap();
    assert_eq!(labels[0]["label"], "звезда", "{body}");
    let total: f64 = labels.iter().map(|l| l["score"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-6, "{body}");

    let (status, body) = post(
        &s,
        "/v1/rerank",
        &json!({"text": "большая синяя звезда слева на белом фоне", "images": [circle, star]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["index"], 1, "{body}");

    // Every malformed request is a 4xx naming its problem, and the server goes on.
    let images = "/v1/images/generations";
    assert_error(
        post_raw(&s, images, "{nope"),
        400,
        None,
        &["not valid JSON"],
    );
    assert_error(post_raw(&s, images, ""), 400, None, &["no body"]);
    let cases: [(Value, u16, &str, &str); 10] = [
        (json!({"n": 1}), 400, "prompt", "prompt"),
        (json!({"prompt": 5}), 400, "prompt", "string"),
        (
            json!({"prompt": STAR, "colour": 1}),
            400,
            "colour",
            "unknown field",
        ),
        (
            json!({"prompt": STAR, "size": "1024x1024"}),
            400,
            "size",
            "64x64",
        ),
        (json!({"prompt": STAR.repeat(20)}), 400, "prompt", "tokens"),
        (
            json!({"prompt": STAR, "n": 5, "candidates": 2}),
            400,
            "n",
            "candidates",
        ),
        (
            json!({"prompt": STAR, "partial_images": 2}),
            400,
            "partial_images",
            "stream",
        ),
        (
            json!({"prompt": STAR, "model": "dall-e-3"}),
            404,
            "model",
            "rudolph-shapes",
        ),
        (
            json!({"prompt": STAR, "temperature": -1}),
            400,
            "temperature",
            "temperature",
        ),
        (
            json!({"prompt": STAR, "guidance_scale": 99}),
            400,
            "guidance_scale",
            "10",
        ),
    ];
    for (body, status, param, word) in cases {
        assert_error(post(&s, images, &body), status, Some(param), &[word]);
    }
    let chat = "/v1/chat/completions";
    let picture = |url: &str| json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]});
    let field = "messages[0].content[0].image_url.url";
    assert_error(
        post(&s, chat, &picture("https://example.com/a.png")),
        400,
        Some(field),
        &["data URL"],
    );
    assert_error(
        post(&s, chat, &picture("data:image/png;base64,@@@")),
        400,
        Some(field),
        &["base64"],
    );
    assert_error(
        post(
            &s,
            chat,
            &picture(&format!(
                "data:image/png;base64,{}",
                b64_png_header(100_000)
            )),
        ),
        400,
        Some(field),
        &["too large"],
    );
    assert_error(
        post(
            &s,
            chat,
            &json!({"messages": [{"role": "system", "content": "x"}]}),
        ),
        400,
        Some("messages"),
        &["user"],
    );
    assert_error(
        post(
            &s,
            "/v1/classify",
            &json!({"inputs": star, "parameters": {"candidate_labels": []}}),
        ),
        400,
        Some("parameters.candidate_labels"),
        &["empty"],
    );
    assert_error(
        post(&s, "/v1/rerank", &json!({"text": STAR})),
        400,
        Some("images"),
        &["either"],
    );
    assert_error(
        post(
            &s,
            "/v1/rerank",
            &json!({"text": STAR, "codes": [[1, 2, 3]]}),
        ),
        400,
        Some("codes[0]"),
        &["64"],
    );
    let r = client().get(s.url(images)).send().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let (status, _) = get(&s, "/v2/nothing");
    assert_eq!(status, 404);
    let (status, _) = get(&s, "/health");
    assert_eq!(status, 200);

    let (_, metrics) = get(&s, "/metrics");
    assert!(
        metrics
            .contains("rudolph_requests_total{route=\"/v1/images/generations\",status=\"400\"} 11")
    );
    assert!(metrics.contains("rudolph_request_duration_seconds_bucket{route=\"/v1/classify\""));
    let (status, log) = s.stop();
    assert!(status.success(), "{status}: {log}");
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(lines.iter().any(|l| l["route"] == "/v1/rerank"
        && l["status"] == 200
        && l["request_id"].is_string()
        && l["latency_ms"].is_number()));
}

/// The start of a PNG that declares a `side × side` picture: the decoder must refuse it from its
/// header alone.
fn b64_png_header(side: u32) -> String {
    let small = image::RgbImage::new(1, 1);
    let mut out = std::io::Cursor::new(Vec::new());
    small.write_to(&mut out, image::ImageFormat::Png).unwrap();
    let mut png = out.into_inner();
    png[16..20].copy_from_slice(&side.to_be_bytes());
    png[20..24].copy_from_slice(&side.to_be_bytes());
    // The header's CRC, so that the decoder reads the size before anything else fails.
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn metric(s: &Served, name: &str) -> f64 {
    let (_, metrics) = get(s, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .parse()
        .unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "waited in vain for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn keys_limits_backpressure_timeouts_and_departing_clients() {
    let s = Served::start(&[
        "--max-batch",
        "2",
        "--max-queue",
        "0",
        "--max-body-mb",
        "1",
        "--api-key",
        "sesame",
    ]);
    let images = s.url("/v1/images/generations");
    let body = json!({"prompt": STAR, "candidates": 1, "seed": 1});
    let r = client().post(&images).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = client()
        .post(&images)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(get(&s, "/health").0, 200, "health needs no key");
    let r = client()
        .post(&images)
        .bearer_auth("sesame")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let huge = json!({"prompt": "x".repeat(2 << 20)});
    let r = client()
        .post(&images)
        .bearer_auth("sesame")
        .json(&huge)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let e: Value = r.json().unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-body-mb")
    );

    // Two long requests fill the batch and the (empty) queue; a third is told to come back.
    // Their clients then give up, and their rows are freed long before they would have ended.
    let long = json!({"prompt": STAR, "candidates": 256, "seed": 2});
    let impatient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            let (impatient, images, long) = (&impatient, &images, &long);
            scope.spawn(move || {
                let r = impatient
                    .post(images)
                    .bearer_auth("sesame")
                    .json(long)
                    .send();
                assert!(r.is_err(), "the client gave up before the answer");
            });
        }
        let gauge = |name: &str| {
            let (_, m) = {
                let r = client()
                    .get(s.url("/metrics"))
                    .bearer_auth("sesame")
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.text().unwrap())
            };
            m.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap()
                .parse::<f64>()
                .unwrap()
        };
        wait_for("two requests in progress", || {
            gauge("rudolph_requests_in_progress") == 2.0
        });
        let r = client()
            .post(&images)
            .bearer_auth("sesame")
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let started = Instant::now();
        wait_for("the departed clients' rows to be freed", || {
            gauge("rudolph_batch_rows") == 0.0 && gauge("rudolph_requests_in_progress") == 0.0
        });
        assert!(started.elapsed() < Duration::from_secs(20));
    });
    let r = client()
        .post(&images)
        .bearer_auth("sesame")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "the server goes on");
    let (status, log) = s.stop();
    assert!(status.success(), "{status}: {log}");

    // A request that outlives the server's limit is stopped with a 504.
    let s = Served::start(&["--timeout", "1"]);
    let (status, e) = post(
        &s,
        "/v1/images/generations",
        &json!({"prompt": STAR, "candidates": 256, "seed": 3}),
    );
    assert_eq!(status, 504, "{e}");
    assert_eq!(e["error"]["code"], "timeout");
    assert_eq!(metric(&s, "rudolph_batch_rows"), 0.0);
}

/// The official `openai` Python package draws a picture and captions it through the server
/// (`examples/openai_client.py`). `.ci/run` makes its virtual environment; elsewhere set
/// `RUDOLPH_OPENAI_PYTHON` to a Python that has `pip install -r examples/requirements.txt`.
#[test]
fn the_official_openai_python_client_draws_and_captions() {
    let python = std::env::var("RUDOLPH_OPENAI_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/openai-venv/bin/python").to_string()
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "no Python with the openai package at {python}: run .ci/run, or make a venv with \
         `pip install -r examples/requirements.txt` and set RUDOLPH_OPENAI_PYTHON to its python"
    );
    let s = Served::start(&[]);
    let out_dir = std::env::temp_dir().join(format!("rudolph-openai-{}", std::process::id()));
    let output = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/openai_client.py"
        ))
        .arg(&s.url)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let (status, _) = s.stop();
    assert!(status.success());
}
