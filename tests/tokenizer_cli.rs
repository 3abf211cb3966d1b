//! `rudolph tokenize` / `rudolph detokenize` through the built binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use rudolph::tokenizer::TextTokenizer;
use serde_json::Value;

fn model_path() -> PathBuf {
    let root = std::env::var_os("RUDOLPH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let path = root.join("tokenizer/bpe.model");
    assert!(
        path.is_file(),
        "fixture {} not found: set RUDOLPH_FIXTURES to the fixtures root",
        path.display()
    );
    path
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rudolph");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "rudolph failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Texts taken from the fixture cases, so the test follows whatever tokenizer is there.
fn sample_texts() -> Vec<String> {
    let path = model_path().with_file_name("tokenizer_cases.json");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut texts: Vec<String> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .filter(|t| !t.trim().is_empty() && !t.contains(['\n', '\r']))
        .collect();
    texts.truncate(2);
    assert_eq!(texts.len(), 2, "need two non-blank fixture texts");
    texts
}

#[test]
fn tokenize_json_matches_library() {
    let model = model_path();
    let tok = TextTokenizer::load(&model).unwrap();
    let texts = sample_texts();
    let mut args = vec![
        "tokenize",
        "--json",
        "--tokenizer",
        model.to_str().unwrap(),
        "--",
    ];
    args.extend(texts.iter().map(String::as_str));
    let stdout = stdout_ok(&run(&args, None));
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), texts.len());
    for (line, text) in lines.iter().zip(&texts) {
        assert_eq!(line["text"], *text);
        let ids: Vec<u32> = serde_json::from_value(line["ids"].clone()).unwrap();
        assert_eq!(ids, tok.bpe().encode(text));
        let pieces: Vec<String> = serde_json::from_value(line["pieces"].clone()).unwrap();
        assert_eq!(pieces, tok.bpe().encode_pieces(text));
    }

    // --stdin with --lower: one result per line, lowercased like the pipelines do.
    let input = texts.join("\n");
    let stdout = stdout_ok(&run(
        &[
            "tokenize",
            "--stdin",
            "--lower",
            "--json",
            "--tokenizer",
            model.to_str().unwrap(),
        ],
        Some(&input),
    ));
    for (line, text) in stdout.lines().zip(&texts) {
        let v: Value = serde_json::from_str(line).unwrap();
        let lowered = rudolph::tokenizer::lower_strip(text);
        assert_eq!(v["text"], *lowered);
        let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
        assert_eq!(ids, tok.bpe().encode(&lowered));
    }

    // The human-readable form lists the same ids.
    let stdout = stdout_ok(&run(
        &[
            "tokenize",
            "--tokenizer",
            model.to_str().unwrap(),
            "--",
            &texts[0],
        ],
        None,
    ));
    let ids: Vec<String> = tok
        .bpe()
        .encode(&texts[0])
        .iter()
        .map(u32::to_string)
        .collect();
    assert!(
        stdout.starts_with(&format!("ids: {}\npieces: ", ids.join(" "))),
        "{stdout}"
    );
}

#[test]
fn detokenize_round_trip() {
    let model = model_path();
    let m = model.to_str().unwrap();
    let tok = TextTokenizer::load(&model).unwrap();
    let texts = sample_texts();

    // JSON lines from tokenize feed detokenize directly.
    let mut args = vec!["tokenize", "--json", "--tokenizer", m, "--"];
    args.extend(texts.iter().map(String::as_str));
    let json = stdout_ok(&run(&args, None));
    let decoded = stdout_ok(&run(
        &["detokenize", "--stdin", "--tokenizer", m],
        Some(&json),
    ));
    let want: Vec<String> = texts
        .iter()
        .map(|t| tok.bpe().decode(&tok.bpe().encode(t), &[]).unwrap())
        .collect();
    assert_eq!(decoded.lines().collect::<Vec<_>>(), want);

    // Arguments, commas, and the wrapper framing: specials vanish unless --raw.
    let framed = tok.encode_text(&texts[0], 64);
    let list: Vec<String> = framed.iter().map(u32::to_string).collect();
    let comma = list.join(",");
    let out = stdout_ok(&run(&["detokenize", "--tokenizer", m, &comma], None));
    assert_eq!(
        out.trim_end_matches('\n'),
        tok.decode_text(&framed).unwrap()
    );
    let mut args = vec!["detokenize", "--raw", "--tokenizer", m];
    args.extend(list.iter().map(String::as_str));
    let out = stdout_ok(&run(&args, None));
    assert_eq!(
        out.trim_end_matches('\n'),
        tok.bpe().decode(&framed, &[]).unwrap()
    );
}

#[test]
fn errors_exit_non_zero_with_a_clear_message() {
    let model = model_path();
    let m = model.to_str().unwrap();
    let vocab = TextTokenizer::load(&model).unwrap().vocab_size();

    let missing = model.with_file_name("no-such-bpe.model");
    let out = run(
        &["tokenize", "--tokenizer", missing.to_str().unwrap(), "кот"],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-bpe.model"), "{err}");

    let bad = vocab.to_string();
    for raw in [true, false] {
        let mut args = vec!["detokenize", "--tokenizer", m, "2", &bad, "3"];
        if raw {
            args.push("--raw");
        }
        let out = run(&args, None);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&bad) && err.contains("vocab_size"), "{err}");
    }

    let out = run(&["detokenize", "--tokenizer", m, "12", "x"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`x`"));
}
