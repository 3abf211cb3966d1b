//! Attention masks.
//!
//! Two families multiply together in every layer: the *layer masks* (sparse image patterns
//! registered as checkpoint buffers: row, col, conv and last_conv) and the *pipeline masks* that
//! each task passes in (causal, t2t, i2t). Both are 0/1; 1 = the query may attend to the key.
//! Everything here is built in closed form, cell by cell, from the rules below (the original builds the same masks by loops over cells).

use crate::config::Config;
use candle_core::{DType, Device, Result, Tensor};

/// The four sparse patterns a layer can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerMaskKind {
    Row,
    Col,
    Conv,
    LastConv,
}

impl LayerMaskKind {
    pub const ALL: [LayerMaskKind; 4] = [Self::Row, Self::Col, Self::Conv, Self::LastConv];

    /// The checkpoint buffer name (`transformer.<name>`).
    pub fn buffer_name(self) -> &'static str {
        match self {
            Self::Row => "row_mask",
            Self::Col => "col_mask",
            Self::Conv => "conv_mask",
            Self::LastConv => "last_conv_mask",
        }
    }

    /// The original's per-layer precedence: col wins over last_conv, so a model whose last
    /// index is ≡ 1 (mod 4) ends with a col layer.
    pub fn for_layer(layer: usize, num_layers: usize) -> Self {
        let i = layer as i64;
        if (i - 1).rem_euclid(4) == 0 {
            Self::Col
        } else if layer + 1 == num_layers {
            Self::LastConv
        } else if (i - 3).rem_euclid(4) == 0 {
            Self::Conv
        } else {
            Self::Row
        }
    }
}

impl std::fmt::Display for LayerMaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Row => "row",
            Self::Col => "col",
            Self::Conv => "conv",
            Self::LastConv => "last_conv",
        })
    }
}

/// Checkpoint versions differ in their layer masks: rudolph 0.0.1rc1 forbids the right text to
/// see the left text in every layer; later versions (rc2+, rc10) are plainly causal outside the
/// image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskVariant {
    Rc1,
    Rc10,
}

impl MaskVariant {
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Rc1 => "rc1",
            Self::Rc10 => "rc10",
        }
    }
}

impl std::fmt::Display for MaskVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rc1 => "rc1 (right text cannot see left text)",
            Self::Rc10 => "rc10 (causal outside the image)",
        })
    }
}

/// Whether query `q` may attend to key `k` under `kind`.
pub fn layer_mask_allows(
    cfg: &Config,
    variant: MaskVariant,
    kind: LayerMaskKind,
    q: usize,
    k: usize,
) -> bool {
    if k > q {
        return false;
    }
    let (l, d) = (cfg.l_text_seq_length, cfg.image_tokens_per_dim);
    let n = d * d;
    let t = cfg.total_seq_length();
    if variant == MaskVariant::Rc1 {
        // rc1 built the conv masks with `l` where `r` was meant; checkpoints store masks built that way.
        let r = match kind {
            LayerMaskKind::Row | LayerMaskKind::Col => cfg.r_text_seq_length,
            LayerMaskKind::Conv | LayerMaskKind::LastConv => l,
        };
        if q + r >= t && k < l {
            return false;
        }
    }
    let in_image = |x: usize| x >= l && x < l + n;
    if !(in_image(q) && in_image(k)) {
        return true;
    }
    let (a, b) = (q - l, k - l);
    let near = |kernel: usize| {
        let half = kernel / 2;
        a == b || ((a / d).abs_diff(b / d) <= half && (a % d).abs_diff(b % d) <= half)
    };
    match kind {
        LayerMaskKind::Row => a - b <= d,
        LayerMaskKind::Col => (a - b) % d == 0,
        LayerMaskKind::Conv => near(cfg.kernel_size),
        LayerMaskKind::LastConv => near(cfg.last_kernel_size),
    }
}

/// A layer mask as a row-major `T×T` 0/1 matrix.
pub fn build_layer_mask(cfg: &Config, variant: MaskVariant, kind: LayerMaskKind) -> Vec<u8> {
    let t = cfg.total_seq_length();
    let mut out = vec![0u8; t * t];
    for q in 0..t {
        for k in 0..=q {
            out[q * t + k] = layer_mask_allows(cfg, variant, kind, q, k) as u8;
        }
    }
    out
}

/// Which built variant a set of four masks (in [`LayerMaskKind::ALL`] order) equals, if any.
pub fn detect_variant(cfg: &Config, masks: &[Vec<u8>; 4]) -> Option<MaskVariant> {
    [MaskVariant::Rc1, MaskVariant::Rc10]
        .into_iter()
        .find(|&v| {
            LayerMaskKind::ALL
                .iter()
                .zip(masks)
                .all(|(&kind, m)| *m == build_layer_mask(cfg, v, kind))
        })
}

/// Full causal pipeline mask `[B, 1, T, T]` (`tril(ones)`), what generate_codebooks passes.
pub fn causal_mask(batch: usize, len: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..len * len)
        .map(|i| ((i % len) <= (i / len)) as u8 as f32)
        .collect();
    Tensor::from_vec(data, (1, 1, len, len), device)?.repeat((batch, 1, 1, 1))
}

