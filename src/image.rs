//! Image I/O and the pipelines' image pre-processing, pixel-exact with the reference
//! (torchvision `RandomResizedCrop(size, scale=(1, 1), ratio=(1, 1))` on a PIL image, then
//! `ToTensor`), plus the tensor → picture helpers of rudalle's utils.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// Why an image could not be read, written or converted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a readable PNG, JPEG or WebP image: {source}")]
    Decode {
        path: String,
        source: image::ImageError,
    },
    #[error("cannot write image {path}: {source}")]
    Save {
        path: String,
        source: image::ImageError,
    },
    #[error("{path} is too large a picture: {problem}")]
    TooLarge { path: String, problem: String },
    #[error("cannot write a picture to {path}: {problem}")]
    Output { path: String, problem: String },
    #[error("bad image tensor: {0}")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The largest picture file read: far above any photograph, far below what would exhaust memory.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The largest side of a picture decoded (the model uses 64 to 256 pixels of it).
pub const MAX_SIDE: u32 = 16_384;

/// The most memory the decoder may take for one picture.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Reads a PNG, JPEG or WebP (detected by content) and converts it to 8-bit RGB like PIL's
/// `convert('RGB')`: greyscale is replicated, palettes are expanded, alpha is dropped (not
/// composited), 16-bit samples are scaled to 8 bits. PNG pixels are exact; JPEG is decoded by
/// the `image` crate, which can differ from PIL's libjpeg by a few levels per channel.
///
/// Files above [`MAX_FILE_BYTES`], pictures wider or taller than [`MAX_SIDE`] and pictures
/// whose decoding needs more than [`MAX_DECODE_BYTES`] are refused before they are decoded,
/// whatever their header declares.
pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let open = |source| ImageError::Open {
        path: shown.clone(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(open)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(open)?;
    decode_image(&bytes, &shown)
}

/// As [`load_image`], for a picture already in memory; `shown` names it in errors (a file, a
/// request's field).
pub fn decode_image(bytes: &[u8], shown: &str) -> Result<RgbImage, ImageError> {
    decode_image_within(bytes, shown, MAX_SIDE)
}

/// As [`decode_image`], refusing pictures more than `max_side` pixels wide or tall (at most
/// [`MAX_SIDE`]).
pub fn decode_image_within(
    bytes: &[u8],
    shown: &str,
    max_side: u32,
) -> Result<RgbImage, ImageError> {
    let max_side = max_side.min(MAX_SIDE);
    let shown = shown.to_string();
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ImageError::TooLarge {
            path: shown,
            problem: format!("the file is larger than {} MiB", MAX_FILE_BYTES >> 20),
        });
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| ImageError::Open {
            path: shown.clone(),
            source,
        })?;
    reader.limits(limits);
    let img = reader.decode().map_err(|source| match source {
        image::ImageError::Limits(e) => ImageError::TooLarge {
            path: shown.clone(),
            problem: format!(
                "{e} (at most {max_side} pixels a side and {} MiB to decode)",
                MAX_DECODE_BYTES >> 20
            ),
        },
        source => ImageError::Decode {
            path: shown.clone(),
            source,
        },
    })?;
    Ok(img.to_rgb8())
}

/// The square that `RandomResizedCrop(scale=(1, 1), ratio=(1, 1))` falls back to:
/// `(left, top, side)`. A square image is kept whole; otherwise the centred square of the short
/// side, offset `floor((long − short) / 2)`.
///
/// One reference difference: when the sides differ by exactly 1 pixel, one of torchvision's ten
/// random attempts succeeds and the offset is a random 0 or 1; here it is always 0 (the floor
/// of the centre).
pub fn center_square(width: u32, height: u32) -> (u32, u32, u32) {
    let side = width.min(height);
    ((width - side) / 2, (height - side) / 2, side)
}

