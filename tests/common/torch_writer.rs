//! A minimal `torch.save` imitation for tests: protocol-2 pickles laid out the way torch writes
//! them (`collections.OrderedDict` through REDUCE, `_rebuild_tensor_v2` with persistent storage
//! ids, memoised globals, `_metadata` set through BUILD), in a zip archive or the legacy stream.

use std::io::Write;
use std::path::Path;

use rudolph::weights::StoredDtype;

/// One storage: its element type and little-endian bytes.
#[derive(Debug, Clone)]
pub struct Storage {
    pub dtype: StoredDtype,
    pub bytes: Vec<u8>,
}

impl Storage {
    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }
}

/// One tensor: a strided view (in elements) of storage number `storage`.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub storage: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// What the top-level pickled object looks like.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layout {
    /// `torch.save(model.state_dict())`.
    StateDict,
    /// A Lightning checkpoint: `{'state_dict': ..., 'epoch', 'global_step', 'hyper_parameters',
    /// 'optimizer_states', 'callbacks'}` with objects of unknown classes and an optimizer tensor.
    Lightning,
    /// Real-ESRGAN style: `{key: state_dict, 'note': '...'}`.
    Under(&'static str),
}

#[derive(Debug, Clone)]
pub struct TorchFile {
    pub storages: Vec<Storage>,
    pub tensors: Vec<TensorSpec>,
    pub layout: Layout,
}

fn storage_class(dtype: StoredDtype) -> &'static str {
    match dtype {
        StoredDtype::F64 => "DoubleStorage",
        StoredDtype::F32 => "FloatStorage",
        StoredDtype::F16 => "HalfStorage",
        StoredDtype::BF16 => "BFloat16Storage",
        StoredDtype::I64 => "LongStorage",
        StoredDtype::I32 => "IntStorage",
        StoredDtype::I16 => "ShortStorage",
        StoredDtype::I8 => "CharStorage",
        StoredDtype::U8 => "ByteStorage",
        StoredDtype::Bool => "BoolStorage",
    }
}

/// A protocol-2 pickle writer with the memo handling torch's pickler produces.
struct Pickler {
    out: Vec<u8>,
    memo: std::collections::HashMap<String, u32>,
    /// Memo slots for non-global values, kept apart from the globals' slots.
    next_put: u32,
}

impl Pickler {
    fn new() -> Self {
        Pickler {
            out: vec![0x80, 2],
            memo: Default::default(),
            next_put: 1000,
        }
    }

    fn put(&mut self) {
        self.next_put += 1;
        self.put_n(self.next_put);
    }

    fn put_n(&mut self, n: u32) {
        if n < 256 {
            self.out.extend([b'q', n as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(n.to_le_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        match v {
            0..=255 => self.out.extend([b'K', v as u8]),
            256..=65535 => {
                self.out.push(b'M');
                self.out.extend((v as u16).to_le_bytes());
            }
            _ if i32::try_from(v).is_ok() => {
                self.out.push(b'J');
                self.out.extend((v as i32).to_le_bytes());
            }
            _ => {
                self.out.extend([0x8a, 8]);
                self.out.extend(v.to_le_bytes());
            }
        }
    }

    /// A global, memoised on first use and fetched with BINGET afterwards, as torch does.
    fn global(&mut self, module: &str, name: &str) {
        let key = format!("{module}\n{name}");
        if let Some(&n) = self.memo.get(&key) {
            if n < 256 {
                self.out.extend([b'h', n as u8]);
            } else {
                self.out.push(b'j');
                self.out.extend(n.to_le_bytes());
            }
            return;
        }
        self.out.push(b'c');
        self.out.extend(format!("{module}\n{name}\n").as_bytes());
        let n = self.memo.len() as u32;
        self.memo.insert(key, n);
        self.put_n(n);
    }

    fn tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                for &i in items {
                    self.int(i as i64);
                }
                self.out.push(0x84 + items.len() as u8);
            }
            _ => {
                self.out.push(b'(');
                for &i in items {
                    self.int(i as i64);
                }
                self.out.push(b't');
            }
        }
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.out.extend([b')', b'R']);
        self.put();
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, t: &TensorSpec, storage: &Storage, key: &str, legacy: bool) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.extend([b'(', b'(']);
        self.str("storage");
        self.global("torch", storage_class(storage.dtype));
        self.str(key);
        self.str("cpu");
        self.int(storage.numel() as i64);
        // Legacy ids carry a sixth field, the view metadata. Old torch pickled a tensor at an
        // offset as one over a storage view `(view_key, offset, size)` of the root storage; do
        // the same for every offset tensor, so that legacy files exercise both forms.
        let offset = match legacy {
            false => t.offset,
            true if t.offset == 0 => {
                self.out.push(b'N');
                0
            }
            true => {
                self.out.push(b'(');
                self.str(&format!("{key}_view{}", t.offset));
                self.int(t.offset as i64);
                self.int((storage.numel() - t.offset) as i64);
                self.out.push(b't');
                0
            }
        };
        self.out.extend([b't', b'Q']);
        self.int(offset as i64);
        self.tuple(&t.shape);
        self.tuple(&t.stride);
        self.out.push(0x89);
        self.empty_ordered_dict();
        self.out.extend([b't', b'R']);
        self.put();
    }

