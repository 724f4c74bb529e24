//! The scenario interface: each benchmark measures tether next to a baseline in the same
//! run, interleaved, and returns [`Row`]s. A new benchmark is a new implementation of
//! [`Scenario`] added to the list in `bench.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::chart::Chart;
use crate::report::Row;

/// What every scenario gets.
pub struct Ctx {
    /// The release `tether` binary.
    pub tether: PathBuf,
    /// Smaller sizes and fewer repetitions.
    pub quick: bool,
    /// Repetitions of each (baseline, tether) pair.
    pub reps: usize,
    /// TMPDIR for tether processes: their state dirs live here, apart from those of
    /// other daemons on the machine.
    pub tmpdir: PathBuf,
    /// Charts handed in by the scenarios, drawn by `--plot`.
    pub charts: Mutex<Vec<Chart>>,
}

impl Ctx {
    /// Environment for every tether process the bench starts.
    pub fn tether_env(&self) -> [(&'static str, &Path); 1] {
        [("TMPDIR", self.tmpdir.as_path())]
    }

    /// A command running the tether binary with [`Ctx::tether_env`].
    pub fn tether_cmd(&self) -> Command {
        let mut cmd = Command::new(&self.tether);
        for (k, v) in self.tether_env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Keeps a chart's data for `--plot` (and the JSON document).
    pub fn chart(&self, chart: Chart) {
        self.charts.lock().unwrap_or_else(|e| e.into_inner()).push(chart);
    }

    /// Progress on stderr (the table goes to stdout).
    pub fn progress(&self, scenario: &str, msg: &str) {
        eprintln!("[{scenario}] {msg}");
    }
}

/// One benchmark.
pub trait Scenario {
    /// Short name, for `--only` and progress lines.
    fn id(&self) -> &'static str;
    /// Runs the baseline and tether `ctx.reps` times, interleaved (baseline first).
    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>>;
}
