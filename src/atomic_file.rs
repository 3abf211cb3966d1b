//! Writing a file so that readers never see it half written: the bytes go to a temporary file
//! in the same folder, which then replaces the target by a rename.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Creates `.NAME.PID.tmp` beside `path`, lets `write` fill it, syncs it and renames it over
/// `path`. `io` turns an I/O failure (with what was being done) into the caller's error. On any
/// error the temporary file is removed and `path` is left as it was.
pub fn write_atomically<E>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<(), E>,
    io: impl Fn(&'static str, std::io::Error) -> E,
) -> Result<(), E> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io("create a temporary file", e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| io("write", e.into_error()))?;
        file.sync_all().map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename the temporary file", e))
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage now; the error above is what matters.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}