    fn state_dict(&mut self, file: &TorchFile, keys: &[String], legacy: bool) {
        self.empty_ordered_dict();
        self.out.push(b'(');
        for t in &file.tensors {
            self.str(&t.name);
            self.tensor(t, &file.storages[t.storage], &keys[t.storage], legacy);
        }
        self.out.push(b'u');
        // state: {'_metadata': OrderedDict({'': {'version': 1}})}, applied by BUILD.
        self.out.push(b'}');
        self.str("_metadata");
        self.empty_ordered_dict();
        self.str("");
        self.out.push(b'}');
        self.str("version");
        self.int(1);
        self.out.extend([b's', b's', b's', b'b']);
    }

    fn object(&mut self, file: &TorchFile, keys: &[String], legacy: bool) {
        match file.layout {
            Layout::StateDict => self.state_dict(file, keys, legacy),
            Layout::Under(key) => {
                self.out.extend([b'}', b'(']);
                self.str(key);
                self.state_dict(file, keys, legacy);
                self.str("note");
                self.str("saved by a test");
                self.out.push(b'u');
            }
            Layout::Lightning => {
                self.out.extend([b'}', b'(']);
                self.str("state_dict");
                self.state_dict(file, keys, legacy);
                self.str("epoch");
                self.int(3);
                self.str("global_step");
                self.int(1234567);
                self.str("hyper_parameters");
                // argparse.Namespace(lr=0.5, name='x') via NEWOBJ + BUILD.
                self.global("argparse", "Namespace");
                self.out.extend([b')', 0x81, b'}']);
                self.str("lr");
                self.out.push(b'G');
                self.out.extend(0.5f64.to_be_bytes());
                self.out.push(b's');
                self.str("name");
                self.out.extend([0x8c, 1, b'x', b's', b'b']);
                self.str("optimizer_states");
                // [{'state': {0: {'step': 10, 'exp_avg': <tensor>}}, 'param_groups': [...]}]
                self.out.extend([b']', b'}']);
                self.str("state");
                self.out.extend([b'}']);
                self.int(0);
                self.out.extend([b'}']);
                self.str("step");
                self.int(10);
                self.out.push(b's');
                self.str("exp_avg");
                let t = &file.tensors[0];
                self.tensor(t, &file.storages[t.storage], &keys[t.storage], legacy);
                self.out.extend([b's', b's', b's']);
                self.str("param_groups");
                self.out.extend([b']', b'(']);
                self.int(1);
                self.int(-7);
                self.out.extend([0x88, b'N', b'e', b's', b'a']);
                self.str("callbacks");
                // An unknown class rebuilt by REDUCE with a numpy-like bytes payload.
                self.global("numpy.core.multiarray", "scalar");
                self.out.extend([b'C', 4, 1, 2, 3, 4, 0x85, b'R', b'u']);
            }
        }
        self.out.push(b'.');
    }
}

fn key_names(file: &TorchFile) -> Vec<String> {
    (0..file.storages.len()).map(|i| i.to_string()).collect()
}

/// The `data.pkl` a zip archive of `file` holds.
pub fn data_pkl(file: &TorchFile) -> Vec<u8> {
    let mut p = Pickler::new();
    p.object(file, &key_names(file), false);
    p.out
}

/// Writes `file` as a torch zip archive whose entries live under `folder/`.
pub fn write_zip(file: &TorchFile, folder: &str, path: &Path) {
    let stored = zip::CompressionMethod::Stored;
    write_zip_entries(path, folder, Some(data_pkl(file)), &file.storages, stored);
}

/// Writes a torch-like zip with the given `data.pkl` (none if `None`) and storages, compressed
/// with `method` (torch itself always stores).
pub fn write_zip_entries(
    path: &Path,
    folder: &str,
    pkl: Option<Vec<u8>>,
    storages: &[Storage],
    method: zip::CompressionMethod,
) {
    let f = std::fs::File::create(path).expect("create zip");
    let mut zip = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(method)
        .with_alignment(64);
    let mut entry = |name: String, bytes: &[u8]| {
        zip.start_file(name, opts).expect("zip entry");
        zip.write_all(bytes).expect("zip write");
    };
    if let Some(pkl) = pkl {
        entry(format!("{folder}/data.pkl"), &pkl);
    }
    entry(format!("{folder}/byteorder"), b"little");
    for (i, s) in storages.iter().enumerate() {
        entry(format!("{folder}/data/{i}"), &s.bytes);
    }
    entry(format!("{folder}/version"), b"3\n");
    zip.finish().expect("zip finish");
}

/// Writes `file` in the legacy (pre-1.6) stream format.
pub fn write_legacy(file: &TorchFile, path: &Path) {
    let mut out = Vec::new();
    // Magic number 0x1950a86a20f9469cfc6c as LONG1, then protocol 1001, then sys_info.
    out.extend([0x80, 2, 0x8a, 10]);
    out.extend(0x1950a86a20f9469cfc6cu128.to_le_bytes()[..10].iter());
    out.push(b'.');
    let mut p = Pickler::new();
    p.int(1001);
    p.out.push(b'.');
    out.extend(p.out);
    let mut p = Pickler::new();
    p.out.extend([b'}', b'(']);
    p.str("protocol_version");
    p.int(1001);
    p.str("little_endian");
    p.out.push(0x88);
    p.str("type_sizes");
    p.out.extend([b'}', b'u', b'.']);
    out.extend(p.out);
    let keys = key_names(file);
    let mut p = Pickler::new();
    p.object(file, &keys, true);
    out.extend(p.out);
    let mut p = Pickler::new();
    p.out.extend([b']', b'(']);
    for k in &keys {
        p.str(k);
    }
    p.out.extend([b'e', b'.']);
    out.extend(p.out);
    for s in &file.storages {
        out.extend((s.numel() as u64).to_le_bytes());
        out.extend(&s.bytes);
    }
    std::fs::write(path, out).expect("write legacy file");
}
