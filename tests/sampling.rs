//! `top_k_top_p_filtering` against transformers 4.10's outputs (fixtures `sampling/`).

mod common;

use common::*;
use rudolph::sampling::top_k_top_p_filtering;
use rudolph::sampling::torch_order::descending_order;

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

/// The order `torch.sort(descending=True)` leaves rows in on the CPU, on rows built to take the
/// introsort down every branch (its heapsort fallback included).
#[test]
fn the_sort_order_is_torchs() {
    let (meta, g) = tie_goldens();
    let orders = meta["orders"].as_array().unwrap();
    assert!(!orders.is_empty());
    for name in orders {
        let name = name.as_str().unwrap();
        let row = get(&g, &format!("sort_input.{name}"))
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<usize> = get(&g, &format!("sort_order.{name}"))
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as usize)
            .collect();
        assert_eq!(descending_order(&row), want, "{name}");
    }
}

fn tie_goldens() -> (
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/ties");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("ties.json")).unwrap());
    let g = candle_core::safetensors::load(dir.join("ties.safetensors"), &candle_core::Device::Cpu);
    (meta.unwrap(), g.unwrap())
}

/// Rows with runs of equal logits (fp16 values, widths from 5 to the 16,384 text classes) where
/// a top-k or top-p cut falls inside a run: the tokens kept are the ones transformers 4.10 keeps
/// on PyTorch 2.4's CPU sort (goldens made by `tests/goldens/make_ties.py`).
#[test]
fn ties_are_broken_as_the_original_breaks_them() {
    let (meta, g) = tie_goldens();
    let cases = meta["cases"].as_array().unwrap();
    let telling = cases
        .iter()
        .filter(|c| c["stable_sort_differs"].as_bool().unwrap())
        .count();
    assert!(
        telling >= 10,
        "only {telling} cases tell a stable sort apart"
    );
    for case in cases {
        let row_name = case["row"].as_str().unwrap();
        let row = get(&g, row_name)
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<bool> = get(&g, case["kept"].as_str().unwrap())
            .to_vec1::<u8>()
            .unwrap()
            .into_iter()
            .map(|k| k != 0)
            .collect();
        let (top_k, top_p) = (
            case["top_k"].as_u64().unwrap() as usize,
            case["top_p"].as_f64().unwrap(),
        );
        let mut got = row.clone();
        top_k_top_p_filtering(&mut got, top_k, top_p);
        let got: Vec<bool> = got.iter().map(|v| v.is_finite()).collect();
        let wrong: Vec<usize> = (0..row.len()).filter(|&i| got[i] != want[i]).collect();
        assert!(
            wrong.is_empty(),
            "{row_name} top_k={top_k} top_p={top_p}: {} of {} tokens kept differently (first at {})",
            wrong.len(),
            row.len(),
            wrong[0]
        );
    }
}
