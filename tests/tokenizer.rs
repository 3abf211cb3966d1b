//! Tokenizer goldens (`tokenizer/` in the fixture folder) plus a tiny model of youtokentome 1.0.6,
//! malformed-model errors, BPE-dropout and property tests.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rudolph::tokenizer::{Bpe, TextTokenizer, TokenizerError, lower_strip};
use serde_json::Value;

fn tokenizer_dir() -> PathBuf {
    let root = std::env::var_os("RUDOLPH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let dir = root.join("tokenizer");
    assert!(
        dir.is_dir(),
        "fixture folder {} not found: set RUDOLPH_FIXTURES to the fixtures root",
        dir.display()
    );
    dir
}

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = tokenizer_dir().join("bpe.model");
        TextTokenizer::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

fn read_json(name: &str) -> Value {
    let path = tokenizer_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an id list, got {v}"))
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn strings_of(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a string list, got {v}"))
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

/// `{"8": …, "16": …}` → `[(8, …), (16, …)]`.
fn per_length(v: &Value) -> Vec<(usize, &Value)> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected an object keyed by length, got {v}"))
        .iter()
        .map(|(k, v)| (k.parse().expect("length key"), v))
        .collect()
}

#[test]
fn model_header_matches_fixture() {
    let cases = read_json("tokenizer_cases.json");
    let tok = tokenizer();
    assert_eq!(
        tok.vocab_size() as u64,
        cases["vocab_size"].as_u64().unwrap()
    );
    let sp = tok.bpe().special_ids();
    let want = &cases["special_ids"];
    assert_eq!(u64::from(sp.unk), want["unk"].as_u64().unwrap());
    assert_eq!(sp.pad.map(u64::from), want["pad"].as_u64());
    assert_eq!(sp.bos.map(u64::from), want["bos"].as_u64());
    assert_eq!(sp.eos.map(u64::from), want["eos"].as_u64());
    let mut ignore = ids_of(&cases["wrapper_ignore_ids_in_decode_text"]);
    let mut ours = TextTokenizer::SPECIAL_IDS.to_vec();
    ignore.sort();
    ours.sort();
    assert_eq!(ignore, ours);
}

#[test]
fn vocab_json_equals_id_to_piece() {
    let vocab = strings_of(&read_json("vocab.json"));
    let bpe = tokenizer().bpe();
    assert_eq!(vocab.len(), bpe.vocab_size());
    for (id, piece) in vocab.iter().enumerate() {
        assert_eq!(bpe.id_to_piece(id as u32).unwrap(), piece, "id {id}");
        let back = bpe.piece_to_id(piece).unwrap();
        assert_eq!(bpe.id_to_piece(back).unwrap(), piece);
    }
    assert!(bpe.id_to_piece(vocab.len() as u32).is_err());
}

#[test]
fn every_encoding_case() {
    let cases = read_json("tokenizer_cases.json");
    let tok = tokenizer();
    let bpe = tok.bpe();
    let list = cases["cases"].as_array().expect("cases");
    assert!(!list.is_empty());
    let mut checks = 0;
    for case in list {
        let text = case["text"].as_str().expect("text");
        let ctx = format!("text {text:?}");
        let ids = ids_of(&case["ids"]);
        assert_eq!(bpe.encode(text), ids, "ids, {ctx}");
        assert_eq!(bpe.encode_bytes(text.as_bytes()), ids, "bytes, {ctx}");
        assert_eq!(
            bpe.encode_pieces(text),
            strings_of(&case["subwords"]),
            "subwords, {ctx}"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            bpe.encode_with_dropout(text, 0.0, &mut rng).unwrap(),
            ids,
            "dropout 0, {ctx}"
        );
        assert_eq!(
            bpe.decode(&ids, &[]).unwrap(),
            case["decode_raw"].as_str().expect("decode_raw"),
            "decode_raw, {ctx}"
        );
        for (len, want) in per_length(&case["encode_text"]) {
            assert_eq!(
                tok.encode_text(text, len),
                ids_of(want),
                "encode_text[{len}], {ctx}"
            );
        }
        for (len, want) in per_length(&case["decode_text"]) {
            let encoded = tok.encode_text(text, len);
            assert_eq!(
                tok.decode_text(&encoded).unwrap(),
                want.as_str().expect("decode_text"),
                "decode_text[{len}], {ctx}"
            );
        }
        let lowered = lower_strip(text);
        assert_eq!(
            lowered,
            case["lower_strip"].as_str().unwrap(),
            "lower_strip, {ctx}"
        );
        for (len, want) in per_length(&case["lower_strip_encode_text"]) {
            assert_eq!(
                tok.encode_text(&lowered, len),
                ids_of(want),
                "lower_strip_encode_text[{len}], {ctx}"
            );
        }
        checks += 1;
    }
    assert_eq!(checks, list.len());
}

#[test]
fn every_decode_case() {
    let cases = read_json("tokenizer_cases.json");
    let tok = tokenizer();
    let list = cases["decode_cases"].as_array().expect("decode_cases");
    assert!(!list.is_empty());
    for case in list {
        let ids = ids_of(&case["ids"]);
        let raw = tok.bpe().decode(&ids, &[]);
        let text = tok.decode_text(&ids);
        match (&case["decode_raw"], &case["decode_raw_error"]) {
            (Value::String(want), Value::Null) => assert_eq!(&raw.unwrap(), want, "{ids:?}"),
            (Value::Null, Value::String(err)) => {
                assert!(raw.is_err(), "{ids:?} must fail like {err}")
            }
            other => panic!("decode case {ids:?}: unexpected fields {other:?}"),
        }
        match (&case["decode_text"], &case["decode_text_error"]) {
            (Value::String(want), Value::Null) => assert_eq!(&text.unwrap(), want, "{ids:?}"),
            (Value::Null, Value::String(err)) => {
                assert!(text.is_err(), "{ids:?} must fail like {err}")
            }
            other => panic!("decode case {ids:?}: unexpected fields {other:?}"),
        }
    }
}

#[test]
fn out_of_range_id_error_names_id_and_vocab_size() {
    let bpe = tokenizer().bpe();
    let n = bpe.vocab_size() as u32;
    let err = bpe.decode(&[4, n + 7], &[]).unwrap_err().to_string();
    assert!(err.contains(&(n + 7).to_string()), "{err}");
    assert!(err.contains(&n.to_string()), "{err}");
    // Ignored ids are skipped before the range check, as in the original.
    assert!(bpe.decode(&[n + 7], &[n + 7]).unwrap().is_empty());
}

/// A tiny model built with youtokentome 1.0.6 and its outputs.
const APPENDIX_B: &str = "25 31;1089 18;1081 22;1073 20;1086 11;1099 25;1078 19;104 23;1088 5;101 24;114 27;1080 6;1072 7;119 26;1085 12;111 21;1077 8;1090 10;1082 9;9601 4;108 13;1074 17;1087 14;100 28;1079 16;1084 15;4 14 29;4 9 30;6 17 31;29 5 32;31 8 33;33 10 34;32 34 35;11 20 36;5 7 37;12 7 38;4 15 39;39 6 40;40 5 41;4 38 42;37 19 43;43 8 44;36 44 45;16 45 46;30 7 47;6 46 48;47 5 49;4 48 50;49 10 51;24 13 52;51 6 53;52 13 54;53 12 55;54 21 56;55 9 57;23 56 58;57 8 59;1 0 2 3";

fn appendix_b() -> Bpe {
    Bpe::from_str_model(&APPENDIX_B.replace(';', "\n"), "appendix-b").unwrap()
}

/// input, ids, subwords, decode, decode ignoring specials.
type AppendixRow = (
    &'static str,
    &'static [u32],
    &'static [&'static str],
    &'static str,
    &'static str,
);

#[test]
fn appendix_b_table() {
    let bpe = appendix_b();
    assert_eq!(bpe.vocab_size(), 60);
    let specials = [0, 1, 2, 3];
    #[rustfmt::skip]
    let table: &[AppendixRow] = &[
        ("привет мир", &[35, 41], &["▁привет", "▁мир"], "привет мир", "привет мир"),
        ("  привет   мир  ", &[35, 41], &["▁привет", "▁мир"], "привет мир", "привет мир"),
        ("привет\tмир\n", &[35, 41], &["▁привет", "▁мир"], "привет мир", "привет мир"),
        ("q привет", &[4, 1, 35], &["▁", "q", "▁привет"], "<UNK> привет", " привет"),
        ("приqqzвет", &[32, 6, 1, 17, 8, 10], &["▁пр", "и", "qqz", "в", "е", "т"], "при<UNK>вет", "привет"),
        ("HELLO", &[4, 1], &["▁", "HELLO"], "<UNK>", ""),
        ("▁привет", &[35], &["▁привет"], "привет", "привет"),
        ("мир▁мир", &[41, 41], &["▁мир", "▁мир"], "мир мир", "мир мир"),
        ("ab\u{a0}cd", &[4, 1, 28], &["▁", "ab\u{a0}c", "d"], "<UNK>d", "d"),
        ("на картинке изображена собака", &[42, 59, 50, 38, 4, 18, 36, 7, 9, 7],
         &["▁на", "▁картинке", "▁изображе", "на", "▁", "с", "об", "а", "к", "а"],
         "на картинке изображена собака", "на картинке изображена собака"),
        ("hello world", &[4, 58, 4, 26, 21, 27, 13, 28], &["▁", "hello", "▁", "w", "o", "r", "l", "d"],
         "hello world", "hello world"),
        ("", &[], &[], "", ""),
    ];
    for &(text, ids, pieces, raw, ignored) in table {
        assert_eq!(bpe.encode(text), ids, "{text:?}");
        assert_eq!(bpe.encode_pieces(text), pieces, "{text:?}");
        assert_eq!(bpe.decode(ids, &[]).unwrap(), raw, "{text:?}");
        assert_eq!(bpe.decode(ids, &specials).unwrap(), ignored, "{text:?}");
    }
    let framed = [2, 35, 41, 3, 0, 0];
    assert_eq!(
        bpe.decode(&framed, &[]).unwrap(),
        "<BOS> привет мир<EOS><PAD><PAD>"
    );
    assert_eq!(bpe.decode(&framed, &specials).unwrap(), "привет мир");
}

fn parse_err(model: &str) -> String {
    match Bpe::from_str_model(model, "m.model") {
        Ok(_) => panic!("{model:?} must be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_models_name_file_line_and_expectation() {
    let good = "3 1\n9601 4\n97 5\n98 6\n5 6 7\n1 0 2 3\n";
    assert!(Bpe::from_str_model(good, "m.model").is_ok());

    let e = parse_err("3 1\n9601 4\n97 x\n98 6\n5 6 7\n1 0 2 3\n");
    assert!(
        e.contains("m.model")
            && e.contains("line 3")
            && e.contains("codepoint id")
            && e.contains("`x`"),
        "{e}"
    );
    let e = parse_err("3 1\n9601 4\n97 5\n98 6\n5 6 7\n");
    assert!(e.contains("end of file") && e.contains("unk_id"), "{e}");
    let e = parse_err("3 1\n9601 4\n97 5\n98 6\n");
    assert!(e.contains("truncated") && e.contains("rule 1 of 1"), "{e}");
    let e = parse_err("3 1\n9600 4\n97 5\n98 6\n5 6 7\n1 0 2 3\n");
    assert!(e.contains("U+2581"), "{e}");
    let e = parse_err("3 1\n9601 4\n97 5\n98 60\n5 6 7\n1 0 2 3\n");
    assert!(
        e.contains("line 4") && e.contains("60") && e.contains("out of range"),
        "{e}"
    );
    let e = parse_err("3 1\n9601 4\n97 5\n98 5\n5 6 7\n1 0 2 3\n");
    assert!(
        e.contains("line 4") && e.contains("already used on line 3"),
        "{e}"
    );
    let e = parse_err("3 1\n9601 4\n97 5\n98 6\n5 0 7\n1 0 2 3\n");
    assert!(e.contains("line 5") && e.contains("right id 0"), "{e}");
    let e = parse_err("3 1\n9601 4\n97 5\n55296 6\n5 6 7\n1 0 2 3\n");
    assert!(e.contains("line 4") && e.contains("55296"), "{e}");
    let e = parse_err("3 1\n9601 4\n97 5\n98 6\n5 6 7\n-1 0 2 3\n");
    assert!(e.contains("line 6") && e.contains("unk_id"), "{e}");
    let e = parse_err("3 1\n9601 4\n97 5\n98 6\n5 6 7\n1 0 2 3 9\n");
    assert!(e.contains("line 6") && e.contains("`9`"), "{e}");

    let missing = std::env::temp_dir().join("rudolph-no-such-dir/bpe.model");
    let e = Bpe::load(&missing).unwrap_err();
    assert!(matches!(e, TokenizerError::Io { .. }));
    assert!(e.to_string().contains("rudolph-no-such-dir"), "{e}");
}

#[test]
fn missing_specials_shrink_the_vocabulary() {
    let bpe = Bpe::from_str_model("3 1\n9601 1\n97 2\n98 3\n2 3 4\n0 -1 -1 -1\n", "m").unwrap();
    assert_eq!(bpe.vocab_size(), 5);
    assert_eq!(bpe.special_ids().pad, None);
    assert_eq!(bpe.encode("ab c"), vec![1, 4, 1, 0]);
}

#[test]
fn decode_text_of_empty_list_is_an_error() {
    assert!(matches!(
        tokenizer().decode_text(&[]),
        Err(TokenizerError::EmptyInput)
    ));
}

#[test]
fn dropout_behaviour() {
    let bpe = tokenizer().bpe();
    let corpus = std::fs::read_to_string(tokenizer_dir().join("corpus.txt")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for bad in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            bpe.encode_with_dropout("кот", bad, &mut rng),
            Err(TokenizerError::InvalidDropout(_))
        ));
    }
    let tok = tokenizer();
    for line in corpus.lines().take(20) {
        assert_eq!(
            tok.encode_text_with_dropout(line, 16, 0.0, &mut rng)
                .unwrap(),
            tok.encode_text(line, 16)
        );
        let framed = tok
            .encode_text_with_dropout(line, 4096, 0.5, &mut rng)
            .unwrap();
        assert_eq!(
            tok.decode_text(&framed).unwrap(),
            tok.decode_text(&tok.encode_text(line, 4096)).unwrap()
        );
    }
    let mut total_plain = 0;
    let mut total_dropout = 0;
    for line in corpus.lines() {
        let plain = bpe.encode(line);
        let a = bpe
            .encode_with_dropout(line, 0.3, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        let b = bpe
            .encode_with_dropout(line, 0.3, &mut ChaCha8Rng::seed_from_u64(1))
            .unwrap();
        assert_eq!(a, b, "same seed, same ids");
        // Dropout changes the segmentation, never the text.
        assert_eq!(
            bpe.decode(&a, &[]).unwrap(),
            bpe.decode(&plain, &[]).unwrap()
        );
        // p = 1 sets every merge aside: one token per character (or unknown run) plus `▁`.
        let none = bpe.encode_with_dropout(line, 1.0, &mut rng).unwrap();
        let chars = bpe.encode_with_dropout(line, 1.0, &mut rng).unwrap();
        assert_eq!(none, chars);
        assert_eq!(
            bpe.decode(&none, &[]).unwrap(),
            bpe.decode(&plain, &[]).unwrap()
        );
        total_plain += plain.len();
        total_dropout += a.len();
    }
    assert!(
        total_dropout > total_plain,
        "dropout should yield more tokens"
    );
}

#[test]
fn long_word_is_not_quadratic() {
    let bpe = tokenizer().bpe();
    let corpus = std::fs::read_to_string(tokenizer_dir().join("corpus.txt")).unwrap();
    // One 200 000-character word made of known characters (whitespace removed).
    let known: String = corpus
        .chars()
        .filter(|&c| bpe.encode(&c.to_string()).last() != Some(&bpe.special_ids().unk))
        .filter(|c| !c.is_whitespace() && *c != '\u{2581}')
        .collect();
    assert!(!known.is_empty());
    let word: String = known.chars().cycle().take(200_000).collect();
    let ids = bpe.encode(&word);
    assert!(!ids.is_empty() && ids.len() < 200_001);
    assert_eq!(bpe.decode(&ids, &[]).unwrap(), word);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let dropped = bpe.encode_with_dropout(&word, 0.1, &mut rng).unwrap();
    assert_eq!(bpe.decode(&dropped, &[]).unwrap(), word);
}

fn is_yttm_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\u{2581}')
}

/// What decode(encode(x)) must give: words joined by one space, unknown runs as `<UNK>`.
fn expected_round_trip(bpe: &Bpe, text: &str) -> String {
    let unk = bpe.special_ids().unk;
    let known = |c: char| {
        let ids = bpe.encode(&c.to_string());
        ids.last() != Some(&unk)
    };
    let words: Vec<String> = text
        .split(is_yttm_space)
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut out = String::new();
            let mut in_unknown = false;
            for c in w.chars() {
                if known(c) {
                    out.push(c);
                    in_unknown = false;
                } else if !in_unknown {
                    out.push_str("<UNK>");
                    in_unknown = true;
                }
            }
            out
        })
        .collect();
    words.join(" ")
}

