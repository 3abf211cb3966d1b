//! The inverse Haar wavelet transform that ruDALL-E's DWT decoder applies to its 12-channel
//! output (`pytorch_wavelets.DWTInverse(mode='zero', wave='haar')`, one level).

use candle_core::{Result, Tensor};

/// `1/√2` as the float32 the reference stores in its filter buffers.
pub const HAAR_A: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// The four synthesis-filter buffers of `decoder.idwt` with their expected shapes and values
/// (`g0 = [a, a]`, `g1 = [a, −a]`, as columns `[1,1,2,1]` and rows `[1,1,1,2]`).
pub fn haar_buffers() -> [(&'static str, [usize; 4], [f32; 2]); 4] {
    let g0 = [HAAR_A, HAAR_A];
    let g1 = [HAAR_A, -HAAR_A];
    [
        ("g0_col", [1, 1, 2, 1], g0),
        ("g1_col", [1, 1, 2, 1], g1),
        ("g0_row", [1, 1, 1, 2], g0),
        ("g1_row", [1, 1, 1, 2], g1),
    ]
}

/// One-level inverse Haar DWT in closed form: `[B, 12, h, w]` → `[B, 3, 2h, 2w]`.
///
/// Channels `0..3` are the low-pass band `LL` per colour; channel `3 + 3c + k` is band `k`
/// (`LH`, `HL`, `HH`) of colour `c`. The reference runs two separable synthesis passes with
/// `a = 0.70710677`; the closed form below (`a² = ½`) agrees with it to ~5e-7.
pub fn inverse_haar(f: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = f.dims4()?;
    if c != 12 {
        candle_core::bail!("inverse Haar DWT expects 12 channels, got {c}");
    }
    let ll = f.narrow(1, 0, 3)?;
    let bands = f.narrow(1, 3, 9)?.reshape((b, 3, 3, h, w))?;
    let lh = bands.narrow(2, 0, 1)?.squeeze(2)?;
    let hl = bands.narrow(2, 1, 1)?.squeeze(2)?;
    let hh = bands.narrow(2, 2, 1)?.squeeze(2)?;
    let lo_sum = (&ll + &lh)?;
    let lo_diff = (&ll - &lh)?;
    let hi_sum = (&hl + &hh)?;
    let hi_diff = (&hl - &hh)?;
    let x00 = ((&lo_sum + &hi_sum)? * 0.5)?;
    let x01 = ((&lo_sum - &hi_sum)? * 0.5)?;
    let x10 = ((&lo_diff + &hi_diff)? * 0.5)?;
    let x11 = ((&lo_diff - &hi_diff)? * 0.5)?;
    // Interleave columns, then rows: [B,3,h,w,2] -> [B,3,h,2w]; [B,3,h,2,2w] -> [B,3,2h,2w].
    let even_rows = Tensor::stack(&[&x00, &x01], 4)?.reshape((b, 3, h, 2 * w))?;
    let odd_rows = Tensor::stack(&[&x10, &x11], 4)?.reshape((b, 3, h, 2 * w))?;
    Tensor::stack(&[&even_rows, &odd_rows], 3)?.reshape((b, 3, 2 * h, 2 * w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The reference's two separable passes with the float32 filter taps, written out.
    fn two_pass(f: &[f32], h: usize, w: usize) -> Vec<f32> {
        let a = HAAR_A;
        let at = |ch: usize, i: usize, j: usize| f[(ch * h + i) * w + j];
        let mut out = vec![0f32; 3 * 4 * h * w];
        for c in 0..3 {
            for i in 0..h {
                for j in 0..w {
                    let (ll, lh, hl, hh) = (
                        at(c, i, j),
                        at(3 + 3 * c, i, j),
                        at(4 + 3 * c, i, j),
                        at(5 + 3 * c, i, j),
                    );
                    let lo = [a * ll + a * lh, a * ll - a * lh];
                    let hi = [a * hl + a * hh, a * hl - a * hh];
                    for di in 0..2 {
                        let x = [a * lo[di] + a * hi[di], a * lo[di] - a * hi[di]];
                        for dj in 0..2 {
                            out[(c * 2 * h + 2 * i + di) * 2 * w + 2 * j + dj] = x[dj];
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn closed_form_matches_two_pass_synthesis() {
        let (h, w) = (3, 5);
        let data: Vec<f32> = (0..12 * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let f = Tensor::from_vec(data.clone(), (1, 12, h, w), &Device::Cpu).unwrap();
        let got = inverse_haar(&f).unwrap();
        assert_eq!(got.dims(), &[1, 3, 2 * h, 2 * w]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(two_pass(&data, h, w)) {
            assert!((g - e).abs() < 1e-5, "{g} vs {e}");
        }
    }
}
