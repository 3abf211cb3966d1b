//! Parity of the transformer with the original: masks, logits under the three pipeline masks,
//! hidden states, losses and KV-cached greedy generation (fixtures `model_goldens/`).

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use rudolph::model::masks::{self, LayerMaskKind, MaskVariant};
use rudolph::model::{Labels, LossWeights, Rudolph};

const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

#[test]
fn built_layer_masks_equal_the_goldens_and_the_checkpoint() {
    let cfg = tiny_config();
    let golden = device_goldens("model_goldens/masks.safetensors");
    let model = tiny_model();
    let from_ckpt = model.masks().to_bytes().unwrap();
    for (i, kind) in LayerMaskKind::ALL.into_iter().enumerate() {
        let want: Vec<u8> = flat_u32(get(&golden, kind.buffer_name()))
            .into_iter()
            .map(|v| v as u8)
            .collect();
        // The original that made the fixtures is rc1.
        let built = masks::build_layer_mask(&cfg, MaskVariant::Rc1, kind);
        assert_eq!(built, want, "{kind} mask built in closed form");
        assert_eq!(from_ckpt[i], want, "{kind} mask read from the checkpoint");
    }
    assert_eq!(
        masks::detect_variant(&cfg, &from_ckpt),
        Some(MaskVariant::Rc1)
    );
}

#[test]
fn layer_mask_kinds_follow_the_goldens() {
    let cfg = tiny_config();
    let kinds = json("model_goldens/model_goldens.json")["layer_mask_kinds"].clone();
    let kinds: Vec<String> = serde_json::from_value(kinds).unwrap();
    assert_eq!(kinds.len(), cfg.num_layers);
    for (i, want) in kinds.iter().enumerate() {
        assert_eq!(
            LayerMaskKind::for_layer(i, cfg.num_layers).to_string(),
            *want,
            "layer {i}"
        );
    }
}

#[test]
fn pipeline_masks_equal_the_goldens() {
    let cfg = tiny_config();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "input_ids");
    let b = ids.dim(0).unwrap();
    let dev = common::device();
    let t = cfg.total_seq_length();
    let causal = masks::causal_mask(b, t, &dev).unwrap();
    assert_close(
        "default mask",
        &causal,
        get(&g, "attention_mask_default"),
        0.0,
        0.0,
    );
    let t2t = masks::t2t_mask(&cfg, b, &dev).unwrap();
    assert_close("t2t mask", &t2t, get(&g, "attention_mask_t2t"), 0.0, 0.0);
    let right = ids
        .narrow(1, t - cfg.r_text_seq_length, cfg.r_text_seq_length)
        .unwrap();
    let pads: Vec<Vec<u8>> = (0..b)
        .map(|i| {
            flat_u32(&right.i(i).unwrap())
                .iter()
                .map(|&v| (v != 0) as u8)
                .collect()
        })
        .collect();
    let i2t = masks::i2t_mask(&cfg, &pads, &dev).unwrap();
    assert_close("i2t mask", &i2t, get(&g, "attention_mask_i2t"), 0.0, 0.0);
}

/// Under the i2t mask no position after the left text sees it, so a window from there gives
/// the golden logits of every row that sees anything (fully masked rows, the right-text pads,
/// attend uniformly to whatever keys there are, which is why scoring ignores them); a mask
/// that lets the window see earlier positions is refused.
#[test]
fn a_window_past_the_hidden_left_text_gives_the_same_logits() {
    let cfg = tiny_config();
    let model = tiny_model();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "input_ids").to_dtype(DType::U32).unwrap();
    let (l, t) = (cfg.l_text_seq_length, cfg.total_seq_length());
    let want = get(&g, "logits_i2t");
    for end in [t, t - 1, l + cfg.image_seq_length()] {
        let window = ids.narrow(1, l, end - l).unwrap();
        let got = model
            .forward_window(&window, get(&g, "attention_mask_i2t"), l)
            .unwrap();
        let mask = get(&g, "attention_mask_i2t");
        for b in 0..ids.dim(0).unwrap() {
            for q in l..end {
                let sees = mask.i((b, 0, q)).unwrap().sum_all().unwrap();
                if sees
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
                {
                    continue;
                }
                assert_close(
                    &format!("window {l}..{end}, sample {b}, row {q}"),
                    &got.i((b, q - l)).unwrap(),
                    &want.i((b, q)).unwrap(),
                    RTOL,
                    ATOL,
                );
            }
        }
    }
    let err = model
        .forward_window(
            &ids.narrow(1, l, t - l).unwrap(),
            get(&g, "attention_mask_default"),
            l,
        )
        .unwrap_err();
    assert!(err.to_string().contains("see earlier ones"), "{err}");
}

