//! Continuous batching: callers on many threads decode their rows in one shared batch.
//!
//! A [`Batcher`] owns a model on a thread of its own. A caller opens a [`Session`] for a group
//! of rows that move in step (a chunk of one generation: the same prefix length, one pipeline
//! mask, one class range) and then sends, step after step, the tokens its rows appended since
//! the last step; it gets their next-token logits back and samples as it would alone. The
//! batcher runs a step as soon as every open session has sent its tokens: new sessions' prefixes
//! are run on their own (their first step), and every session's single new tokens go through
//! the model together ([`Rudolph::forward_step_groups`]), each session at its own position in
//! its own KV cache. A session that arrives while others decode joins at the next step; one that
//! ends (or whose caller goes away) leaves at once, making room for the next in line.
//!
//! Rows never exceed `max_batch` in one step, except that a session larger than the whole batch
//! runs alone when nothing else does.

use crate::model::{KvCache, Rudolph, StepGroup};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

/// What the batcher is doing, for a server's metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows of the sessions that are decoding.
    pub running_rows: AtomicUsize,
    /// Sessions waiting for room in the batch.
    pub waiting_sessions: AtomicUsize,
    /// Model steps run.
    pub steps: AtomicU64,
    /// Tokens computed (one per row and step, the prefixes' included).
    pub tokens: AtomicU64,
    /// Rows summed over the steps (their mean per step is `rows / steps`).
    pub rows: AtomicU64,
    /// Rows of the latest step.
    pub last_step_rows: AtomicUsize,
    /// The most rows of one step so far.
    pub peak_step_rows: AtomicUsize,
}

/// A handle to the shared decoding thread; cheap to clone. The thread ends when every handle
/// and session is gone.
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Msg>,
    max_batch: usize,
    stats: Arc<Stats>,
}

/// The logits of a session's rows for one step, `rows × classes`.
pub type StepLogits = Vec<Vec<f32>>;

type Reply<T> = Sender<std::result::Result<T, String>>;

enum Msg {
    Open {
        rows: usize,
        mask: Tensor,
        classes: Range<usize>,
        reply: Reply<u64>,
    },
    Step {
        id: u64,
        tokens: Vec<Vec<u32>>,
        reply: Reply<StepLogits>,
    },
    Close {
        id: u64,
    },
}

