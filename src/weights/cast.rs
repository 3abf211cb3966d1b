//! Conversion of stored (little-endian, possibly strided) tensor bytes into candle tensors.
//!
//! Each element is read once from the mapped bytes and written once into the output vector, so
//! loading never holds more than the output tensor. Floats go through f64, which is exact for
//! every stored float type, so f32→f16 and f32→bf16 round once, like torch's `.half()`.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::StoredDtype;

/// A strided tensor over stored bytes. `stride` and `offset` count elements.
pub(crate) struct View<'a> {
    pub bytes: &'a [u8],
    pub dtype: StoredDtype,
    pub shape: &'a [usize],
    pub stride: &'a [usize],
    pub offset: usize,
}

impl View<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&size, &stride) in self.shape.iter().zip(self.stride).rev() {
            if size != 1 && stride != expected {
                return false;
            }
            // Saturating: after a zero dimension the others' product need not fit (and no
            // element is read).
            expected = expected.saturating_mul(size);
        }
        true
    }

    /// Calls `f` with each element's bytes in row-major order. The caller (open) has checked
    /// that every addressed element lies inside `bytes`.
    fn for_each(&self, mut f: impl FnMut(&[u8])) {
        let es = self.dtype.size();
        let n = self.numel();
        if n == 0 {
            return;
        }
        if self.is_contiguous() {
            let start = self.offset * es;
            self.bytes[start..start + n * es]
                .chunks_exact(es)
                .for_each(f);
            return;
        }
        let rank = self.shape.len();
        let mut idx = vec![0usize; rank];
        let mut pos = self.offset;
        let last = rank - 1;
        let (last_size, last_stride) = (self.shape[last], self.stride[last]);
        loop {
            for i in 0..last_size {
                let at = (pos + i * last_stride) * es;
                f(&self.bytes[at..at + es]);
            }
            // Odometer over the outer dimensions.
            let mut d = last;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                pos += self.stride[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                pos -= self.stride[d] * idx[d];
                idx[d] = 0;
            }
        }
    }

    /// The converted elements. The element count is not bounded by the file size (a stride-0
    /// tensor can be huge over one stored element), so the buffer is reserved fallibly.
    fn collect<T>(&self, conv: impl Fn(&[u8]) -> T) -> Result<Vec<T>, String> {
        let n = self.numel();
        let mut out = Vec::new();
        out.try_reserve_exact(n).map_err(|e| {
            format!(
                "cannot allocate {n} elements of {} bytes: {e}",
                std::mem::size_of::<T>()
            )
        })?;
        self.for_each(|c| out.push(conv(c)));
        Ok(out)
    }
}

fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    a
}

/// Runs `$body` with `$read` bound to a closure reading one stored element as f64. A macro, not a
/// function pointer, so that each source type gets its own inlined conversion loop.
macro_rules! with_float_reader {
    ($dtype:expr, $read:ident => $body:expr) => {
        match $dtype {
            StoredDtype::F64 => {
                let $read = |c: &[u8]| f64::from_le_bytes(arr(c));
                $body
            }
            StoredDtype::F32 => {
                let $read = |c: &[u8]| f64::from(f32::from_le_bytes(arr(c)));
                $body
            }
            StoredDtype::F16 => {
                let $read = |c: &[u8]| f16::from_le_bytes(arr(c)).to_f64();
                $body
            }
            StoredDtype::BF16 => {
                let $read = |c: &[u8]| bf16::from_le_bytes(arr(c)).to_f64();
                $body
            }
            StoredDtype::I64 => {
                let $read = |c: &[u8]| i64::from_le_bytes(arr(c)) as f64;
                $body
            }
            StoredDtype::I32 => {
                let $read = |c: &[u8]| f64::from(i32::from_le_bytes(arr(c)));
                $body
            }
            StoredDtype::I16 => {
                let $read = |c: &[u8]| f64::from(i16::from_le_bytes(arr(c)));
                $body
            }
            StoredDtype::I8 => {
                let $read = |c: &[u8]| f64::from(c[0] as i8);
                $body
            }
            StoredDtype::U8 => {
                let $read = |c: &[u8]| f64::from(c[0]);
                $body
            }
            StoredDtype::Bool => {
                let $read = |c: &[u8]| f64::from(u8::from(c[0] != 0));
                $body
            }
        }
    };
}

