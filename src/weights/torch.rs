//! `torch.save` files: the zip archive (torch ≥ 1.6) and the legacy pickle stream.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use super::cast::extent;
use super::pickle::{
    self, Arena, Id, MAX_KEY_LEN, MAX_PICKLE_BYTES, Node, StorageRef, TensorRef, short,
};
use super::{Entry, Format, Parsed, Region, TensorInfo, WeightsError};

/// The legacy format's first pickle, 0x1950a86a20f9469cfc6c, as LONG1 bytes.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL: i64 = 1001;

fn malformed(path: &Path, format: Format, detail: impl Into<String>) -> WeightsError {
    WeightsError::Malformed {
        path: path.to_path_buf(),
        format,
        detail: detail.into(),
    }
}

/// The most tensors a checkpoint may hold: the 2.7B model has about 500, a training checkpoint
/// with Adam's states three times as many.
pub const MAX_TENSORS: usize = 1 << 14;

/// Bytes that deflated storage entries may inflate to in all, beyond [`INFLATE_RATIO`] times
/// their compressed size: room for masks and other highly compressible buffers.
pub const INFLATE_FLOOR: usize = 64 << 20;

/// How much larger than its compressed bytes a deflated storage may become. Weights compress
/// little (torch itself always stores them); a bigger ratio is a decompression bomb.
pub const INFLATE_RATIO: usize = 16;

/// Finds the tensors of the state dict inside the top-level object, in pickle order.
fn state_dict(arena: &Arena, root: Id) -> Result<Vec<(String, TensorRef)>, String> {
    let mut dict = root;
    for key in ["state_dict", "params", "params_ema"] {
        if let Some(inner) = arena.dict_get(root, key)
            && matches!(arena.get(inner), Node::Dict(_))
        {
            dict = inner;
            break;
        }
    }
    let Some(items) = arena.dict_items(dict) else {
        return Err(format!(
            "the top-level object is not a dict of tensors but {}",
            arena.describe(dict)
        ));
    };
    let mut out = Vec::new();
    let mut other_keys = Vec::new();
    let mut others = 0usize;
    for &(k, v) in items {
        let name = || match arena.as_str(k) {
            Some(s) => s.to_string(),
            None => arena.describe(k),
        };
        match arena.get(v) {
            Node::Tensor(t) => {
                if out.len() == MAX_TENSORS {
                    return Err(format!(
                        "the state dict holds more than {MAX_TENSORS} tensors, the most this \
                         reader accepts"
                    ));
                }
                out.push((name(), (**t).clone()));
            }
            Node::Unsupported(why) => {
                return Err(format!(
                    "tensor `{}` cannot be read: unsupported {why}",
                    short(&name())
                ));
            }
            _ => {
                others += 1;
                if other_keys.len() < 10 {
                    other_keys.push(short(&name()));
                }
            }
        }
    }
    if out.is_empty() && others > 0 {
        return Err(format!(
            "no tensors found; the dict holds only {others} non-tensor entries {other_keys:?}"
        ));
    }
    Ok(out)
}

/// Where a format keeps its storages.
trait Storages {
    /// The bytes the file says storage `key` holds.
    fn len(&mut self, key: &str) -> Result<usize, WeightsError>;
    /// The storage's bytes, at least its first `needed` (which the caller has checked against
    /// [`Storages::len`]).
    fn region(&mut self, key: &str, needed: usize) -> Result<Region, WeightsError>;
}

/// One tensor of the state dict with its sizes checked and converted.
struct Checked {
    name: String,
    storage: StorageRef,
    shape: Vec<usize>,
    stride: Vec<usize>,
    offset: usize,
    /// Bytes the pickle declares for the whole storage.
    declared: usize,
    /// Bytes of the storage the view reaches (offset and strides included).
    needed: usize,
}