#[test]
fn logits_match_under_every_pipeline_mask() {
    let cfg = tiny_config();
    let model = tiny_model();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "input_ids");
    for kind in ["default", "i2t"] {
        let mask = get(&g, &format!("attention_mask_{kind}"));
        let logits = model.forward(ids, mask).unwrap();
        assert_close(
            &format!("logits_{kind}"),
            &logits,
            get(&g, &format!("logits_{kind}")),
            RTOL,
            ATOL,
        );
    }
    let left = ids.narrow(1, 0, cfg.l_text_seq_length).unwrap();
    let logits = model.forward(&left, get(&g, "attention_mask_t2t")).unwrap();
    assert_close(
        "logits_t2t_left_only",
        &logits,
        get(&g, "logits_t2t_left_only"),
        RTOL,
        ATOL,
    );
}

#[test]
fn hidden_states_match() {
    let model = tiny_model();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "hidden_input_ids");
    let mask = get(&g, "attention_mask_default").narrow(0, 0, 1).unwrap();
    let out = model.forward_with_hidden(ids, &mask).unwrap();
    assert_close(
        "embeddings",
        out.embeddings.as_ref().unwrap(),
        get(&g, "hidden_embeddings"),
        RTOL,
        ATOL,
    );
    let want = get(&g, "hidden_states");
    assert_eq!(out.hidden_states.len(), want.dim(0).unwrap());
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(
            &format!("hidden state {i}"),
            h,
            &want.i(i).unwrap(),
            RTOL,
            ATOL,
        );
    }
    assert_close(
        "final layernorm",
        out.final_hidden.as_ref().unwrap(),
        get(&g, "hidden_final_layernorm_out"),
        RTOL,
        ATOL,
    );
}

#[test]
fn losses_match_under_every_pipeline_mask() {
    let model = tiny_model();
    let g = device_goldens("model_goldens/forward.safetensors");
    let meta = json("model_goldens/model_goldens.json");
    let w = &meta["forward"]["loss_weights"];
    let weights = LossWeights {
        l_text: w["lt_loss_weight"].as_f64().unwrap(),
        image: w["img_loss_weight"].as_f64().unwrap(),
        r_text: w["rt_loss_weight"].as_f64().unwrap(),
    };
    let ids = get(&g, "input_ids");
    let losses = meta["forward"]["losses"].as_object().unwrap();
    assert!(!losses.is_empty());
    for (kind, want) in losses {
        let mask = get(&g, &format!("attention_mask_{kind}"));
        let loss = model.loss(ids, mask, weights, Labels::Original).unwrap();
        for (name, got) in [
            ("loss", &loss.total),
            ("l_text_loss", &loss.l_text),
            ("image_loss", &loss.image),
            ("r_text_loss", &loss.r_text),
        ] {
            let got = got.to_scalar::<f32>().unwrap() as f64;
            let want = want[name].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{kind} {name}: got {got}, want {want}"
            );
        }
    }
}

/// Corrected labels score exactly the n image codes through the image slice of the head, the
/// first one from the last left-text position (inference samples it there), and the right text
/// as the original does.
#[test]
fn corrected_labels_score_each_code_as_an_image_class() {
    let model = tiny_model();
    let cfg = model.config().clone();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "input_ids");
    let mask = get(&g, "attention_mask_default");
    let original = model
        .loss(ids, mask, LossWeights::default(), Labels::Original)
        .unwrap();
    let corrected = model
        .loss(ids, mask, LossWeights::default(), Labels::Corrected)
        .unwrap();
    let f = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert_ne!(f(&original.l_text), f(&corrected.l_text));
    assert_eq!(f(&original.r_text), f(&corrected.r_text));

    let (l, n) = (cfg.l_text_seq_length, cfg.image_seq_length());
    let (v, vi) = (cfg.text_vocab(), cfg.image_vocab());
    let logits = model.forward(ids, mask).unwrap();
    let (b, _, _) = logits.dims3().unwrap();
    let scored = logits
        .narrow(1, l - 1, n)
        .unwrap()
        .narrow(2, v, vi)
        .unwrap()
        .reshape((b * n, vi))
        .unwrap();
    let codes = ids
        .narrow(1, l, n)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let ce = rudolph::model::loss::cross_entropy_per_token(&scored, &codes, None).unwrap();
    let want = ce.mean_all().unwrap().to_scalar::<f32>().unwrap();
    let got = f(&corrected.image);
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "got {got}, want {want}"
    );
}

