//! Quantized weights (`--dtype q8`) and bf16 tile products (`--dtype packed-bf16`): the quality cost on
//! the fixtures' model, measured against the exact float32 model — logits, greedy generation
//! and perplexities.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use rudolph::model::masks;

/// Greedy image generation from the kv_cache goldens' prompt; returns the generated ids.
fn greedy(model: &rudolph::model::Rudolph, prompt: &Tensor) -> Vec<u32> {
    let cfg = model.config();
    let (b, _) = prompt.dims2().unwrap();
    let v = cfg.text_vocab();
    let mask = masks::causal_mask(b, cfg.total_seq_length(), &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    let mut next = prompt.clone();
    let mut out = Vec::new();
    for _ in 0..cfg.image_seq_length() {
        let logits = model.forward_cached(&next, &mask, &mut cache).unwrap();
        let last = logits.i((.., logits.dim(1).unwrap() - 1, ..)).unwrap();
        next = last
            .narrow(1, v, cfg.image_vocab())
            .unwrap()
            .argmax_keepdim(1)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        out.push(next.clone());
    }
    flat_u32(&Tensor::cat(&out, 1).unwrap())
}

#[test]
fn q8_stays_close_to_float32() {
    let exact = tiny_model();
    let mut q8 = tiny_model();
    let (done, total) = q8.quantize(GgmlDType::Q8_0).unwrap();
    assert_eq!(total, 4 * exact.config().num_layers + 1);
    assert!(
        done > 0,
        "no layer of the fixtures' model could be quantized"
    );
    assert_eq!(q8.dtype(), DType::F32);
    let report = closeness(&exact, &q8, 0.02);
    eprintln!("q8 on the fixtures' model: {done}/{total} layers quantized, {report}");
}

/// bf16 products (on the best kernel this CPU has): activations and weights rounded to
/// bf16 before each linear product, everything else in f32.
#[test]
fn amx_stays_close_to_float32() {
    use rudolph::model::{Precision, Rudolph};
    let ckpt =
        rudolph::weights::Checkpoint::open(fixture("rudolph_tiny/model.safetensors")).unwrap();
    let (tiles, _) =
        Rudolph::from_checkpoint_as(&ckpt, &tiny_config(), Precision::PackedBf16, &Device::Cpu)
            .unwrap();
    assert_eq!(tiles.dtype(), DType::F32);
    let report = closeness(&tiny_model(), &tiles, 0.02);
    let on = rudolph::kernels::packed_bf16::Kernel::best().name();
    eprintln!("packed-bf16 on the fixtures' model, through {on}: {report}");
}

/// Asserts that `lossy` stays within `bound` of `exact` (relative RMS of the logits and of each
/// perplexity) with ≥ 90 % top-1 agreement and ≥ 50 % free-running greedy agreement; returns
/// what it measured.
fn closeness(
    exact: &rudolph::model::Rudolph,
    lossy: &rudolph::model::Rudolph,
    bound: f64,
) -> String {
    // Logits under the pipeline masks: relative RMS error, and the share of positions whose
    // top-1 token is unchanged (teacher-forced greedy agreement).
    let g = goldens("model_goldens/forward.safetensors");
    let ids = get(&g, "input_ids");
    let mut top1 = Vec::new();
    let mut rms = Vec::new();
    for kind in ["default", "i2t"] {
        let mask = get(&g, &format!("attention_mask_{kind}"));
        let la = exact.forward(ids, mask).unwrap();
        let lb = lossy.forward(ids, mask).unwrap();
        let (a, b) = (flat_f64(&la), flat_f64(&lb));
        let err: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        let norm: f64 = a.iter().map(|x| x * x).sum::<f64>();
        let rel = (err / norm).sqrt();
        assert!(
            rel > 0.0 && rel < bound,
            "{kind}: relative RMS error of the logits {rel}"
        );
        let (ta, tb) = (
            flat_u32(&la.argmax(2).unwrap()),
            flat_u32(&lb.argmax(2).unwrap()),
        );
        let same = ta.iter().zip(&tb).filter(|(x, y)| x == y).count() as f64 / ta.len() as f64;
        assert!(same >= 0.9, "{kind}: top-1 agreement {same}");
        top1.push(same);
        rms.push(rel);
    }

    // Free-running greedy generation: one early flip changes every later token, and the
    // fixtures' random model has nearly flat logits, so this is the harshest measure.
    let kv = goldens("model_goldens/kv_cache.safetensors");
    let prompt = get(&kv, "prompt_ids").to_dtype(DType::U32).unwrap();
    let (a, b) = (greedy(exact, &prompt), greedy(lossy, &prompt));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    assert!(same >= 0.5, "free-running greedy agreement {same}");

    // Perplexities of (picture, text) pairs, as reranking computes them.
    let cfg = exact.config().clone();
    let (l, n) = (cfg.l_text_seq_length, cfg.image_seq_length());
    let ids = flat_u32(&get(&g, "input_ids").to_dtype(DType::U32).unwrap());
    let t = cfg.total_seq_length();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = ids
        .chunks(t)
        .map(|r| (r[l..l + n].to_vec(), r[l + n..].to_vec()))
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|(c, t)| (&c[..], &t[..])).collect();
    let pa = rudolph::pipelines::rerank::score_pairs(exact, &pairs, 1, 4).unwrap();
    let pb = rudolph::pipelines::rerank::score_pairs(lossy, &pairs, 1, 4).unwrap();
    let mut worst = 0f32;
    for (x, y) in pa.iter().zip(&pb) {
        for (u, w) in [(x.ppl_text, y.ppl_text), (x.ppl_image, y.ppl_image)] {
            let rel = ((u - w) / u).abs();
            assert!((rel as f64) < bound, "perplexity {u} became {w}");
            worst = worst.max(rel);
        }
    }
    format!(
        "logits within {:.2e} relative RMS, top-1 agreement {top1:?}, free-running greedy \
         agreement {same:.3}, perplexities within {worst:.2e} relative",
        rms.iter().cloned().fold(0f64, f64::max)
    )
}

