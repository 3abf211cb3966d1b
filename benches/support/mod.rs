//! What the benchmarks share: how many timed runs, and the mean time of one after a warm-up.

use std::time::Instant;

/// Timed runs: `$var` if it is set to a positive number, else `default`.
pub fn iterations(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// Runs `run` once untimed (page faults, caches), then `iters` times; the mean seconds per run.
pub fn mean_seconds(
    iters: usize,
    mut run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    run()?;
    let start = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}
