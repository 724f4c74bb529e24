//! Benchmarks of the release `tether` binary against plain-Unix baselines, measured in
//! the same run, interleaved (baseline, tether, baseline, tether, ...).
//!
//! ```text
//! cargo run --release -p integration-tests --bin bench -- [--quick] [--json FILE]
//!     [--plot DIR] [--only SCENARIO[,SCENARIO...]] [--reps N]
//!
//! Scenarios: stream, sequential, idle-memory, ping-under-flood, stalled-memory,
//! logs-replay, transfer, container, keystroke, concurrency, cold-start, steps, kubectl.
//! ```
//!
//! The tether binary is `$TETHER_BIN`, else `target/release/tether` of this workspace
//! (or of `$CARGO_TARGET_DIR`), built with `cargo build --release -p tether` if missing.
//! Timing never fails the run: the exit status is 1 only when a scenario crashed (or,
//! with `--plot DIR`, a chart could not be drawn).
//!
//! `--plot DIR` draws every chart the scenarios that ran handed in as `DIR/<id>.svg`
//! (DIR is created), once all of them ran; see `bench/plot.rs`.

#[path = "../bench/chart.rs"]
mod chart;
#[path = "../bench/cold_start.rs"]
mod cold_start;
#[path = "../bench/concurrency.rs"]
mod concurrency;
#[path = "../bench/container_figures.rs"]
mod container_figures;
#[path = "../bench/idle_memory.rs"]
mod idle_memory;
#[path = "../bench/keystroke.rs"]
mod keystroke;
#[path = "../bench/kubectl.rs"]
mod kubectl;
#[path = "../bench/logs_replay.rs"]
mod logs_replay;
#[path = "../bench/ping_flood.rs"]
mod ping_flood;
#[path = "../bench/plot.rs"]
mod plot;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/scenario.rs"]
mod scenario;
#[path = "../bench/sequential.rs"]
mod sequential;
#[path = "../bench/session.rs"]
mod session;
#[path = "../bench/socket_daemon.rs"]
mod socket_daemon;
#[path = "../bench/stalled_memory.rs"]
mod stalled_memory;
#[path = "../bench/steps.rs"]
mod steps;
#[path = "../bench/stream.rs"]
mod stream;
#[path = "../bench/transfer.rs"]
mod transfer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use report::Row;
use scenario::{Ctx, Scenario};

/// Every scenario, in the order they run.
fn scenarios() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(stream::Stream),
        Box::new(sequential::Sequential),
        Box::new(idle_memory::IdleMemory),
        Box::new(ping_flood::PingUnderFlood),
        Box::new(stalled_memory::StalledMemory),
        Box::new(logs_replay::LogsReplay),
        Box::new(transfer::Transfer),
        Box::new(container_figures::ContainerFigures),
        Box::new(keystroke::Keystroke),
        Box::new(concurrency::Concurrency),
        Box::new(cold_start::ColdStart),
        Box::new(steps::Steps),
        Box::new(kubectl::Kubectl),
    ]
}

const USAGE: &str = "usage: bench [--quick] [--json FILE] [--plot DIR] [--only SCENARIO[,SCENARIO...]] [--reps N]";

struct Args {
    quick: bool,
    json: Option<PathBuf>,
    /// Where to draw the charts, one SVG file each.
    plot: Option<PathBuf>,
    only: Option<Vec<String>>,
    reps: Option<usize>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        quick: false,
        json: None,
        plot: None,
        only: None,
        reps: None,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a
            .to_str()
            .with_context(|| format!("argument {a:?} is not UTF-8"))?
            .to_owned();
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--quick" => args.quick = true,
            "--json" => args.json = Some(PathBuf::from(value("--json")?)),
            "--plot" => args.plot = Some(PathBuf::from(value("--plot")?)),
            "--only" => {
                let v = value("--only")?;
                let v = v.to_str().context("--only is not UTF-8")?;
                args.only = Some(v.split(',').map(str::to_owned).collect());
            }
            "--reps" => {
                let v = value("--reps")?;
                let n: usize = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .filter(|n| *n > 0)
                    .with_context(|| format!("--reps needs a positive number, not {v:?}"))?;
                args.reps = Some(n);
            }
            "-h" | "--help" => {
                println!("{USAGE}\nscenarios: {}", ids().join(", "));
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn ids() -> Vec<&'static str> {
    scenarios().iter().map(|s| s.id()).collect()
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("the integration-tests crate has no parent directory")
}

/// `$TETHER_BIN`, else the workspace's release binary, built if missing.
fn locate_tether() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TETHER_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("TETHER_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let root = workspace_root()?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => root.join(t),
        None => root.join("target"),
    };
    let bin = target.join("release").join("tether");
    if !bin.is_file() {
        eprintln!("{} is missing; running cargo build --release -p tether", bin.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "tether"])
            .current_dir(&root)
            .status()
            .context("cannot run cargo build --release -p tether")?;
        if !st.success() {
            bail!("cargo build --release -p tether failed ({st})");
        }
        if !bin.is_file() {
            bail!("cargo build succeeded but {} still does not exist", bin.display());
        }
    }
    Ok(bin)
}