/// Contiguous f16 → f32, the common case of loading a half-precision checkpoint for f32
/// inference: blocks go through `half`'s slice conversion, which uses F16C where the CPU has it.
fn f16_to_f32(bytes: &[u8]) -> Result<Vec<f32>, String> {
    const BLOCK: usize = 4096;
    let n = bytes.len() / 2;
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|e| format!("cannot allocate {n} f32 elements: {e}"))?;
    let mut halves = [f16::ZERO; BLOCK];
    let mut floats = [0f32; BLOCK];
    for block in bytes.chunks(2 * BLOCK) {
        let k = block.len() / 2;
        for (h, c) in halves.iter_mut().zip(block.chunks_exact(2)) {
            *h = f16::from_le_bytes([c[0], c[1]]);
        }
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&halves[..k], &mut floats[..k]);
        out.extend_from_slice(&floats[..k]);
    }
    Ok(out)
}

fn read_int(dtype: StoredDtype) -> Option<fn(&[u8]) -> i64> {
    Some(match dtype {
        StoredDtype::I64 => |c| i64::from_le_bytes(arr(c)),
        StoredDtype::I32 => |c| i64::from(i32::from_le_bytes(arr(c))),
        StoredDtype::I16 => |c| i64::from(i16::from_le_bytes(arr(c))),
        StoredDtype::I8 => |c| i64::from(c[0] as i8),
        StoredDtype::U8 => |c| i64::from(c[0]),
        StoredDtype::Bool => |c| i64::from(c[0] != 0),
        _ => return None,
    })
}

/// Converts integer values, failing on the first one the target type cannot hold.
fn narrow<T: TryFrom<i64>>(values: Vec<i64>) -> Result<Vec<T>, String> {
    values
        .into_iter()
        .map(|v| T::try_from(v).map_err(|_| format!("value {v} is out of range")))
        .collect()
}

/// Reads `view` into a contiguous tensor of type `target`.
pub(crate) fn to_tensor(view: &View<'_>, target: DType, device: &Device) -> Result<Tensor, String> {
    let shape = view.shape.to_vec();
    let err = |e: candle_core::Error| e.to_string();
    // Same type, contiguous: one copy of the bytes (candle needs an aligned buffer anyway).
    if view.dtype.candle() == Some(target) && view.is_contiguous() {
        let es = view.dtype.size();
        let start = view.offset * es;
        let bytes = &view.bytes[start..start + view.numel() * es];
        return Tensor::from_raw_buffer(bytes, target, &shape, device).map_err(err);
    }
    if view.dtype == StoredDtype::F16 && target == DType::F32 && view.is_contiguous() {
        let start = view.offset * 2;
        let values = f16_to_f32(&view.bytes[start..start + view.numel() * 2])?;
        return Tensor::from_vec(values, shape, device).map_err(err);
    }
    let t = match target {
        DType::F64 => with_float_reader!(view.dtype, read => {
            Tensor::from_vec(view.collect(read)?, shape, device)
        }),
        DType::F32 => with_float_reader!(view.dtype, read => {
            Tensor::from_vec(view.collect(|c| read(c) as f32)?, shape, device)
        }),
        DType::F16 => with_float_reader!(view.dtype, read => {
            Tensor::from_vec(view.collect(|c| f16::from_f64(read(c)))?, shape, device)
        }),
        DType::BF16 => with_float_reader!(view.dtype, read => {
            Tensor::from_vec(view.collect(|c| bf16::from_f64(read(c)))?, shape, device)
        }),
        DType::U8 if view.dtype.is_float() => with_float_reader!(view.dtype, read => {
            Tensor::from_vec(view.collect(|c| u8::from(read(c) != 0.0))?, shape, device)
        }),
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => {
            let Some(int) = read_int(view.dtype) else {
                return Err(format!(
                    "a {} tensor can only be read as a float type or as U8 (value != 0)",
                    view.dtype
                ));
            };
            let values = view.collect(int)?;
            match target {
                DType::U8 => Tensor::from_vec(narrow::<u8>(values)?, shape, device),
                DType::U32 => Tensor::from_vec(narrow::<u32>(values)?, shape, device),
                DType::I16 => Tensor::from_vec(narrow::<i16>(values)?, shape, device),
                DType::I32 => Tensor::from_vec(narrow::<i32>(values)?, shape, device),
                _ => Tensor::from_vec(values, shape, device),
            }
        }
        other => return Err(format!("unsupported target type {other:?}")),
    };
    t.map_err(err)
}

/// Whether any block of little-endian `$t` values in `bytes` has all the bits of `mask` set.
/// Blocks keep the inner loop branch-free, so that it vectorises, and let the scan stop early.
macro_rules! any_masked {
    ($bytes:expr, $t:ty, $mask:expr) => {{
        const N: usize = std::mem::size_of::<$t>();
        let mask: $t = $mask;
        $bytes.chunks(N * 1024).any(|block| {
            let mut hit = false;
            for c in block.chunks_exact(N) {
                hit |= <$t>::from_le_bytes(arr(c)) & mask == mask;
            }
            hit
        })
    }};
}