/// Checks a tensor reference with checked arithmetic: its sizes fit in memory, and its view
/// stays inside the storage the pickle declares.
fn check_tensor(
    path: &Path,
    format: Format,
    name: String,
    t: TensorRef,
) -> Result<Checked, WeightsError> {
    let bad = |what: &str| malformed(path, format, format!("tensor `{}`: {what}", short(&name)));
    let to_usize =
        |v: &[u64]| -> Option<Vec<usize>> { v.iter().map(|&x| usize::try_from(x).ok()).collect() };
    let (Some(shape), Some(stride)) = (to_usize(&t.shape), to_usize(&t.stride)) else {
        return Err(bad(&format!(
            "size {:?} or stride {:?} too large",
            t.shape, t.stride
        )));
    };
    let offset = usize::try_from(t.offset)
        .ok()
        .and_then(|o| o.checked_add(usize::try_from(t.storage.view_offset).ok()?))
        .ok_or_else(|| bad(&format!("storage offset {} too large", t.offset)))?;
    let dtype = t.storage.dtype;
    let declared = usize::try_from(t.storage.numel)
        .ok()
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| {
            bad(&format!(
                "storage `{}` declares {} {dtype} elements, more bytes than this machine can \
                 address",
                t.storage.key, t.storage.numel
            ))
        })?;
    let (_, reach) = extent(&shape, &stride, offset).ok_or_else(|| {
        bad(&format!(
            "shape {shape:?} with stride {stride:?} at offset {offset} overflows the address space"
        ))
    })?;
    let needed = reach.checked_mul(dtype.size()).ok_or_else(|| {
        bad(&format!(
            "shape {shape:?} with stride {stride:?} at offset {offset} overflows the address space"
        ))
    })?;
    if needed > declared {
        return Err(bad(&format!(
            "shape {shape:?} with stride {stride:?} at offset {offset} needs {needed} bytes of \
             {dtype} storage `{}`, which holds only {declared} bytes",
            t.storage.key
        )));
    }
    Ok(Checked {
        name,
        storage: t.storage,
        shape,
        stride,
        offset,
        declared,
        needed,
    })
}

/// Turns tensor references into entries: every size is checked first, then each storage is
/// checked to hold what the pickle declares, and only the bytes some tensor reaches are fetched.
fn entries(
    path: &Path,
    format: Format,
    tensors: Vec<(String, TensorRef)>,
    storages: &mut dyn Storages,
) -> Result<Vec<(String, Entry)>, WeightsError> {
    let checked = tensors
        .into_iter()
        .map(|(name, t)| check_tensor(path, format, name, t))
        .collect::<Result<Vec<_>, _>>()?;
    // The bytes each storage must provide: as far as its furthest-reaching tensor.
    let mut needed: HashMap<&str, usize> = HashMap::new();
    for c in &checked {
        let n = needed.entry(c.storage.key.as_str()).or_default();
        *n = (*n).max(c.needed);
    }
    let mut lens: HashMap<&str, usize> = HashMap::new();
    for c in &checked {
        let key = c.storage.key.as_str();
        let len = match lens.get(key) {
            Some(&len) => len,
            None => {
                let len = storages.len(key)?;
                lens.insert(key, len);
                len
            }
        };
        // The pickle's element count and the stored bytes must agree; less data than declared
        // means the file was cut or rewritten.
        if c.declared > len {
            return Err(malformed(
                path,
                format,
                format!(
                    "tensor `{}`: {} storage `{key}` declares {} elements ({} bytes) but holds \
                     only {len} bytes (truncated file?)",
                    short(&c.name),
                    c.storage.dtype,
                    c.storage.numel,
                    c.declared
                ),
            ));
        }
    }
    let mut regions: HashMap<&str, Region> = HashMap::new();
    let mut out = Vec::with_capacity(checked.len());
    for c in &checked {
        let key = c.storage.key.as_str();
        let region = match regions.get(key) {
            Some(&r) => r,
            None => {
                let reach = needed.get(key).copied().unwrap_or_default();
                let r = storages.region(key, reach)?;
                regions.insert(key, r);
                r
            }
        };
        out.push((
            c.name.clone(),
            Entry {
                info: TensorInfo {
                    dtype: c.storage.dtype,
                    shape: c.shape.clone(),
                },
                region,
                offset: c.offset,
                stride: c.stride.clone(),
            },
        ));
    }
    Ok(out)
}

