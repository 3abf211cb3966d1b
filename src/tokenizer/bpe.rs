//! YouTokenToMe 1.0.6 BPE: model file, encoding (plain and BPE-dropout) and decoding.
//!
//! The merge loop deliberately mirrors the original's linked list + priority queue, stale-event
//! rule and emission order, so that every id (including for odd inputs and odd models) is the
//! one YTTM produces, and a word costs O(n log n) rather than O(n²).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::path::Path;

use rand::RngExt;

use super::TokenizerError;

/// U+2581 `▁`: the word-start meta symbol; also a word separator on input.
pub(super) const SPACE_TOKEN: char = '\u{2581}';
/// Code points below this are looked up in a dense table (covers Latin and Cyrillic).
const DENSE_CHARS: usize = 0x800;
const NO_ID: u32 = u32::MAX;
/// Linked-list "no neighbour" marker.
const NONE: u32 = u32::MAX;
/// Tokens at or above this stand for a run of unknown characters; the original uses 1e9 + k.
/// Real ids are validated to be below it, so these never match a rule.
const PLACEHOLDER_BASE: u32 = 1 << 31;

/// The special ids from the model's last line (`unk pad bos eos`); `None` where the file has -1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub unk: u32,
    pub pad: Option<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// A cheap hasher for the integer keys used in the hot loop (std's SipHash dominates otherwise).
#[derive(Default, Clone, Copy)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        // hashbrown takes the bucket from the low bits and the tag from the top 7 bits: fold the
        // well-mixed high half of the product into the low half.
        let h = (n ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 32);
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

fn pair_key(x: u32, y: u32) -> u64 {
    (u64::from(x) << 32) | u64::from(y)
}

/// YTTM's whitespace: C `isspace` for code points below 256 (only ` \t\n\v\f\r`, as checked
/// against the original: NBSP and U+001C–U+001F are not spaces) plus `▁`.
pub(super) fn is_yttm_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' | SPACE_TOKEN)
}

/// A YouTokenToMe BPE model.
///
/// ```
/// use rudolph::tokenizer::Bpe;
/// // 3 characters (▁ a b), one merge (a b → ab), specials unk pad bos eos = 1 0 2 3.
/// let bpe = Bpe::from_str_model("3 1\n9601 4\n97 5\n98 6\n5 6 7\n1 0 2 3\n", "inline").unwrap();
/// assert_eq!(bpe.vocab_size(), 8);
/// assert_eq!(bpe.encode("ab  a c"), vec![4, 7, 4, 5, 4, 1]);
/// assert_eq!(bpe.encode_pieces("ab c"), vec!["▁", "ab", "▁", "c"]);
/// assert_eq!(bpe.decode(&[4, 7, 4, 5, 4, 1], &[]).unwrap(), "ab a <UNK>");
/// ```
#[derive(Debug, Clone)]
pub struct Bpe {
    space_id: u32,
    dense_chars: Vec<u32>,
    sparse_chars: IntMap<u32, u32>,
    /// `(x, y, z)` in priority order.
    rules: Vec<(u32, u32, u32)>,
    rule_priority: IntMap<u64, u32>,
    /// `id_to_subword` without space replacement (specials as `<PAD>` …), indexed by id.
    pieces: Vec<String>,
    /// What decode emits for each id: the piece with a leading `▁` turned into a space.
    decoded: Vec<String>,
    piece_ids: HashMap<String, u32>,
    special: SpecialIds,
}

/// Model-file reader that remembers the line of every number, for error messages.
struct ModelReader<'a> {
    origin: &'a str,
    tokens: Vec<(usize, &'a str)>,
    next: usize,
    last_line: usize,
}

impl<'a> ModelReader<'a> {
    fn new(text: &'a str, origin: &'a str) -> Self {
        let mut tokens = Vec::new();
        let mut last_line = 1;
        for (i, line) in text.split('\n').enumerate() {
            // C++ stream extraction treats all of these as separators.
            let words = line
                .split(|c: char| c.is_ascii_whitespace() || c == '\x0b')
                .filter(|w| !w.is_empty());
            for w in words {
                tokens.push((i + 1, w));
            }
            if !line.trim().is_empty() {
                last_line = i + 1;
            }
        }
        ModelReader {
            origin,
            tokens,
            next: 0,
            last_line,
        }
    }