/// rc1 `get_t2t_attention_mask`: causal with every row from `l` on zeroed.
pub fn t2t_mask(cfg: &Config, batch: usize, device: &Device) -> Result<Tensor> {
    let (t, l) = (cfg.total_seq_length(), cfg.l_text_seq_length);
    let data: Vec<f32> = (0..t * t)
        .map(|i| {
            let (q, k) = (i / t, i % t);
            (k <= q && q < l) as u8 as f32
        })
        .collect();
    Tensor::from_vec(data, (1, 1, t, t), device)?.repeat((batch, 1, 1, 1))
}

/// rc1 `get_i2t_attention_mask`: causal, every left-text column zeroed, and for each sample the
/// rows from its first right-text pad on zeroed. `right_pad_masks[b][i]` is 1 where right-text
/// slot `i` holds a token. As in the original, `argmin` finds the first 0; a row without pads
/// (or whose first entry is the minimum at 0) masks nothing, as in the original.
pub fn i2t_mask(cfg: &Config, right_pad_masks: &[Vec<u8>], device: &Device) -> Result<Tensor> {
    let (t, l) = (cfg.total_seq_length(), cfg.l_text_seq_length);
    let image_end = l + cfg.image_seq_length();
    let mut data = Vec::with_capacity(right_pad_masks.len() * t * t);
    for pads in right_pad_masks {
        let first_min = argmin_first(pads);
        let cut = (first_min > 0).then(|| image_end + first_min);
        for q in 0..t {
            let row_dead = cut.is_some_and(|c| q >= c);
            for k in 0..t {
                data.push((k <= q && k >= l && !row_dead) as u8 as f32);
            }
        }
    }
    Tensor::from_vec(data, (right_pad_masks.len(), 1, t, t), device)
}

/// Index of the first minimum, torch's `argmin` on CPU.
fn argmin_first(values: &[u8]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v < values[best] {
            best = i;
        }
    }
    best
}

/// The four layer masks of a model as f32 0/1 tensors `[T, T]`, indexed by kind.
#[derive(Debug, Clone)]
pub struct LayerMasks {
    masks: [Tensor; 4],
}

impl LayerMasks {
    pub fn new(masks: [Tensor; 4]) -> Self {
        Self { masks }
    }

    /// The four buffers of a checkpoint, each fetched by `read` under its name
    /// (`transformer.row_mask`, …) in whatever dtype it was stored (bool or 0/1 floats), as 0/1
    /// f32.
    pub fn read<E: From<candle_core::Error>>(
        mut read: impl FnMut(&str) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let mut get = |kind: LayerMaskKind| -> std::result::Result<Tensor, E> {
            let m = read(&format!("transformer.{}", kind.buffer_name()))?;
            Ok(m.ne(&m.zeros_like()?)?.to_dtype(DType::F32)?)
        };
        Ok(Self::new([
            get(LayerMaskKind::Row)?,
            get(LayerMaskKind::Col)?,
            get(LayerMaskKind::Conv)?,
            get(LayerMaskKind::LastConv)?,
        ]))
    }

    pub fn build(cfg: &Config, variant: MaskVariant, device: &Device) -> Result<Self> {
        let t = cfg.total_seq_length();
        let masks = LayerMaskKind::ALL.map(|kind| {
            let data: Vec<f32> = build_layer_mask(cfg, variant, kind)
                .into_iter()
                .map(f32::from)
                .collect();
            Tensor::from_vec(data, (t, t), device)
        });
        let [a, b, c, d] = masks;
        Ok(Self::new([a?, b?, c?, d?]))
    }

    pub fn get(&self, kind: LayerMaskKind) -> &Tensor {
        &self.masks[kind as usize]
    }