fn alphabet() -> Vec<char> {
    let bpe = tokenizer().bpe();
    let mut chars: Vec<char> = (0..bpe.vocab_size() as u32)
        .filter_map(|id| {
            let piece = bpe.id_to_piece(id).unwrap();
            let mut it = piece.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => Some(c),
                _ => None,
            }
        })
        .collect();
    chars.extend([' ', '\t', '\n', '\u{2581}', '\u{a0}', '🐱', 'Ж']);
    chars
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_unicode_never_panics(text in any::<String>(), p in 0.0f64..=1.0, seed in any::<u64>()) {
        let tok = tokenizer();
        let bpe = tok.bpe();
        let ids = bpe.encode(&text);
        prop_assert_eq!(bpe.encode_pieces(&text).len(), ids.len());
        let decoded = bpe.decode(&ids, &[]).unwrap();
        prop_assert_eq!(decoded, expected_round_trip(bpe, &text));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dropped = bpe.encode_with_dropout(&text, p, &mut rng).unwrap();
        bpe.decode(&dropped, &[]).unwrap();
        let _ = lower_strip(&text);
        let _ = tok.decode_text(&tok.encode_text(&text, 16));
    }

    #[test]
    fn round_trip_over_model_alphabet(
        chars in prop::collection::vec(prop::sample::select(alphabet()), 0..80)
    ) {
        let text: String = chars.into_iter().collect();
        let bpe = tokenizer().bpe();
        let ids = bpe.encode(&text);
        prop_assert_eq!(bpe.decode(&ids, &[]).unwrap(), expected_round_trip(bpe, &text));
        let pieces = bpe.encode_pieces(&text);
        prop_assert_eq!(pieces.len(), ids.len());
        // `encode("a b") == encode("a") ++ encode("b")`: merges never cross words.
        let per_word: Vec<u32> = text
            .split(is_yttm_space)
            .flat_map(|w| bpe.encode(w))
            .collect();
        prop_assert_eq!(ids, per_word);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let bpe = tokenizer().bpe();
        let ids = bpe.encode_bytes(&bytes);
        bpe.decode(&ids, &[]).unwrap();
        // Valid UTF-8 goes through unchanged.
        if let Ok(s) = std::str::from_utf8(&bytes) {
            prop_assert_eq!(ids, bpe.encode(s));
        }
    }

    #[test]
    fn decode_never_panics(
        ids in prop::collection::vec(0..tokenizer().vocab_size() as u32 * 6 / 5, 0..40)
    ) {
        let tok = tokenizer();
        let n = tok.vocab_size() as u32;
        let raw = tok.bpe().decode(&ids, &[]);
        prop_assert_eq!(raw.is_err(), ids.iter().any(|&id| id >= n));
        let _ = tok.decode_text(&ids);
    }
}
