//! A small pickle virtual machine, enough for what `torch.save` writes (protocols 2 to 5).
//!
//! Values live in an arena and refer to each other by index. Shared (memoised) containers are then
//! shared for free, mutation through the memo works as in Python, and neither a reference cycle
//! nor a deeply nested input can make dropping the result recurse or leak.
//!
//! Nothing is executed: a global is a name, and calling it either builds one of the few objects a
//! checkpoint needs (ordered dicts, tensors, storages) or yields an opaque value.

use super::StoredDtype;

/// Index of a value in [`Arena::nodes`].
pub(crate) type Id = usize;

/// Where a tensor's storage lives, as the persistent id describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StorageRef {
    /// The archive key (`data/<key>` in a zip, position in the key list of a legacy file).
    pub key: String,
    pub dtype: StoredDtype,
    /// Element count the pickle declares for the whole storage.
    pub numel: u64,
    /// Legacy storage views start this many elements into the root storage.
    pub view_offset: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view into a storage.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64, as its little-endian two's-complement bytes (the legacy
    /// format's magic number is one).
    BigInt(Vec<u8>),
    /// A float; no checkpoint field this reader needs is one, so the value is not kept.
    Float,
    Str(String),
    /// Raw bytes (numpy scalars and the like); skipped, never copied.
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(String, String),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// A tensor-like object this reader cannot turn into a tensor, with the reason.
    Unsupported(String),
    /// An instance of a class this reader does not model; kept so that parsing can go on.
    Opaque(String),
}

#[derive(Debug, Default)]
pub(crate) struct Arena {
    pub nodes: Vec<Node>,
}

impl Arena {
    fn push(&mut self, node: Node) -> Id {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn get(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// Looks `key` up in a dict node (string keys only, as in a state dict).
    pub fn dict_get(&self, dict: Id, key: &str) -> Option<Id> {
        match self.get(dict) {
            Node::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(self.get(*k), Node::Str(s) if s == key))
                .map(|&(_, v)| v),
            _ => None,
        }
    }

    fn as_int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    fn as_u64s(&self, id: Id) -> Option<Vec<u64>> {
        match self.get(id) {
            Node::Tuple(items) | Node::List(items) => items
                .iter()
                .map(|&i| self.as_int(i).and_then(|v| u64::try_from(v).ok()))
                .collect(),
            _ => None,
        }
    }

    fn items(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Node::Tuple(items) | Node::List(items) => Some(items),
            _ => None,
        }
    }

    /// A short description of a value for error messages (never the whole value: it may be huge).
    pub fn describe(&self, id: Id) -> String {
        match self.get(id) {
            Node::None => "None".into(),
            Node::Bool(b) => b.to_string(),
            Node::Int(i) => i.to_string(),
            Node::BigInt(_) => "a big integer".into(),
            Node::Float => "a float".into(),
            Node::Str(s) if s.len() <= 60 => format!("{s:?}"),
            Node::Str(_) => "a long string".into(),
            Node::Bytes => "bytes".into(),
            Node::Tuple(v) => format!("a tuple of {} items", v.len()),
            Node::List(v) => format!("a list of {} items", v.len()),
            Node::Dict(v) => format!("a dict of {} items", v.len()),
            Node::Global(m, n) => format!("{m}.{n}"),
            Node::Storage(s) => format!("storage `{}`", s.key),
            Node::Tensor(_) => "a tensor".into(),
            Node::Unsupported(why) => format!("an unsupported {why}"),
            Node::Opaque(c) => format!("an instance of {c}"),
        }
    }
}

/// Maps a torch storage class name to its element type.
pub(crate) fn storage_dtype(name: &str) -> Option<StoredDtype> {
    Some(match name {
        "DoubleStorage" => StoredDtype::F64,
        "FloatStorage" => StoredDtype::F32,
        "HalfStorage" => StoredDtype::F16,
        "BFloat16Storage" => StoredDtype::BF16,
        "LongStorage" => StoredDtype::I64,
        "IntStorage" => StoredDtype::I32,
        "ShortStorage" => StoredDtype::I16,
        "CharStorage" => StoredDtype::I8,
        "ByteStorage" | "UntypedStorage" => StoredDtype::U8,
        "BoolStorage" => StoredDtype::Bool,
        _ => return None,
    })
}

/// The result of running one pickle: the arena and the id of the top-level object.
#[derive(Debug)]
pub(crate) struct Unpickled {
    pub arena: Arena,
    pub root: Id,
    /// Bytes consumed, up to and including STOP (legacy files hold several pickles in a row).
    pub consumed: usize,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Arena,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, Id>,
}