    /// The masks as row-major 0/1 bytes, for comparing with the built variants.
    pub fn to_bytes(&self) -> Result<[Vec<u8>; 4]> {
        let conv = |t: &Tensor| -> Result<Vec<u8>> {
            Ok(t.to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|v| (v != 0.0) as u8)
                .collect())
        };
        let [a, b, c, d] = &self.masks;
        Ok([conv(a)?, conv(b)?, conv(c)?, conv(d)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(cfg: &Config, variant: MaskVariant, kind: LayerMaskKind) -> Vec<String> {
        let t = cfg.total_seq_length();
        build_layer_mask(cfg, variant, kind)
            .chunks(t)
            .map(|row| row.iter().map(|b| char::from(b'0' + b)).collect())
            .collect()
    }

    fn small(l: usize, d: usize, r: usize, k: usize) -> Config {
        let mut c = Config::preset("350m").unwrap();
        c.l_text_seq_length = l;
        c.r_text_seq_length = r;
        c.image_tokens_per_dim = d;
        c.kernel_size = k;
        c.last_kernel_size = k;
        c
    }

    // Worked examples, computed by running the original mask builders.
    #[test]
    fn rc1_worked_example_l2_d3_r2() {
        let cfg = small(2, 3, 2, 3);
        let row = render(&cfg, MaskVariant::Rc1, LayerMaskKind::Row);
        assert_eq!(row[6], "1101111000000");
        assert_eq!(row[10], "1100000111100");
        assert_eq!(row[11], "0011111111110");
        let col = render(&cfg, MaskVariant::Rc1, LayerMaskKind::Col);
        assert_eq!(col[8], "1110010010000");
        assert_eq!(col[10], "1100100100100");
        let conv = render(&cfg, MaskVariant::Rc1, LayerMaskKind::Conv);
        let expected = [
            "1000000000000",
            "1100000000000",
            "1110000000000",
            "1111000000000",
            "1101100000000",
            "1111010000000",
            "1111111000000",
            "1101101100000",
            "1100011010000",
            "1100011111000",
            "1100001101100",
            "0011111111110",
            "0011111111111",
        ];
        assert_eq!(conv, expected);
        let rc10 = render(&cfg, MaskVariant::Rc10, LayerMaskKind::Conv);
        assert_eq!(rc10[11], "1111111111110");
        assert_eq!(rc10[..11], expected[..11]);
    }

    #[test]
    fn rc10_worked_example_l1_d4_r1() {
        let cfg = small(1, 4, 1, 3);
        let row = render(&cfg, MaskVariant::Rc10, LayerMaskKind::Row);
        let col = render(&cfg, MaskVariant::Rc10, LayerMaskKind::Col);
        let conv = render(&cfg, MaskVariant::Rc10, LayerMaskKind::Conv);
        assert_eq!(row[7], "100111110000000000");
        assert_eq!(col[13], "110001000100010000");
        assert_eq!(conv[10], "100001110110000000");
        assert_eq!(conv[16], "100000000001100110");
        assert_eq!(row[17], "111111111111111111");
    }

    #[test]
    fn layer_kinds_follow_the_precedence_rule() {
        let kinds: Vec<_> = (0..8).map(|i| LayerMaskKind::for_layer(i, 8)).collect();
        use LayerMaskKind::*;
        assert_eq!(kinds, [Row, Col, Row, Conv, Row, Col, Row, LastConv]);
        assert_eq!(LayerMaskKind::for_layer(5, 6), Col);
        assert_eq!(LayerMaskKind::for_layer(23, 24), LastConv);
        assert_eq!(LayerMaskKind::for_layer(19, 24), Conv);
    }

    #[test]
    fn i2t_example_matches_the_spec() {
        let cfg = small(2, 3, 2, 3);
        let m = i2t_mask(&cfg, &[vec![1, 0], vec![1, 1]], &Device::Cpu).unwrap();
        let m = m
            .squeeze(1)
            .unwrap()
            .to_dtype(DType::U8)
            .unwrap()
            .to_vec3::<u8>()
            .unwrap();
        let show = |r: &Vec<u8>| r.iter().map(|b| char::from(b'0' + b)).collect::<String>();
        assert_eq!(show(&m[0][0]), "0000000000000");
        assert_eq!(show(&m[0][11]), "0011111111110");
        assert_eq!(show(&m[0][12]), "0000000000000");
        assert_eq!(show(&m[1][12]), "0011111111111");
    }
}

#[cfg(test)]
mod checksums {
    use super::*;
    use sha2::{Digest, Sha256};

    /// The count of ones and the first 16 hex digits of the sha256 of each published mask.
    #[test]
    fn published_masks_have_the_spec_checksums() {
        type Expected = [(usize, &'static str); 4];
        let table: [(&str, MaskVariant, Expected); 4] = [
            (
                "350m",
                MaskVariant::Rc1,
                [
                    (41144, "2ad4f77b320a61bc"),
                    (39104, "01e3fa30864c1559"),
                    (42056, "b156f11dc1cf4e58"),
                    (44744, "690868509a530efb"),
                ],
            ),
            (
                "350m",
                MaskVariant::Rc10,
                [
                    (45240, "311c02c52e08db68"),
                    (43200, "32d751c3b20588c6"),
                    (46152, "5d15129ae837b111"),
                    (48840, "a4e1e552264ac898"),
                ],
            ),
            (
                "1.3b",
                MaskVariant::Rc10,
                [
                    (328304, "08182d07b294062d"),
                    (311936, "998914b2c3ec1979"),
                    (331464, "227ad2c297271aa7"),
                    (347394, "8f2b973784034903"),
                ],
            ),
            (
                "2.7b",
                MaskVariant::Rc10,
                [
                    (440340, "7fe587dffadd7ce1"),
                    (433440, "59e674e532a7450f"),
                    (438696, "6aa0dfd764360fab"),
                    (445736, "70b77ca18a0cd1ab"),
                ],
            ),
        ];
        for (preset, variant, expected) in table {
            let cfg = Config::preset(preset).unwrap();
            for (kind, (ones, digest)) in LayerMaskKind::ALL.into_iter().zip(expected) {
                let m = build_layer_mask(&cfg, variant, kind);
                let got_ones = m.iter().filter(|&&b| b == 1).count();
                let hex: String = Sha256::digest(&m)[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(
                    (got_ones, hex.as_str()),
                    (ones, digest),
                    "{preset} {variant} {kind}"
                );
            }
        }
    }
}