    fn error(&self, line: usize, message: String) -> TokenizerError {
        TokenizerError::Parse {
            origin: self.origin.to_string(),
            line,
            message,
        }
    }

    /// Reads the next number; `what` names the expected line layout and field.
    fn number<T: std::str::FromStr>(&mut self, what: &str) -> Result<(T, usize), TokenizerError> {
        match self.tokens.get(self.next) {
            None => Err(self.error(
                self.last_line,
                format!("expected {what}, found end of file (truncated model)"),
            )),
            Some(&(line, tok)) => {
                self.next += 1;
                tok.parse::<T>()
                    .map(|v| (v, line))
                    .map_err(|_| self.error(line, format!("expected {what}, found `{tok}`")))
            }
        }
    }
}

/// The longest piece a merge rule may make, in characters: YouTokenToMe's pieces are words and
/// parts of words, while rules that double a piece again and again would make one of 2⁴⁰.
const MAX_PIECE_CHARS: usize = 1024;

/// The largest `bpe.model` read (ruDALL-E's is 0.3 MiB).
const MAX_MODEL_BYTES: u64 = 64 << 20;

impl Bpe {
    /// Loads a `bpe.model` file (YTTM's text format: a header line, the alphabet, the merges).
    pub fn load(path: impl AsRef<Path>) -> Result<Bpe, TokenizerError> {
        use std::io::Read;
        let path = path.as_ref();
        let io = |source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_MODEL_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        if bytes.len() as u64 > MAX_MODEL_BYTES {
            return Err(TokenizerError::Model {
                origin: path.display().to_string(),
                message: format!(
                    "the file is larger than {} MiB, which no BPE model needs",
                    MAX_MODEL_BYTES >> 20
                ),
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text: {e}"),
            ))
        })?;
        Bpe::from_str_model(&text, &path.display().to_string())
    }

    /// Parses model text; `origin` (usually the file name) prefixes every error message.
    ///
    /// Stricter than the original, which does no checking at all: every id must be in
    /// `[0, vocab_size)` and used once, rules may only combine ids defined above them, `▁` must
    /// be in the character table and `unk` must exist.
    pub fn from_str_model(text: &str, origin: &str) -> Result<Bpe, TokenizerError> {
        let mut r = ModelReader::new(text, origin);
        let (n_chars, _) = r.number::<usize>("`n_chars n_rules` (the number of characters)")?;
        let (n_rules, _) = r.number::<usize>("`n_chars n_rules` (the number of merge rules)")?;

        let mut chars: Vec<(char, u32, usize)> = Vec::with_capacity(n_chars.min(1 << 20));
        for k in 0..n_chars {
            let what = format!("`codepoint id` (character {} of {n_chars})", k + 1);
            let (cp, line) = r.number::<u32>(&what)?;
            let (id, _) = r.number::<u32>(&what)?;
            let c = char::from_u32(cp)
                .ok_or_else(|| r.error(line, format!("{cp} is not a Unicode scalar value")))?;
            chars.push((c, id, line));
        }
        let mut rules_read: Vec<(u32, u32, u32, usize)> = Vec::with_capacity(n_rules.min(1 << 20));
        for k in 0..n_rules {
            let what = format!("`left_id right_id new_id` (rule {} of {n_rules})", k + 1);
            let (x, line) = r.number::<u32>(&what)?;
            let (y, _) = r.number::<u32>(&what)?;
            let (z, _) = r.number::<u32>(&what)?;
            rules_read.push((x, y, z, line));
        }
        let mut specials = [None; 4];
        let names = ["unk_id", "pad_id", "bos_id", "eos_id"];
        let mut special_lines = [0; 4];
        for (k, name) in names.iter().enumerate() {
            let what = format!("`unk_id pad_id bos_id eos_id` (the {name}, -1 if absent)");
            let (v, line) = r.number::<i64>(&what)?;
            special_lines[k] = line;
            specials[k] = match v {
                -1 => None,
                v => Some(
                    u32::try_from(v)
                        .map_err(|_| r.error(line, format!("expected {what}, found `{v}`")))?,
                ),
            };
        }
        if let Some(&(line, tok)) = r.tokens.get(r.next) {
            return Err(r.error(
                line,
                format!(
                    "unexpected `{tok}` after the special-id line (the model should end there)"
                ),
            ));
        }
        let unk = specials[0]
            .ok_or_else(|| r.error(special_lines[0], "unk_id must not be -1".to_string()))?;

        let vocab_size = n_chars + n_rules + specials.iter().flatten().count();
        if vocab_size >= PLACEHOLDER_BASE as usize {
            return Err(TokenizerError::Model {
                origin: origin.to_string(),
                message: format!("vocabulary of {vocab_size} ids is too large"),
            });
        }
        // Every id gets exactly one definition; `defined[id]` is the line that defined it.
        let mut defined: Vec<usize> = vec![0; vocab_size];
        let mut define = |id: u32, line: usize, what: &str| -> Result<(), TokenizerError> {
            let slot = defined.get_mut(id as usize).ok_or_else(|| {
                r.error(
                    line,
                    format!("{what} id {id} is out of range: vocab_size is {vocab_size} ({n_chars} characters + {n_rules} rules + specials)"),
                )
            })?;
            if *slot != 0 {
                return Err(r.error(
                    line,
                    format!("{what} id {id} is already used on line {}", *slot),
                ));
            }
            *slot = line;
            Ok(())
        };
        for (k, name) in names.iter().enumerate() {
            if let Some(id) = specials[k] {
                define(id, special_lines[k], name)?;
            }
        }
        let mut dense_chars = vec![NO_ID; DENSE_CHARS];
        let mut sparse_chars = IntMap::default();
        let mut char_line: IntMap<u32, usize> = IntMap::default();
        let mut pieces: Vec<String> = vec![String::new(); vocab_size];
        for &(c, id, line) in &chars {
            if let Some(prev) = char_line.insert(c as u32, line) {
                return Err(r.error(
                    line,
                    format!(
                        "character U+{:04X} is already listed on line {prev}",
                        c as u32
                    ),
                ));
            }
            define(id, line, "character")?;
            if (c as usize) < DENSE_CHARS {
                dense_chars[c as usize] = id;
            } else {
                sparse_chars.insert(c as u32, id);
            }
            pieces[id as usize] = c.to_string();
        }
        let mut rules = Vec::with_capacity(rules_read.len());
        let mut rule_priority = IntMap::default();
        for (k, &(x, y, z, line)) in rules_read.iter().enumerate() {
            for (side, id) in [("left", x), ("right", y)] {
                // Specials have no piece yet, so this also rejects them.
                let known = pieces.get(id as usize).is_some_and(|p| !p.is_empty());
                if !known {
                    return Err(r.error(
                        line,
                        format!("rule {}: {side} id {id} is neither a character nor the result of an earlier rule", k + 1),
                    ));
                }
            }
            let chars = pieces[x as usize].chars().count() + pieces[y as usize].chars().count();
            if chars > MAX_PIECE_CHARS {
                return Err(r.error(
                    line,
                    format!(
                        "rule {} makes a piece of {chars} characters, more than the {MAX_PIECE_CHARS} a piece may have",
                        k + 1
                    ),
                ));
            }
            define(z, line, "rule result")?;
            pieces[z as usize] = format!("{}{}", pieces[x as usize], pieces[y as usize]);
            // A repeated pair: the later rule wins, as in the original's map.
            rule_priority.insert(pair_key(x, y), k as u32);
            rules.push((x, y, z));
        }
        let space_id = char_line
            .contains_key(&(SPACE_TOKEN as u32))
            .then(|| dense_or_sparse(&dense_chars, &sparse_chars, SPACE_TOKEN))
            .flatten()
            .ok_or_else(|| TokenizerError::Model {
                origin: origin.to_string(),
                message:
                    "the character table has no entry for U+2581 `▁` (9601), the word-start symbol"
                        .to_string(),
            })?;

        let special = SpecialIds {
            unk,
            pad: specials[1],
            bos: specials[2],
            eos: specials[3],
        };
        for (id, name) in [
            (Some(unk), "<UNK>"),
            (special.pad, "<PAD>"),
            (special.bos, "<BOS>"),
            (special.eos, "<EOS>"),
        ] {
            if let Some(id) = id {
                pieces[id as usize] = name.to_string();
            }
        }
        let decoded = pieces
            .iter()
            .map(|p| match p.strip_prefix(SPACE_TOKEN) {
                Some(rest) => format!(" {rest}"),
                None => p.clone(),
            })
            .collect();
        let mut piece_ids = HashMap::with_capacity(vocab_size);
        for (id, p) in pieces.iter().enumerate() {
            piece_ids.entry(p.clone()).or_insert(id as u32);
        }
        Ok(Bpe {
            space_id,
            dense_chars,
            sparse_chars,
            rules,
            rule_priority,
            pieces,
            decoded,
            piece_ids,
            special,
        })
    }

    /// `n_rules + n_chars + number of specials present` (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The special ids of the model file.
    pub fn special_ids(&self) -> SpecialIds {
        self.special
    }

    /// YTTM's `id_to_subword`: the piece with its raw `▁`, specials as `<PAD>` `<UNK>` `<BOS>`
    /// `<EOS>` (so `(0..vocab_size).map(id_to_piece)` is `bpe.vocab()`).
    pub fn id_to_piece(&self, id: u32) -> Result<&str, TokenizerError> {
        self.pieces
            .get(id as usize)
            .map(String::as_str)
            .ok_or(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.vocab_size(),
            })
    }

    /// The id of a piece as written by [`Bpe::id_to_piece`]. Unlike the original's
    /// `subword_to_id`, which answers `unk` for anything unknown, this says `None`; when two ids
    /// spell the same piece (possible with a repeated rule) the lower id is returned.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.piece_ids.get(piece).copied()
    }

    fn char_id(&self, c: char) -> Option<u32> {
        dense_or_sparse(&self.dense_chars, &self.sparse_chars, c)
    }

    /// YTTM `encode(text, output_type=ID)`: no BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut queue = PlainQueue::default();
        self.encode_impl(text, &mut queue, |t| {
            out.push(match t {
                Emitted::Id(id) => id,
                Emitted::Unknown(_) => self.special.unk,
            })
        });
        out
    }

    /// The words YTTM encodes one by one: `text` split at its whitespace (the six ASCII spaces
    /// of C's `isspace` and `▁`), empty words left out.
    pub fn words(text: &str) -> impl Iterator<Item = &str> {
        text.split(is_yttm_space).filter(|w| !w.is_empty())
    }

    /// YTTM `encode(text, output_type=SUBWORD)`: pieces with their `▁`; a run of unknown
    /// characters appears as the raw run.
    pub fn encode_pieces(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut queue = PlainQueue::default();
        self.encode_impl(text, &mut queue, |t| {
            out.push(match t {
                Emitted::Id(id) => self.pieces[id as usize].clone(),
                Emitted::Unknown(run) => run.to_string(),
            })
        });
        out
    }

    /// Encodes raw bytes the way YTTM receives Python strings: invalid UTF-8 (including
    /// surrogates, overlong forms and truncated sequences) is skipped one byte at a time, so the
    /// characters around it join up.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        self.encode(&yttm_utf8_lossy(bytes))
    }

    /// BPE-dropout as YTTM does it: every pop of the merge queue sets the best event aside with
    /// probability `p` (stale events included); running out of events ends that word's merging.
    ///
    /// The draws come from `rng`, so results are reproducible for a seeded RNG but are not the
    /// original's: YTTM draws from one process-global `std::mt19937` that Python cannot seed or
    /// reset. `p == 0` is exactly [`Bpe::encode`]; `p` outside `[0, 1]` is an error.
    pub fn encode_with_dropout<R: rand::Rng + ?Sized>(
        &self,
        text: &str,
        p: f64,
        rng: &mut R,
    ) -> Result<Vec<u32>, TokenizerError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(TokenizerError::InvalidDropout(p));
        }
        if p == 0.0 {
            return Ok(self.encode(text));
        }
        let mut out = Vec::new();
        let mut queue = DropoutQueue {
            heap: BinaryHeap::new(),
            skipped: Vec::new(),
            p,
            rng,
        };
        self.encode_impl(text, &mut queue, |t| {
            out.push(match t {
                Emitted::Id(id) => id,
                Emitted::Unknown(_) => self.special.unk,
            })
        });
        Ok(out)
    }

    /// YTTM `decode(ids, ignore_ids)`: specials as `<PAD>` `<UNK>` `<BOS>` `<EOS>`, a leading `▁`
    /// becomes a space, and the first emitted piece loses one leading space. Ignored ids are
    /// skipped before the range check, as in the original.
    pub fn decode(&self, ids: &[u32], ignore: &[u32]) -> Result<String, TokenizerError> {
        let mut out = String::with_capacity(ids.len() * 4);
        let mut first = true;
        for &id in ids {
            if ignore.contains(&id) {
                continue;
            }
            let piece = self
                .decoded
                .get(id as usize)
                .ok_or(TokenizerError::IdOutOfRange {
                    id,
                    vocab_size: self.vocab_size(),
                })?;
            if first {
                out.push_str(piece.strip_prefix(' ').unwrap_or(piece));
                first = false;
            } else {
                out.push_str(piece);
            }
        }
        Ok(out)
    }

    /// Splits `text` into words and runs the merge loop on each, handing the surviving tokens
    /// to `emit` left to right.
    fn encode_impl<'t, Q: MergeQueue>(
        &self,
        text: &'t str,
        queue: &mut Q,
        mut emit: impl FnMut(Emitted<'t>),
    ) {
        let mut nodes: Vec<Node> = Vec::new();
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find(|c: char| !is_yttm_space(c)) {
            let end = rest[start..]
                .find(is_yttm_space)
                .map_or(rest.len(), |e| start + e);
            let word_offset = offset + start;
            self.merge_word(&rest[start..end], word_offset, queue, &mut nodes, &mut runs);

            // The original starts at the first node whose token is not 0 (its dead-node
            // marker), which only differs from node 0 for models where 0 is a normal token.
            let mut pos = nodes.iter().position(|n| n.token != 0).unwrap_or(0) as u32;
            while pos != NONE {
                let node = nodes[pos as usize];
                if node.token >= PLACEHOLDER_BASE {
                    let run = runs[(node.token - PLACEHOLDER_BASE) as usize].clone();
                    emit(Emitted::Unknown(&text[run]));
                } else {
                    emit(Emitted::Id(node.token));
                }
                pos = node.next;
            }
            offset += end;
            rest = &rest[end..];
        }
    }

    fn merge_word<Q: MergeQueue>(
        &self,
        word: &str,
        word_offset: usize,
        queue: &mut Q,
        nodes: &mut Vec<Node>,
        runs: &mut Vec<Range<usize>>,
    ) {
        nodes.clear();
        runs.clear();
        queue.clear();
        nodes.push(Node {
            token: self.space_id,
            prev: NONE,
            next: 1,
        });
        for (i, c) in word.char_indices() {
            let token = match self.char_id(c) {
                Some(id) => id,
                None => {
                    let (start, end) = (word_offset + i, word_offset + i + c.len_utf8());
                    // Consecutive unknown characters share one placeholder.
                    if nodes.last().is_some_and(|n| n.token >= PLACEHOLDER_BASE) {
                        if let Some(run) = runs.last_mut() {
                            run.end = end;
                        }
                        continue;
                    }
                    runs.push(start..end);
                    PLACEHOLDER_BASE + runs.len() as u32 - 1
                }
            };
            let k = nodes.len() as u32;
            nodes.push(Node {
                token,
                prev: k - 1,
                next: k + 1,
            });
        }
        if let Some(last) = nodes.last_mut() {
            last.next = NONE;
        }

        let rule_of = |nodes: &[Node], pos: u32| -> Option<u32> {
            let left = nodes[pos as usize];
            let right = nodes[left.next as usize];
            self.rule_priority
                .get(&pair_key(left.token, right.token))
                .copied()
        };
        for pos in 0..nodes.len() as u32 - 1 {
            if let Some(k) = rule_of(nodes, pos) {
                queue.push(Reverse((k, pos)));
            }
        }
        while let Some(Reverse((k, pos1))) = queue.pop() {
            let (x, y, z) = self.rules[k as usize];
            let pos2 = nodes[pos1 as usize].next;
            if nodes[pos1 as usize].token != x || pos2 == NONE || nodes[pos2 as usize].token != y {
                continue;
            }
            let pos0 = nodes[pos1 as usize].prev;
            let pos3 = nodes[pos2 as usize].next;
            nodes[pos2 as usize] = Node {
                token: 0,
                prev: NONE,
                next: NONE,
            };
            nodes[pos1 as usize] = Node {
                token: z,
                prev: pos0,
                next: pos3,
            };
            if pos3 != NONE {
                nodes[pos3 as usize].prev = pos1;
            }
            if pos0 != NONE
                && let Some(k) = rule_of(nodes, pos0)
            {
                queue.push(Reverse((k, pos0)));
            }
            if pos3 != NONE
                && let Some(k) = rule_of(nodes, pos1)
            {
                queue.push(Reverse((k, pos1)));
            }
        }
    }
}

