//! Python's `str.lower().strip()`, the preprocessing every RuDOLPH pipeline applies to text.
//!
//! Rust's `to_lowercase`/`trim` are not the same function: `trim` keeps U+001C–U+001F (Python's
//! `isspace` is true for them), and both follow the toolchain's Unicode version. So the mapping
//! and property tables in `unicode_tables.rs` are taken from CPython (see its header for the
//! version) by this script, which also derives `Case_Ignorable`/`Cased` from the observable
//! final-sigma behaviour of `str.lower()`:
//!
//! ```text
//! for cp in range(0x110000):  # minus surrogates
//!     c = chr(cp); low = c.lower()            # LOWER_RUNS / LOWER_MULTI where low != c
//!     cased = (c + 'Σ').lower()[-1] == 'ς'     # CASED
//!     ignorable = not cased and ('A' + c + 'Σ').lower()[-1] == 'ς'   # CASE_IGNORABLE
//!     space = c.isspace()                     # PY_WHITESPACE
//! ```

use super::unicode_tables::{CASE_IGNORABLE, CASED, LOWER_MULTI, LOWER_RUNS, PY_WHITESPACE};

const CAPITAL_SIGMA: char = '\u{3A3}';

/// Python's `text.lower().strip()` (CPython semantics, including the final-sigma rule and
/// Python's notion of whitespace).
///
/// ```
/// use rudolph::tokenizer::lower_strip;
/// assert_eq!(lower_strip("\u{1c} ΟΔΟΣ Кот\u{a0}"), "οδος кот");
/// assert_eq!(lower_strip("İ"), "i\u{307}");
/// // U+200B is not whitespace for Python.
/// assert_eq!(lower_strip("\u{200b}A"), "\u{200b}a");
/// ```
pub fn lower_strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == CAPITAL_SIGMA {
            out.push(if is_final_sigma(&chars, i) {
                '\u{3C2}'
            } else {
                '\u{3C3}'
            });
        } else {
            push_lower(c, &mut out);
        }
    }
    out.trim_matches(is_python_space).to_string()
}

/// Python's `str.isspace()` for one character.
/// Python's `text.strip()` (its notion of whitespace, not Rust's `trim`).
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(is_python_space)
}

pub(crate) fn is_python_space(c: char) -> bool {
    PY_WHITESPACE.binary_search(&c).is_ok()
}

fn push_lower(c: char, out: &mut String) {
    if let Ok(k) = LOWER_MULTI.binary_search_by_key(&c, |&(from, _)| from) {
        out.push_str(LOWER_MULTI[k].1);
        return;
    }
    let cp = c as u32;
    // The last run starting at or before `cp`; runs never overlap.
    let k = LOWER_RUNS.partition_point(|&(first, ..)| first <= cp);
    if k > 0 {
        let (first, count, delta, stride) = LOWER_RUNS[k - 1];
        let off = cp - first;
        if off.is_multiple_of(stride) && off / stride < count {
            let lowered = cp.checked_add_signed(delta).and_then(char::from_u32);
            out.push(lowered.unwrap_or(c));
            return;
        }
    }
    out.push(c);
}

fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let cp = c as u32;
    let k = ranges.partition_point(|&(first, _)| first <= cp);
    k > 0 && cp <= ranges[k - 1].1
}

/// CPython's `handle_capital_sigma`: preceded by a cased letter and not followed by one,
/// skipping case-ignorable characters on both sides.
fn is_final_sigma(chars: &[char], i: usize) -> bool {
    fn cased_next<'a>(mut it: impl Iterator<Item = &'a char>) -> bool {
        it.find(|&&c| !in_ranges(CASE_IGNORABLE, c))
            .is_some_and(|&c| in_ranges(CASED, c))
    }
    cased_next(chars[..i].iter().rev()) && !cased_next(chars[i + 1..].iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted() {
        assert!(LOWER_RUNS.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(LOWER_MULTI.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(PY_WHITESPACE.windows(2).all(|w| w[0] < w[1]));
        for t in [CASE_IGNORABLE, CASED] {
            assert!(t.windows(2).all(|w| w[0].1 < w[1].0));
        }
    }

    #[test]
    fn matches_python_examples() {
        // Values printed by CPython 3.11.
        assert_eq!(lower_strip("ΣΑ"), "σα");
        assert_eq!(lower_strip("ΑΣ"), "ας");
        assert_eq!(lower_strip("ΑΣ'Α"), "ασ'α");
        assert_eq!(lower_strip("Σ"), "σ");
        assert_eq!(lower_strip("ǅ"), "ǆ");
        assert_eq!(lower_strip("ẞ"), "ß");
        assert_eq!(lower_strip("\u{85}\u{2028}x\u{3000}"), "x");
        assert_eq!(lower_strip("KELVIN \u{212A}"), "kelvin k");
    }
}
