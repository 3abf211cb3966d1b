//! `top_k_top_p_filtering` against transformers 4.10's outputs (fixtures `sampling/`).

mod common;

use common::*;
use rudolph::sampling::top_k_top_p_filtering;

#[test]
fn filtering_matches_transformers_for_every_case() {
    let meta = json("sampling/top_k_top_p_filtering.json");
    let g = goldens("sampling/top_k_top_p_filtering.safetensors");
    let logits = get(&g, "logits");
    let (rows, cols) = logits.dims2().unwrap();
    let input: Vec<f32> = flat_f64(logits).into_iter().map(|v| v as f32).collect();
    let cases = meta["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let top_k = case["top_k"].as_u64().unwrap() as usize;
        let top_p = case["top_p"].as_f64().unwrap();
        let want = flat_f64(get(&g, case["tensor"].as_str().unwrap()));
        for r in 0..rows {
            let mut row = input[r * cols..(r + 1) * cols].to_vec();
            top_k_top_p_filtering(&mut row, top_k, top_p);
            for c in 0..cols {
                let (got, want) = (row[c] as f64, want[r * cols + c]);
                assert!(
                    got == want || (got - want).abs() <= 1e-6,
                    "top_k={top_k} top_p={top_p} row {r} col {c}: got {got}, want {want}"
                );
            }
        }
    }
}