fn dense_or_sparse(dense: &[u32], sparse: &IntMap<u32, u32>, c: char) -> Option<u32> {
    match dense.get(c as usize) {
        Some(&NO_ID) => None,
        Some(&id) => Some(id),
        None => sparse.get(&(c as u32)).copied(),
    }
}

/// YTTM's UTF-8 decoding: a valid (strict) sequence at the current byte is taken whole,
/// anything else drops that single byte.
fn yttm_utf8_lossy(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let len = match bytes[i] {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 0,
        };
        match bytes.get(i..i + len).map(std::str::from_utf8) {
            Some(Ok(s)) if len > 0 => {
                out.push_str(s);
                i += len;
            }
            _ => i += 1,
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct Node {
    token: u32,
    prev: u32,
    next: u32,
}

enum Emitted<'t> {
    Id(u32),
    Unknown(&'t str),
}

/// `(rule priority, left position)`, smallest first.
type Event = Reverse<(u32, u32)>;

trait MergeQueue {
    fn clear(&mut self);
    fn push(&mut self, event: Event);
    fn pop(&mut self) -> Option<Event>;
}

#[derive(Default)]
struct PlainQueue(BinaryHeap<Event>);

impl MergeQueue for PlainQueue {
    fn clear(&mut self) {
        self.0.clear();
    }
    fn push(&mut self, event: Event) {
        self.0.push(event);
    }
    fn pop(&mut self) -> Option<Event> {
        self.0.pop()
    }
}

struct DropoutQueue<'r, R: rand::Rng + ?Sized> {
    heap: BinaryHeap<Event>,
    skipped: Vec<Event>,
    p: f64,
    rng: &'r mut R,
}

impl<R: rand::Rng + ?Sized> MergeQueue for DropoutQueue<'_, R> {
    fn clear(&mut self) {
        self.heap.clear();
        self.skipped.clear();
    }
    fn push(&mut self, event: Event) {
        self.heap.push(event);
    }
    fn pop(&mut self) -> Option<Event> {
        let picked = loop {
            let Some(event) = self.heap.pop() else {
                break None;
            };
            if self.rng.random::<f64>() < self.p {
                self.skipped.push(event);
            } else {
                break Some(event);
            }
        };
        self.heap.extend(self.skipped.drain(..));
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lossy_utf8_skips_single_bytes() {
        assert_eq!(yttm_utf8_lossy(b"a\xffb"), "ab");
        // Truncated 3-byte sequence: lead byte dropped, continuation bytes dropped one by one.
        assert_eq!(yttm_utf8_lossy(b"x\xe2\x96y"), "xy");
        // Surrogate U+D800 and overlong '/' are invalid.
        assert_eq!(yttm_utf8_lossy(b"\xed\xa0\x80z\xc0\xaf"), "z");
        assert_eq!(yttm_utf8_lossy("ёж▁🐱".as_bytes()), "ёж▁🐱");
    }

    #[test]
    fn int_hasher_spreads_pairs() {
        let mut seen = std::collections::HashSet::new();
        for x in 0..64u32 {
            for y in 0..64u32 {
                let mut h = IntHasher::default();
                h.write_u64(pair_key(x, y));
                seen.insert(h.finish() & 0xfff);
            }
        }
        assert!(seen.len() > 2000, "poor spread: {}", seen.len());
    }
}
