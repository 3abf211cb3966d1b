//! Token embeddings: one table for text ids (shared by both text segments), one for image codes,
//! and learned positions per segment. Positions are absolute in the `[left | image | right]`
//! layout, so a chunk of new tokens may straddle segments.

use crate::config::Config;
use candle_core::{Result, Tensor, bail};
use candle_nn::{Embedding, Module, VarBuilder, embedding};

#[derive(Debug, Clone)]
pub struct Embeddings {
    text: Embedding,
    image: Embedding,
    left_pos: Embedding,
    right_pos: Embedding,
    image_row: Embedding,
    image_col: Embedding,
    cfg: Config,
}

impl Embeddings {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let d = cfg.image_tokens_per_dim;
        Ok(Self {
            text: embedding(cfg.text_vocab(), h, vb.pp("text_embeddings"))?,
            image: embedding(cfg.image_vocab(), h, vb.pp("image_embeddings"))?,
            // One row more than slots: the original allocates it and never reads it.
            left_pos: embedding(cfg.l_text_seq_length + 1, h, vb.pp("l_text_pos_embeddings"))?,
            right_pos: embedding(cfg.r_text_seq_length + 1, h, vb.pp("r_text_pos_embeddings"))?,
            image_row: embedding(d, h, vb.pp("image_row_embeddings"))?,
            image_col: embedding(d, h, vb.pp("image_col_embeddings"))?,
            cfg: cfg.clone(),
        })
    }

    /// Left-text pads (0) become the position token of their slot; the labels use the same ids.
    /// `ids`: `[B, s]` holding slots `start..start + s` of the left text.
    pub fn replace_left_pads(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        let s = ids.dim(1)?;
        let first = self.cfg.left_position_token(start);
        let positions = Tensor::arange(first, first + s as u32, ids.device())?
            .unsqueeze(0)?
            .broadcast_as(ids.shape())?;
        ids.eq(0u32)?.where_cond(&positions, ids)
    }

    /// `ids`: `[B, s]` u32 for absolute positions `start..start + s` → `[B, s, H]`.
    pub fn forward(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (l, n) = (cfg.l_text_seq_length, cfg.image_seq_length());
        let (_, s) = ids.dims2()?;
        let end = start + s;
        if end > cfg.total_seq_length() {
            bail!(
                "sequence of {end} tokens is longer than the model's {} (l {} + image {n} + r {})",
                cfg.total_seq_length(),
                l,
                cfg.r_text_seq_length
            );
        }
        let dev = ids.device();
        let mut parts = Vec::with_capacity(3);
        // (segment start, segment end) in absolute positions.
        let segments = [(0, l), (l, l + n), (l + n, cfg.total_seq_length())];
        for (seg, &(seg_start, seg_end)) in segments.iter().enumerate() {
            let (a, b) = (start.max(seg_start), end.min(seg_end));
            if a >= b {
                continue;
            }
            let part = ids.narrow(1, a - start, b - a)?;
            let local = Tensor::arange((a - seg_start) as u32, (b - seg_start) as u32, dev)?;
            let limit = if seg == 1 {
                cfg.image_vocab()
            } else {
                cfg.text_vocab()
            };
            check_ids(&part, limit, ["left text", "image", "right text"][seg])?;
            let emb = match seg {
                0 => {
                    let part = self.replace_left_pads(&part, a)?;
                    self.text
                        .forward(&part)?
                        .broadcast_add(&self.left_pos.forward(&local)?)?
                }
                1 => {
                    let d = cfg.image_tokens_per_dim;
                    let cells = a - seg_start..b - seg_start;
                    let rows: Vec<u32> = cells.clone().map(|j| (j / d) as u32).collect();
                    let cols: Vec<u32> = cells.map(|j| (j % d) as u32).collect();
                    let rows = Tensor::new(rows, dev)?;
                    let cols = Tensor::new(cols, dev)?;
                    let pos = (self.image_row.forward(&rows)? + self.image_col.forward(&cols)?)?;
                    self.image.forward(&part)?.broadcast_add(&pos)?
                }
                _ => self
                    .text
                    .forward(&part)?
                    .broadcast_add(&self.right_pos.forward(&local)?)?,
            };
            parts.push(emb);
        }
        let x = Tensor::cat(&parts, 1)?;
        // The original shrinks embedding gradients with `0.1·x + 0.9·x.detach()`; computing it
        // literally keeps the forward bit-compatible (it differs from x by one ulp at times).
        x.affine(0.1, 0.0)? + x.detach().affine(0.9, 0.0)?
    }
}

fn check_ids(ids: &Tensor, limit: usize, segment: &str) -> Result<()> {
    let max = ids
        .max_keepdim(1)?
        .max_keepdim(0)?
        .flatten_all()?
        .to_vec1::<u32>()?[0];
    if max as usize >= limit {
        bail!(
            "{segment} id {max} is out of range: the model's {segment} vocabulary has {limit} ids"
        );
    }
    Ok(())
}
