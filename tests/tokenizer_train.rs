//! `train_bpe` and `rudolph tokenizer train`: trained models load, round-trip and compress.

mod common;

use common::scratch;

use std::path::PathBuf;
use std::process::{Command, Output};

use rudolph::tokenizer::{Bpe, TokenizerError, TrainOptions, train_bpe};

/// The fixture corpus; a missing fixture fails the test rather than skipping it.
fn corpus_path() -> PathBuf {
    let root = std::env::var_os("RUDOLPH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let path = root.join("tokenizer/corpus.txt");
    assert!(
        path.is_file(),
        "fixture {} not found: set RUDOLPH_FIXTURES to the fixtures root",
        path.display()
    );
    path
}

fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(corpus_path()).unwrap();
    text.lines().map(str::to_string).collect()
}

/// YTTM's whitespace handling: words are the maximal runs of non-spaces, joined by one space.
fn normalise(text: &str) -> String {
    text.split(|c: char| c.is_ascii_whitespace() || c == '\u{2581}')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn train(
    texts: &[String],
    vocab_size: usize,
) -> Result<rudolph::tokenizer::TrainedBpe, TokenizerError> {
    train_bpe(
        texts.iter().map(String::as_str),
        vocab_size,
        &TrainOptions::default(),
    )
}

#[test]
fn trained_model_loads_round_trips_and_compresses() {
    let texts = corpus();
    let model = train(&texts, 400).unwrap();
    assert_eq!(model.vocab_size(), 400);
    let dir = scratch("roundtrip");
    let path = dir.join("bpe.model");
    model.save(&path, false).unwrap();
    let bpe = Bpe::load(&path).unwrap();
    assert_eq!(bpe.vocab_size(), 400);
    let specials = bpe.special_ids();
    assert_eq!(
        (specials.unk, specials.pad, specials.bos, specials.eos),
        (1, Some(0), Some(2), Some(3))
    );
    let (mut n_ids, mut n_chars) = (0, 0);
    for text in &texts {
        let ids = bpe.encode(text);
        assert!(!ids.contains(&1), "unknown character in {text:?}: {ids:?}");
        assert_eq!(bpe.decode(&ids, &[]).unwrap(), normalise(text), "{text:?}");
        n_ids += ids.len();
        n_chars += normalise(text).chars().count();
    }
    assert!(
        n_ids * 2 < n_chars,
        "merges should at least halve the length: {n_ids} ids for {n_chars} characters"
    );
}

#[test]
fn file_format_is_yttm() {
    let model = train(&corpus(), 300).unwrap();
    let text = model.model_text();
    let lines: Vec<&str> = text.lines().collect();
    let head: Vec<usize> = lines[0].split(' ').map(|n| n.parse().unwrap()).collect();
    let (n_chars, n_merges) = (head[0], head[1]);
    assert_eq!((n_chars, n_merges), (model.n_chars(), model.n_merges()));
    assert_eq!(n_chars + n_merges + 4, 300);
    assert_eq!(lines.len(), 1 + n_chars + n_merges + 1);
    assert_eq!(*lines.last().unwrap(), "1 0 2 3");
    assert!(text.ends_with("1 0 2 3\n"));
    // Characters: `codepoint id`, ids 4.. in order, `▁` first.
    assert_eq!(lines[1], "9601 4");
    for (k, line) in lines[1..=n_chars].iter().enumerate() {
        let f: Vec<u32> = line.split(' ').map(|n| n.parse().unwrap()).collect();
        assert_eq!(f.len(), 2, "{line}");
        assert!(char::from_u32(f[0]).is_some());
        assert_eq!(f[1] as usize, 4 + k);
    }
    // Rules: `left right new`, new ids consecutive, operands defined earlier.
    for (k, line) in lines[1 + n_chars..1 + n_chars + n_merges]
        .iter()
        .enumerate()
    {
        let f: Vec<usize> = line.split(' ').map(|n| n.parse().unwrap()).collect();
        assert_eq!(f.len(), 3, "{line}");
        let z = 4 + n_chars + k;
        assert_eq!(f[2], z);
        assert!(f[0] >= 4 && f[0] < z && f[1] >= 4 && f[1] < z, "{line}");
    }
}

#[test]
fn training_is_deterministic() {
    let texts = corpus();
    let a = train(&texts, 350).unwrap();
    let b = train(&texts, 350).unwrap();
    assert_eq!(a.model_text(), b.model_text());
    // Input order does not matter either.
    let mut reversed = texts.clone();
    reversed.reverse();
    assert_eq!(train(&reversed, 350).unwrap().model_text(), a.model_text());
}

#[test]
fn merges_stop_when_no_pair_repeats() {
    let texts = vec!["ab ab".to_string(), "cd".to_string()];
    let model = train(&texts, 1000).unwrap();
    // ▁ a b c d; ▁+a, ▁a+b (twice each); nothing else occurs twice.
    assert_eq!((model.n_chars(), model.n_merges()), (5, 2));
    assert_eq!(model.vocab_size(), 11);
    let bpe = model.to_bpe().unwrap();
    assert_eq!(bpe.encode_pieces("ab cd"), vec!["▁ab", "▁", "c", "d"]);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let texts = corpus();
    let chars = train(&texts, 100_000).unwrap().n_chars();
    let e = train(&texts, chars + 3).unwrap_err().to_string();
    assert!(
        e.contains("too small") && e.contains(&format!("{}", chars + 4)),
        "{e}"
    );
    assert!(train(&texts, chars + 4).is_ok());

    for empty in [vec![], vec![String::new(), " \t ".to_string()]] {
        let e = train(&empty, 100).unwrap_err().to_string();
        assert!(e.contains("no text"), "{e}");
    }
    let bad = TrainOptions { coverage: 0.0 };
    let e = train_bpe(["a"], 100, &bad).unwrap_err().to_string();
    assert!(e.contains("coverage"), "{e}");
}

#[test]
fn save_refuses_to_overwrite() {
    let model = train(&corpus(), 300).unwrap();
    let dir = scratch("overwrite");
    let path = dir.join("bpe.model");
    std::fs::write(&path, "old").unwrap();
    let e = model.save(&path, false).unwrap_err();
    assert!(matches!(e, TokenizerError::Exists(_)), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
    model.save(&path, true).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), model.model_text());
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let e = model
        .save(dir.join("missing/bpe.model"), false)
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

fn rudolph(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudolph"))
        .args(args)
        .output()
        .expect("spawn rudolph")
}

#[test]
fn cli_trains_from_text_and_jsonl() {
    let dir = scratch("cli");
    let corpus_file = corpus_path();
    let out = dir.join("bpe.model");
    let o = rudolph(&[
        "tokenizer",
        "train",
        "--input",
        corpus_file.to_str().unwrap(),
        "--vocab-size",
        "300",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("vocab size 300"), "{stdout}");
    let from_cli = std::fs::read_to_string(&out).unwrap();
    assert_eq!(from_cli, train(&corpus(), 300).unwrap().model_text());

    // A second run without --force fails and leaves the file alone.
    let o = rudolph(&[
        "tokenizer",
        "train",
        "--input",
        corpus_file.to_str().unwrap(),
        "--vocab-size",
        "250",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), from_cli);

    // The same texts as JSONL give the same model.
    let jsonl = dir.join("data.jsonl");
    let lines: Vec<String> = corpus()
        .iter()
        .map(|t| serde_json::json!({ "image": "x.png", "text": t }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    let o = rudolph(&[
        "tokenizer",
        "train",
        "--jsonl",
        jsonl.to_str().unwrap(),
        "--vocab-size",
        "300",
        "-o",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), from_cli);

    // Unreadable input and malformed JSONL name the file.
    let missing = dir.join("nope.txt");
    let o = rudolph(&[
        "tokenizer",
        "train",
        "--input",
        missing.to_str().unwrap(),
        "--vocab-size",
        "300",
        "-o",
        dir.join("x.model").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.txt"));
    std::fs::write(&jsonl, "{\"text\": \"a\"}\n{\"caption\": \"b\"}\n").unwrap();
    let o = rudolph(&[
        "tokenizer",
        "train",
        "--jsonl",
        jsonl.to_str().unwrap(),
        "--vocab-size",
        "300",
        "-o",
        dir.join("x.model").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("data.jsonl:2"), "{stderr}");
    assert!(!dir.join("x.model").exists());
}
