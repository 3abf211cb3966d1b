//! Checkpoint files: safetensors, torch zip archives (`torch.save` since 1.6) and the legacy
//! (pre-1.6) torch format, read through one memory map without a second copy of the data.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! let ckpt = rudolph::weights::Checkpoint::open("pytorch_model.bin")?;
//! let tensors = ckpt.load_all(DType::F32, &Device::Cpu)?;
//! let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cast;
mod pickle;
mod torch;
mod write;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use write::{ConvertSummary, convert, save_safetensors, save_safetensors_with_bools};

/// Element type of a tensor as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StoredDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F64 | Self::F32 | Self::F16 | Self::BF16)
    }

    /// The candle type holding these values unchanged, if candle has one (it has no bool or i8).
    pub fn candle(self) -> Option<DType> {
        Some(match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 => DType::I16,
            Self::U8 => DType::U8,
            Self::I8 | Self::Bool => return None,
        })
    }

    /// The safetensors name of this type (`F16`, `BOOL`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Self::F64 => "F64",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I64 => "I64",
            Self::I32 => "I32",
            Self::I16 => "I16",
            Self::I8 => "I8",
            Self::U8 => "U8",
            Self::Bool => "BOOL",
        }
    }
}

impl fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F64 => "float64",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        })
    }
}

/// The container format of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save` zip archive (torch ≥ 1.6).
    TorchZip,
    /// `torch.save(..., _use_new_zipfile_serialization=False)` or torch < 1.6.
    TorchLegacy,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Safetensors => "safetensors",
            Self::TorchZip => "torch zip",
            Self::TorchLegacy => "legacy torch",
        })
    }
}

/// Stored type and shape of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
}

/// Everything that can go wrong reading or writing a checkpoint. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: the file is empty (0 bytes), not a checkpoint")]
    Empty { path: PathBuf },
    #[error(
        "{path}: unrecognised file format (not safetensors, a torch zip archive or a legacy torch \
         pickle); it starts with {start}"
    )]
    UnknownFormat { path: PathBuf, start: String },
    #[error("{path}: malformed {format} file: {detail}")]
    Malformed {
        path: PathBuf,
        format: Format,
        detail: String,
    },
    #[error("{path}: no tensor named `{name}` in this checkpoint ({count} tensors{hint})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        count: usize,
        hint: String,
    },
    #[error(
        "{path}: cannot load tensor `{name}` ({stored}, shape {shape:?}) as {target:?}: {detail}"
    )]
    Conversion {
        path: PathBuf,
        name: String,
        stored: StoredDtype,
        shape: Vec<usize>,
        target: DType,
        detail: String,
    },
    #[error("{}", mismatch_message(path, missing, unexpected, wrong_shape))]
    Mismatch {
        path: PathBuf,
        /// Expected names absent from the file, with the expected shape.
        missing: Vec<(String, Vec<usize>)>,
        /// Names in the file that were not expected, with the shape found.
        unexpected: Vec<(String, Vec<usize>)>,
        /// Name, expected shape, shape found.
        wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    #[error("{path}: cannot save tensor `{name}`: {detail}")]
    Save {
        path: PathBuf,
        name: String,
        detail: String,
    },
    #[error("{path}: already exists")]
    Exists { path: PathBuf },
}

fn mismatch_message(
    path: &Path,
    missing: &[(String, Vec<usize>)],
    unexpected: &[(String, Vec<usize>)],
    wrong_shape: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut s = format!(
        "{}: checkpoint does not match the expected tensors ({} missing, {} unexpected, {} with \
         a wrong shape):",
        path.display(),
        missing.len(),
        unexpected.len(),
        wrong_shape.len()
    );
    for (name, shape) in missing {
        s.push_str(&format!(
            "\n  missing key `{name}` (expected shape {shape:?})"
        ));
    }
    for (name, shape) in unexpected {
        s.push_str(&format!(
            "\n  unexpected key `{name}` (found shape {shape:?})"
        ));
    }
    for (name, expected, found) in wrong_shape {
        s.push_str(&format!(
            "\n  shape mismatch for `{name}`: expected {expected:?}, found {found:?}"
        ));
    }
    s
}

/// Where a storage's bytes are: a range of the memory map, or a buffer decompressed at open.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Region {
    Mapped { start: usize, len: usize },
    Owned { index: usize },
}

/// The file's bytes, shared by every view of a checkpoint.
pub(crate) struct Source {
    map: memmap2::Mmap,
    owned: Vec<Vec<u8>>,
}

impl Source {
    fn bytes(&self, region: Region) -> &[u8] {
        match region {
            Region::Mapped { start, len } => &self.map[start..start + len],
            Region::Owned { index } => &self.owned[index],
        }
    }
}

/// One tensor: a strided view (in elements) into the bytes of a region.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    info: TensorInfo,
    region: Region,
    offset: usize,
    stride: Vec<usize>,
}