/// PIL's fixed-point precision for 8-bit resampling (`32 − 8 − 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel taps of PIL's `precompute_coeffs` with the bilinear (triangle) filter,
/// already normalised to fixed point like `normalize_coeffs_8bpc`.
struct Taps {
    /// `(first input index, number of taps)` per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output pixel.
    weights: Vec<i32>,
    ksize: usize,
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

fn precompute_taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 1.0;
    let (in0, in1) = (0.0f64, in_size as f64);
    let scale = (in1 - in0) / out_size as f64;
    // Antialiasing: when shrinking, the filter is stretched over `scale` input pixels.
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the clamp to 0 makes that a floor here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bilinear_filter(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Taps {
        bounds,
        weights,
        ksize,
    }
}

/// PIL's `clip8`: drop the fixed-point fraction (the accumulator starts at one half, so this
/// rounds) and saturate.
fn clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// One separable pass over `n_lines` lines of `len_in` samples (3 channels interleaved);
/// `at(line, i)` reads input sample `i` of a line, the result is `[line][out][channel]`.
fn resample_pass(
    taps: &Taps,
    n_lines: usize,
    at: impl Fn(usize, usize, usize) -> u8,
) -> Vec<[u8; 3]> {
    let out_len = taps.bounds.len();
    let mut out = Vec::with_capacity(n_lines * out_len);
    for line in 0..n_lines {
        for (o, &(start, count)) in taps.bounds.iter().enumerate() {
            let k = &taps.weights[o * taps.ksize..o * taps.ksize + count];
            let mut px = [0u8; 3];
            for (c, p) in px.iter_mut().enumerate() {
                let mut acc = 1i64 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    acc += i64::from(at(line, start + i, c)) * i64::from(w);
                }
                *p = clip8(acc);
            }
            out.push(px);
        }
    }
    out
}

/// PIL-compatible `Image.resize((width, height), Image.BILINEAR)` of an 8-bit RGB image:
/// PIL's `ImagingResample` with the triangle filter, antialiased when shrinking, in two passes
/// (horizontal, then vertical) with 22-bit fixed-point weights and rounding to 8 bits after each
/// pass. A pass whose size does not change is skipped, as in PIL.
///
/// The pass order is that of Pillow ≤ 12 (the reference's era; checked pixel-exact against
/// Pillow 10.4 on random sizes). Pillow 13 runs the vertical pass first when the height shrinks
/// much more than the width (python-pillow PR 9549), which can move some pixels by one level.
pub fn resize_bilinear(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    let mut cur: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    let mut cur_w = w0;
    if w1 != w0 {
        let taps = precompute_taps(w0, w1);
        cur = resample_pass(&taps, h0, |y, x, c| cur[y * w0 + x][c]);
        cur_w = w1;
    }
    if h1 != h0 {
        let taps = precompute_taps(h0, h1);
        // Lines are output columns; the result comes out column-major, transpose it back.
        let cols = resample_pass(&taps, cur_w, |x, y, c| cur[y * cur_w + x][c]);
        cur = (0..h1 * cur_w)
            .map(|i| cols[(i % cur_w) * h1 + i / cur_w])
            .collect();
    }
    RgbImage::from_fn(width, height, |x, y| {
        image::Rgb(cur[y as usize * cur_w + x as usize])
    })
}

/// The pipelines' image transform in 8-bit: centre square ([`center_square`]), then
/// [`resize_bilinear`] to `size × size`. Returns the image unchanged when it already is
/// `size × size` (PIL returns a copy without resampling).
pub fn center_crop_resize(img: &RgbImage, size: u32) -> RgbImage {
    let (left, top, side) = center_square(img.width(), img.height());
    let square = image::imageops::crop_imm(img, left, top, side, side).to_image();
    if side == size {
        square
    } else {
        resize_bilinear(&square, size, size)
    }
}

/// torchvision `ToTensor`: 8-bit HWC → `[3, H, W]` f32 `value / 255`.
pub fn to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor, ImageError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = f32::from(p.0[c]) / 255.0;
        }
    }
    Ok(Tensor::from_vec(data, (3, h, w), device)?)
}

/// The full pre-processing of an image for the VQGAN: [`center_crop_resize`] then
/// [`to_tensor`] → `[3, size, size]` in `[0, 1]`.
pub fn preprocess(img: &RgbImage, size: u32, device: &Device) -> Result<Tensor, ImageError> {
    to_tensor(&center_crop_resize(img, size), device)
}

