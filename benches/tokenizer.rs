//! Tokenizer throughput: `cargo bench --bench tokenizer` (plain timing loop, no harness).
//! Encodes the fixture corpus repeated to ~8 MB, then decodes the result.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use rudolph::tokenizer::Bpe;

fn main() {
    let root = std::env::var_os("RUDOLPH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let dir = root.join("tokenizer");
    let bpe = Bpe::load(dir.join("bpe.model"))
        .unwrap_or_else(|e| panic!("{e} (set RUDOLPH_FIXTURES to the fixtures root)"));
    let corpus = std::fs::read_to_string(dir.join("corpus.txt")).expect("corpus.txt");
    let lines: Vec<&str> = corpus.lines().collect();
    let repeats = (8 << 20) / corpus.len().max(1) + 1;
    let mb = (corpus.len() * repeats) as f64 / 1e6;

    // Line by line, as the pipelines call it (one caption at a time).
    let mut best_encode = f64::INFINITY;
    let mut ids: Vec<Vec<u32>> = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        ids.clear();
        for _ in 0..repeats {
            for line in &lines {
                ids.push(black_box(bpe.encode(line)));
            }
        }
        best_encode = best_encode.min(start.elapsed().as_secs_f64());
    }
    let n_ids: usize = ids.iter().map(Vec::len).sum();

    let mut best_decode = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        for list in &ids {
            black_box(bpe.decode(list, &[]).expect("decode"));
        }
        best_decode = best_decode.min(start.elapsed().as_secs_f64());
    }
    println!(
        "encode: {mb:.1} MB of text in {best_encode:.3} s = {:.1} MB/s ({:.2} M ids/s)",
        mb / best_encode,
        n_ids as f64 / best_encode / 1e6
    );
    println!(
        "decode: {:.2} M ids in {best_decode:.3} s = {:.1} M ids/s ({:.1} MB/s of text)",
        n_ids as f64 / 1e6,
        n_ids as f64 / best_decode / 1e6,
        mb / best_decode
    );
}
