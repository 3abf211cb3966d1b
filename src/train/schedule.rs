//! Learning-rate schedules, as functions of the optimizer step.

use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// The peak rate throughout (after an optional linear warmup).
    Constant,
    /// Linear warmup to the peak, then cosine decay to zero at the last step.
    Cosine,
    /// PyTorch's `OneCycleLR` (cosine annealing, `pct_start` 0.3, `div_factor` 25,
    /// `final_div_factor` 1e4), as the original's fine-tuning notebooks used.
    OneCycle,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            "one-cycle" | "onecycle" => Ok(Self::OneCycle),
            _ => Err(format!(
                "unknown schedule '{s}' (constant, cosine, one-cycle)"
            )),
        }
    }
}

/// The rate for optimizer step `step` (0-based) of `total`, peaking at `peak`.
pub fn learning_rate(schedule: Schedule, step: u64, total: u64, peak: f64, warmup: u64) -> f64 {
    let total = total.max(1);
    let cos_anneal =
        |from: f64, to: f64, frac: f64| to + (from - to) * (1.0 + (PI * frac).cos()) / 2.0;
    match schedule {
        Schedule::Constant | Schedule::Cosine if step < warmup => {
            peak * (step + 1) as f64 / warmup as f64
        }
        Schedule::Constant => peak,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1);
            let frac = (step - warmup) as f64 / span as f64;
            cos_anneal(peak, 0.0, frac.min(1.0))
        }
        Schedule::OneCycle => {
            let initial = peak / 25.0;
            let min = initial / 1e4;
            // torch: phase ends at float(pct_start * total_steps) - 1 and total_steps - 1.
            let up_end = 0.3 * total as f64 - 1.0;
            let down_end = total as f64 - 1.0;
            let s = step as f64;
            if s <= up_end {
                cos_anneal(initial, peak, if up_end > 0.0 { s / up_end } else { 1.0 })
            } else {
                cos_anneal(peak, min, ((s - up_end) / (down_end - up_end)).min(1.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_rises_to_the_peak_then_falls_to_the_floor() {
        let lr = |s| learning_rate(Schedule::OneCycle, s, 100, 1e-3, 0);
        assert!((lr(0) - 1e-3 / 25.0).abs() < 1e-12);
        assert!((lr(29) - 1e-3).abs() < 1e-9);
        assert!(lr(99) < 1e-7);
        assert!(lr(50) < lr(29) && lr(50) > lr(99));
    }

    #[test]
    fn cosine_warms_up_linearly() {
        let lr = |s| learning_rate(Schedule::Cosine, s, 110, 1.0, 10);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!(lr(109) < 1e-3);
    }
}
