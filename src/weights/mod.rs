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

/// The bounds within which a checkpoint file is read, whoever made it: a file past one is refused
/// with a message naming the limit, before the work or memory it would take. Each is far above
/// what the published checkpoints need (see each constant).
pub mod limits {
    pub use super::MAX_SAFETENSORS_HEADER;
    pub use super::pickle::{MAX_KEY_LEN, MAX_OBJECTS, MAX_OPS, MAX_PICKLE_BYTES, MAX_RANK};
    pub use super::torch::{INFLATE_FLOOR, INFLATE_RATIO, MAX_TENSORS};
}

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
    #[error("{}", non_finite_message(path, names, *count))]
    NonFinite {
        path: PathBuf,
        /// The first few tensors holding NaN or infinite values.
        names: Vec<String>,
        /// How many tensors hold them.
        count: usize,
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

fn non_finite_message(path: &Path, names: &[String], count: usize) -> String {
    let shown: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    let more = match count.saturating_sub(names.len()) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!(
        "{}: {count} tensor{} NaN or infinite values ({}{more}): the file is damaged or its \
         training diverged, and a model with such weights gives empty texts, NaN scores or blank \
         pictures (--allow-non-finite, or `allow_non_finite` in the load options, loads it \
         anyway)",
        path.display(),
        if count == 1 { " holds" } else { "s hold" },
        shown.join(", ")
    )
}

/// How many names [`WeightsError::NonFinite`] lists.
const NON_FINITE_SHOWN: usize = 5;

/// How a model is read from its checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Load weights holding NaN or infinite values instead of refusing them. Such weights are
    /// reported at load ([`crate::model::load::LoadReport::non_finite`]); without this the load
    /// fails with [`WeightsError::NonFinite`], because the model would run and quietly give
    /// empty texts, NaN scores or blank pictures.
    pub allow_non_finite: bool,
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
    let mut stride = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        // Saturating: with a zero dimension the product of the others need not fit, and such
        // a tensor has no element for a stride to reach.
        stride[i] = stride[i + 1].saturating_mul(shape[i + 1]);
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

    /// Whether tensor `name` holds a NaN or an infinity (never true of integer or bool tensors).
    /// One pass over the stored bytes, which stops at the first block holding one.
    pub fn has_non_finite(&self, name: &str) -> Result<bool, WeightsError> {
        let entry = self.entry(name)?;
        let view = cast::View {
            bytes: self.source.bytes(entry.region),
            dtype: entry.info.dtype,
            shape: &entry.info.shape,
            stride: &entry.stride,
            offset: entry.offset,
        };
        Ok(cast::any_non_finite(&view))
    }

    /// The tensors among `names` that hold NaN or infinite values, in the order given, named as
    /// in the file.
    pub fn non_finite<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>, WeightsError> {
        let mut found = Vec::new();
        for name in names {
            if self.has_non_finite(name)? {
                found.push(format!("{}{name}", self.prefix));
            }
        }
        Ok(found)
    }

    /// Fails with [`WeightsError::NonFinite`], naming the first few, if any of the tensors
    /// `names` holds NaN or infinite values.
    pub fn check_finite<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), WeightsError> {
        let found = self.non_finite(names)?;
        self.refuse_non_finite(&found)
    }

    /// [`WeightsError::NonFinite`] for the tensors `found` (full names), if there are any.
    pub fn refuse_non_finite(&self, found: &[String]) -> Result<(), WeightsError> {
        if found.is_empty() {
            return Ok(());
        }
        Err(WeightsError::NonFinite {
            path: self.path.clone(),
            names: found.iter().take(NON_FINITE_SHOWN).cloned().collect(),
            count: found.len(),
        })
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

/// The largest safetensors header accepted. Real ones take about 120 bytes per tensor (some
/// 60 KiB for the 2.7B model); the format's own reader allows 100 MB, which parsed would take
/// several times that in memory.
pub const MAX_SAFETENSORS_HEADER: usize = 16 << 20;

fn safetensors_dtype(name: &str) -> Option<StoredDtype> {
    Some(match name {
        "F64" => StoredDtype::F64,
        "F32" => StoredDtype::F32,
        "F16" => StoredDtype::F16,
        "BF16" => StoredDtype::BF16,
        "I64" => StoredDtype::I64,
        "I32" => StoredDtype::I32,
        "I16" => StoredDtype::I16,
        "I8" => StoredDtype::I8,
        "U8" => StoredDtype::U8,
        "BOOL" => StoredDtype::Bool,
        _ => return None,
    })
}

/// One tensor's entry in a safetensors header, as written.
#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// A safetensors header: the tensors in the order written (`__metadata__` is skipped). A
/// malformed entry is reported with its tensor's name.
struct Header(Vec<(String, RawInfo)>);

impl<'de> serde::Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Header;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to their dtype, shape and offsets")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Header, A::Error> {
                use serde::de::Error;
                let mut out = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if name == "__metadata__" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    if out.len() == torch::MAX_TENSORS {
                        return Err(A::Error::custom(format!(
                            "more than {} tensors, the most this reader accepts",
                            torch::MAX_TENSORS
                        )));
                    }
                    let info = map.next_value::<RawInfo>().map_err(|e| {
                        A::Error::custom(format!(
                            "tensor `{}`: {e} (expected {{\"dtype\": \"F32\", \"shape\": [..], \
                             \"data_offsets\": [start, end]}})",
                            pickle::short(&name)
                        ))
                    })?;
                    out.push((name, info));
                }
                Ok(Header(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Reads a safetensors header and checks, with checked arithmetic, that each tensor's type and
/// shape fill exactly its byte range and that the ranges tile the data to the end of the file;
/// every message names the tensor.
fn parse_safetensors(path: &Path, data: &[u8]) -> Result<Parsed, WeightsError> {
    let malformed = |detail: String| WeightsError::Malformed {
        path: path.to_path_buf(),
        format: Format::Safetensors,
        detail,
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&data[..8]);
    let claimed = u64::from_le_bytes(len_bytes);
    let n = usize::try_from(claimed)
        .ok()
        .filter(|&n| n <= MAX_SAFETENSORS_HEADER)
        .ok_or_else(|| {
            malformed(format!(
                "the header claims {claimed} bytes; at most {MAX_SAFETENSORS_HEADER} are accepted \
                 (a real header takes about 120 bytes per tensor)"
            ))
        })?;
    let header = data.get(8..8 + n).ok_or_else(|| {
        malformed(format!(
            "the header claims {n} bytes but only {} follow its length (truncated file?)",
            data.len() - 8
        ))
    })?;
    let text = std::str::from_utf8(header)
        .map_err(|e| malformed(format!("the header is not UTF-8 text: {e}")))?;
    let Header(mut tensors) = serde_json::from_str(text)
        .map_err(|e| malformed(format!("the header is not a valid safetensors header: {e}")))?;
    let base = 8 + n;
    let data_len = (data.len() - base) as u64;
    tensors.sort_by(|a, b| {
        (a.1.data_offsets)
            .cmp(&b.1.data_offsets)
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut entries = Vec::with_capacity(tensors.len());
    let mut prev: Option<&str> = None;
    let mut end_prev = 0u64;
    for (name, info) in &tensors {
        let bad = |what: String| malformed(format!("tensor `{}`: {what}", pickle::short(name)));
        let dtype = safetensors_dtype(&info.dtype).ok_or_else(|| {
            bad(format!(
                "dtype {:?} is not one this reader supports (F64, F32, F16, BF16, I64, I32, I16, \
                 I8, U8, BOOL)",
                pickle::short(&info.dtype)
            ))
        })?;
        if info.shape.len() > pickle::MAX_RANK {
            return Err(bad(format!(
                "{} dimensions; at most {} are accepted",
                info.shape.len(),
                pickle::MAX_RANK
            )));
        }
        let too_big = || {
            bad(format!(
                "shape {:?} has more bytes than this machine can address",
                info.shape
            ))
        };
        let shape = info
            .shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(too_big)?;
        let bytes = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(too_big)?;
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(bad(format!(
                "data_offsets [{s}, {e}] end before they start"
            )));
        }
        if e - s != bytes as u64 {
            return Err(bad(format!(
                "{} with shape {shape:?} takes {bytes} bytes, but its data_offsets [{s}, {e}] \
                 span {} (the header's type, shape or offsets are wrong)",
                info.dtype,
                e - s
            )));
        }
        if s != end_prev {
            return Err(bad(match prev {
                Some(p) => format!(
                    "its data starts at byte {s}, but the tensor before it, `{}`, ends at byte \
                     {end_prev}: the tensors must fill the data without gaps or overlaps",
                    pickle::short(p)
                ),
                None => format!("its data starts at byte {s}; the first tensor must start at 0"),
            }));
        }
        if e > data_len {
            return Err(bad(format!(
                "data_offsets [{s}, {e}] reach past the {data_len} bytes of data after the header \
                 (truncated file?)"
            )));
        }
        end_prev = e;
        prev = Some(name);
        // `e <= data_len`, which is a usize.
        let (start, len) = (base + s as usize, bytes);
        entries.push((
            name.clone(),
            Entry {
                region: Region::Mapped { start, len },
                offset: 0,
                stride: contiguous_stride(&shape),
                info: TensorInfo { dtype, shape },
            },
        ));
    }
    if end_prev != data_len {
        return Err(malformed(format!(
            "the tensors' data ends at byte {end_prev} but {data_len} bytes follow the header: \
             the last {} bytes belong to no tensor",
            data_len - end_prev
        )));
    }
    // The format's own reader must agree; its messages are only a fallback, as they may not
    // name the tensor.
    safetensors::SafeTensors::read_metadata(data)
        .map_err(|e| malformed(format!("the safetensors reader refuses the header: {e}")))?;
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
