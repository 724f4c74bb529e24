//! Data for the charts `--plot DIR` draws: scenarios hand their series to
//! [`Ctx::chart`](crate::scenario::Ctx::chart) next to their table rows, and `plot.rs`
//! renders each [`Chart`] as one SVG file named for its id.

use serde_json::{json, Value};

/// One chart's data.
#[derive(Debug, Clone)]
pub enum Chart {
    /// Distributions of one quantity (a latency, say), one per mechanism, drawn as
    /// cumulative distributions on a log axis so that a floor and its tail both show.
    Distribution {
        /// The SVG file's name, without `.svg`.
        id: String,
        title: String,
        /// The samples' unit, e.g. "ms".
        unit: String,
        /// (mechanism, samples); tether's series first, then its baselines.
        series: Vec<(String, Vec<f64>)>,
    },
    /// A quantity against another (throughput against concurrency, say), one line per
    /// series.
    Lines {
        id: String,
        title: String,
        x_label: String,
        y_label: String,
        /// Plot x on a log axis (concurrency 1, 4, 16, 64).
        log_x: bool,
        /// (series name, (x, y) points in order of x); tether's first.
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
}

impl Chart {
    /// The chart's data for the JSON document.
    pub fn to_json(&self) -> Value {
        match self {
            Chart::Distribution {
                id,
                title,
                unit,
                series,
            } => json!({
                "id": id, "kind": "distribution", "title": title, "unit": unit,
                "series": series.iter().map(|(name, v)| json!({"name": name, "samples": v})).collect::<Vec<_>>(),
            }),
            Chart::Lines {
                id,
                title,
                x_label,
                y_label,
                log_x,
                series,
            } => json!({
                "id": id, "kind": "lines", "title": title, "x_label": x_label, "y_label": y_label, "log_x": log_x,
                "series": series.iter().map(|(name, p)| json!({"name": name, "points": p})).collect::<Vec<_>>(),
            }),
        }
    }
}
