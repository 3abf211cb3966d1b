//! The server's counters in Prometheus' text format (`GET /metrics`).

use crate::batching::Stats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds: from a health check to the
/// longest generation a timeout allows.
const BUCKETS: [f64; 14] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    /// A request to `route` was answered with `status` after `latency`.
    pub fn record(&self, route: &str, status: u16, latency: Duration) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *requests.entry((route.to_string(), status)).or_default() += 1;
        drop(requests);
        let mut latency_by_route = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = latency_by_route.entry(route.to_string()).or_default();
        let secs = latency.as_secs_f64();
        for (count, bound) in h.counts.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Everything, with the batcher's and the queue's state, in Prometheus' text format.
    pub fn render(
        &self,
        batch: &Stats,
        in_progress: usize,
        running: usize,
        max_batch: usize,
    ) -> String {
        let mut out = String::from(
            "# HELP rudolph_requests_total Requests answered, by route and status.\n\
             # TYPE rudolph_requests_total counter\n",
        );
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines = String::new();
        for ((route, status), n) in requests.iter() {
            let _ = writeln!(
                lines,
                "rudolph_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        drop(requests);
        out.push_str(&lines);
        let gauges = [
            (
                "rudolph_requests_in_progress",
                "Requests admitted and not yet answered (running or queued).",
                in_progress as f64,
            ),
            (
                "rudolph_requests_running",
                "Requests whose work runs (at most --max-batch).",
                running as f64,
            ),
            (
                "rudolph_queue_depth",
                "Requests waiting in the queue to run.",
                in_progress.saturating_sub(running) as f64,
            ),
            (
                "rudolph_batch_waiting",
                "Running requests' generations waiting for rows in the batch.",
                batch.waiting_sessions.load(Ordering::Relaxed) as f64,
            ),
            (
                "rudolph_batch_rows",
                "Rows decoding in the shared batch.",
                batch.running_rows.load(Ordering::Relaxed) as f64,
            ),
            (
                "rudolph_batch_rows_max",
                "The most rows one decoding step takes (--max-batch).",
                max_batch as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let mut block = String::new();
            let _ = writeln!(
                block,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
            out.push_str(&block);
        }
        let counters = [
            (
                "rudolph_generated_tokens_total",
                "Tokens the shared batch computed (prefixes included).",
                batch.tokens.load(Ordering::Relaxed),
            ),
            (
                "rudolph_decoding_steps_total",
                "Model steps the shared batch ran.",
                batch.steps.load(Ordering::Relaxed),
            ),
            (
                "rudolph_decoded_rows_total",
                "Rows summed over the steps (divided by the steps: the mean batch).",
                batch.rows.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let mut block = String::new();
            let _ = writeln!(
                block,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
            out.push_str(&block);
        }
        let name = "rudolph_request_duration_seconds";
        let mut block = format!(
            "# HELP {name} Time from a request's arrival to its answer (to the start of a stream), by route.\n# TYPE {name} histogram\n"
        );
        let latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (route, h) in latency.iter() {
            for (count, bound) in h.counts.iter().zip(BUCKETS) {
                let _ = writeln!(
                    block,
                    "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                block,
                "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n{name}_sum{{route=\"{route}\"}} {}\n{name}_count{{route=\"{route}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        out.push_str(&block);
        out
    }
}
