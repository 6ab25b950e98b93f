//! Operational metrics, rendered in the Prometheus text format at `GET /metrics`.
//!
//! Lock-free atomics on the hot paths (HTTP status counters, the command-duration histogram);
//! the `{type, outcome}` command counter needs dynamic labels, so it is a small mutex-guarded
//! map (a few dozen series at most: protocol types × outcome codes). Gauges that mirror state
//! (connected devices) are read from their owner at render time instead of being kept in sync.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the command-duration histogram buckets.
pub const COMMAND_DURATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Every metric the control plane exports, except gauges read at render time.
pub struct Metrics {
    /// Index = HTTP status code (100..=599).
    http_requests: Box<[AtomicU64]>,
    commands: Mutex<BTreeMap<(String, String), u64>>,
    duration_buckets: [AtomicU64; COMMAND_DURATION_BUCKETS.len()],
    duration_count: AtomicU64,
    duration_sum_micros: AtomicU64,
    event_streams: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            http_requests: (0..600).map(|_| AtomicU64::new(0)).collect(),
            commands: Mutex::new(BTreeMap::new()),
            duration_buckets: Default::default(),
            duration_count: AtomicU64::new(0),
            duration_sum_micros: AtomicU64::new(0),
            event_streams: AtomicU64::new(0),
        }
    }
}

/// Values owned elsewhere, sampled when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub devices_connected: usize,
}

/// Keeps `codemantle_event_streams` incremented while alive.
pub struct EventStreamGuard(Arc<Metrics>);

impl Drop for EventStreamGuard {
    fn drop(&mut self) {
        self.0.event_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts an open live event stream until the guard is dropped.
    pub fn event_stream_opened(self: &Arc<Self>) -> EventStreamGuard {
        self.event_streams.fetch_add(1, Ordering::Relaxed);
        EventStreamGuard(self.clone())
    }

    /// Counts one HTTP response.
    pub fn record_http(&self, status: u16) {
        if let Some(c) = self.http_requests.get(usize::from(status)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one device command and observes its duration. `command_type` is the protocol
    /// `t`, `outcome` is `ok` or an error code; keep both low-cardinality.
    pub fn record_command(&self, command_type: &str, outcome: &str, duration: Duration) {
        *self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((command_type.to_owned(), outcome.to_owned()))
            .or_insert(0) += 1;
        let secs = duration.as_secs_f64();
        for (bound, bucket) in COMMAND_DURATION_BUCKETS.iter().zip(&self.duration_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.duration_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.duration_sum_micros
            .fetch_add(micros, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.render_into(&mut out, gauges);
        out
    }

    fn render_into(&self, out: &mut String, gauges: Gauges) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP codemantle_devices_connected Devices with an open tunnel."
        )?;
        writeln!(out, "# TYPE codemantle_devices_connected gauge")?;
        writeln!(
            out,
            "codemantle_devices_connected {}",
            gauges.devices_connected
        )?;

        writeln!(
            out,
            "# HELP codemantle_event_streams Open live event streams (SSE)."
        )?;
        writeln!(out, "# TYPE codemantle_event_streams gauge")?;
        let streams = self.event_streams.load(Ordering::Relaxed);
        writeln!(out, "codemantle_event_streams {streams}")?;

        writeln!(
            out,
            "# HELP codemantle_commands_total Device commands by type and outcome."
        )?;
        writeln!(out, "# TYPE codemantle_commands_total counter")?;
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((t, outcome), n) in &commands {
            writeln!(
                out,
                "codemantle_commands_total{{type=\"{}\",outcome=\"{}\"}} {n}",
                escape_label(t),
                escape_label(outcome)
            )?;
        }

        writeln!(
            out,
            "# HELP codemantle_command_duration_seconds Device command round-trip time."
        )?;
        writeln!(out, "# TYPE codemantle_command_duration_seconds histogram")?;
        for (bound, bucket) in COMMAND_DURATION_BUCKETS.iter().zip(&self.duration_buckets) {
            writeln!(
                out,
                "codemantle_command_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            )?;
        }
        let count = self.duration_count.load(Ordering::Relaxed);
        writeln!(
            out,
            "codemantle_command_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        )?;
        let sum = self.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        writeln!(out, "codemantle_command_duration_seconds_sum {sum}")?;
        writeln!(out, "codemantle_command_duration_seconds_count {count}")?;

        writeln!(
            out,
            "# HELP codemantle_http_requests_total HTTP responses by status code."
        )?;
        writeln!(out, "# TYPE codemantle_http_requests_total counter")?;
        for (code, c) in self.http_requests.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                writeln!(out, "codemantle_http_requests_total{{code=\"{code}\"}} {n}")?;
            }
        }
        Ok(())
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::new();
        m.record_http(200);
        m.record_http(200);
        m.record_http(404);
        m.record_command("dr", "ok", Duration::from_millis(20));
        m.record_command("dr", "timeout", Duration::from_secs(45));
        let text = m.render(Gauges {
            devices_connected: 3,
        });
        assert!(text.contains("codemantle_devices_connected 3\n"));
        assert!(text.contains("codemantle_http_requests_total{code=\"200\"} 2\n"));
        assert!(text.contains("codemantle_commands_total{type=\"dr\",outcome=\"timeout\"} 1\n"));
        assert!(text.contains("codemantle_command_duration_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("codemantle_command_duration_seconds_bucket{le=\"60\"} 2\n"));
        assert!(text.contains("codemantle_command_duration_seconds_count 2\n"));
    }
}