/// Quantizing layer by layer while the checkpoint is read gives the same model as loading in
/// float32 and quantizing afterwards: identical logits.
#[test]
fn quantizing_while_loading_equals_quantizing_after() {
    use rudolph::model::{Precision, Rudolph};
    let ckpt =
        rudolph::weights::Checkpoint::open(fixture("rudolph_tiny/model.safetensors")).unwrap();
    let cfg = tiny_config();
    let format = GgmlDType::Q8_0;
    let (mut after, _) = Rudolph::from_checkpoint(&ckpt, &cfg, DType::F32, &Device::Cpu).unwrap();
    after.quantize(format).unwrap();
    let (while_loading, _) =
        Rudolph::from_checkpoint_as(&ckpt, &cfg, Precision::Quantized(format), &Device::Cpu)
            .unwrap();
    let g = goldens("model_goldens/forward.safetensors");
    let (ids, mask) = (get(&g, "input_ids"), get(&g, "attention_mask_default"));
    let a = flat_f64(&after.forward(ids, mask).unwrap());
    let b = flat_f64(&while_loading.forward(ids, mask).unwrap());
    assert_eq!(a, b);
    let exact = flat_f64(&tiny_model().forward(ids, mask).unwrap());
    assert_ne!(a, exact, "the fixtures' model was not quantized at all");
}

/// f16 / bf16 linear weights under f32 compute (`--dtype f16w` / `bf16w`): the only change is
/// the rounding of the weights, so logits stay within that rounding of float32's, and decoding
/// steps (the few-rows kernel, which widens the weights as it reads them) agree with a full
/// forward of the same model; so do packed-bf16 products, to bf16's rounding.
#[test]
fn half_weights_cost_only_their_rounding() {
    use rudolph::model::{Precision, Rudolph};
    let ckpt =
        rudolph::weights::Checkpoint::open(fixture("rudolph_tiny/model.safetensors")).unwrap();
    let cfg = tiny_config();
    let exact = tiny_model();
    let g = goldens("model_goldens/forward.safetensors");
    let (ids, mask) = (get(&g, "input_ids"), get(&g, "attention_mask_default"));
    let la = flat_f64(&exact.forward(ids, mask).unwrap());
    // The tile products round activations to bf16, so a last-bit difference between the two
    // attention paths can flip one rounding (2⁻⁸ relative): their steps agree to that scale.
    for (precision, bound, step_bound) in [
        (Precision::HalfWeights(DType::F16), 2e-3, 1e-4),
        (Precision::HalfWeights(DType::BF16), 2e-2, 1e-4),
        (Precision::PackedBf16, 2e-2, 2e-2),
    ] {
        let dtype = precision.name();
        let (half, _) = Rudolph::from_checkpoint_as(&ckpt, &cfg, precision, &Device::Cpu).unwrap();
        assert_eq!(half.dtype(), DType::F32);
        let lb = flat_f64(&half.forward(ids, mask).unwrap());
        let err: f64 = la
            .iter()
            .zip(&lb)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>();
        let norm: f64 = la.iter().map(|x| x * x).sum::<f64>();
        let rel = (err / norm).sqrt();
        assert!(
            rel > 0.0 && rel < bound,
            "{dtype}: relative RMS error {rel}"
        );

        // The first sequence token by token through the cache against one full forward.
        let one = ids.narrow(0, 0, 1).unwrap().to_dtype(DType::U32).unwrap();
        let t = one.dim(1).unwrap();
        let causal = masks::causal_mask(1, cfg.total_seq_length(), &Device::Cpu).unwrap();
        let full = half.forward(&one, &causal).unwrap();
        let mut cache = half.new_cache();
        for p in 0..t {
            let step = half
                .forward_cached(&one.narrow(1, p, 1).unwrap(), &causal, &mut cache)
                .unwrap();
            let want = flat_f64(&full.narrow(1, p, 1).unwrap());
            let got = flat_f64(&step);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                .fold(0f64, f64::max);
            assert!(
                worst < step_bound,
                "{dtype} position {p}: cached step differs by {worst}"
            );
        }
    }
}