/// A checkpoint file opened for reading, or a view of part of one (see [`Checkpoint::strip_prefix`]).
/// Cloning is cheap: clones share the memory map.
#[derive(Clone)]
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    source: Arc<Source>,
    entries: Vec<(String, Entry)>,
    index: HashMap<String, usize>,
    /// What [`Checkpoint::strip_prefix`] removed, so that errors can name the key as in the file.
    prefix: String,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("prefix", &self.prefix)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// Row-major strides of `shape`.
pub(crate) fn contiguous_stride(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    stride
}

impl Checkpoint {
    /// Opens a checkpoint, detecting its format from the file's content (not its extension):
    /// safetensors, a torch zip archive (whatever its internal folder is called) or a legacy
    /// (pre-1.6) torch pickle.
    ///
    /// For torch files the top-level object may be the state dict itself (`pytorch_model.bin`),
    /// or a dict holding it under `state_dict` (Lightning `.ckpt`), `params` or `params_ema`
    /// (Real-ESRGAN); the other entries are parsed and ignored. Every tensor's storage is checked
    /// to hold the bytes the tensor needs, so a truncated file fails here, not at load time.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let io = |action, source| WeightsError::Io {
            path: path.clone(),
            action,
            source,
        };
        let file = std::fs::File::open(&path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        if len == 0 {
            return Err(WeightsError::Empty { path });
        }
        // SAFETY: the map is read-only. Like every mmap-based reader (safetensors, candle) this
        // assumes nobody truncates or rewrites the file while it is open; `save_safetensors`
        // writes a new file and renames it, which leaves existing maps intact.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("memory-map", e))?;
        let (format, parsed) = if map.starts_with(b"PK\x03\x04") || map.starts_with(b"PK\x05\x06") {
            (Format::TorchZip, torch::parse_zip(&path, &map)?)
        } else if is_safetensors(&map) {
            (Format::Safetensors, parse_safetensors(&path, &map)?)
        } else if map.first() == Some(&0x80) {
            (Format::TorchLegacy, torch::parse_legacy(&path, &map)?)
        } else {
            let start: String = map
                .iter()
                .take(16)
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            return Err(WeightsError::UnknownFormat {
                path,
                start: format!("bytes {start}"),
            });
        };
        let mut ckpt = Checkpoint {
            path,
            format,
            source: Arc::new(Source {
                map,
                owned: parsed.owned,
            }),
            entries: Vec::new(),
            index: HashMap::new(),
            prefix: String::new(),
        };
        for (name, entry) in parsed.entries {
            if ckpt
                .index
                .insert(name.clone(), ckpt.entries.len())
                .is_some()
            {
                return Err(ckpt.malformed(format!("tensor `{name}` appears twice")));
            }
            ckpt.entries.push((name, entry));
        }
        Ok(ckpt)
    }

    fn malformed(&self, detail: String) -> WeightsError {
        WeightsError::Malformed {
            path: self.path.clone(),
            format: self.format,
            detail,
        }
    }

    /// The file this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The detected container format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Tensor names, in file order (pickle order for torch files, data order for safetensors).
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Stored type and shape of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.entries[i].1.info)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightsError> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.entries[i].1),
            None => {
                let similar: Vec<&str> = self
                    .names()
                    .into_iter()
                    .filter(|n| n.ends_with(name) || name.ends_with(n))
                    .take(3)
                    .collect();
                let hint = match (similar.is_empty(), self.prefix.is_empty()) {
                    (true, true) => String::new(),
                    (true, false) => format!(" under prefix `{}`", self.prefix),
                    (false, _) => format!("; similar: {similar:?}"),
                };
                Err(WeightsError::MissingTensor {
                    path: self.path.clone(),
                    name: format!("{}{name}", self.prefix),
                    count: self.entries.len(),
                    hint,
                })
            }
        }
    }

    /// Reads tensor `name` into a new tensor of type `dtype` on `device`, converting on the way:
    /// any float type to any float type; bool and integer tensors to 0/1 (or their value) in the
    /// target type; float tensors asked as `U8` become `value != 0` (masks stored as f16 0/1).
    /// Arbitrary strides and storage offsets are materialised into a contiguous tensor.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, WeightsError> {
        let entry = self.entry(name)?;
        let bytes = self.source.bytes(entry.region);
        let view = cast::View {
            bytes,
            dtype: entry.info.dtype,
            shape: &entry.info.shape,
            stride: &entry.stride,
            offset: entry.offset,
        };
        cast::to_tensor(&view, dtype, device).map_err(|detail| WeightsError::Conversion {
            path: self.path.clone(),
            name: format!("{}{name}", self.prefix),
            stored: entry.info.dtype,
            shape: entry.info.shape.clone(),
            target: dtype,
            detail,
        })
    }

    /// Every tensor converted to `dtype`, keyed by name (for `candle_nn::VarBuilder::from_tensors`).
    pub fn load_all(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, WeightsError> {
        self.entries
            .iter()
            .map(|(name, _)| Ok((name.clone(), self.load(name, dtype, device)?)))
            .collect()
    }

    /// Compares the checkpoint with the `(name, shape)` pairs a model expects and reports every
    /// missing key, unexpected key and shape mismatch in one [`WeightsError::Mismatch`].
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<(), WeightsError> {
        let mut missing = Vec::new();
        let mut wrong_shape = Vec::new();
        let mut wanted = std::collections::HashSet::new();
        for (name, shape) in expected {
            wanted.insert(name.as_str());
            match self.info(name) {
                None => missing.push((format!("{}{name}", self.prefix), shape.clone())),
                Some(info) if &info.shape != shape => wrong_shape.push((
                    format!("{}{name}", self.prefix),
                    shape.clone(),
                    info.shape.clone(),
                )),
                Some(_) => {}
            }
        }
        let unexpected: Vec<_> = self
            .entries
            .iter()
            .filter(|(n, _)| !wanted.contains(n.as_str()))
            .map(|(n, e)| (format!("{}{n}", self.prefix), e.info.shape.clone()))
            .collect();
        if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
            Ok(())
        } else {
            Err(WeightsError::Mismatch {
                path: self.path.clone(),
                missing,
                unexpected,
                wrong_shape,
            })
        }
    }

    /// A view of the tensors whose names start with `prefix`, with the prefix removed (VQGAN
    /// checkpoints store the model under `model.`). The file's bytes are shared, not copied.
    pub fn strip_prefix(&self, prefix: &str) -> Checkpoint {
        let entries: Vec<(String, Entry)> = self
            .entries
            .iter()
            .filter_map(|(n, e)| n.strip_prefix(prefix).map(|s| (s.to_string(), e.clone())))
            .collect();
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Checkpoint {
            path: self.path.clone(),
            format: self.format,
            source: Arc::clone(&self.source),
            entries,
            index,
            prefix: format!("{}{prefix}", self.prefix),
        }
    }
}

