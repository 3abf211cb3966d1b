//! Writing safetensors files, and converting any readable checkpoint into one.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{Checkpoint, StoredDtype, WeightsError};

/// One tensor to write: its header fields and a way to produce its bytes when its turn comes,
/// so that a whole checkpoint never has to be in memory at once.
struct Outgoing<'a> {
    name: String,
    dtype: StoredDtype,
    shape: Vec<usize>,
    bytes: Box<dyn FnOnce() -> Result<Vec<u8>, WeightsError> + 'a>,
}

fn candle_stored(dtype: DType) -> Option<StoredDtype> {
    Some(match dtype {
        DType::F64 => StoredDtype::F64,
        DType::F32 => StoredDtype::F32,
        DType::F16 => StoredDtype::F16,
        DType::BF16 => StoredDtype::BF16,
        DType::I64 => StoredDtype::I64,
        DType::I32 => StoredDtype::I32,
        DType::I16 => StoredDtype::I16,
        DType::U8 => StoredDtype::U8,
        _ => return None,
    })
}

/// The little-endian bytes of a tensor's elements in row-major order.
fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    fn le<T: Copy, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    Ok(match t.dtype() {
        DType::F64 => le(t.to_vec1::<f64>()?, f64::to_le_bytes),
        DType::F32 => le(t.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F16 => le(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::BF16 => le(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::I64 => le(t.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::I32 => le(t.to_vec1::<i32>()?, i32::to_le_bytes),
        DType::I16 => le(t.to_vec1::<i16>()?, i16::to_le_bytes),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(candle_core::Error::Msg(format!(
                "{other:?} has no safetensors equivalent here"
            )));
        }
    })
}

/// Writes `tensors` to `path` as safetensors. The file is written next to `path` under a
/// temporary name and renamed into place, so readers (and memory maps) of an existing file never
/// see a half-written one. An existing `path` is replaced; refusing is the caller's decision.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<(), WeightsError> {
    save_safetensors_with_bools(tensors, path, |_| false)
}

/// As [`save_safetensors`], but the tensors for which `is_bool(name)` holds are stored as
/// `BOOL` (non-zero → true), as PyTorch stores bool buffers such as RuDOLPH's layer masks;
/// candle has no bool type to say so itself.
pub fn save_safetensors_with_bools(
    tensors: &[(String, Tensor)],
    path: &Path,
    is_bool: impl Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let as_bool = is_bool(name);
        let dtype = if as_bool {
            StoredDtype::Bool
        } else {
            candle_stored(t.dtype()).ok_or_else(|| WeightsError::Save {
                path: path.to_path_buf(),
                name: name.clone(),
                detail: format!("dtype {:?} cannot be stored in safetensors", t.dtype()),
            })?
        };
        out.push(Outgoing {
            name: name.clone(),
            dtype,
            shape: t.dims().to_vec(),
            bytes: Box::new(move || {
                let bytes = if as_bool {
                    t.ne(0f64)
                        .and_then(|b| b.to_dtype(DType::U8))
                        .and_then(|b| tensor_bytes(&b))
                } else {
                    tensor_bytes(t)
                };
                bytes.map_err(|e| WeightsError::Save {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    detail: e.to_string(),
                })
            }),
        });
    }
    write_file(path, out)
}

fn write_file(path: &Path, tensors: Vec<Outgoing<'_>>) -> Result<(), WeightsError> {
    let io = |action, source| WeightsError::Io {
        path: path.to_path_buf(),
        action,
        source,
    };
    // Header: tensors in the given order, contiguous offsets, padded with spaces to a multiple
    // of 8 bytes as the reference writer does (keeps the data aligned for mmap readers).
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    let mut seen = std::collections::HashSet::new();
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(WeightsError::Save {
                path: path.to_path_buf(),
                name: t.name.clone(),
                detail: "the name appears twice".into(),
            });
        }
        let len = t.shape.iter().product::<usize>() * t.dtype.size();
        let name = serde_json::to_string(&t.name).unwrap_or_default();
        header.push_str(&format!(
            ",{name}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{offset},{}]}}",
            t.dtype.safetensors_name(),
            t.shape,
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    while (header.len() + 8) % 8 != 0 {
        header.push(' ');
    }

    crate::atomic_file::write_atomically(
        path,
        |w| {
            w.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|()| w.write_all(header.as_bytes()))
                .map_err(|e| io("write", e))?;
            for t in tensors {
                let expected = t.shape.iter().product::<usize>() * t.dtype.size();
                let name = t.name;
                let bytes = (t.bytes)()?;
                if bytes.len() != expected {
                    return Err(WeightsError::Save {
                        path: path.to_path_buf(),
                        name,
                        detail: format!("produced {} bytes, expected {expected}", bytes.len()),
                    });
                }
                w.write_all(&bytes).map_err(|e| io("write", e))?;
            }
            Ok(())
        },
        io,
    )
}

/// What [`convert`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertSummary {
    pub tensors: usize,
    /// Bytes of tensor data (the header excluded).
    pub bytes: u64,
}

/// Converts any checkpoint [`Checkpoint::open`] reads into safetensors at `output`, keeping the
/// tensor names. Float tensors are cast to `float_dtype` (default: their stored type); integer
/// and bool tensors keep their type (bool masks stay safetensors `BOOL`, so the original Python
/// `load_state_dict` accepts the file). An existing `output` is refused unless `force`.
pub fn convert(
    input: &Path,
    output: &Path,
    float_dtype: Option<DType>,
    force: bool,
) -> Result<ConvertSummary, WeightsError> {
    if !force && output.exists() {
        return Err(WeightsError::Exists {
            path: output.to_path_buf(),
        });
    }
    let target = match float_dtype {
        None => None,
        Some(d) => match candle_stored(d) {
            Some(s) if s.is_float() => Some(s),
            _ => {
                return Err(WeightsError::Save {
                    path: output.to_path_buf(),
                    name: String::new(),
                    detail: format!("the target dtype must be a float type, not {d:?}"),
                });
            }
        },
    };
    let ckpt = Checkpoint::open(input)?;
    let mut out = Vec::with_capacity(ckpt.len());
    let mut total = 0u64;
    for name in ckpt.names() {
        let Some(info) = ckpt.info(name) else {
            continue;
        };
        let dtype = match (info.dtype.is_float(), target) {
            (true, Some(t)) => t,
            _ => info.dtype,
        };
        total += (info.shape.iter().product::<usize>() * dtype.size()) as u64;
        let ckpt = &ckpt;
        out.push(Outgoing {
            name: name.to_string(),
            dtype,
            shape: info.shape.clone(),
            bytes: Box::new(move || {
                // candle has no bool or i8: read those through a wider type and narrow back.
                let via = match dtype {
                    StoredDtype::Bool => DType::U8,
                    StoredDtype::I8 => DType::I16,
                    other => other.candle().unwrap_or(DType::F32),
                };
                let t = ckpt.load(name, via, &Device::Cpu)?;
                let bytes = tensor_bytes(&t).map_err(|e| WeightsError::Save {
                    path: output.to_path_buf(),
                    name: name.to_string(),
                    detail: e.to_string(),
                })?;
                Ok(match dtype {
                    StoredDtype::Bool => bytes.into_iter().map(|b| u8::from(b != 0)).collect(),
                    StoredDtype::I8 => bytes.chunks_exact(2).map(|c| c[0]).collect(),
                    _ => bytes,
                })
            }),
        });
    }
    let tensors = out.len();
    write_file(output, out)?;
    Ok(ConvertSummary {
        tensors,
        bytes: total,
    })
}
