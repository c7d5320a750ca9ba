//! Duration histograms recorded on every transaction: fixed buckets of atomic counters, so a
//! sample costs a bucket search and two relaxed additions (the exporter's histograms queue
//! every sample and cost several times that), rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the `le` labels).
pub const BOUNDS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The same bounds in nanoseconds, compared on the recording path.
const BOUNDS_NS: [u64; 16] = {
    let mut ns = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        ns[i] = (BOUNDS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// A histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Samples per bucket (not cumulative); the last is above every bound.
    counts: [AtomicU64; 17],
    /// In microseconds (rounded): nanoseconds would wrap within months on a busy broker.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one sample.
    #[inline]
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Relaxed);
        }
        self.sum_us.fetch_add(ns.saturating_add(500) / 1000, Relaxed);
    }

    /// Appends this histogram's sample lines (`_bucket`, `_sum`, `_count`) for `name` with
    /// `labels` (already formatted, `k="v",...`, may be empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            let le = BOUNDS.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// A label value escaped for the text format (backslash, quote, newline).
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(h: &Histogram) -> String {
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "db=\"a\"");
        out
    }

    #[test]
    fn samples_land_in_the_first_bucket_at_or_above_them_and_buckets_are_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(500));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(100));
        let out = rendered(&h);
        assert!(out.contains("x_seconds_bucket{db=\"a\",le=\"0.0005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{db=\"a\",le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{db=\"a\",le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{db=\"a\",le=\"60\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{db=\"a\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count{db=\"a\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_sum{db=\"a\"} 100.0036\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