/// What a format parser hands back: the tensors and any decompressed buffers they point into.
pub(crate) struct Parsed {
    pub entries: Vec<(String, Entry)>,
    pub owned: Vec<Vec<u8>>,
}

fn is_safetensors(data: &[u8]) -> bool {
    data.len() > 8 && data[8] == b'{'
}

fn safetensors_dtype(dtype: safetensors::Dtype) -> Option<StoredDtype> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F64 => StoredDtype::F64,
        D::F32 => StoredDtype::F32,
        D::F16 => StoredDtype::F16,
        D::BF16 => StoredDtype::BF16,
        D::I64 => StoredDtype::I64,
        D::I32 => StoredDtype::I32,
        D::I16 => StoredDtype::I16,
        D::I8 => StoredDtype::I8,
        D::U8 => StoredDtype::U8,
        D::BOOL => StoredDtype::Bool,
        _ => return None,
    })
}

fn parse_safetensors(path: &Path, data: &[u8]) -> Result<Parsed, WeightsError> {
    let malformed = |detail: String| WeightsError::Malformed {
        path: path.to_path_buf(),
        format: Format::Safetensors,
        detail,
    };
    let (n, meta) = safetensors::SafeTensors::read_metadata(data)
        .map_err(|e| malformed(format!("invalid header: {e:?}")))?;
    // `read_metadata` has checked that the offsets tile the data exactly and match each
    // tensor's size, and that the data ends where the file ends.
    let base = 8 + n;
    let mut entries = Vec::new();
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else {
            continue;
        };
        let dtype = safetensors_dtype(info.dtype).ok_or_else(|| {
            malformed(format!(
                "tensor `{name}` has dtype {:?}, which this reader does not support",
                info.dtype
            ))
        })?;
        let (s, e) = info.data_offsets;
        entries.push((
            name,
            Entry {
                region: Region::Mapped {
                    start: base + s,
                    len: e - s,
                },
                offset: 0,
                stride: contiguous_stride(&info.shape),
                info: TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                },
            },
        ));
    }
    Ok(Parsed {
        entries,
        owned: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_follow_torch_and_safetensors() {
        let all = [
            (StoredDtype::F64, "float64", "F64", 8),
            (StoredDtype::F32, "float32", "F32", 4),
            (StoredDtype::F16, "float16", "F16", 2),
            (StoredDtype::BF16, "bfloat16", "BF16", 2),
            (StoredDtype::I64, "int64", "I64", 8),
            (StoredDtype::I32, "int32", "I32", 4),
            (StoredDtype::I16, "int16", "I16", 2),
            (StoredDtype::I8, "int8", "I8", 1),
            (StoredDtype::U8, "uint8", "U8", 1),
            (StoredDtype::Bool, "bool", "BOOL", 1),
        ];
        for (dtype, torch, st, size) in all {
            assert_eq!(dtype.to_string(), torch);
            assert_eq!(dtype.safetensors_name(), st);
            assert_eq!(dtype.size(), size);
        }
        assert_eq!(Format::TorchZip.to_string(), "torch zip");
        assert_eq!(contiguous_stride(&[2, 3, 4]), vec![12, 4, 1]);
    }
}
