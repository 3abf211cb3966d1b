//! Progress bars on stderr (rate and ETA), drawn only when it is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rudolph::progress::{ProgressSink, silent};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};

/// Where the library reports progress: bars on stderr, or nowhere when `quiet` or when stderr
/// is not a terminal (a log file would fill with redrawn bars).
pub fn progress(quiet: bool) -> Arc<dyn ProgressSink> {
    if quiet || !std::io::stderr().is_terminal() {
        return silent();
    }
    Arc::new(Bars::default())
}

/// One bar for the task at hand.
#[derive(Default)]
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Some(bar) = self
            .bar
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            f(bar);
        }
    }
}

impl ProgressSink for Bars {
    fn start(&self, total: u64, what: &str, unit: &str) {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let rate_unit = unit.to_string();
        let template =
            format!("{{msg:>20}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{rate}}, ETA {{eta}}");
        bar.set_style(
            ProgressStyle::with_template(&template)
                .expect("valid template")
                .with_key(
                    "rate",
                    move |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.1} {rate_unit}/s", state.per_sec());
                    },
                )
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        let old = self
            .bar
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(bar);
        if let Some(old) = old {
            old.finish_and_clear();
        }
    }

    fn advance(&self, steps: u64) {
        self.with_bar(|bar| bar.inc(steps));
    }

    fn message(&self, text: &str) {
        self.with_bar(|bar| bar.set_message(text.to_string()));
    }

    fn finish(&self) {
        let bar = self
            .bar
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
}