fn tether_version(tether: &Path) -> anyhow::Result<String> {
    let out = Command::new(tether)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", tether.display()))?;
    if !out.status.success() {
        bail!("{} --version failed ({})", tether.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .or_else(|| {
            let out = Command::new("uname").arg("-r").output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    json!({"nproc": nproc, "cpu": model, "kernel": kernel})
}

/// Instance dirs left in the bench's private state root once every daemon has stopped
/// (each daemon should remove its own on exit).
fn leftover_state(tmpdir: &Path) -> Vec<String> {
    let instances = tmpdir
        .join(format!("tether-{}", nix::unistd::geteuid()))
        .join("instances");
    let Ok(entries) = std::fs::read_dir(&instances) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path().display().to_string())
        .collect()
}

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> anyhow::Result<i32> {
    let args = parse_args()?;
    if let Some(only) = &args.only {
        let known = ids();
        if let Some(bad) = only.iter().find(|o| !known.contains(&o.as_str())) {
            bail!("unknown scenario {bad:?}; known: {}", known.join(", "));
        }
    }
    let tether = locate_tether()?;
    let version = tether_version(&tether)?;
    let tmp = tempfile::Builder::new()
        .prefix("tether-bench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let ctx = Ctx {
        tether: tether.clone(),
        quick: args.quick,
        reps: args.reps.unwrap_or(if args.quick { 2 } else { 5 }),
        tmpdir: tmp.path().to_path_buf(),
        charts: std::sync::Mutex::new(Vec::new()),
    };
    let machine = machine();
    let mode = if ctx.quick { "quick" } else { "full" };
    println!(
        "machine: {} cpus, {}, kernel {}",
        machine["nproc"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );
    println!("tether:  {version} ({})", tether.display());
    println!(
        "mode:    {mode}, {} repetitions, each baseline then tether; median [min-max]",
        ctx.reps
    );
    println!();

    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut errors: Vec<(String, String)> = Vec::new();
    for s in scenarios() {
        if args.only.as_ref().is_some_and(|o| !o.iter().any(|x| x == s.id())) {
            continue;
        }
        let t0 = Instant::now();
        match s.run(&ctx) {
            Ok(r) => {
                ctx.progress(s.id(), &format!("done in {:.1} s", t0.elapsed().as_secs_f64()));
                rows.extend(r);
            }
            Err(e) => {
                eprintln!("[{}] FAILED: {e:#}", s.id());
                errors.push((s.id().to_owned(), format!("{e:#}")));
            }
        }
    }
    let leftovers = leftover_state(tmp.path());

    print!("{}", report::table(&rows));
    if !leftovers.is_empty() {
        println!("\nstate left behind by stopped daemons: {}", leftovers.join(", "));
    }
    for (id, e) in &errors {
        println!("\nscenario {id} FAILED: {e}");
    }
    println!("\ntotal {:.1} s", started.elapsed().as_secs_f64());

    if let Some(path) = &args.json {
        let doc = json!({
            "machine": machine,
            "tether": {"path": tether.display().to_string(), "version": version},
            "mode": mode,
            "reps": ctx.reps,
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "errors": errors.iter().map(|(id, e)| json!({"scenario": id, "error": e})).collect::<Vec<_>>(),
            "leftover_state": leftovers,
            "charts": ctx.charts.lock().map(|c| c.iter().map(chart::Chart::to_json).collect::<Vec<_>>()).unwrap_or_default(),
            "seconds": started.elapsed().as_secs_f64(),
        });
        let text = serde_json::to_string_pretty(&doc).context("cannot serialise the results")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    let plots_ok = match &args.plot {
        Some(dir) => draw_charts(&ctx, dir),
        None => true,
    };
    Ok(if errors.is_empty() && plots_ok { 0 } else { 1 })
}

/// Draws every collected chart as `dir/<id>.svg`, listing the files written; `false` if
/// any could not be drawn (reported on stderr).
fn draw_charts(ctx: &Ctx, dir: &Path) -> bool {
    let charts = ctx.charts.lock().unwrap_or_else(|e| e.into_inner());
    if charts.is_empty() {
        println!("\nplots: no chart to draw (none of the scenarios that ran draws one)");
        return true;
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("bench: --plot: cannot create {}: {e}", dir.display());
        return false;
    }
    println!("\nplots:");
    let mut ok = true;
    for chart in charts.iter() {
        match plot::write(chart, dir) {
            Ok(path) => println!("  {}", path.display()),
            Err(e) => {
                eprintln!("bench: --plot: chart {:?} FAILED: {e:#}", plot::id(chart));
                ok = false;
            }
        }
    }
    ok
}
