//! The RuDOLPH transformer: embeddings → decoder blocks with per-layer sparse masks → final
//! LayerNorm → head (LayerNorm → Linear) over `[text classes | image classes]`.
//!
//! Tensor names are the original state-dict names (`transformer.layers.3.mlp.dense_h_to_4h.weight`
//! …), so a `VarBuilder` over an original checkpoint builds the model directly.

pub mod attention;
pub mod cache;
pub mod dense;
pub mod dropout;
pub mod embeddings;
pub mod layer;
pub mod load;
pub mod loss;
pub mod masks;
pub mod precision;

pub use cache::KvCache;
pub use loss::{Labels, Loss, LossWeights};
pub use masks::{LayerMaskKind, LayerMasks, MaskVariant};
pub use precision::Precision;

use crate::config::Config;
use attention::AdditiveMask;
use candle_core::{DType, Device, Result, Tensor, bail};
use candle_nn::{Module, VarBuilder};
use dense::Dense;
use embeddings::Embeddings;
use layer::{Layer, Norm, Ops};

#[derive(Debug, Clone)]
pub struct Rudolph {
    cfg: Config,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    final_layernorm: Norm,
    head_layernorm: Norm,
    head: Dense,
    masks: LayerMasks,
}

/// What a forward pass can hand back besides the logits.
#[derive(Debug, Clone)]
pub struct Forward {
    /// `[B, S, V + Vi]`.
    pub logits: Tensor,
    /// Input of the first layer, `[B, S, H]` (only when hidden states were asked for).
    pub embeddings: Option<Tensor>,
    /// Output of every layer before the final LayerNorm, each `[B, S, H]`.
    pub hidden_states: Vec<Tensor>,
    /// Transformer output after the final LayerNorm, `[B, S, H]` (only when asked for).
    pub final_hidden: Option<Tensor>,
}

impl Rudolph {
    /// Builds the model from tensors named as in the original state dict. The layer masks are
    /// passed separately because checkpoints carry their own (see [`Rudolph::masks_from`]).
    pub fn new(cfg: &Config, vb: VarBuilder, masks: LayerMasks) -> Result<Self> {
        let precision = Precision::Float(vb.dtype());
        Self::build(cfg, vb, masks, precision)
    }

