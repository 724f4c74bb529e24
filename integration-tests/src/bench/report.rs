//! What a scenario measures and how it is shown: [`Stats`] over repetitions, one
//! [`Row`] per compared metric, the text table and the JSON document.

use serde_json::{json, Value};

/// Median and spread of one metric over the repetitions of a scenario.
#[derive(Debug, Clone)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    /// Statistics of `samples` (one value per repetition); `None` when there are none.
    pub fn of(samples: Vec<f64>) -> Option<Stats> {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return None;
        }
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples,
        })
    }

    fn to_json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "samples": self.samples})
    }
}

/// The `p`-th percentile (0 < p <= 100) of `values` by the nearest-rank method.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What a row must show to meet the project's goal.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// tether over the baseline ([`Row::ratio`]) must be at least this.
    RatioAtLeast(f64),
    /// tether's median must be at most this (in the row's unit).
    AtMost(f64),
    /// Shown for comparison only.
    None,
}

/// One compared metric: tether next to its baseline, measured in the same run.
#[derive(Debug, Clone)]
pub struct Row {
    /// e.g. "stream 2 GiB to /dev/null".
    pub scenario: String,
    /// e.g. "throughput".
    pub metric: String,
    /// e.g. "MiB/s".
    pub unit: &'static str,
    pub tether: Stats,
    /// The baseline's name (e.g. "sh pipeline, 2 hops") and statistics.
    pub baseline: Option<(String, Stats)>,
    pub goal: Goal,
    /// Anything worth knowing about this measurement.
    pub notes: Vec<String>,
}

impl Row {
    /// tether over the baseline. When both have one sample per repetition (run as
    /// interleaved pairs), the median of the per-pair ratios: each pair ran back to back
    /// under the same machine conditions, so drift between repetitions (other load on a
    /// shared machine) cancels out. Otherwise the ratio of the medians.
    pub fn ratio(&self) -> Option<f64> {
        let (_, b) = self.baseline.as_ref()?;
        let (t, bs) = (&self.tether.samples, &b.samples);
        if t.len() == bs.len() && !t.is_empty() && bs.iter().all(|&x| x != 0.0) {
            let pairs: Vec<f64> = t.iter().zip(bs).map(|(t, b)| t / b).collect();
            return Stats::of(pairs).map(|s| s.median);
        }
        (b.median != 0.0).then(|| self.tether.median / b.median)
    }

    /// Whether the goal is met; `None` when there is no goal (or no ratio to judge).
    pub fn met(&self) -> Option<bool> {
        match self.goal {
            Goal::RatioAtLeast(x) => self.ratio().map(|r| r >= x),
            Goal::AtMost(x) => Some(self.tether.median <= x),
            Goal::None => None,
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::RatioAtLeast(x) => format!(">= {x}x baseline"),
            Goal::AtMost(x) => format!("<= {} {}", num(x), self.unit),
            Goal::None => "-".to_owned(),
        }
    }

    pub fn to_json(&self) -> Value {
        let goal = match self.goal {
            Goal::RatioAtLeast(x) => json!({"kind": "ratio_at_least", "value": x, "text": self.goal_text()}),
            Goal::AtMost(x) => json!({"kind": "at_most", "value": x, "unit": self.unit, "text": self.goal_text()}),
            Goal::None => Value::Null,
        };
        json!({
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "tether": self.tether.to_json(),
            "baseline": self.baseline.as_ref().map(|(name, s)| {
                let mut v = s.to_json();
                v["name"] = json!(name);
                v
            }),
            "ratio": self.ratio(),
            "goal": goal,
            "met": self.met(),
            "notes": self.notes,
        })
    }
}

/// A number with as many decimals as its size deserves.
/// `2 GiB` for whole GiB, else `256 MiB`: sizes in scenario names.
pub fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes & ((1 << 30) - 1) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || x == x.trunc() && a >= 10.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn cell(s: &Stats, unit: &str) -> String {
    if s.samples.len() > 1 {
        format!("{} {unit} [{}-{}]", num(s.median), num(s.min), num(s.max))
    } else {
        format!("{} {unit}", num(s.median))
    }
}

/// The rows as a plain-text table (median [min-max] over the repetitions), with the
/// rows' notes below it.
pub fn table(rows: &[Row]) -> String {
    let header = ["scenario", "tether", "baseline", "ratio", "goal", "met?"];
    let mut lines: Vec<[String; 6]> = vec![header.map(str::to_owned)];
    for r in rows {
        let baseline = match &r.baseline {
            Some((name, s)) => format!("{} ({name})", cell(s, r.unit)),
            None => "-".to_owned(),
        };
        let ratio = r.ratio().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".to_owned());
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        lines.push([
            format!("{}: {}", r.scenario, r.metric),
            cell(&r.tether, r.unit),
            baseline,
            ratio,
            r.goal_text(),
            met.to_owned(),
        ]);
    }
    let mut widths = [0usize; 6];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        let cells: Vec<String> = l.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join(" | ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("-+-"));
            out.push('\n');
        }
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("  * {}: {n}", r.scenario)))
        .collect();
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_percentiles() {
        let s = Stats::of(vec![3.0, 1.0, 2.0, 10.0]).expect("samples");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