/// Greedy image generation exactly as generate_codebooks, one cached step at a time.
#[test]
fn cached_greedy_generation_reproduces_the_goldens() {
    let cfg = tiny_config();
    let model = tiny_model();
    let g = device_goldens("model_goldens/kv_cache.safetensors");
    let prompt = get(&g, "prompt_ids").to_dtype(DType::U32).unwrap();
    let want_ids = get(&g, "generated_ids");
    let want_logits = get(&g, "step_logits_cached");
    let (b, l) = prompt.dims2().unwrap();
    let n = cfg.image_seq_length();
    let v = cfg.text_vocab();
    let mask = masks::causal_mask(b, cfg.total_seq_length(), &common::device()).unwrap();
    let mut cache = model.new_cache();
    let mut next = prompt.clone();
    let mut out = vec![prompt.clone()];
    for step in 0..n {
        let logits = model.forward_cached(&next, &mask, &mut cache).unwrap();
        let last = logits.i((.., logits.dim(1).unwrap() - 1, ..)).unwrap();
        assert_close(
            &format!("step {step} logits"),
            &last,
            &want_logits.i(step).unwrap(),
            RTOL,
            ATOL,
        );
        let image = last.narrow(1, v, cfg.image_vocab()).unwrap();
        next = image
            .argmax_keepdim(1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        out.push(next.clone());
    }
    let got = Tensor::cat(&out, 1).unwrap();
    assert_eq!(got.dims(), &[b, l + n]);
    assert_eq!(flat_u32(&got), flat_u32(want_ids));
}

/// The cache returns, chunk by chunk (of any size), the rows of one full forward. Rows whose
/// pipeline mask is all zero are left out: they attend uniformly to the keys present in their
/// call (the original masks by adding −10000, not −inf), so they legitimately depend on how the
/// sequence was chunked.
#[test]
fn cache_equals_full_forward_at_every_position() {
    let cfg = tiny_config();
    let model = tiny_model();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "input_ids").to_dtype(DType::U32).unwrap();
    let t = cfg.total_seq_length();
    for kind in ["default", "i2t"] {
        let mask = get(&g, &format!("attention_mask_{kind}"));
        let full = model.forward(&ids, mask).unwrap();
        for chunks in [
            vec![1; t],
            vec![cfg.l_text_seq_length, 5, 1, 13, t],
            vec![t],
        ] {
            let mut cache = model.new_cache();
            let mut got = Vec::new();
            let mut pos = 0;
            for c in chunks {
                let c = c.min(t - pos);
                if c == 0 {
                    break;
                }
                got.push(
                    model
                        .forward_cached(&ids.narrow(1, pos, c).unwrap(), mask, &mut cache)
                        .unwrap(),
                );
                pos += c;
            }
            assert_eq!(cache.len(), t);
            let got = Tensor::cat(&got, 1).unwrap();
            let live = mask
                .sum_keepdim(3)
                .unwrap()
                .ne(0f32)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let live = live
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_as(full.shape())
                .unwrap();
            assert_close(
                &format!("cached {kind}"),
                &(got * &live).unwrap(),
                &(&full * &live).unwrap(),
                RTOL,
                ATOL,
            );
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let cfg = tiny_config();
    let model = tiny_model();
    let t = cfg.total_seq_length();
    let mask = masks::causal_mask(1, t, &common::device()).unwrap();
    let too_long = Tensor::zeros((1, t + 1), DType::U32, &common::device()).unwrap();
    let err = model.forward(&too_long, &mask).unwrap_err().to_string();
    assert!(
        err.contains("attention mask") || err.contains("longer"),
        "{err}"
    );
    let bad_image = Tensor::full(
        cfg.image_vocab() as u32,
        (1, cfg.l_text_seq_length + 1),
        &common::device(),
    )
    .unwrap();
    let err = model.forward(&bad_image, &mask).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    let small_mask = masks::causal_mask(1, 3, &common::device()).unwrap();
    let ids = Tensor::zeros((1, 4), DType::U32, &common::device()).unwrap();
    let err = model.forward(&ids, &small_mask).unwrap_err().to_string();
    assert!(err.contains("attention mask"), "{err}");
}

#[test]
fn bin_and_safetensors_load_into_identical_models() {
    let cfg = tiny_config();
    let g = device_goldens("model_goldens/forward.safetensors");
    let (ids, mask) = (get(&g, "input_ids"), get(&g, "attention_mask_default"));
    let mut logits = Vec::new();
    for file in [
        "rudolph_tiny/pytorch_model.bin",
        "rudolph_tiny/model.safetensors",
    ] {
        let ckpt = rudolph::weights::Checkpoint::open(fixture(file)).unwrap();
        let (model, report) =
            Rudolph::from_checkpoint(&ckpt, &cfg, DType::F32, &common::device()).unwrap();
        assert_eq!(report.mask_variant, Some(MaskVariant::Rc1), "{file}");
        assert_eq!(report.parameters, Rudolph::parameter_count(&cfg), "{file}");
        assert_eq!(
            report.dtypes.get("bool"),
            Some(&4),
            "{file}: the four masks arrive as bool"
        );
        let l = model.forward(ids, mask).unwrap();
        assert_close(file, &l, get(&g, "logits_default"), RTOL, ATOL);
        logits.push(flat_f64(&l));
    }
    assert_eq!(
        logits[0], logits[1],
        ".bin and .safetensors give the same model"
    );
}

#[test]
fn a_renamed_key_and_a_wrong_shape_are_reported_by_name() {
    let cfg = tiny_config();
    let dir = std::env::temp_dir().join(format!("rudolph-model-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut tensors: Vec<(String, Tensor)> = tiny_tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let renamed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let n = if n == "transformer.final_layernorm.bias" {
                "transformer.final_norm.bias".to_string()
            } else {
                n.clone()
            };
            (n, t.clone())
        })
        .collect();
    let path = dir.join("renamed.safetensors");
    rudolph::weights::save_safetensors(&renamed, &path).unwrap();
    let ckpt = rudolph::weights::Checkpoint::open(&path).unwrap();
    let err = Rudolph::from_checkpoint(&ckpt, &cfg, DType::F32, &common::device())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transformer.final_layernorm.bias")
            && err.contains("transformer.final_norm.bias"),
        "{err}"
    );
    let reshaped: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let t = if n == "image_embeddings.weight" {
                t.narrow(0, 1, t.dim(0).unwrap() - 1).unwrap()
            } else {
                t.clone()
            };
            (n.clone(), t)
        })
        .collect();
    let path = dir.join("reshaped.safetensors");
    rudolph::weights::save_safetensors(&reshaped, &path).unwrap();
    let ckpt = rudolph::weights::Checkpoint::open(&path).unwrap();
    let err = Rudolph::from_checkpoint(&ckpt, &cfg, DType::F32, &common::device())
        .unwrap_err()
        .to_string();
    let want = format!("{}", cfg.image_vocab());
    assert!(
        err.contains("image_embeddings.weight") && err.contains(&want),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Half-precision weights (what GPUs run) stay close to f32; f32 stays the exact default.
#[test]
fn half_precision_weights_stay_close() {
    let cfg = tiny_config();
    let g = device_goldens("model_goldens/forward.safetensors");
    let ckpt =
        rudolph::weights::Checkpoint::open(fixture("rudolph_tiny/model.safetensors")).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let (model, _) = Rudolph::from_checkpoint(&ckpt, &cfg, dtype, &common::device()).unwrap();
        assert_eq!(model.dtype(), dtype);
        let logits = model
            .forward(get(&g, "input_ids"), get(&g, "attention_mask_default"))
            .unwrap();
        assert_close(
            &format!("{dtype:?} logits"),
            &logits,
            get(&g, "logits_default"),
            0.0,
            0.25,
        );
    }
}
