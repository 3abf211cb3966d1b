//! Reading the small text files of a model folder (`config.json`, `generation_config.json`,
//! `vocabulary.txt`, the VQGAN's `.config.yml`) with a cap, so that a hostile folder cannot make
//! a command read gigabytes (or `/dev/zero`) into memory.

use std::io::Read;
use std::path::Path;

/// The largest such file read: the real ones are a few kilobytes.
pub const MAX_BYTES: u64 = 16 << 20;

/// The file's text; a file above [`MAX_BYTES`] or not UTF-8 is an `InvalidData` error saying so.
pub fn read(path: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB, which no such file needs",
                MAX_BYTES >> 20
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8: {e}"))
    })
}