/// Runs the pickle at the start of `data`. Errors are plain strings; the caller adds the file name.
pub(crate) fn unpickle(data: &[u8]) -> Result<Unpickled, String> {
    let mut m = Machine {
        data,
        pos: 0,
        arena: Arena::default(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let root = m.run()?;
    Ok(Unpickled {
        arena: m.arena,
        root,
        consumed: m.pos,
    })
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "pickle truncated: need {n} bytes at offset {}, only {} left",
                    self.pos,
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads `len` bytes; the length is checked against the remaining input before anything is
    /// allocated, so a lying length cannot cause a huge allocation.
    fn bytes(&mut self, len: u64) -> Result<Vec<u8>, String> {
        let len = usize::try_from(len).map_err(|_| format!("length {len} too large"))?;
        Ok(self.take(len)?.to_vec())
    }

    fn skip(&mut self, len: u64) -> Result<(), String> {
        let len = usize::try_from(len).map_err(|_| format!("length {len} too large"))?;
        self.take(len).map(|_| ())
    }

    fn string(&mut self, len: u64) -> Result<String, String> {
        let at = self.pos;
        String::from_utf8(self.bytes(len)?)
            .map_err(|_| format!("invalid UTF-8 in pickle string at offset {at}"))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("pickle truncated: unterminated line at offset {}", self.pos))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Id, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("pickle stack underflow at offset {}", self.pos));
        }
        Ok(self.stack.pop().unwrap_or_default())
    }

    fn top(&self) -> Result<Id, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| format!("pickle stack empty at offset {}", self.pos))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle MARK missing at offset {}", self.pos))?;
        Ok(self.stack.split_off(mark))
    }

    fn push(&mut self, node: Node) {
        let id = self.arena.push(node);
        self.stack.push(id);
    }

    fn memo_get(&self, key: u64) -> Result<Id, String> {
        self.memo
            .get(&key)
            .copied()
            .ok_or_else(|| format!("pickle memo key {key} not defined (offset {})", self.pos))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn run(&mut self) -> Result<Id, String> {
        // Every opcode consumes at least one byte, so the loop is bounded by the input size.
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'}' => self.push(Node::Dict(Vec::new())),
                b']' => self.push(Node::List(Vec::new())),
                b')' => self.push(Node::Tuple(Vec::new())),
                0x8f => self.push(Node::List(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items, at)?;
                    self.push(Node::Dict(pairs));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![v], at)?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items, at)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, vec![(k, v)], at)?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, pairs(items, at)?, at)?;
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Node::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Int(i64::from(v)));
                }
                0x8a => {
                    let n = self.u8()?;
                    let b = self.bytes(u64::from(n))?;
                    self.push(long(&b));
                }
                0x8b => {
                    let n = self.u32()?;
                    let b = self.bytes(u64::from(n))?;
                    self.push(long(&b));
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let t = line.trim_end_matches('L');
                    let node = match t {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => t
                            .parse()
                            .map(Node::Int)
                            .unwrap_or_else(|_| Node::Opaque(format!("integer {t}"))),
                    };
                    self.push(node);
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Node::Float);
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'X' => {
                    let n = self.u32()?;
                    let s = self.string(u64::from(n))?;
                    self.push(Node::Str(s));
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(u64::from(n))?;
                    self.push(Node::Str(s));
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.push(Node::Str(s));
                }
                // Python 2 `str` (BINSTRING / SHORT_BINSTRING): treated as latin-1 text.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        u64::from(self.u32()?)
                    } else {
                        u64::from(self.u8()?)
                    };
                    let b = self.bytes(n)?;
                    self.push(Node::Str(b.iter().map(|&c| char::from(c)).collect()));
                }
                b'B' => {
                    let n = self.u32()?;
                    self.skip(u64::from(n))?;
                    self.push(Node::Bytes);
                }
                b'C' => {
                    let n = self.u8()?;
                    self.skip(u64::from(n))?;
                    self.push(Node::Bytes);
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    self.skip(n)?;
                    self.push(Node::Bytes);
                }
                b'q' => {
                    let k = self.u8()?;
                    self.memo_put(u64::from(k))?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(u64::from(k))?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let line = self.line()?;
                    let k = line
                        .parse()
                        .map_err(|_| format!("bad PUT argument {line:?} at offset {at}"))?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    let id = self.memo_get(u64::from(k))?;
                    self.stack.push(id);
                }
                b'j' => {
                    let k = self.u32()?;
                    let id = self.memo_get(u64::from(k))?;
                    self.stack.push(id);
                }
                b'g' => {
                    let line = self.line()?;
                    let k = line
                        .parse()
                        .map_err(|_| format!("bad GET argument {line:?} at offset {at}"))?;
                    let id = self.memo_get(k)?;
                    self.stack.push(id);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Node::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.arena.get(module), self.arena.get(name)) {
                        (Node::Str(m), Node::Str(n)) => {
                            let node = Node::Global(m.clone(), n.clone());
                            self.push(node);
                        }
                        _ => return Err(format!("STACK_GLOBAL needs two strings (offset {at})")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let node = self.call(func, args, 0);
                    self.push(node);
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let node = Node::Opaque(self.arena.describe(cls));
                    self.push(node);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let node = Node::Opaque(self.arena.describe(cls));
                    self.push(node);
                }
                // BUILD sets an object's state (`_metadata` of an OrderedDict, attributes of
                // opaque objects); none of it matters for reading tensors.
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let node = self.persistent_load(pid);
                    self.push(node);
                }
                b'P' => {
                    let line = self.line()?;
                    self.push(Node::Opaque(format!("persistent id {line:?}")));
                }
                _ => {
                    return Err(format!(
                        "unknown or unsupported pickle opcode 0x{op:02x} at offset {at}"
                    ));
                }
            }
        }
    }

    fn append(&mut self, list: Id, items: Vec<Id>, at: usize) -> Result<(), String> {
        match &mut self.arena.nodes[list] {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            // Appending to an object calls its `append`/`extend`; nothing to keep.
            Node::Opaque(_) => Ok(()),
            _ => Err(format!("APPEND to a non-list at offset {at}")),
        }
    }

    fn set_items(&mut self, dict: Id, items: Vec<(Id, Id)>, at: usize) -> Result<(), String> {
        // Collect first: string keys are compared through the arena, which `nodes[dict]` borrows.
        let keys: Vec<Option<String>> = items
            .iter()
            .map(|(k, _)| match self.arena.get(*k) {
                Node::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        let existing: Vec<Option<String>> = match self.arena.get(dict) {
            Node::Dict(v) => v
                .iter()
                .map(|(k, _)| match self.arena.get(*k) {
                    Node::Str(s) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            Node::Opaque(_) => return Ok(()),
            _ => return Err(format!("SETITEM on a non-dict at offset {at}")),
        };
        let mut index: std::collections::HashMap<String, usize> = existing
            .into_iter()
            .enumerate()
            .filter_map(|(i, k)| k.map(|k| (k, i)))
            .collect();
        if let Node::Dict(v) = &mut self.arena.nodes[dict] {
            for ((k, val), key) in items.into_iter().zip(keys) {
                match key {
                    Some(s) => match index.get(&s) {
                        Some(&i) => v[i].1 = val,
                        None => {
                            index.insert(s, v.len());
                            v.push((k, val));
                        }
                    },
                    None => v.push((k, val)),
                }
            }
        }
        Ok(())
    }

    /// Interprets a persistent id `('storage', StorageType, key, location, numel[, view])`.
    fn persistent_load(&mut self, pid: Id) -> Node {
        let Some(items) = self.arena.items(pid).map(<[Id]>::to_vec) else {
            return Node::Opaque(format!("persistent id {}", self.arena.describe(pid)));
        };
        let is_storage = matches!(items.first().map(|&i| self.arena.get(i)), Some(Node::Str(s)) if s == "storage");
        if !is_storage || items.len() < 5 {
            return Node::Opaque(format!("persistent id {}", self.arena.describe(pid)));
        }
        let dtype = match self.arena.get(items[1]) {
            Node::Global(_, name) => match storage_dtype(name) {
                Some(d) => d,
                None => return Node::Unsupported(format!("storage type {name}")),
            },
            _ => {
                return Node::Unsupported(format!(
                    "storage type {}",
                    self.arena.describe(items[1])
                ));
            }
        };
        let key = match self.arena.get(items[2]) {
            Node::Str(s) => s.clone(),
            Node::Int(i) => i.to_string(),
            _ => return Node::Unsupported("storage key is not a string".into()),
        };
        let Some(numel) = self
            .arena
            .as_int(items[4])
            .and_then(|v| u64::try_from(v).ok())
        else {
            return Node::Unsupported(format!("storage {key} has no element count"));
        };
        let mut view_offset = 0;
        if let Some(&view) = items.get(5)
            && let Some(v) = self.arena.items(view)
            && v.len() == 3
        {
            match self.arena.as_int(v[1]).and_then(|o| u64::try_from(o).ok()) {
                Some(o) => view_offset = o,
                None => return Node::Unsupported(format!("storage view of {key}")),
            }
        }
        Node::Storage(StorageRef {
            key,
            dtype,
            numel,
            view_offset,
        })
    }

    /// What calling `func(*args)` yields. `depth` bounds the nesting of rebuild helpers that call
    /// other rebuild helpers.
    fn call(&mut self, func: Id, args: Id, depth: u32) -> Node {
        let Node::Global(module, name) = self.arena.get(func).clone() else {
            return Node::Opaque(format!("result of calling {}", self.arena.describe(func)));
        };
        let argv = self
            .arena
            .items(args)
            .map(<[Id]>::to_vec)
            .unwrap_or_default();
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                let mut pairs = Vec::new();
                if let Some(&list) = argv.first()
                    && let Some(items) = self.arena.items(list)
                {
                    for &item in items {
                        if let Some(&[k, v]) = self.arena.items(item) {
                            pairs.push((k, v));
                        }
                    }
                }
                Node::Dict(pairs)
            }
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") if argv.len() >= 4 => {
                self.rebuild_tensor(&argv)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
            | ("torch.nn.parameter", "Parameter")
                if !argv.is_empty() =>
            {
                self.arena.get(argv[0]).clone()
            }
            ("torch._tensor", "_rebuild_from_type_v2") if argv.len() >= 3 && depth < 4 => {
                self.call(argv[0], argv[2], depth + 1)
            }
            ("torch.storage", "_load_from_bytes") => {
                Node::Unsupported("storage pickled with torch.storage._load_from_bytes".into())
            }
            ("torch._utils", other) if other.starts_with("_rebuild") => {
                Node::Unsupported(format!("tensor kind torch._utils.{other}"))
            }
            _ => Node::Opaque(format!("{module}.{name}")),
        }
    }

    fn rebuild_tensor(&mut self, argv: &[Id]) -> Node {
        let storage = match self.arena.get(argv[0]) {
            Node::Storage(s) => s.clone(),
            Node::Unsupported(why) => return Node::Unsupported(why.clone()),
            _ => {
                return Node::Unsupported(format!(
                    "tensor whose storage is {}",
                    self.arena.describe(argv[0])
                ));
            }
        };
        let offset = self
            .arena
            .as_int(argv[1])
            .and_then(|v| u64::try_from(v).ok());
        let shape = self.arena.as_u64s(argv[2]);
        let stride = self.arena.as_u64s(argv[3]);
        match (offset, shape, stride) {
            (Some(offset), Some(shape), Some(stride)) if shape.len() == stride.len() => {
                Node::Tensor(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                })
            }
            _ => Node::Unsupported(
                "tensor with a malformed offset, size or stride (negative strides are not supported)"
                    .into(),
            ),
        }
    }
}

