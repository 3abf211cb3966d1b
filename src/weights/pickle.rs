//! A small pickle virtual machine, enough for what `torch.save` writes (protocols 2 to 5).
//!
//! Values live in an arena and refer to each other by index. A memoised value fetched again, a
//! duplicated one or a parameter wrapping a tensor is the same index, as Python shares the same
//! object: nothing is ever deep-copied. Mutation through the memo works as in Python, and neither a
//! reference cycle nor a deeply nested input can make dropping the result recurse or leak. Strings
//! are interned, so a dict finds a string key by its number and building a dict of n items takes
//! n steps.
//!
//! The input is untrusted: every opcode does constant work (plus the bytes it reads, or the items
//! it moves, which earlier opcodes pushed), and what the machine holds is counted against
//! [`MAX_OBJECTS`], so time and memory stay linear in the input and bounded whatever it says.
//!
//! Nothing is executed: a global is a name, and calling it either builds one of the few objects a
//! checkpoint needs (ordered dicts, tensors, storages) or yields an opaque value.

use std::collections::HashMap;
use std::rc::Rc;

use super::StoredDtype;

/// The longest pickle run: `data.pkl` of a zip archive, or each pickle of a legacy file. A
/// checkpoint's pickle is small (about 180 bytes per tensor in the fixtures: some 90 KiB for the
/// 2.7B model's ~500 tensors); optimizer states and callbacks of a training checkpoint add little.
pub const MAX_PICKLE_BYTES: usize = 64 << 20;

/// The most opcodes one pickle may run (a checkpoint needs about 40 per tensor, some 20,000 for
/// the 2.7B model). Every opcode is at least one byte, so this bounds the time of a pickle that
/// stays under [`MAX_PICKLE_BYTES`] with cheap opcodes.
pub const MAX_OPS: usize = 1 << 24;

/// The most objects one pickle may build: values, stack, mark and memo entries, container items,
/// interned strings, and tensor dimensions and storage keys (in 8-byte units). Each costs a few
/// dozen bytes, so this caps the machine near 100 MiB; a checkpoint needs about 110 per tensor
/// (the fixtures: 15,274 for 144 tensors), some 55,000 for the 2.7B model: 40 times less.
pub const MAX_OBJECTS: usize = 1 << 21;

/// The most dimensions a tensor may have (RuDOLPH's and the VQGAN's have at most 4).
pub const MAX_RANK: usize = 32;

/// The longest storage key. Torch writes decimal numbers (`data/0`, `data/1`, ...; legacy files
/// use the storage's address).
pub const MAX_KEY_LEN: usize = 256;

/// Index of a value in [`Arena::nodes`].
pub(crate) type Id = usize;

/// An interned string: index into the arena's string table.
pub(crate) type Sym = usize;

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

/// A dict: items in insertion order, and where each string key is, so that setting an item
/// never scans the others.
#[derive(Debug, Default)]
pub(crate) struct Dict {
    pub items: Vec<(Id, Id)>,
    by_key: HashMap<Sym, usize>,
}

#[derive(Debug)]
pub(crate) enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for i64, as its little-endian two's-complement bytes (the legacy
    /// format's magic number is one).
    BigInt(Box<[u8]>),
    /// A float; no checkpoint field this reader needs is one, so the value is not kept.
    Float,
    Str(Sym),
    /// Raw bytes (numpy scalars and the like); skipped, never copied.
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Box<Dict>),
    Global(Sym, Sym),
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
    /// A tensor-like object this reader cannot turn into a tensor, with the reason.
    Unsupported(Box<str>),
    /// An instance of a class this reader does not model; kept so that parsing can go on.
    Opaque(Box<str>),
}

#[derive(Debug, Default)]
pub(crate) struct Arena {
    pub nodes: Vec<Node>,
    strings: Vec<Rc<str>>,
    interned: HashMap<Rc<str>, Sym>,
}