/// Reads a zip entry that is not a storage (`data.pkl`, `byteorder`), refusing one whose size is
/// over `max` before reading anything.
fn read_small(
    path: &Path,
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    i: usize,
    what: &str,
    max: usize,
) -> Result<Vec<u8>, WeightsError> {
    let fmt = Format::TorchZip;
    let mut f = zip
        .by_index(i)
        .map_err(|e| malformed(path, fmt, format!("cannot read {what}: {e}")))?;
    let size = f.size();
    if size > max as u64 {
        return Err(malformed(
            path,
            fmt,
            format!("{what} is {size} bytes, more than the {max} this reader accepts"),
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    // `take` bounds the read by the declared size, whatever the compressed stream holds.
    (&mut f)
        .take(size)
        .read_to_end(&mut buf)
        .map_err(|e| malformed(path, fmt, format!("cannot read {what}: {e}")))?;
    if buf.len() as u64 != size {
        return Err(malformed(
            path,
            fmt,
            format!("{what} is truncated: {} of {size} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// The storages of a zip archive: stored entries are read in place, deflated ones are inflated
/// as far as their tensors reach and no further, within [`INFLATE_FLOOR`] and [`INFLATE_RATIO`].
struct ZipStorages<'a> {
    path: &'a Path,
    data: &'a [u8],
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    by_name: HashMap<String, usize>,
    prefix: String,
    owned: Vec<Vec<u8>>,
    /// Bytes inflated so far, and the compressed bytes they came from.
    inflated: usize,
    compressed: usize,
}

/// What the zip directory says of one storage entry.
struct ZipEntry {
    name: String,
    index: usize,
    stored: bool,
    start: Option<u64>,
    compressed: u64,
    size: u64,
}

impl ZipStorages<'_> {
    fn malformed(&self, detail: String) -> WeightsError {
        malformed(self.path, Format::TorchZip, detail)
    }

    fn entry(&mut self, key: &str) -> Result<ZipEntry, WeightsError> {
        let path = self.path;
        let name = format!("{}data/{key}", self.prefix);
        let Some(&index) = self.by_name.get(&name) else {
            return Err(self.malformed(format!(
                "storage `{key}` is referenced but {name} is missing"
            )));
        };
        let raw = match self.zip.by_index_raw(index) {
            Ok(raw) => raw,
            Err(e) => return Err(malformed(path, Format::TorchZip, format!("{name}: {e}"))),
        };
        let stored = raw.compression() == zip::CompressionMethod::Stored;
        let (start, compressed, size) = (raw.data_start(), raw.compressed_size(), raw.size());
        drop(raw);
        Ok(ZipEntry {
            name,
            index,
            stored,
            start,
            compressed,
            size,
        })
    }
}

impl Storages for ZipStorages<'_> {
    fn len(&mut self, key: &str) -> Result<usize, WeightsError> {
        let e = self.entry(key)?;
        // A stored entry holds its compressed bytes, whatever size the directory states.
        let len = if e.stored { e.compressed } else { e.size };
        Ok(usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn region(&mut self, key: &str, needed: usize) -> Result<Region, WeightsError> {
        let e = self.entry(key)?;
        let path = self.path;
        let bad = |detail: String| malformed(path, Format::TorchZip, detail);
        let name = &e.name;
        if e.stored {
            let Some(start) = e.start.and_then(|s| usize::try_from(s).ok()) else {
                return Err(self.malformed(format!("{name}: no usable data offset")));
            };
            let len = usize::try_from(e.compressed).unwrap_or(usize::MAX);
            if start
                .checked_add(len)
                .is_none_or(|end| end > self.data.len())
            {
                return Err(self.malformed(format!(
                    "{name} claims {len} bytes at offset {start}, past the end of the {}-byte \
                     file (truncated file?)",
                    self.data.len()
                )));
            }
            if len < needed {
                return Err(self.malformed(format!(
                    "{name} holds {len} bytes but its tensors need {needed}"
                )));
            }
            return Ok(Region::Mapped { start, len });
        }
        let compressed = usize::try_from(e.compressed).unwrap_or(usize::MAX);
        let total = self.inflated.saturating_add(needed);
        let allowed = INFLATE_FLOOR.saturating_add(
            INFLATE_RATIO.saturating_mul(self.compressed.saturating_add(compressed)),
        );
        if total > allowed {
            return Err(self.malformed(format!(
                "{name} would inflate {compressed} compressed bytes to {needed}, {total} bytes of \
                 compressed storages in all, more than the {allowed} this reader allows ({} MiB \
                 plus {INFLATE_RATIO} times the compressed size: a decompression bomb?); torch \
                 stores weights uncompressed",
                INFLATE_FLOOR >> 20
            )));
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(needed).map_err(|err| {
            self.malformed(format!("{name}: cannot allocate {needed} bytes: {err}"))
        })?;
        if needed > 0 {
            let mut f = match self.zip.by_index(e.index) {
                Ok(f) => f,
                Err(err) => return Err(bad(format!("cannot read {name}: {err}"))),
            };
            // Only the bytes a tensor reaches: a storage that declares more (or a directory that
            // claims more) is never inflated past them.
            if let Err(err) = (&mut f).take(needed as u64).read_to_end(&mut buf) {
                return Err(bad(format!("cannot read {name}: {err}")));
            }
        }
        if buf.len() != needed {
            return Err(self.malformed(format!(
                "{name} is truncated: {} of the {needed} bytes its tensors need",
                buf.len()
            )));
        }
        self.inflated = total;
        self.compressed = self.compressed.saturating_add(compressed);
        self.owned.push(buf);
        Ok(Region::Owned {
            index: self.owned.len() - 1,
        })
    }
}

/// Reads a torch zip archive. The folder holding `data.pkl` can have any name.
pub(crate) fn parse_zip(path: &Path, data: &[u8]) -> Result<Parsed, WeightsError> {
    let fmt = Format::TorchZip;
    let mut zip = zip::ZipArchive::new(Cursor::new(data))
        .map_err(|e| malformed(path, fmt, format!("cannot read the zip directory: {e}")))?;
    let mut by_name = HashMap::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| malformed(path, fmt, format!("zip entry {i}: {e}")))?;
        let name = f
            .name()
            .map_err(|e| malformed(path, fmt, format!("zip entry {i}: {e}")))?
            .into_owned();
        by_name.insert(name, i);
    }
    // The shortest `…data.pkl` is the archive's own, in case a nested folder has another.
    let pkl = by_name
        .keys()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.len(), n.to_string()))
        .cloned()
        .ok_or_else(|| {
            malformed(
                path,
                fmt,
                "the zip archive has no data.pkl, so it is not a torch checkpoint",
            )
        })?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();

    if let Some(&i) = by_name.get(&format!("{prefix}byteorder")) {
        let order = read_small(path, &mut zip, i, "byteorder", 16)?;
        if order.trim_ascii() != b"little" {
            return Err(malformed(
                path,
                fmt,
                format!(
                    "byteorder is {:?}; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }

    let pickle_bytes = read_small(path, &mut zip, by_name[&pkl], &pkl, MAX_PICKLE_BYTES)?;
    let un =
        pickle::unpickle(&pickle_bytes).map_err(|e| malformed(path, fmt, format!("{pkl}: {e}")))?;
    drop(pickle_bytes);
    let tensors =
        state_dict(&un.arena, un.root).map_err(|e| malformed(path, fmt, format!("{pkl}: {e}")))?;
    drop(un);

    let mut storages = ZipStorages {
        path,
        data,
        zip,
        by_name,
        prefix,
        owned: Vec::new(),
        inflated: 0,
        compressed: 0,
    };
    let entries = entries(path, fmt, tensors, &mut storages)?;
    Ok(Parsed {
        entries,
        owned: storages.owned,
    })
}

/// The storages of a legacy file: each is a range of the file, found when the file is read.
struct LegacyStorages<'a> {
    path: &'a Path,
    /// Region and byte length of each storage key.
    regions: HashMap<String, (Region, usize)>,
}

impl LegacyStorages<'_> {
    fn get(&self, key: &str) -> Result<(Region, usize), WeightsError> {
        self.regions.get(key).copied().ok_or_else(|| {
            malformed(
                self.path,
                Format::TorchLegacy,
                format!("storage `{key}` is referenced but not in the storage list"),
            )
        })
    }
}

impl Storages for LegacyStorages<'_> {
    fn len(&mut self, key: &str) -> Result<usize, WeightsError> {
        Ok(self.get(key)?.1)
    }

    fn region(&mut self, key: &str, _needed: usize) -> Result<Region, WeightsError> {
        Ok(self.get(key)?.0)
    }
}

/// Reads the legacy stream: magic, protocol, sys_info, the object, the storage keys, then each
/// storage as an 8-byte little-endian element count followed by its bytes.
pub(crate) fn parse_legacy(path: &Path, data: &[u8]) -> Result<Parsed, WeightsError> {
    let fmt = Format::TorchLegacy;
    let mut pos = 0usize;
    let mut next = |what: &str| {
        let un = pickle::unpickle(&data[pos..])
            .map_err(|e| malformed(path, fmt, format!("{what} pickle at byte {pos}: {e}")))?;
        pos += un.consumed;
        Ok::<_, WeightsError>(un)
    };
    let magic = next("magic number")?;
    if !matches!(magic.arena.get(magic.root), Node::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err(malformed(
            path,
            fmt,
            "the file is a pickle but lacks torch's magic number, so it is not a torch checkpoint",
        ));
    }
    let proto = next("protocol version")?;
    if !matches!(proto.arena.get(proto.root), Node::Int(LEGACY_PROTOCOL)) {
        return Err(malformed(
            path,
            fmt,
            format!(
                "unsupported legacy protocol {}",
                proto.arena.describe(proto.root)
            ),
        ));
    }
    let sys = next("sys_info")?;
    if let Some(le) = sys.arena.dict_get(sys.root, "little_endian")
        && matches!(sys.arena.get(le), Node::Bool(false))
    {
        return Err(malformed(
            path,
            fmt,
            "big-endian checkpoints are not supported",
        ));
    }
    let main = next("main object")?;
    let keys = next("storage key list")?;
    let Some(key_ids) = keys.arena.items(keys.root) else {
        return Err(malformed(
            path,
            fmt,
            format!(
                "storage key list is {}, not a list",
                keys.arena.describe(keys.root)
            ),
        ));
    };

    // Element sizes come from the storage types the object references.
    let mut dtypes = HashMap::new();
    for node in &main.arena.nodes {
        if let Node::Storage(s) = node {
            dtypes.insert(s.key.as_str(), s.dtype);
        }
    }
    let mut regions = HashMap::new();
    // Each key takes at least 8 bytes of the file (its element count), so a key list longer
    // than the file stops at its end.
    for &id in key_ids {
        let key = keys.arena.as_str(id).ok_or_else(|| {
            malformed(
                path,
                fmt,
                format!("storage key {} is not a string", keys.arena.describe(id)),
            )
        })?;
        if key.len() > MAX_KEY_LEN {
            return Err(malformed(
                path,
                fmt,
                format!(
                    "storage key of {} bytes in the key list; at most {MAX_KEY_LEN} are accepted",
                    key.len()
                ),
            ));
        }
        let dtype = *dtypes.get(key).ok_or_else(|| {
            malformed(
                path,
                fmt,
                format!("storage `{key}` is listed but never referenced, so its type is unknown"),
            )
        })?;
        if regions.contains_key(key) {
            return Err(malformed(
                path,
                fmt,
                format!("storage `{key}` is listed twice"),
            ));
        }
        let count = data
            .get(pos..pos.saturating_add(8))
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(|| {
                malformed(
                    path,
                    fmt,
                    format!("truncated before the size of storage `{key}`"),
                )
            })?;
        pos += 8;
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(dtype.size()))
            .filter(|&len| pos.checked_add(len).is_some_and(|end| end <= data.len()))
            .ok_or_else(|| {
                malformed(
                    path,
                    fmt,
                    format!(
                        "storage `{key}` declares {count} {dtype} elements at byte {pos}, more \
                         than the {} bytes left (truncated file?)",
                        data.len() - pos
                    ),
                )
            })?;
        regions.insert(key.to_string(), (Region::Mapped { start: pos, len }, len));
        pos += len;
    }

    let tensors = state_dict(&main.arena, main.root)
        .map_err(|e| malformed(path, fmt, format!("main object: {e}")))?;
    let entries = entries(path, fmt, tensors, &mut LegacyStorages { path, regions })?;
    Ok(Parsed {
        entries,
        owned: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn s(out: &mut Vec<u8>, text: &str) {
        out.push(b'X');
        out.extend((text.len() as u32).to_le_bytes());
        out.extend(text.as_bytes());
    }

    /// `{'w': _rebuild_tensor_v2(<FloatStorage '0', 2 elements>, 0, (2,), (1,), False, {})}`.
    fn pickle() -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        s(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        s(&mut p, "0");
        s(&mut p, "cpu");
        p.extend([
            b'K', 2, b't', b'Q', b'K', 0, b'K', 2, 0x85, b'K', 1, 0x85, 0x89, b'}',
        ]);
        p.extend([b't', b'R', b'u', b'.']);
        p
    }

    fn zip(method: zip::CompressionMethod) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, bytes) in [
            ("m/data.pkl", pickle()),
            (
                "m/data/0",
                [1.5f32, -2.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ] {
            w.start_file(name, opts).unwrap();
            w.write_all(&bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn stored_entries_are_mapped_and_compressed_ones_owned() {
        let path = Path::new("mem.bin");
        let stored = zip(zip::CompressionMethod::Stored);
        let parsed = parse_zip(path, &stored).unwrap();
        assert!(parsed.owned.is_empty());
        let Region::Mapped { start, len } = parsed.entries[0].1.region else {
            panic!("a stored entry must be read in place");
        };
        assert_eq!(
            &stored[start..start + len],
            &[0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]
        );

        let deflated = zip(zip::CompressionMethod::Deflated);
        let parsed = parse_zip(path, &deflated).unwrap();
        assert_eq!(parsed.owned.len(), 1);
        assert!(matches!(
            parsed.entries[0].1.region,
            Region::Owned { index: 0 }
        ));
    }
}
