//! The words a model was trained on: a model folder may list them in `vocabulary.txt`, one word
//! a line, lowercased as the tokenizer lowercases. A tokenizer spells almost any word of its
//! alphabet with single letters, so it cannot tell a word the model read a thousand times from
//! one the model never met; the list can, and the commands name the words of a prompt that are
//! not on it. Without the list, only the words the tokenizer itself cannot spell (they encode to
//! the unknown id) are named ([`TextTokenizer::unknown_words`]).
//!
//! ```
//! use rudolph::vocabulary::Vocabulary;
//! let v = Vocabulary::from_texts(["большая красная звезда", "маленький синий круг"]);
//! assert_eq!(v.unknown_words("Большая зелёная звезда a star"), vec!["зелёная", "a", "star"]);
//! ```

use crate::error::{Error, Result, invalid};
use crate::pipelines::{UnknownTo, Warning};
use crate::tokenizer::{Bpe, TextTokenizer, lower_strip};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The words of a model's training texts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vocabulary {
    words: BTreeSet<String>,
    /// The file it was read from, which warnings point to.
    path: Option<PathBuf>,
}

impl Vocabulary {
    /// The file name in a model folder.
    pub const FILE: &'static str = "vocabulary.txt";

    /// Every word of `texts`, lowercased and split as the tokenizer does.
    pub fn from_texts<S: AsRef<str>>(texts: impl IntoIterator<Item = S>) -> Self {
        let mut words = BTreeSet::new();
        for text in texts {
            words.extend(text_words(text.as_ref()));
        }
        Self { words, path: None }
    }

    /// The folder's `vocabulary.txt`, or `None` when it has none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(Self::FILE);
        if !path.is_file() {
            return Ok(None);
        }
        Self::read_file(&path).map(Some)
    }

    /// A vocabulary file: one word a line (lowercased here, as the tokenizer would); blank lines
    /// are skipped, and a line of several words is an error naming it.
    pub fn read_file(path: &Path) -> Result<Self> {
        let text = crate::text_file::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut words = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = lower_strip(line);
            let mut split = Bpe::words(&line);
            let Some(word) = split.next() else { continue };
            if split.next().is_some() {
                return Err(invalid(format!(
                    "{}:{}: «{line}» is more than one word (the file lists one word a line)",
                    path.display(),
                    i + 1
                )));
            }
            words.insert(word.to_string());
        }
        Ok(Self {
            words,
            path: Some(path.to_path_buf()),
        })
    }

    /// Writes the words, sorted, one a line, as `dir/vocabulary.txt` (replacing one that is
    /// there), and returns the file's path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(Self::FILE);
        crate::atomic_file::write_atomically(
            &path,
            |w| {
                for word in &self.words {
                    writeln!(w, "{word}").map_err(|source| Error::Io {
                        path: path.clone(),
                        source,
                    })?;
                }
                Ok(())
            },
            |_, source| Error::Io {
                path: path.clone(),
                source,
            },
        )?;
        Ok(path)
    }

    /// The file the vocabulary was read from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether `word` (already lowercased) is one of the words.
    pub fn contains(&self, word: &str) -> bool {
        self.words.contains(word)
    }

    /// The words, sorted.
    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.words.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The words of `text` (lowercased and split as the tokenizer does) that are not in the
    /// vocabulary, each once, in order.
    pub fn unknown_words(&self, text: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for word in text_words(text) {
            if !self.contains(&word) && !out.contains(&word) {
                out.push(word);
            }
        }
        out
    }
}

/// The words of `text` as the pipelines tokenize it: lowercased and stripped, split at the
/// tokenizer's whitespace.
pub fn text_words(text: &str) -> Vec<String> {
    Bpe::words(&lower_strip(text)).map(str::to_string).collect()
}

/// The warning for the words of `text` that the model cannot read, or `None` when it can read
/// them all: with a `vocabulary`, the words it lacks (and any the tokenizer cannot spell);
/// without one, the words the tokenizer cannot spell. `what` names the text ("text",
/// "template", "class").
pub fn check(
    tokenizer: &TextTokenizer,
    vocabulary: Option<&Vocabulary>,
    what: &str,
    text: &str,
) -> Option<Warning> {
    let unspelt = tokenizer.unknown_words(text);
    let mut words: Vec<String> = Vec::new();
    // In the order of the text, each once.
    for word in text_words(text) {
        let unknown = unspelt.contains(&word) || vocabulary.is_some_and(|v| !v.contains(&word));
        if unknown && !words.contains(&word) {
            words.push(word);
        }
    }
    (!words.is_empty()).then(|| Warning::UnknownWords {
        what: what.to_string(),
        text: crate::tokenizer::python_strip(text).to_string(),
        words,
        unknown_to: match vocabulary {
            Some(v) => UnknownTo::Training {
                vocabulary: v.path().map(Path::to_path_buf),
            },
            None => UnknownTo::Tokenizer,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes_and_refuses_a_line_of_two_words() {
        let dir = std::env::temp_dir().join(format!("rudolph-vocabulary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = Vocabulary::from_texts(["Большая  звезда", "звезда слева\n"]);
        assert_eq!(
            v.words().collect::<Vec<_>>(),
            ["большая", "звезда", "слева"]
        );
        let path = v.write(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "большая\nзвезда\nслева\n"
        );
        let back = Vocabulary::read(&dir).unwrap().unwrap();
        assert_eq!(
            back.words().collect::<Vec<_>>(),
            ["большая", "звезда", "слева"]
        );
        assert_eq!(back.path(), Some(path.as_path()));
        std::fs::write(&path, "звезда\n\nбольшая звезда\n").unwrap();
        let err = Vocabulary::read(&dir).unwrap_err().to_string();
        assert!(
            err.contains(":3:") && err.contains("one word a line"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(Vocabulary::read(&dir).unwrap(), None);
    }
}
