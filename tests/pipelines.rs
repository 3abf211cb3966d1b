//! Pipeline parity on the goldens' recorded tokens (fixtures `pipeline_goldens/`). Generation
//! there is greedy (top_k = 1), so our sampler must pick exactly the original's tokens.

mod common;

use common::*;
use rudolph::pipelines::images::{ImagePrompt, generate_image_codes};
use rudolph::pipelines::rerank::{score_pairs, score_texts_by_image_rc1};
use rudolph::pipelines::texts::{self, SpecialIds, generate_text_ids};
use rudolph::progress::Progress;
use rudolph::sampling::SamplingParams;
use serde_json::Value;

fn case(name: &str) -> Value {
    json(&format!("pipeline_goldens/{name}.json"))
}

fn params(args: &Value) -> SamplingParams {
    SamplingParams {
        top_k: args["top_k"].as_u64().unwrap() as usize,
        top_p: args["top_p"].as_f64().unwrap(),
        temperature: args["temperature"].as_f64().unwrap(),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

fn assert_rel(what: &str, got: f32, want: f64) {
    assert!(
        ((got as f64) - want).abs() <= 1e-4 * want.abs(),
        "{what}: got {got}, want {want}"
    );
}

/// The goldens record each multinomial call's appended tokens in batch order, chunk after chunk.
fn appended_in_call_order(generated: &[Vec<u32>], batch: usize, skip: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for chunk in generated.chunks(batch) {
        for step in skip..chunk[0].len() {
            out.extend(chunk.iter().map(|row| row[step]));
        }
    }
    out
}

#[test]
fn generate_codebooks_matches_with_and_without_cache() {
    let cfg = tiny_config();
    let model = tiny_model();
    for name in [
        "generate_codebooks_cache_true",
        "generate_codebooks_cache_false",
    ] {
        let c = case(name);
        let args = &c["args"];
        let left = &ids(&c["last_model_call_input_ids"][0])[..cfg.l_text_seq_length];
        let count = args["images_num"].as_u64().unwrap() as usize;
        let bs = args["bs"].as_u64().unwrap() as usize;
        let got = generate_image_codes(
            &model,
            left,
            count,
            None,
            bs,
            &params(args),
            0,
            &Progress::hidden(),
        )
        .unwrap();
        assert_eq!(got, rows(&c["result"]), "{name}");
    }
}

#[test]
fn image_prompts_are_continued_exactly() {
    let cfg = tiny_config();
    let model = tiny_model();
    for name in ["image_prompts_0", "image_prompts_1"] {
        let c = case(name);
        let args = &c["args"];
        let left = &ids(&c["last_model_call_input_ids"][0])[..cfg.l_text_seq_length];
        let ip = &c["image_prompts"];
        let prompt = ImagePrompt {
            codes: ids(&ip["image_prompts"][0]),
            known: ids(&ip["mask"]).into_iter().map(|m| m == 1).collect(),
        };
        let count = args["images_num"].as_u64().unwrap() as usize;
        let bs = args["bs"].as_u64().unwrap() as usize;
        let got = generate_image_codes(
            &model,
            left,
            count,
            Some(&prompt),
            bs,
            &params(args),
            0,
            &Progress::hidden(),
        )
        .unwrap();
        assert_eq!(got, rows(&c["result"]), "{name}");
    }
}

#[test]
fn self_reranking_by_text_matches() {
    let cfg = tiny_config();
    let model = tiny_model();
    let c = case("self_reranking_by_text");
    let codebooks = rows(&c["args"]["codebooks"]);
    let last = ids(&c["last_model_call_input_ids"][0]);
    let right = &last[last.len() - cfg.r_text_seq_length..];
    let pairs: Vec<(&[u32], &[u32])> = codebooks.iter().map(|cb| (cb.as_slice(), right)).collect();
    let bs = c["args"]["bs"].as_u64().unwrap_or(64) as usize;
    let scores = score_pairs(&model, &pairs, 1, bs).unwrap();
    let want = &c["result"];
    for (i, s) in scores.iter().enumerate() {
        assert_rel(
            &format!("ppl_text {i}"),
            s.ppl_text,
            want["ppl_text"][i].as_f64().unwrap(),
        );
        assert_rel(
            &format!("ppl_image {i}"),
            s.ppl_image,
            want["ppl_image"][i].as_f64().unwrap(),
        );
    }
}

#[test]
fn self_reranking_by_image_rc1_matches_on_the_recorded_last_chunk() {
    let cfg = tiny_config();
    let model = tiny_model();
    let c = case("self_reranking_by_image");
    let last = rows(&c["last_model_call_input_ids"]);
    let (l, n) = (cfg.l_text_seq_length, cfg.image_seq_length());
    let codes = &last[0][l..l + n];
    let texts: Vec<Vec<u32>> = last.iter().map(|row| row[..l].to_vec()).collect();
    let scores = score_texts_by_image_rc1(&model, codes, &texts, 8).unwrap();
    let want = &c["result"];
    let total = want["ppl_text"].as_array().unwrap().len();
    // The last call holds the last texts of the list.
    for (j, s) in scores.iter().enumerate() {
        let i = total - scores.len() + j;
        assert_rel(
            "ppl_text",
            s.ppl_text,
            want["ppl_text"][i].as_f64().unwrap(),
        );
        assert_rel(
            "ppl_image",
            s.ppl_image,
            want["ppl_image"][i].as_f64().unwrap(),
        );
    }
}

#[test]
fn every_position_token_becomes_eos_under_the_fix() {
    let cfg = tiny_config();
    let first = cfg.left_position_token(0);
    let original = texts::special_to_eos(first, SpecialIds::OriginalTexts);
    let fixed = texts::special_to_eos(first, SpecialIds::AllPositionTokens);
    assert_eq!(
        original(first),
        first,
        "rc1 generate_texts lets the first position token through"
    );
    assert_eq!(fixed(first), texts::EOS);
    assert_eq!(fixed(first + 3), texts::EOS);
    assert_eq!(fixed(first - 1), first - 1);
}

#[test]
fn generate_texts_without_template_matches() {
    let c = case("generate_texts_0");
    let model = tiny_model();
    let args = &c["args"];
    assert_eq!(args["template"], "");
    let count = args["texts_num"].as_u64().unwrap() as usize;
    let bs = args["bs"].as_u64().unwrap() as usize;
    let generated = generate_text_ids(
        &model,
        &[texts::BOS],
        count,
        bs,
        &params(args),
        0,
        SpecialIds::OriginalTexts,
        &Progress::hidden(),
    )
    .unwrap();
    let want: Vec<u32> = c["sampled_tokens"]["appended"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(ids)
        .collect();
    assert_eq!(appended_in_call_order(&generated, bs, 1), want);
    // The pipeline's last call re-scores the (one) unique text.
    let rescored = ids(&c["last_model_call_input_ids"][0]);
    let ppl = texts::left_text_perplexities(&model, &[rescored], 1).unwrap();
    let want_ppl = c["ce_to_ppl_outputs"][0][0].as_f64().unwrap();
    assert_rel("ppl", ppl[0], want_ppl);
}