/// Whether an element the view addresses is a NaN or an infinity: all exponent bits set, in
/// every IEEE type. Integer and bool tensors have neither. Contiguous tensors (all of a real
/// checkpoint's) are scanned as blocks of bits, stopping at the first block holding one.
pub(crate) fn any_non_finite(view: &View<'_>) -> bool {
    let n = view.numel();
    if n == 0 || !view.dtype.is_float() {
        return false;
    }
    let es = view.dtype.size();
    if view.is_contiguous() {
        let start = view.offset * es;
        let bytes = &view.bytes[start..start + n * es];
        return match view.dtype {
            StoredDtype::F64 => any_masked!(bytes, u64, 0x7ff0_0000_0000_0000),
            StoredDtype::F32 => any_masked!(bytes, u32, 0x7f80_0000),
            StoredDtype::F16 => any_masked!(bytes, u16, 0x7c00),
            _ => any_masked!(bytes, u16, 0x7f80),
        };
    }
    let mut found = false;
    with_float_reader!(view.dtype, read => view.for_each(|c| found |= !read(c).is_finite()));
    found
}

/// Element count and the number of stored elements a strided view reaches (offset included):
/// the storage must hold at least that many. `None` on arithmetic overflow.
pub(crate) fn extent(shape: &[usize], stride: &[usize], offset: usize) -> Option<(usize, usize)> {
    let numel = shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s))?;
    if numel == 0 {
        return Some((0, 0));
    }
    let mut last = offset;
    for (&size, &st) in shape.iter().zip(stride) {
        last = last.checked_add((size - 1).checked_mul(st)?)?;
    }
    Some((numel, last.checked_add(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_view_is_materialised_in_row_major_order() {
        // Storage 0..12 as f32, view = 3x2 transpose of a 2x3 block starting at element 1.
        let bytes: Vec<u8> = (0..12).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let view = View {
            bytes: &bytes,
            dtype: StoredDtype::F32,
            shape: &[3, 2],
            stride: &[1, 3],
            offset: 1,
        };
        let t = to_tensor(&view, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![1., 4.], vec![2., 5.], vec![3., 6.]]
        );
        assert_eq!(extent(&[3, 2], &[1, 3], 1), Some((6, 7)));
    }

    #[test]
    fn non_finite_values_are_found_in_every_float_type() {
        let check = |dtype: StoredDtype, bytes: Vec<u8>, stride: usize| {
            let n = bytes.len() / dtype.size() / stride;
            any_non_finite(&View {
                bytes: &bytes,
                dtype,
                shape: &[n],
                stride: &[stride],
                offset: 0,
            })
        };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut values = vec![0.5f64; 5000];
            let encode = |values: &[f64], dtype: StoredDtype| -> Vec<u8> {
                values
                    .iter()
                    .flat_map(|&v| match dtype {
                        StoredDtype::F64 => v.to_le_bytes().to_vec(),
                        StoredDtype::F32 => (v as f32).to_le_bytes().to_vec(),
                        StoredDtype::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
                        _ => bf16::from_f64(v).to_le_bytes().to_vec(),
                    })
                    .collect()
            };
            for dtype in [
                StoredDtype::F64,
                StoredDtype::F32,
                StoredDtype::F16,
                StoredDtype::BF16,
            ] {
                assert!(!check(dtype, encode(&values, dtype), 1), "{dtype}");
                values[4321] = bad;
                assert!(check(dtype, encode(&values, dtype), 1), "{dtype} {bad}");
                // Strided: element 4321 is odd, so a stride-2 view skips it.
                assert!(!check(dtype, encode(&values, dtype), 2), "{dtype}");
                values[4321] = 0.5;
            }
        }
        // The largest finite values are finite; integers never count.
        assert!(!check(StoredDtype::F16, f16::MAX.to_le_bytes().to_vec(), 1));
        assert!(!check(StoredDtype::I16, vec![0xff; 64], 1));
    }

    #[test]
    fn float_masks_read_as_u8_are_nonzero_tests() {
        let bytes: Vec<u8> = [0.0f32, 1.0, -0.0, 0.5]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let view = View {
            bytes: &bytes,
            dtype: StoredDtype::F16,
            shape: &[4],
            stride: &[1],
            offset: 0,
        };
        let t = to_tensor(&view, DType::U8, &Device::Cpu).unwrap();
        assert_eq!(t.to_vec1::<u8>().unwrap(), vec![0, 1, 0, 1]);
    }
}