/// At most 200 characters of `s` (more than any real tensor or class name), for messages: names
/// from the file can be any length.
pub(crate) fn short(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

impl Arena {
    fn intern(&mut self, s: &str) -> Sym {
        if let Some(&sym) = self.interned.get(s) {
            return sym;
        }
        let rc: Rc<str> = Rc::from(s);
        let sym = self.strings.len();
        self.strings.push(Rc::clone(&rc));
        self.interned.insert(rc, sym);
        sym
    }

    pub fn get(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    pub fn string(&self, sym: Sym) -> &str {
        &self.strings[sym]
    }

    /// The text of a string value.
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Node::Str(s) => Some(self.string(*s)),
            _ => None,
        }
    }

    /// The items of a dict value, in insertion order.
    pub fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.get(id) {
            Node::Dict(d) => Some(&d.items),
            _ => None,
        }
    }

    /// Looks `key` up in a dict node (string keys, as in a state dict).
    pub fn dict_get(&self, dict: Id, key: &str) -> Option<Id> {
        let sym = self.interned.get(key)?;
        match self.get(dict) {
            Node::Dict(d) => d.by_key.get(sym).map(|&i| d.items[i].1),
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

    pub fn items(&self, id: Id) -> Option<&[Id]> {
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
            Node::Str(s) if self.string(*s).len() <= 60 => format!("{:?}", self.string(*s)),
            Node::Str(_) => "a long string".into(),
            Node::Bytes => "bytes".into(),
            Node::Tuple(v) => format!("a tuple of {} items", v.len()),
            Node::List(v) => format!("a list of {} items", v.len()),
            Node::Dict(d) => format!("a dict of {} items", d.items.len()),
            Node::Global(m, n) => format!("{}.{}", short(self.string(*m)), short(self.string(*n))),
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
    /// The input, cut at [`MAX_PICKLE_BYTES`].
    data: &'a [u8],
    /// Whether `data` was cut, so that running off its end is the limit, not a truncated file.
    cut: bool,
    pos: usize,
    arena: Arena,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    ops: usize,
    objects: usize,
}

/// Runs the pickle at the start of `data` (which may go on past its STOP). Errors are plain
/// strings; the caller adds the file name.
pub(crate) fn unpickle(data: &[u8]) -> Result<Unpickled, String> {
    let cut = data.len() > MAX_PICKLE_BYTES;
    let mut m = Machine {
        data: &data[..data.len().min(MAX_PICKLE_BYTES)],
        cut,
        pos: 0,
        arena: Arena::default(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        ops: 0,
        objects: 0,
    };
    let root = m.run()?;
    Ok(Unpickled {
        arena: m.arena,
        root,
        consumed: m.pos,
    })
}

/// `n` bytes in the 8-byte units [`MAX_OBJECTS`] counts.
fn words(n: usize) -> usize {
    n / 8 + 1
}

impl<'a> Machine<'a> {
    fn truncated(&self, what: String) -> String {
        if self.cut {
            format!(
                "the pickle is longer than {MAX_PICKLE_BYTES} bytes, the most this reader accepts \
                 (a checkpoint's takes about 180 bytes per tensor)"
            )
        } else {
            format!("pickle truncated: {what}")
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let Some(end) = self.pos.checked_add(n).filter(|&e| e <= self.data.len()) else {
            let left = self.data.len() - self.pos;
            return Err(self.truncated(format!(
                "need {n} bytes at offset {}, only {left} left",
                self.pos
            )));
        };
        let data: &'a [u8] = self.data;
        self.pos = end;
        Ok(&data[end - n..end])
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

    /// Reads `len` bytes in place; the length is checked against the remaining input, so a lying
    /// length cannot cause a huge allocation.
    fn bytes(&mut self, len: u64) -> Result<&'a [u8], String> {
        let len = usize::try_from(len).map_err(|_| format!("length {len} too large"))?;
        self.take(len)
    }

    fn string(&mut self, len: u64) -> Result<Sym, String> {
        let at = self.pos;
        let b = self.bytes(len)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| format!("invalid UTF-8 in pickle string at offset {at}"))?;
        self.intern(s)
    }

    /// Interns `s`; a new string counts its table entries and its bytes against [`MAX_OBJECTS`].
    fn intern(&mut self, s: &str) -> Result<Sym, String> {
        if !self.arena.interned.contains_key(s) {
            self.charge(words(s.len()) + 6)?;
        }
        Ok(self.arena.intern(s))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.truncated(format!("unterminated line at offset {}", self.pos)));
        };
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    /// Counts `n` more objects against [`MAX_OBJECTS`].
    fn charge(&mut self, n: usize) -> Result<(), String> {
        self.objects = self.objects.saturating_add(n);
        if self.objects > MAX_OBJECTS {
            return Err(format!(
                "the pickle builds more than {MAX_OBJECTS} objects (values, stack, memo and \
                 container entries), the most this reader allows; a checkpoint needs about 110 per \
                 tensor (stopped at offset {})",
                self.pos
            ));
        }
        Ok(())
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

    /// Adds a value to the arena (not to the stack).
    fn alloc(&mut self, node: Node) -> Result<Id, String> {
        self.charge(1)?;
        self.arena.nodes.push(node);
        Ok(self.arena.nodes.len() - 1)
    }

    /// Pushes an existing value: the same object, not a copy.
    fn push_id(&mut self, id: Id) -> Result<(), String> {
        self.charge(1)?;
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, node: Node) -> Result<(), String> {
        let id = self.alloc(node)?;
        self.push_id(id)
    }

    fn memo_get(&self, key: u64) -> Result<Id, String> {
        self.memo
            .get(&key)
            .copied()
            .ok_or_else(|| format!("pickle memo key {key} not defined (offset {})", self.pos))
    }

    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        self.charge(1)?;
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    /// A new dict holding `pairs` (later duplicates of a string key replace the value, as in
    /// Python).
    fn new_dict(&mut self, pairs: Vec<(Id, Id)>, at: usize) -> Result<Id, String> {
        let id = self.alloc(Node::Dict(Box::default()))?;
        self.set_items(id, pairs, at)?;
        Ok(id)
    }

    fn run(&mut self) -> Result<Id, String> {
        loop {
            self.ops += 1;
            if self.ops > MAX_OPS {
                return Err(format!(
                    "the pickle runs more than {MAX_OPS} opcodes, the most this reader allows; a \
                     checkpoint needs about 40 per tensor (stopped at offset {})",
                    self.pos
                ));
            }
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
                b'(' => {
                    self.charge(1)?;
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.push_id(top)?;
                }
                b'}' => self.push(Node::Dict(Box::default()))?,
                b']' | 0x8f => self.push(Node::List(Vec::new()))?,
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = self.new_dict(pairs(items, at)?, at)?;
                    self.push_id(dict)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?;
                }
                b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?;
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
                    self.push(Node::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Int(i64::from(v)))?;
                }
                0x8a => {
                    let n = self.u8()?;
                    let node = long(self.bytes(u64::from(n))?);
                    self.push(node)?;
                }
                0x8b => {
                    let n = self.u32()?;
                    let node = long(self.bytes(u64::from(n))?);
                    self.push(node)?;
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let t = line.trim_end_matches('L');
                    let node = match t {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => t.parse().map(Node::Int).unwrap_or_else(|_| {
                            Node::Opaque(format!("integer {}", short(t)).into())
                        }),
                    };
                    self.push(node)?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Node::Float)?;
                }
                b'N' => self.push(Node::None)?,
                0x88 => self.push(Node::Bool(true))?,
                0x89 => self.push(Node::Bool(false))?,
                b'X' => {
                    let n = self.u32()?;
                    let s = self.string(u64::from(n))?;
                    self.push(Node::Str(s))?;
                }
                0x8c => {
                    let n = self.u8()?;
                    let s = self.string(u64::from(n))?;
                    self.push(Node::Str(s))?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let s = self.string(n)?;
                    self.push(Node::Str(s))?;
                }
                // Python 2 `str` (BINSTRING / SHORT_BINSTRING): treated as latin-1 text.
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        u64::from(self.u32()?)
                    } else {
                        u64::from(self.u8()?)
                    };
                    let text: String = self.bytes(n)?.iter().map(|&c| char::from(c)).collect();
                    let s = self.intern(&text)?;
                    self.push(Node::Str(s))?;
                }
                b'B' => {
                    let n = self.u32()?;
                    self.bytes(u64::from(n))?;
                    self.push(Node::Bytes)?;
                }
                b'C' => {
                    let n = self.u8()?;
                    self.bytes(u64::from(n))?;
                    self.push(Node::Bytes)?;
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    self.bytes(n)?;
                    self.push(Node::Bytes)?;
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
                    let k = line.parse().map_err(|_| {
                        format!("bad PUT argument {:?} at offset {at}", short(&line))
                    })?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()?;
                    let id = self.memo_get(u64::from(k))?;
                    self.push_id(id)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    let id = self.memo_get(u64::from(k))?;
                    self.push_id(id)?;
                }
                b'g' => {
                    let line = self.line()?;
                    let k = line.parse().map_err(|_| {
                        format!("bad GET argument {:?} at offset {at}", short(&line))
                    })?;
                    let id = self.memo_get(k)?;
                    self.push_id(id)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let (m, n) = (self.intern(&module)?, self.intern(&name)?);
                    self.push(Node::Global(m, n))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (self.arena.get(module), self.arena.get(name)) {
                        (&Node::Str(m), &Node::Str(n)) => self.push(Node::Global(m, n))?,
                        _ => return Err(format!("STACK_GLOBAL needs two strings (offset {at})")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let id = self.call(func, args, 0, at)?;
                    self.push_id(id)?;
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let node = Node::Opaque(self.arena.describe(cls).into());
                    self.push(node)?;
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let node = Node::Opaque(self.arena.describe(cls).into());
                    self.push(node)?;
                }
                // BUILD sets an object's state (`_metadata` of an OrderedDict, attributes of
                // opaque objects); none of it matters for reading tensors.
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let node = self.persistent_load(pid)?;
                    self.push(node)?;
                }
                b'P' => {
                    let line = self.line()?;
                    self.push(Node::Opaque(
                        format!("persistent id {:?}", short(&line)).into(),
                    ))?;
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
        self.charge(items.len())?;
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

    /// Sets `items` in a dict, each string key found through the dict's index (constant time),
    /// so that a dict built one SETITEM at a time costs one step per item.
    fn set_items(&mut self, dict: Id, items: Vec<(Id, Id)>, at: usize) -> Result<(), String> {
        self.charge(items.len().saturating_mul(2))?;
        match &self.arena.nodes[dict] {
            Node::Dict(_) => {}
            // Setting an item on an object calls its `__setitem__`; nothing to keep.
            Node::Opaque(_) => return Ok(()),
            _ => return Err(format!("SETITEM on a non-dict at offset {at}")),
        }
        // Take the dict out of the arena while its keys (elsewhere in the arena) are looked at.
        let Node::Dict(mut d) = std::mem::replace(&mut self.arena.nodes[dict], Node::None) else {
            return Ok(());
        };
        for (k, v) in items {
            match self.arena.nodes[k] {
                Node::Str(sym) => match d.by_key.get(&sym) {
                    Some(&i) => d.items[i].1 = v,
                    None => {
                        d.by_key.insert(sym, d.items.len());
                        d.items.push((k, v));
                    }
                },
                _ => d.items.push((k, v)),
            }
        }
        self.arena.nodes[dict] = Node::Dict(d);
        Ok(())
    }

    /// Interprets a persistent id `('storage', StorageType, key, location, numel[, view])`.
    fn persistent_load(&mut self, pid: Id) -> Result<Node, String> {
        // Only the first six items mean anything; a longer tuple is not copied.
        let Some(items) = self.arena.items(pid).map(|v| v[..v.len().min(6)].to_vec()) else {
            return Ok(Node::Opaque(
                format!("persistent id {}", self.arena.describe(pid)).into(),
            ));
        };
        let is_storage = items.first().and_then(|&i| self.arena.as_str(i)) == Some("storage");
        if !is_storage || items.len() < 5 {
            return Ok(Node::Opaque(
                format!("persistent id {}", self.arena.describe(pid)).into(),
            ));
        }
        let unsupported = |why: String| Ok(Node::Unsupported(why.into()));
        let dtype = match self.arena.get(items[1]) {
            Node::Global(_, name) => match storage_dtype(self.arena.string(*name)) {
                Some(d) => d,
                None => {
                    return unsupported(format!(
                        "storage type {}",
                        short(self.arena.string(*name))
                    ));
                }
            },
            _ => return unsupported(format!("storage type {}", self.arena.describe(items[1]))),
        };
        let key = match self.arena.get(items[2]) {
            Node::Str(s) => {
                let key = self.arena.string(*s);
                if key.len() > MAX_KEY_LEN {
                    return unsupported(format!(
                        "storage key of {} bytes (at most {MAX_KEY_LEN} are accepted; torch \
                         writes short numbers)",
                        key.len()
                    ));
                }
                key.to_string()
            }
            Node::Int(i) => i.to_string(),
            _ => return unsupported("storage key that is not a string".into()),
        };
        let Some(numel) = self
            .arena
            .as_int(items[4])
            .and_then(|v| u64::try_from(v).ok())
        else {
            return unsupported(format!("storage {key} without an element count"));
        };
        let mut view_offset = 0;
        if let Some(&view) = items.get(5)
            && let Some(v) = self.arena.items(view)
            && v.len() == 3
        {
            match self.arena.as_int(v[1]).and_then(|o| u64::try_from(o).ok()) {
                Some(o) => view_offset = o,
                None => return unsupported(format!("storage view of {key}")),
            }
        }
        self.charge(words(key.len()) + 4)?;
        Ok(Node::Storage(Box::new(StorageRef {
            key,
            dtype,
            numel,
            view_offset,
        })))
    }

    /// The value `func(*args)` yields: a new object, or for the wrappers torch puts around a
    /// tensor (`Parameter`, `_rebuild_from_type_v2`), the wrapped object itself. `depth` bounds
    /// the nesting of rebuild helpers that call other rebuild helpers.
    fn call(&mut self, func: Id, args: Id, depth: u32, at: usize) -> Result<Id, String> {
        let &Node::Global(module, name) = self.arena.get(func) else {
            let what = format!("result of calling {}", self.arena.describe(func));
            return self.alloc(Node::Opaque(what.into()));
        };
        let (module, name) = (
            Rc::clone(&self.arena.strings[module]),
            Rc::clone(&self.arena.strings[name]),
        );
        // The helpers take at most six arguments; a longer tuple is not copied.
        let argc = self.arena.items(args).map_or(0, <[Id]>::len);
        let argv: Vec<Id> = self
            .arena
            .items(args)
            .map(|v| v[..v.len().min(6)].to_vec())
            .unwrap_or_default();
        let node = match (&*module, &*name) {
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                // Built from an iterable of pairs (or another dict): one step per pair, as in
                // Python; each pair is counted, so repeating this cannot grow without bound.
                let mut pairs = Vec::new();
                if let Some(&src) = argv.first() {
                    let n = match self.arena.get(src) {
                        Node::Dict(d) => d.items.len(),
                        Node::Tuple(v) | Node::List(v) => v.len(),
                        _ => 0,
                    };
                    self.charge(n)?;
                    match self.arena.get(src) {
                        Node::Dict(d) => pairs.extend_from_slice(&d.items),
                        Node::Tuple(v) | Node::List(v) => {
                            for &item in v {
                                if let Some(&[k, v]) = self.arena.items(item) {
                                    pairs.push((k, v));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                return self.new_dict(pairs, at);
            }
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") if argc >= 4 => {
                self.rebuild_tensor(&argv)?
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
            | ("torch.nn.parameter", "Parameter")
                if argc >= 1 =>
            {
                return Ok(argv[0]);
            }
            ("torch._tensor", "_rebuild_from_type_v2") if argc >= 3 && depth < 4 => {
                return self.call(argv[0], argv[2], depth + 1, at);
            }
            ("torch.storage", "_load_from_bytes") => {
                Node::Unsupported("storage pickled with torch.storage._load_from_bytes".into())
            }
            ("torch._utils", other) if other.starts_with("_rebuild") => {
                Node::Unsupported(format!("tensor kind torch._utils.{}", short(other)).into())
            }
            _ => Node::Opaque(format!("{}.{}", short(&module), short(&name)).into()),
        };
        self.alloc(node)
    }

    fn rebuild_tensor(&mut self, argv: &[Id]) -> Result<Node, String> {
        let storage = match self.arena.get(argv[0]) {
            Node::Storage(s) => (**s).clone(),
            Node::Unsupported(why) => return Ok(Node::Unsupported(why.clone())),
            _ => {
                return Ok(Node::Unsupported(
                    format!("tensor whose storage is {}", self.arena.describe(argv[0])).into(),
                ));
            }
        };
        let rank = self.arena.items(argv[2]).map_or(0, <[Id]>::len);
        if rank > MAX_RANK {
            return Ok(Node::Unsupported(
                format!("tensor of {rank} dimensions (at most {MAX_RANK} are accepted)").into(),
            ));
        }
        let offset = self
            .arena
            .as_int(argv[1])
            .and_then(|v| u64::try_from(v).ok());
        let shape = self.arena.as_u64s(argv[2]);
        let stride = self
            .arena
            .items(argv[3])
            .filter(|s| s.len() == rank)
            .and_then(|_| self.arena.as_u64s(argv[3]));
        self.charge(words(storage.key.len()) + 2 * rank + 8)?;
        Ok(match (offset, shape, stride) {
            (Some(offset), Some(shape), Some(stride)) => Node::Tensor(Box::new(TensorRef {
                storage,
                offset,
                shape,
                stride,
            })),
            _ => Node::Unsupported(
                "tensor with a malformed offset, size or stride (negative strides are not supported)"
                    .into(),
            ),
        })
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
        return Node::BigInt(b.into());
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
        assert_eq!(items[0], items[1]);
        assert_eq!(
            u.arena.dict_get(items[1], "a").map(|i| u.arena.as_int(i)),
            Some(Some(1))
        );
    }

    #[test]
    fn parameters_alias_their_tensor_and_repeated_keys_replace_values() {
        // l = [0, 0, 0]; p = _rebuild_parameter(l) twice; {'k': 1, 'k': 2, 'j': p}
        let mut p = b"\x80\x02](K\x00K\x00K\x00eq\x00".to_vec();
        p.extend(b"ctorch._utils\n_rebuild_parameter\nq\x01");
        p.extend(b"h\x01h\x00\x85R0h\x01h\x00\x85Rq\x02");
        p.extend(b"0}(X\x01\x00\x00\x00kK\x01X\x01\x00\x00\x00kK\x02");
        p.extend(b"X\x01\x00\x00\x00jh\x02u.");
        let u = unpickle(&p).unwrap();
        let items = u.arena.dict_items(u.root).unwrap();
        assert_eq!(items.len(), 2);
        let k = u.arena.dict_get(u.root, "k").unwrap();
        assert_eq!(u.arena.as_int(k), Some(2));
        let j = u.arena.dict_get(u.root, "j").unwrap();
        assert_eq!(u.arena.items(j).map(<[Id]>::len), Some(3));
        assert_eq!(
            u.arena
                .nodes
                .iter()
                .filter(|n| matches!(n, Node::List(_)))
                .count(),
            1
        );
    }

    #[test]
    fn long_names_are_shortened_in_messages() {
        let name = "x".repeat(1000);
        assert_eq!(short(&name).chars().count(), 201);
        assert_eq!(short("abc"), "abc");
    }

    #[test]
    fn long1_is_signed() {
        assert!(matches!(long(&[0xff]), Node::Int(-1)));
        assert!(matches!(long(&[0x00, 0x80, 0x00]), Node::Int(0x8000)));
    }
}
