//! Progress of long work (generation, training, encoding a dataset), reported to whatever the
//! caller shows it with: the library only counts, and the command line draws the bars.

use std::sync::Arc;

/// Hears the progress of long work: one task at a time is started, advanced and finished.
/// Every method does nothing unless an implementation says otherwise.
pub trait ProgressSink: Send + Sync {
    /// A task called `what` begins: `total` steps, each one `unit` (`tokens`, `pictures`, …),
    /// which is what its rate counts.
    fn start(&self, _total: u64, _what: &str, _unit: &str) {}

    /// `steps` more steps of the task are done.
    fn advance(&self, _steps: u64) {}

    /// The task's latest state in a few words (the loss of a training step), which a display
    /// may show in place of its name.
    fn message(&self, _text: &str) {}

    /// The task is over.
    fn finish(&self) {}

    /// A generation step was drawn: `rows` are the generated tokens so far of the items
    /// `first..first + rows.len()` (what a server streams).
    fn drawn(&self, _first: usize, _rows: &[Vec<u32>]) {}

    /// Whether whoever asked for the work has gone: generation then stops with an error at the
    /// next step.
    fn cancelled(&self) -> bool {
        false
    }
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl ProgressSink for Silent {}

/// A shared [`Silent`] sink, the default of the option structs.
pub fn silent() -> Arc<dyn ProgressSink> {
    Arc::new(Silent)
}