    /// As [`Rudolph::new`]; with a quantized `precision`, each linear weight is quantized as
    /// soon as its layer is built. When `vb` reads lazily (checkpoints, [`Rudolph::random`]),
    /// the float weights of only one layer are then held at a time.
    pub fn build(
        cfg: &Config,
        vb: VarBuilder,
        masks: LayerMasks,
        precision: Precision,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let quantize = |dense: &mut Dense| -> Result<()> {
            match precision {
                Precision::Quantized(format) => {
                    dense.quantize(format)?;
                }
                Precision::HalfWeights(dtype) => dense.store_half(dtype)?,
                Precision::PackedBf16 => dense.store_packed()?,
                Precision::Float(_) => {}
            }
            Ok(())
        };
        let h = cfg.hidden_size;
        let tvb = vb.pp("transformer");
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let mut layer = Layer::new(cfg, tvb.pp(format!("layers.{i}")))?;
                layer.denses_mut().into_iter().try_for_each(quantize)?;
                Ok(layer)
            })
            .collect::<Result<_>>()?;
        let mut head = Dense::new(h, cfg.total_vocab(), vb.pp("to_logits.1"))?;
        quantize(&mut head)?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings: Embeddings::new(cfg, vb.clone())?,
            layers,
            final_layernorm: Norm::new(h, tvb.pp("final_layernorm"))?,
            head_layernorm: Norm::new(h, vb.pp("to_logits.0"))?,
            head,
            masks,
        })
    }

    /// Reads the four `transformer.*_mask` buffers (stored as bool or as 0/1 floats).
    pub fn masks_from(cfg: &Config, vb: &VarBuilder) -> Result<LayerMasks> {
        let t = cfg.total_seq_length();
        LayerMasks::read(|name| {
            vb.get_with_hints_dtype((t, t), name, Default::default(), DType::F32)
        })
    }

    /// Every tensor of the original state dict with its shape, in the original order
    /// (parameters, then the four mask buffers among them as the original registers them).
    pub fn tensor_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
        let (h, t) = (cfg.hidden_size, cfg.total_seq_length());
        let d = cfg.image_tokens_per_dim;
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("text_embeddings.weight".into(), vec![cfg.text_vocab(), h]),
            ("image_embeddings.weight".into(), vec![cfg.image_vocab(), h]),
            (
                "l_text_pos_embeddings.weight".into(),
                vec![cfg.l_text_seq_length + 1, h],
            ),
            (
                "r_text_pos_embeddings.weight".into(),
                vec![cfg.r_text_seq_length + 1, h],
            ),
            ("image_row_embeddings.weight".into(), vec![d, h]),
            ("image_col_embeddings.weight".into(), vec![d, h]),
            ("to_logits.0.weight".into(), vec![h]),
            ("to_logits.0.bias".into(), vec![h]),
            ("to_logits.1.weight".into(), vec![cfg.total_vocab(), h]),
            ("to_logits.1.bias".into(), vec![cfg.total_vocab()]),
        ];
        for kind in LayerMaskKind::ALL {
            out.push((format!("transformer.{}", kind.buffer_name()), vec![t, t]));
        }
        for i in 0..cfg.num_layers {
            let p = format!("transformer.layers.{i}");
            let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
            for ln in ["input_layernorm", "before_first_addition_layernorm"] {
                add(&format!("{ln}.weight"), vec![h]);
                add(&format!("{ln}.bias"), vec![h]);
            }
            add("attention.query_key_value.weight", vec![3 * h, h]);
            add("attention.query_key_value.bias", vec![3 * h]);
            add("attention.dense.weight", vec![h, h]);
            add("attention.dense.bias", vec![h]);
            for ln in [
                "post_attention_layernorm",
                "before_second_addition_layernorm",
            ] {
                add(&format!("{ln}.weight"), vec![h]);
                add(&format!("{ln}.bias"), vec![h]);
            }
            add("mlp.dense_h_to_4h.weight", vec![4 * h, h]);
            add("mlp.dense_h_to_4h.bias", vec![4 * h]);
            add("mlp.dense_4h_to_h.weight", vec![h, 4 * h]);
            add("mlp.dense_4h_to_h.bias", vec![h]);
        }
        out.push(("transformer.final_layernorm.weight".into(), vec![h]));
        out.push(("transformer.final_layernorm.bias".into(), vec![h]));
        out
    }

    /// A model with random weights and the rc1 masks, for benchmarks: initialised as
    /// [`Rudolph::random_weights`] does, each tensor from its own stream (seeded by `seed` and its
    /// name) and only when its layer is built, so a quantized model never holds all its float
    /// weights at once.
    pub fn random(cfg: &Config, seed: u64, precision: Precision, device: &Device) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let backend = RandomBackend {
            seed,
            shapes: Self::tensor_shapes(cfg).into_iter().collect(),
        };
        let dtype = precision.load_dtype();
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let masks = LayerMasks::build(cfg, MaskVariant::Rc1, device)?;
        Self::build(cfg, vb, masks, precision)
    }

    /// Every parameter, randomly initialised from `seed`: normal with std 0.02 for weights and
    /// embeddings, zero biases, LayerNorms at 1 and 0.
    pub fn random_weights(
        cfg: &Config,
        seed: u64,
        device: &Device,
    ) -> Result<std::collections::HashMap<String, Tensor>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut out = std::collections::HashMap::new();
        for (name, shape) in Self::tensor_shapes(cfg) {
            if name.ends_with("_mask") {
                continue;
            }
            let values = initial_values(&name, shape.iter().product(), &mut unit);
            out.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Ok(out)
    }

    /// Number of parameters (mask buffers excluded).
    pub fn parameter_count(cfg: &Config) -> usize {
        Self::tensor_shapes(cfg)
            .iter()
            .filter(|(name, _)| !name.ends_with("_mask"))
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn masks(&self) -> &LayerMasks {
        &self.masks
    }

    pub fn device(&self) -> &Device {
        self.masks.get(LayerMaskKind::Row).device()
    }

    /// The dtype of the weights, in which the model computes (f32 for a quantized model).
    pub fn dtype(&self) -> DType {
        self.head.dtype()
    }

    /// Quantizes every linear layer's weight (the four per layer and the head) to `format`
    /// (e.g. `GgmlDType::Q8_0`) for inference; embeddings and norms stay in float. Layers
    /// whose input width is not a multiple of the format's block size stay in float; the
    /// result says how many were quantized out of how many. Training needs float weights.
    pub fn quantize(
        &mut self,
        format: candle_core::quantized::GgmlDType,
    ) -> Result<(usize, usize)> {
        let mut denses: Vec<&mut Dense> = self
            .layers
            .iter_mut()
            .flat_map(|l| l.denses_mut())
            .collect();
        denses.push(&mut self.head);
        let total = denses.len();
        let mut done = 0;
        for d in denses {
            done += d.quantize(format)? as usize;
        }
        Ok((done, total))
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg)
    }

    /// Logits `[B, S, V + Vi]` for `input_ids` `[B, S]` (u32) under a pipeline mask
    /// `[B, 1, ≥S, ≥S]` of 0/1 floats.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Ok(self
            .run(input_ids, attention_mask, None, false, Ops::default())?
            .logits)
    }

    /// As [`Rudolph::forward`], also returning the embeddings and every layer's output.
    pub fn forward_with_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Forward> {
        self.run(input_ids, attention_mask, None, true, Ops::default())
    }

    /// Logits `[B, s, V + Vi]` of the positions `first..first + s` alone (`ids` `[B, s]` holds
    /// their tokens), for a mask under which none of them sees a position before `first`: those
    /// positions cannot change these logits, so they are not computed. (Masked scores become
    /// −10000 and vanish in the softmax, so the result equals these rows of a full forward.)
    /// Scoring uses it to skip the left text that the i2t mask hides, and the right-text pads at
    /// the end. Fails if the mask lets a row see before `first`.
    pub fn forward_window(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        first: usize,
    ) -> Result<Tensor> {
        let all = (0..ids.dim(1)?, 0..self.head.out_dim());
        let mut logits = self.forward_window_parts(ids, attention_mask, first, &[all])?;
        Ok(logits.remove(0))
    }

    /// Fails unless the mask hides every position before `first` from the window's rows.
    fn check_window(&self, ids: &Tensor, attention_mask: &Tensor, first: usize) -> Result<()> {
        let s = ids.dim(1)?;
        if first > 0 {
            let (mb, mh, mq, mk) = attention_mask.dims4()?;
            if mh != 1 || mq < first + s || mk < first + s {
                bail!(
                    "attention mask has shape {:?}, expected [B, 1, ≥{}, ≥{}]",
                    [mb, mh, mq, mk],
                    first + s,
                    first + s
                );
            }
            let hidden = attention_mask
                .narrow(2, first, s)?
                .narrow(3, 0, first)?
                .to_dtype(DType::F32)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            if hidden != 0.0 {
                bail!("forward_window: the mask lets positions from {first} on see earlier ones");
            }
        }
        Ok(())
    }

    /// As [`Rudolph::forward_window`], but only the logits scoring needs: for each part
    /// `(rows, classes)`, the window's rows `rows` (relative to `first`) in the head's columns
    /// `classes`, `[B, rows, classes]`. Scoring reads text rows in the text classes and image
    /// rows in the image classes, two thirds of a 350M head less than the full logits.
    pub fn forward_window_parts(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        first: usize,
        parts: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
    ) -> Result<Vec<Tensor>> {
        self.check_window(ids, attention_mask, first)?;
        let s = ids.dim(1)?;
        let h = self.run_hidden(ids, attention_mask, None, first, false, Ops::default())?;
        parts
            .iter()
            .map(|(rows, classes)| {
                if rows.end > s || classes.end > self.head.out_dim() {
                    bail!(
                        "window part rows {rows:?} of {s}, classes {classes:?} of {}",
                        self.head.out_dim()
                    );
                }
                let x = h.final_hidden.narrow(1, rows.start, rows.len())?;
                let x = self.head_layernorm.forward(&x, Ops::default())?;
                self.head.forward_columns(&x, classes.clone())
            })
            .collect()
    }

    /// Processes only `new_ids` `[B, s]`, the positions `cache.len()..cache.len() + s`, and
    /// returns their logits `[B, s, V + Vi]`. Earlier positions come from the cache, so the result
    /// equals the rows of a full forward over the whole prefix.
    pub fn forward_cached(
        &self,
        new_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        Ok(self
            .run(new_ids, attention_mask, Some(cache), false, Ops::default())?
            .logits)
    }

    /// As [`Rudolph::forward_cached`] but returns only the last position's logits in the head's
    /// columns `classes`, `[B, classes]`: what sampling needs (a picture's codes are drawn from
    /// the image classes alone, a third of a 350M head).
    pub fn forward_cached_last(
        &self,
        new_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
        classes: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        if classes.end > self.head.out_dim() {
            bail!(
                "classes {classes:?} of a {}-class head",
                self.head.out_dim()
            );
        }
        let s = new_ids.dim(1)?;
        let ops = Ops::default();
        let h = self.run_hidden(new_ids, attention_mask, Some(cache), 0, false, ops)?;
        let last = h.final_hidden.narrow(1, s - 1, 1)?.squeeze(1)?;
        self.head
            .forward_columns(&self.head_layernorm.forward(&last, ops)?, classes)
    }

    /// One decoding step for groups of rows that sit at different positions, as one batch: each
    /// group's rows share a KV cache (so a position) and a pipeline mask, and read their logits
    /// in the head's columns `classes`. The linear maps run once over all rows; attention runs
    /// per group. Returns each group's logits `[b, classes]`, as
    /// [`Rudolph::forward_cached_last`] gives them for the group alone.
    pub fn forward_step_groups(&self, groups: &mut [StepGroup<'_>]) -> Result<Vec<Tensor>> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let device = groups[0].ids.device().clone();
        if device.is_cpu() {
            // On a worker of the kernels' pool, as `run_hidden` explains.
            rayon::scope(|_| self.step_groups(groups))
        } else {
            let _uploads = crate::device::reuse_small_uploads(&device);
            self.step_groups(groups)
        }
    }

    fn step_groups(&self, groups: &mut [StepGroup<'_>]) -> Result<Vec<Tensor>> {
        let ops = Ops::default();
        let mut sizes = Vec::with_capacity(groups.len());
        let mut masks = Vec::with_capacity(groups.len());
        let mut embedded = Vec::with_capacity(groups.len());
        for g in groups.iter() {
            let ids = g.ids.to_dtype(DType::U32)?;
            let (b, s) = ids.dims2()?;
            if s != 1 {
                bail!("a decoding step takes one new token per row, got {s}");
            }
            if g.classes.end > self.head.out_dim() {
                bail!(
                    "classes {:?} of a {}-class head",
                    g.classes,
                    self.head.out_dim()
                );
            }
            let start = g.cache.len();
            masks.push(self.effective_masks(g.mask, b, start, 1, 0)?);
            embedded.push(self.embeddings.forward(&ids, start)?); // [b, 1, H]
            sizes.push(b);
        }
        let mut h = Tensor::cat(&embedded, 0)?; // [ΣB, 1, H]
        for (i, layer) in self.layers.iter().enumerate() {
            let kind = LayerMaskKind::for_layer(i, self.cfg.num_layers) as usize;
            let mask = |g: usize| masks[g][kind].as_ref().expect("built above");
            h = layer
                .forward_groups(&h, &sizes, mask, |g, k, v| groups[g].cache.append(i, k, v))?;
        }
        groups.iter_mut().for_each(|g| g.cache.advance(1));
        let h = self.final_layernorm.forward(&h.squeeze(1)?, ops)?; // [ΣB, H]
        let h = self.head_layernorm.forward(&h, ops)?;
        // The head once per distinct column range, over the rows of every group reading it.
        let firsts: Vec<usize> = sizes
            .iter()
            .scan(0, |row, &b| {
                let first = *row;
                *row += b;
                Some(first)
            })
            .collect();
        let mut out: Vec<Option<Tensor>> = vec![None; groups.len()];
        for g in 0..groups.len() {
            if out[g].is_some() {
                continue;
            }
            let classes = groups[g].classes.clone();
            let members: Vec<usize> = (g..groups.len())
                .filter(|&j| groups[j].classes == classes)
                .collect();
            let rows: Vec<u32> = members
                .iter()
                .flat_map(|&j| (firsts[j]..firsts[j] + sizes[j]).map(|r| r as u32))
                .collect();
            let index = Tensor::new(rows, h.device())?;
            let logits = self
                .head
                .forward_columns(&h.index_select(&index, 0)?, classes)?;
            let mut row = 0;
            for &j in &members {
                out[j] = Some(logits.narrow(0, row, sizes[j])?);
                row += sizes[j];
            }
        }
        Ok(out.into_iter().map(|t| t.expect("every group")).collect())
    }

    /// The three-part training loss of full sequences `[B, T]` (no dropout: evaluation mode).
    pub fn loss(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        weights: LossWeights,
        labels: Labels,
    ) -> Result<Loss> {
        self.loss_with_dropout(input_ids, attention_mask, weights, labels, None)
    }

    /// The loss in training mode: `dropout` (if any) applies where the original's does.
    pub fn loss_with_dropout(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        weights: LossWeights,
        labels: Labels,
        dropout: Option<&dropout::Dropout>,
    ) -> Result<Loss> {
        let input_ids = &input_ids.to_dtype(DType::U32)?;
        // Composite ops: the loss is what training differentiates.
        let ops = Ops {
            differentiable: true,
            dropout,
        };
        let logits = self
            .run(input_ids, attention_mask, None, false, ops)?
            .logits;
        let l = self.cfg.l_text_seq_length;
        let left = self
            .embeddings
            .replace_left_pads(&input_ids.narrow(1, 0, l)?, 0)?;
        let rest = input_ids.narrow(1, l, input_ids.dim(1)? - l)?;
        let labels_source = Tensor::cat(&[left, rest], 1)?;
        loss::rudolph_loss(&self.cfg, &logits, &labels_source, weights, labels)
    }

    fn run(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
        keep_hidden: bool,
        ops: Ops<'_>,
    ) -> Result<Forward> {
        let h = self.run_hidden(ids, attention_mask, cache, 0, keep_hidden, ops)?;
        let logits = self
            .head
            .forward(&self.head_layernorm.forward(&h.final_hidden, ops)?)?;
        Ok(Forward {
            logits,
            embeddings: h.embeddings,
            hidden_states: h.hidden_states,
            final_hidden: keep_hidden.then_some(h.final_hidden),
        })
    }

    /// Everything up to the transformer output (after the final LayerNorm).
    ///
    /// Without a cache, `ids` are the positions `first..first + s` and they attend only among
    /// themselves (the caller has checked that the mask hides everything before `first`).
    fn run_hidden(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        cache: Option<&mut KvCache>,
        first: usize,
        keep_hidden: bool,
        ops: Ops<'_>,
    ) -> Result<Hidden> {
        // On the CPU, on a worker of the thread pool that the kernels split their work over (at
        // once if already on one). From any other thread, each of a decoding step's ~200
        // parallel ops would wake the workers and put this thread to sleep until they finish:
        // 8 % of a 350M batch-8 step went to that, and generation ran 7 % faster without it.
        // A GPU's work stays on the caller's thread: kernels are only queued there.
        if !ids.device().is_cpu() {
            let _uploads = crate::device::reuse_small_uploads(ids.device());
            return self.run_layers(ids, attention_mask, cache, first, keep_hidden, ops);
        }
        rayon::scope(|_| self.run_layers(ids, attention_mask, cache, first, keep_hidden, ops))
    }

    fn run_layers(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        first: usize,
        keep_hidden: bool,
        ops: Ops<'_>,
    ) -> Result<Hidden> {
        let ids = ids.to_dtype(DType::U32)?;
        let (b, s) = ids.dims2()?;
        let start = cache.as_ref().map_or(first, |c| c.len());
        // The first key position: 0 with a cache (it holds every earlier position), else the
        // window's own start.
        let keys_from = if cache.is_some() { 0 } else { start };
        let effective = self.effective_masks(attention_mask, b, start, s, keys_from)?;
        let mut h = self.embeddings.forward(&ids, start)?;
        let embeddings = keep_hidden.then(|| h.clone());
        let mut hidden_states = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let kind = LayerMaskKind::for_layer(i, self.cfg.num_layers);
            let mask = effective[kind as usize].as_ref().expect("built above");
            h = match cache.as_deref_mut() {
                Some(c) => layer.forward(&h, mask, ops, |k, v| c.append(i, k, v))?,
                None => layer.forward(&h, mask, ops, |k, v| Ok((k.clone(), v.clone())))?,
            };
            if keep_hidden {
                hidden_states.push(h.clone());
            }
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        Ok(Hidden {
            embeddings,
            hidden_states,
            final_hidden: self.final_layernorm.forward(&h, ops)?,
        })
    }

    /// Each layer kind's effective mask for the queries `start..start + s` over the keys
    /// `keys_from..start + s`: the pipeline mask `[B or 1, 1, ≥T, ≥T]` times the kind's layer
    /// mask. Layers of the same kind share one.
    fn effective_masks(
        &self,
        attention_mask: &Tensor,
        b: usize,
        start: usize,
        s: usize,
        keys_from: usize,
    ) -> Result<[Option<AdditiveMask>; 4]> {
        let end = start + s;
        let mask_dims = attention_mask.dims();
        if mask_dims.len() != 4
            || mask_dims[1] != 1
            || (mask_dims[0] != b && mask_dims[0] != 1)
            || mask_dims[2] < end
            || mask_dims[3] < end
        {
            bail!(
                "attention mask has shape {mask_dims:?}, expected [{b} (or 1), 1, ≥{end}, ≥{end}]"
            );
        }
        let pipeline = attention_mask
            .narrow(2, start, s)?
            .narrow(3, keys_from, end - keys_from)?
            .to_dtype(DType::F32)?;
        let mut effective: [Option<AdditiveMask>; 4] = Default::default();
        for i in 0..self.cfg.num_layers {
            let kind = LayerMaskKind::for_layer(i, self.cfg.num_layers);
            if effective[kind as usize].is_none() {
                let layer = self.masks.get(kind).narrow(0, start, s)?.narrow(
                    1,
                    keys_from,
                    end - keys_from,
                )?;
                let keep = pipeline.broadcast_mul(&layer.unsqueeze(0)?.unsqueeze(0)?)?;
                // Scores are computed in the weights' dtype (f16/bf16 on GPUs); so is the mask.
                let keep = keep.to_dtype(self.dtype())?;
                effective[kind as usize] = Some(AdditiveMask::new(keep)?);
            }
        }
        Ok(effective)
    }
}

/// Rows of one decoding step of [`Rudolph::forward_step_groups`].
pub struct StepGroup<'a> {
    /// `[b, 1]`: each row's next token.
    pub ids: &'a Tensor,
    /// The pipeline mask, `[b or 1, 1, T, T]`.
    pub mask: &'a Tensor,
    /// The rows' keys and values so far; the step appends to it.
    pub cache: &'a mut KvCache,
    /// The head's columns to return.
    pub classes: std::ops::Range<usize>,
}