fn pairs(items: Vec<Id>, at: usize) -> Result<Vec<(Id, Id)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err(format!("odd number of items for a dict at offset {at}"));
    }
    Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

/// Decodes a little-endian two's-complement LONG1/LONG4 payload.
fn long(b: &[u8]) -> Node {
    if b.is_empty() {
        return Node::Int(0);
    }
    if b.len() > 8 {
        return Node::BigInt(b.to_vec());
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Node::Int(i64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_unknown_opcodes_are_errors() {
        assert!(unpickle(b"").unwrap_err().contains("truncated"));
        assert!(
            unpickle(b"\x80\x02X\xff\xff\xff\x7f")
                .unwrap_err()
                .contains("truncated")
        );
        assert!(
            unpickle(b"\x80\x02\xff")
                .unwrap_err()
                .contains("opcode 0xff")
        );
        assert!(unpickle(b"\x80\x02.").unwrap_err().contains("underflow"));
        assert!(
            unpickle(b"\x80\x02h\x05.")
                .unwrap_err()
                .contains("memo key 5")
        );
    }

    #[test]
    fn memoised_dict_is_shared() {
        // d = {}; memo[0] = d; d['a'] = 1; result (d, d) via BINGET
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01sh\x00\x86.";
        let u = unpickle(p).unwrap();
        let Node::Tuple(items) = u.arena.get(u.root) else {
            panic!("not a tuple")
        };
        assert_eq!(
            u.arena.dict_get(items[1], "a").map(|i| u.arena.as_int(i)),
            Some(Some(1))
        );
    }

    #[test]
    fn long1_is_signed() {
        assert!(matches!(long(&[0xff]), Node::Int(-1)));
        assert!(matches!(long(&[0x00, 0x80, 0x00]), Node::Int(0x8000)));
    }
}
