//! `torch.save` files: the zip archive (torch ≥ 1.6) and the legacy pickle stream.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use super::cast::extent;
use super::pickle::{self, Arena, Id, Node, StorageRef, TensorRef};
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
    let Node::Dict(items) = arena.get(dict) else {
        return Err(format!(
            "the top-level object is not a dict of tensors but {}",
            arena.describe(dict)
        ));
    };
    let mut out = Vec::new();
    let mut other_keys = Vec::new();
    for &(k, v) in items {
        let name = match arena.get(k) {
            Node::Str(s) => s.clone(),
            _ => arena.describe(k),
        };
        match arena.get(v) {
            Node::Tensor(t) => out.push((name, t.clone())),
            Node::Unsupported(why) => {
                return Err(format!("tensor `{name}` cannot be read: unsupported {why}"));
            }
            _ => other_keys.push(name),
        }
    }
    if out.is_empty() && !other_keys.is_empty() {
        return Err(format!(
            "no tensors found; the dict holds only non-tensor entries {:?}",
            other_keys.iter().take(10).collect::<Vec<_>>()
        ));
    }
    Ok(out)
}

/// Turns tensor references into entries, checking each against the bytes its storage has.
/// `storage` maps a storage key to its region and byte length.
fn entries(
    path: &Path,
    format: Format,
    tensors: Vec<(String, TensorRef)>,
    mut storage: impl FnMut(&StorageRef) -> Result<(Region, usize), WeightsError>,
) -> Result<Vec<(String, Entry)>, WeightsError> {
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let bad = |what: &str| malformed(path, format, format!("tensor `{name}`: {what}"));
        let to_usize = |v: &[u64]| -> Option<Vec<usize>> {
            v.iter().map(|&x| usize::try_from(x).ok()).collect()
        };
        let (Some(shape), Some(stride)) = (to_usize(&t.shape), to_usize(&t.stride)) else {
            return Err(bad("size or stride too large"));
        };
        let offset = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(usize::try_from(t.storage.view_offset).ok()?))
            .ok_or_else(|| bad("storage offset too large"))?;
        let (region, len) = storage(&t.storage)?;
        let dtype = t.storage.dtype;
        let (_, needed) =
            extent(&shape, &stride, offset).ok_or_else(|| bad("size overflows usize"))?;
        let needed_bytes = needed
            .checked_mul(dtype.size())
            .ok_or_else(|| bad("size overflows usize"))?;
        if needed_bytes > len {
            return Err(bad(&format!(
                "shape {shape:?} with stride {stride:?} at offset {offset} needs {needed_bytes} \
                 bytes of {dtype} storage `{}`, which holds only {len} bytes (truncated file?)",
                t.storage.key
            )));
        }
        out.push((
            name,
            Entry {
                info: TensorInfo { dtype, shape },
                region,
                offset,
                stride,
            },
        ));
    }
    Ok(out)
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

    let read_entry = |zip: &mut zip::ZipArchive<Cursor<&[u8]>>, i: usize, what: &str| {
        let mut f = zip
            .by_index(i)
            .map_err(|e| malformed(path, fmt, format!("cannot read {what}: {e}")))?;
        let size = f.size();
        let mut buf = Vec::new();
        // `take` bounds the read by the declared size, which the zip directory states and which
        // a deflate bomb cannot exceed.
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
    };

    if let Some(&i) = by_name.get(&format!("{prefix}byteorder")) {
        let order = read_entry(&mut zip, i, "byteorder")?;
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

    let pickle_bytes = read_entry(&mut zip, by_name[&pkl], &pkl)?;
    let un =
        pickle::unpickle(&pickle_bytes).map_err(|e| malformed(path, fmt, format!("{pkl}: {e}")))?;
    let tensors =
        state_dict(&un.arena, un.root).map_err(|e| malformed(path, fmt, format!("{pkl}: {e}")))?;

    let mut owned = Vec::new();
    let mut regions: HashMap<String, (Region, usize)> = HashMap::new();
    let entries = entries(path, fmt, tensors, |s| {
        if let Some(r) = regions.get(&s.key) {
            return Ok(*r);
        }
        let entry_name = format!("{prefix}data/{}", s.key);
        let &i = by_name.get(&entry_name).ok_or_else(|| {
            malformed(
                path,
                fmt,
                format!(
                    "storage `{}` is referenced but {entry_name} is missing",
                    s.key
                ),
            )
        })?;
        let raw = zip
            .by_index_raw(i)
            .map_err(|e| malformed(path, fmt, format!("{entry_name}: {e}")))?;
        let stored = raw.compression() == zip::CompressionMethod::Stored;
        let start = raw.data_start();
        let len = raw.compressed_size();
        drop(raw);
        let r = match (stored, start) {
            (true, Some(start)) => {
                let (Ok(start), Ok(len)) = (usize::try_from(start), usize::try_from(len)) else {
                    return Err(malformed(
                        path,
                        fmt,
                        format!("{entry_name}: offset too large"),
                    ));
                };
                if start.checked_add(len).is_none_or(|end| end > data.len()) {
                    return Err(malformed(
                        path,
                        fmt,
                        format!(
                            "{entry_name} claims {len} bytes at offset {start}, past the end of \
                             the {}-byte file (truncated file?)",
                            data.len()
                        ),
                    ));
                }
                (Region::Mapped { start, len }, len)
            }
            _ => {
                let buf = read_entry(&mut zip, i, &entry_name)?;
                let len = buf.len();
                owned.push(buf);
                (
                    Region::Owned {
                        index: owned.len() - 1,
                    },
                    len,
                )
            }
        };
        regions.insert(s.key.clone(), r);
        Ok(r)
    })?;
    Ok(Parsed { entries, owned })
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
                "unsupported legacy protocol {:?}",
                proto.arena.get(proto.root)
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
    let key_list: Vec<String> = match keys.arena.get(keys.root) {
        Node::List(items) | Node::Tuple(items) => items
            .iter()
            .map(|&i| match keys.arena.get(i) {
                Node::Str(s) => Ok(s.clone()),
                _ => Err(malformed(
                    path,
                    fmt,
                    format!("storage key {} is not a string", keys.arena.describe(i)),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(malformed(
                path,
                fmt,
                format!(
                    "storage key list is {}, not a list",
                    keys.arena.describe(keys.root)
                ),
            ));
        }
    };

    // Element sizes come from the storage types the object references.
    let mut dtypes = HashMap::new();
    for node in &main.arena.nodes {
        if let Node::Storage(s) = node {
            dtypes.insert(s.key.clone(), s.dtype);
        }
    }
    let mut regions = HashMap::new();
    for key in key_list {
        let dtype = *dtypes.get(&key).ok_or_else(|| {
            malformed(
                path,
                fmt,
                format!("storage `{key}` is listed but never referenced, so its type is unknown"),
            )
        })?;
        let count = data
            .get(pos..pos + 8)
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
        regions.insert(key, (Region::Mapped { start: pos, len }, len));
        pos += len;
    }

    let tensors = state_dict(&main.arena, main.root)
        .map_err(|e| malformed(path, fmt, format!("main object: {e}")))?;
    let entries = entries(path, fmt, tensors, |s| {
        regions.get(&s.key).copied().ok_or_else(|| {
            malformed(
                path,
                fmt,
                format!(
                    "storage `{}` is referenced but not in the storage list",
                    s.key
                ),
            )
        })
    })?;
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