impl Batcher {
    /// Starts the decoding thread for `model`, with at most `max_batch` rows per step.
    pub fn start(model: Rudolph, max_batch: usize) -> crate::Result<Self> {
        if max_batch == 0 {
            return Err(crate::error::invalid("the batch needs at least one row"));
        }
        let (tx, rx) = channel();
        let stats = Arc::new(Stats::default());
        let engine = Engine {
            model,
            max_batch,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            active: BTreeMap::new(),
            next_id: 0,
        };
        std::thread::Builder::new()
            .name("rudolph-batcher".into())
            .spawn(move || engine.run(rx))
            .map_err(|e| crate::error::invalid(format!("cannot start the decoding thread: {e}")))?;
        Ok(Self {
            tx,
            max_batch,
            stats,
        })
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Opens a session of `rows` rows under the pipeline `mask`, reading the head's columns
    /// `classes`; blocks until the batch has room for it.
    pub fn open(
        &self,
        rows: usize,
        mask: Tensor,
        classes: Range<usize>,
    ) -> candle_core::Result<Session> {
        let (reply, answer) = channel();
        self.tx
            .send(Msg::Open {
                rows,
                mask,
                classes,
                reply,
            })
            .map_err(|_| stopped())?;
        let id = receive(&answer)?;
        let (step_reply, step_answer) = channel();
        Ok(Session {
            id,
            tx: self.tx.clone(),
            reply: step_reply,
            answer: step_answer,
        })
    }
}

/// Rows decoding together in a [`Batcher`]; closing it (dropping) frees their place.
pub struct Session {
    id: u64,
    tx: Sender<Msg>,
    reply: Reply<StepLogits>,
    answer: Receiver<std::result::Result<StepLogits, String>>,
}

impl Session {
    /// Appends `tokens` (per row, the same number each: the prefix at first, then the tokens
    /// drawn or forced since the last step) and returns each row's logits after the last one.
    pub fn step(&mut self, tokens: &[Vec<u32>]) -> candle_core::Result<StepLogits> {
        self.tx
            .send(Msg::Step {
                id: self.id,
                tokens: tokens.to_vec(),
                reply: self.reply.clone(),
            })
            .map_err(|_| stopped())?;
        receive(&self.answer)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The batcher may be gone already; then there is nothing to free.
        let _ = self.tx.send(Msg::Close { id: self.id });
    }
}

fn stopped() -> candle_core::Error {
    candle_core::Error::msg("the decoding thread has stopped")
}

fn receive<T>(rx: &Receiver<std::result::Result<T, String>>) -> candle_core::Result<T> {
    rx.recv()
        .map_err(|_| stopped())?
        .map_err(candle_core::Error::msg)
}

struct Waiting {
    rows: usize,
    mask: Tensor,
    classes: Range<usize>,
    reply: Reply<u64>,
}

struct Active {
    rows: usize,
    mask: Tensor,
    classes: Range<usize>,
    cache: KvCache,
    step: Option<(Vec<Vec<u32>>, Reply<StepLogits>)>,
}

struct Engine {
    model: Rudolph,
    max_batch: usize,
    stats: Arc<Stats>,
    waiting: VecDeque<Waiting>,
    active: BTreeMap<u64, Active>,
    next_id: u64,
}

impl Engine {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // A step runs once every open session has sent its tokens; until then, and while
            // nothing is open, wait for messages.
            let ready = !self.active.is_empty() && self.active.values().all(|a| a.step.is_some());
            if !ready {
                match rx.recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => return,
                }
                continue;
            }
            // Whatever else has arrived joins before the step.
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg);
            }
            if self.active.values().all(|a| a.step.is_some()) {
                self.step();
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Open {
                rows,
                mask,
                classes,
                reply,
            } => {
                self.waiting.push_back(Waiting {
                    rows,
                    mask,
                    classes,
                    reply,
                });
                self.admit();
            }
            Msg::Step { id, tokens, reply } => match self.active.get_mut(&id) {
                Some(a) if a.step.is_none() => a.step = Some((tokens, reply)),
                _ => {
                    let _ = reply.send(Err(format!("no open decoding session {id}")));
                }
            },
            Msg::Close { id } => {
                self.active.remove(&id);
                self.admit();
            }
        }
        self.publish();
    }

    fn running_rows(&self) -> usize {
        self.active.values().map(|a| a.rows).sum()
    }

    /// Opens waiting sessions, first come first served, while they fit.
    fn admit(&mut self) {
        while let Some(next) = self.waiting.front() {
            let running = self.running_rows();
            if running > 0 && running + next.rows > self.max_batch {
                return;
            }
            let w = self.waiting.pop_front().expect("just seen");
            let id = self.next_id;
            self.next_id += 1;
            // A caller that gave up waiting is not opened.
            if w.reply.send(Ok(id)).is_ok() {
                self.active.insert(
                    id,
                    Active {
                        rows: w.rows,
                        mask: w.mask,
                        classes: w.classes,
                        cache: self.model.new_cache(),
                        step: None,
                    },
                );
            }
        }
    }

    fn publish(&self) {
        self.stats
            .running_rows
            .store(self.running_rows(), Ordering::Relaxed);
        self.stats
            .waiting_sessions
            .store(self.waiting.len(), Ordering::Relaxed);
    }

    /// Runs every session's pending tokens: prefixes (more than one token) alone, single tokens
    /// all together, and answers each session.
    fn step(&mut self) {
        let mut single = Vec::new();
        let mut rows = 0;
        for (&id, a) in self.active.iter_mut() {
            let (tokens, reply) = a.step.take().expect("every session is ready");
            match check_tokens(&tokens, a.rows) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(1) => single.push((id, tokens, reply)),
                Ok(width) => {
                    rows += a.rows;
                    let logits = prefix_step(&self.model, a, &tokens, width);
                    self.stats
                        .tokens
                        .fetch_add((a.rows * width) as u64, Ordering::Relaxed);
                    let _ = reply.send(logits.map_err(|e| e.to_string()));
                }
            }
        }
        if !single.is_empty() {
            let model = &self.model;
            let active = &mut self.active;
            let result = (|| {
                let ids = single
                    .iter()
                    .map(|(_, t, _)| Tensor::from_vec(t.concat(), (t.len(), 1), model.device()))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                // Both in the order of the session ids.
                let members = active
                    .iter_mut()
                    .filter(|(id, _)| single.iter().any(|(s, _, _)| s == *id));
                let mut groups: Vec<StepGroup<'_>> = members
                    .zip(&ids)
                    .map(|((_, a), ids)| StepGroup {
                        ids,
                        mask: &a.mask,
                        cache: &mut a.cache,
                        classes: a.classes.clone(),
                    })
                    .collect();
                model.forward_step_groups(&mut groups)
            })();
            let n: usize = single.iter().map(|(_, t, _)| t.len()).sum();
            rows += n;
            self.stats.tokens.fetch_add(n as u64, Ordering::Relaxed);
            match result {
                Ok(logits) => {
                    for ((_, _, reply), l) in single.into_iter().zip(logits) {
                        let _ = reply.send(to_rows(&l).map_err(|e| e.to_string()));
                    }
                }
                Err(e) => {
                    for (_, _, reply) in single {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.stats.last_step_rows.store(rows, Ordering::Relaxed);
        self.stats.peak_step_rows.fetch_max(rows, Ordering::Relaxed);
    }
}

/// The width of a step's tokens: the same for every row, at least one.
fn check_tokens(tokens: &[Vec<u32>], rows: usize) -> std::result::Result<usize, String> {
    if tokens.len() != rows {
        return Err(format!(
            "a step of a {rows}-row session sent {} rows",
            tokens.len()
        ));
    }
    let width = tokens.first().map_or(0, Vec::len);
    if width == 0 || tokens.iter().any(|t| t.len() != width) {
        return Err("a step needs the same number of tokens (at least one) for every row".into());
    }
    Ok(width)
}

fn prefix_step(
    model: &Rudolph,
    a: &mut Active,
    tokens: &[Vec<u32>],
    width: usize,
) -> candle_core::Result<StepLogits> {
    let ids = Tensor::from_vec(tokens.concat(), (a.rows, width), model.device())?;
    let logits = model.forward_cached_last(&ids, &a.mask, &mut a.cache, a.classes.clone())?;
    to_rows(&logits)
}

fn to_rows(logits: &Tensor) -> candle_core::Result<StepLogits> {
    logits.to_dtype(DType::F32)?.to_vec2::<f32>()
}