/// torchvision `to_pil_image` of a `[3, H, W]` tensor in `[0, 1]`: `x · 255` **truncated** to
/// 8 bits (the reference does not round; values outside `[0, 1]` saturate).
pub fn to_rgb8(tensor: &Tensor) -> Result<RgbImage, ImageError> {
    let (c, h, w) = tensor
        .dims3()
        .map_err(|_| ImageError::Shape(format!("expected [3, H, W], got {:?}", tensor.dims())))?;
    if c != 3 {
        return Err(ImageError::Shape(format!("expected 3 channels, got {c}")));
    }
    let data = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        image::Rgb([0, 1, 2].map(|ch| (data[ch * h * w + i] * 255.0) as u8))
    }))
}

/// The formats pictures are written in, chosen by the output file's extension.
pub const OUTPUT_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// JPEG quality of written pictures: high enough that the 8×8 blocks of a 64-pixel picture do
/// not show.
const JPEG_QUALITY: u8 = 95;

/// The format a picture written to `path` gets, from its extension (PNG, JPEG, lossless
/// WebP), checked before any work so that a long generation never ends in an unwritable
/// name: an unknown extension and a folder that does not exist are errors naming them.
pub fn output_format(path: &Path) -> Result<image::ImageFormat, ImageError> {
    let shown = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let format = match ext.as_str() {
        "png" => image::ImageFormat::Png,
        "jpg" | "jpeg" => image::ImageFormat::Jpeg,
        "webp" => image::ImageFormat::WebP,
        _ => {
            return Err(ImageError::Output {
                path: shown,
                problem: format!(
                    "the extension {} names no format this writes (one of: {})",
                    if ext.is_empty() {
                        "(none)".to_string()
                    } else {
                        format!(".{ext}")
                    },
                    OUTPUT_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
                ),
            });
        }
    };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent
        && !dir.is_dir()
    {
        return Err(ImageError::Output {
            path: shown,
            problem: format!("the folder {} does not exist", dir.display()),
        });
    }
    Ok(format)
}

/// Writes a picture in the format its extension names (see [`output_format`]), atomically: the
/// bytes go to a temporary file that replaces `path` only once they are all written and synced,
/// so a full disk or a failed write is an error that leaves any earlier file at `path` whole.
pub fn save_image(img: &RgbImage, path: &Path) -> Result<(), ImageError> {
    let format = output_format(path)?;
    let shown = path.display().to_string();
    crate::atomic_file::write_atomically(
        path,
        |w| {
            let encoded = match format {
                image::ImageFormat::Jpeg => {
                    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut *w, JPEG_QUALITY)
                        .encode_image(img)
                }
                _ => img.write_to(&mut *w, format),
            };
            encoded.map_err(|source| ImageError::Save {
                path: shown.clone(),
                source,
            })
        },
        |what, e| ImageError::Save {
            path: shown.clone(),
            source: image::ImageError::IoError(std::io::Error::new(
                e.kind(),
                format!("cannot {what}: {e}"),
            )),
        },
    )
}