struct Hidden {
    embeddings: Option<Tensor>,
    hidden_states: Vec<Tensor>,
    final_hidden: Tensor,
}

/// One parameter's initial values (see [`Rudolph::random_weights`]), drawn from `unit`
/// (uniform in [0, 1)).
fn initial_values(name: &str, numel: usize, unit: &mut impl FnMut() -> f64) -> Vec<f32> {
    let is_norm = name.contains("layernorm") || name.starts_with("to_logits.0");
    if name.ends_with(".bias") {
        vec![0.0; numel]
    } else if is_norm {
        vec![1.0; numel]
    } else {
        // Box–Muller, from our own seeded stream.
        (0..numel)
            .map(|_| {
                let (u1, u2) = (unit().max(f64::MIN_POSITIVE), unit());
                (0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }
}

/// Random parameters made on request, each from a stream seeded by the model seed and its name.
struct RandomBackend {
    seed: u64,
    shapes: std::collections::HashMap<String, Vec<usize>>,
}

impl candle_nn::var_builder::SimpleBackend for RandomBackend {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, device)?;
        if t.shape() != &shape {
            bail!("{name}: shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter named {name}")))?;
        // FNV-1a of the name, so a tensor's values do not depend on the order of requests.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ name_hash);
        let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let values = initial_values(name, shape.iter().product(), &mut unit);
        Tensor::from_vec(values, shape.as_slice(), device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}