/// torchvision `make_grid(images, nrow, padding=2, pad_value=0)`: `[B, C, H, W]` → one
/// `[C, H', W']` tensor with `min(nrow, B)` images per row and 2 px of zeros around and between
/// them. A single image is returned as is (no padding), like torchvision.
pub fn grid(images: &Tensor, nrow: usize) -> Result<Tensor, ImageError> {
    const PADDING: usize = 2;
    let (b, c, h, w) = images.dims4().map_err(|_| {
        ImageError::Shape(format!("expected [B, C, H, W], got {:?}", images.dims()))
    })?;
    if b == 0 || nrow == 0 {
        return Err(ImageError::Shape(
            "grid of no images or with nrow = 0".into(),
        ));
    }
    if b == 1 {
        return Ok(images.squeeze(0)?);
    }
    let xmaps = nrow.min(b);
    let ymaps = b.div_ceil(xmaps);
    let (cell_h, cell_w) = (h + PADDING, w + PADDING);
    let (gh, gw) = (cell_h * ymaps + PADDING, cell_w * xmaps + PADDING);
    let src = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0f32; c * gh * gw];
    for k in 0..b {
        let (gy, gx) = (k / xmaps, k % xmaps);
        for ch in 0..c {
            for y in 0..h {
                let s = ((k * c + ch) * h + y) * w;
                let d = (ch * gh + gy * cell_h + PADDING + y) * gw + gx * cell_w + PADDING;
                out[d..d + w].copy_from_slice(&src[s..s + w]);
            }
        }
    }
    Ok(Tensor::from_vec(out, (c, gh, gw), images.device())?.to_dtype(images.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_offsets() {
        assert_eq!(center_square(64, 80), (0, 8, 64));
        assert_eq!(center_square(81, 64), (8, 0, 64));
        assert_eq!(center_square(5, 5), (0, 0, 5));
    }

    #[test]
    fn taps_sum_to_one_and_cover_support() {
        for (i, o) in [(64, 48), (48, 64), (10, 3), (7, 7), (3, 10)] {
            let t = precompute_taps(i, o);
            for (n, &(start, count)) in t.bounds.iter().enumerate() {
                assert!(start + count <= i && count <= t.ksize);
                let s: i64 = t.weights[n * t.ksize..][..count]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= count as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    /// Outputs of Pillow 10.4 `Image.resize(size, BILINEAR)` on a 7×5 test pattern: mixed
    /// up/down scaling per axis, which the fixture pictures do not exercise.
    #[test]
    fn matches_pillow_on_mixed_scaling() {
        let img = RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([
                ((x * 37 + y * 91) % 256) as u8,
                ((x * x * 13 + y * 7) % 256) as u8,
                ((x * y * 29 + 5) % 256) as u8,
            ])
        });
        let cases: [(u32, u32, &[u8]); 3] = [
            (
                11,
                3,
                &[
                    39, 3, 5, 56, 9, 11, 79, 20, 19, 103, 44, 26, 126, 79, 35, 150, 120, 42, 174,
                    178, 50, 167, 173, 58, 121, 85, 66, 134, 150, 74, 151, 215, 80, 125, 14, 5,
                    142, 20, 31, 152, 31, 68, 86, 55, 105, 70, 90, 122, 94, 131, 122, 118, 189,
                    159, 125, 184, 157, 113, 96, 103, 131, 161, 97, 148, 226, 97, 69, 25, 5, 86,
                    31, 52, 109, 42, 118, 133, 66, 184, 156, 101, 157, 180, 142, 60, 111, 200, 126,
                    81, 195, 152, 105, 107, 125, 128, 172, 117, 145, 237, 114,
                ],
            ),
            (
                3,
                9,
                &[
                    32, 17, 5, 111, 114, 5, 190, 150, 5, 62, 19, 13, 136, 116, 34, 153, 152, 55,
                    113, 23, 27, 179, 120, 82, 92, 156, 137, 139, 27, 41, 127, 124, 124, 96, 160,
                    131, 159, 31, 55, 52, 128, 164, 116, 164, 102, 98, 35, 69, 94, 132, 120, 167,
                    168, 104, 59, 39, 83, 130, 136, 93, 189, 172, 109, 110, 43, 96, 139, 140, 133,
                    97, 176, 131, 140, 45, 104, 144, 142, 157, 42, 178, 144,
                ],
            ),
            (
                4,
                2,
                &[
                    96, 15, 20, 110, 69, 62, 145, 162, 96, 124, 158, 91, 103, 29, 51, 117, 83, 134,
                    113, 176, 132, 139, 172, 107,
                ],
            ),
        ];
        for (w, h, want) in cases {
            assert_eq!(
                resize_bilinear(&img, w, h).as_raw().as_slice(),
                want,
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 255]));
        let out = resize_bilinear(&img, 11, 30);
        assert!(out.pixels().all(|p| p.0 == [200, 13, 255]));
    }

    #[test]
    fn truncation_and_grid() {
        let t = Tensor::from_vec(
            vec![0.999f32, 0.5, 1.0, 0.0, 0.00392, 2.0],
            (3, 1, 2),
            &Device::Cpu,
        )
        .unwrap();
        let img = to_rgb8(&t).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [254, 255, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [127, 0, 255]);
        let batch = Tensor::ones((3, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let g = grid(&batch, 2).unwrap();
        assert_eq!(g.dims(), &[3, 2 * 6 + 2, 2 * 7 + 2]);
        let total = g.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(total, (3 * 3 * 4 * 5) as f32);
        let one = grid(&batch.narrow(0, 0, 1).unwrap(), 4).unwrap();
        assert_eq!(one.dims(), &[3, 4, 5]);
    }
}
