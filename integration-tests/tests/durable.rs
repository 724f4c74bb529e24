//! Durable sessions, end to end with the real binary: builds that outlive their clients
//! (`run --detach`, `attach`, `logs`, `ps`, `cancel`), idempotent `run --id`, output
//! positions, the output quota's gaps, retention of finished records, clients that
//! reconnect through a dying `--via` command or past a silent daemon, and a daemon that
//! drops a silent client's session but not its build.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    decode_events, frame, hello_message, pseudo_random, script_spec, shell_quote, signal, tether, tether_bin,
    wait_until, Event, Finished, Proc, Serve,
};
use nix::sys::signal::Signal;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tether_protocol::{ClientMessage, DaemonMessage, PREAMBLE};

/// How long anything that must happen may take on a slow, busy machine.
const LONG: Duration = Duration::from_secs(60);

/// A daemon serving on `<tmp>/tether.sock` with its state under `<tmp>/state`. On drop it
/// is resumed (in case a test stopped it) and asked to shut down with SIGTERM, which
/// cancels its builds; it is SIGKILLed if that takes too long.
struct Daemon {
    serve: Serve,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["--log-level", "info", "--grace", "2s"];
        args.extend_from_slice(extra);
        let (serve, sock) = integration_tests::serve_socket(dir.path(), &args);
        Daemon { serve, sock, dir }
    }

    fn sock(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    /// A path in the test's temporary directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tether SUB --socket SOCK ARGS`, stdin from /dev/null.
    fn cmd(&self, sub: &str, args: &[&str]) -> Command {
        let mut cmd = tether([sub, "--socket", self.sock()]);
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    fn spawn(&self, sub: &str, args: &[&str]) -> Proc {
        Proc::spawn(&mut self.cmd(sub, args))
    }

    /// Runs `tether SUB --socket SOCK ARGS` to its end.
    fn tether(&self, sub: &str, args: &[&str]) -> Finished {
        self.spawn(sub, args).finish(LONG)
    }

    /// `tether ps --json` (with `--all`), one value per build.
    fn ps(&self, all: bool) -> Vec<Value> {
        let args: &[&str] = if all { &["--json", "--all"] } else { &["--json"] };
        let r = self.tether("ps", args);
        assert_eq!(r.code(), 0, "ps failed: {}", r.stderr_text());
        r.stdout_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("ps --json printed {l:?}: {e}")))
            .collect()
    }

    /// The build `id` as `ps --all --json` lists it, if it does.
    fn build(&self, id: &str) -> Option<Value> {
        self.ps(true).into_iter().find(|b| b["build"] == id)
    }

    /// Starts a build with `run --detach`; returns its id.
    fn detach(&self, args: &[&str]) -> String {
        let mut all = vec!["--detach"];
        all.extend_from_slice(args);
        let r = self.tether("run", &all);
        assert_eq!(r.code(), 0, "run --detach failed: {}", r.stderr_text());
        let id = r.stdout_text().trim().to_owned();
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "run --detach prints the id alone: {:?}",
            r.stdout_text()
        );
        id
    }

    /// Waits until `ps --all` shows build `id` finished; returns its record.
    fn wait_finished(&self, id: &str) -> Value {
        let mut last = None;
        let done = wait_until(LONG, || {
            last = self.build(id);
            last.as_ref().is_some_and(|b| b["state"] != "running")
        });
        assert!(done, "{id} did not finish; last seen: {last:?}");
        last.unwrap()
    }

    fn log(&self) -> String {
        self.serve.stderr.text()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.serve.pid();
        if self.serve.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
            // Builds get SIGTERM and, after the 2 s grace, SIGKILL; then the daemon exits.
            let _ = self.serve.wait_timeout(Duration::from_secs(10));
        }
        // Serve's own drop SIGKILLs it if it still runs.
    }
}

/// `text` without its terminal colour sequences (`ESC [ ... m`).
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn q(p: &Path) -> String {
    shell_quote(p.as_os_str())
}

/// A shell loop that waits (at most 60 s) until `file` exists.
fn wait_for_file(file: &Path) -> String {
    format!(
        "n=0; while [ ! -e {f} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done",
        f = q(file)
    )
}

/// `line-1\n` .. `line-N\n`.
fn numbered(n: u32) -> String {
    (1..=n).map(|i| format!("line-{i}\n")).collect()
}

/// A script printing `line-1` .. `line-N`, one every `pause` seconds, then `exit code`.
fn numbered_script(n: u32, pause: &str, code: i32) -> String {
    format!("i=1; while [ $i -le {n} ]; do echo line-$i; sleep {pause}; i=$((i+1)); done; exit {code}")
}

/// Asserts that `out` is exactly `line-1..line-N`, each once and in order, saying what
/// is wrong otherwise (a doubled or missing line) without dumping the whole output.
fn assert_numbered(out: &str, n: u32, context: &str) {
    let expected = numbered(n);
    if out == expected {
        return;
    }
    let got: Vec<&str> = out.lines().collect();
    let first_bad = got
        .iter()
        .enumerate()
        .find(|(i, l)| **l != format!("line-{}", i + 1))
        .map(|(i, l)| format!("line {} is {l:?}", i + 1));
    panic!(
        "expected line-1..line-{n} once each, got {} lines ({} bytes, expected {}); first difference: {:?}\n{context}",
        got.len(),
        out.len(),
        expected.len(),
        first_bad
    );
}

// ---------------------------------------------------------------------------------------

#[test]
fn killing_the_client_100_times_loses_nothing() {
    let d = Daemon::start(&[]);
    const MIB: usize = 1 << 20;
    let pattern = pseudo_random(64 * MIB, 0x5eed);
    let src = d.path("pattern");
    fs::write(&src, &pattern).unwrap();
    let script = format!(
        "i=0; while [ $i -lt 64 ]; do dd if={} bs=1M skip=$i count=1 2>/dev/null; sleep 0.04; i=$((i+1)); done; exit 3",
        q(&src)
    );
    let out_path = d.path("out");
    let delays = pseudo_random(100, 42);
    let mut running_after_kills = None;
    // Killed clients that had printed something (the others died before their first byte).
    let mut killed_mid_stream = 0;
    for (i, delay) in delays.iter().enumerate() {
        let before = file_len(&out_path);
        let out = OpenOptions::new().create(true).append(true).open(&out_path).unwrap();
        let mut client = if i == 0 {
            // The first client starts the build (and prints from its start) ...
            let mut cmd = d.cmd("run", &["--id", "pattern", "--sh", &script]);
            cmd.stdout(out);
            let client = Proc::spawn_with(&mut cmd, false);
            assert!(
                wait_until(LONG, || d.build("pattern").is_some()),
                "the build never started; client stderr: {}",
                client.stderr.text()
            );
            client
        } else {
            // ... the others attach where the output file ends.
            let from = file_len(&out_path).to_string();
            let mut cmd = d.cmd("attach", &["pattern", "--from", &from]);
            cmd.stdout(out);
            Proc::spawn_with(&mut cmd, false)
        };
        std::thread::sleep(Duration::from_millis(u64::from(*delay) % 41));
        // The client may have finished by itself (only once the build has ended).
        let _ = client.child.kill();
        let st = client.wait_timeout(LONG).expect("a SIGKILLed client exits");
        if let Some(code) = st.code() {
            // Not killed in time: it followed the build to its end.
            assert_eq!(
                code,
                3,
                "client #{i} exited by itself; stderr: {}",
                client.stderr.text()
            );
        }
        if st.code().is_none() && file_len(&out_path) > before {
            killed_mid_stream += 1;
        }
        if i == 3 {
            // The kills so far landed while the build ran: this is not just a replay.
            let b = d.build("pattern").expect("ps lists the build");
            running_after_kills = Some(b["state"] == "running");
        }
    }
    assert_eq!(
        running_after_kills,
        Some(true),
        "the build had already finished after 4 kills (the first of its own `run`): the test only exercised replay"
    );

    eprintln!(
        "{killed_mid_stream} of 100 clients were killed after printing part of the output ({} of {} bytes printed)",
        file_len(&out_path),
        pattern.len()
    );
    assert!(
        killed_mid_stream > 0,
        "no client was killed in the middle of the output"
    );
    let out = OpenOptions::new().append(true).open(&out_path).unwrap();
    let from = file_len(&out_path).to_string();
    let mut cmd = d.cmd("attach", &["pattern", "--from", &from]);
    cmd.stdout(out);
    let last = Proc::spawn_with(&mut cmd, false).finish(LONG);
    assert_eq!(last.code(), 3, "the final attach: {}", last.stderr_text());
    let got = fs::read(&out_path).unwrap();
    assert_eq!(got.len(), pattern.len(), "bytes in the output file");
    assert!(
        sha256(&got) == sha256(&pattern),
        "the output file differs from the pattern (first difference at byte {:?})",
        got.iter().zip(&pattern).position(|(a, b)| a != b)
    );
}

#[test]
fn detach_attach_logs_ps_and_cancel() {
    let d = Daemon::start(&[]);
    let go = d.path("go");
    let script = format!("echo first; echo err >&2; {}; echo second; exit 4", wait_for_file(&go));
    let started = Instant::now();
    let id = d.detach(&["--name", "det", "--sh", &script]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "run --detach returns at once"
    );

    // ps lists it running; once its first output is there, logs prints it and exits 0.
    let mut running = None;
    assert!(
        wait_until(LONG, || {
            running = d.ps(false).into_iter().find(|b| b["build"] == id.as_str());
            running.as_ref().is_some_and(|b| b["output_bytes"] == 10)
        }),
        "ps never showed {id} running with 10 bytes of output: {running:?}"
    );
    let b = running.unwrap();
    assert_eq!(b["state"], "running", "{b}");
    assert!(b["pid"].as_u64().unwrap() > 0, "{b}");
    assert!(b["command"].as_str().unwrap().contains("echo first"), "{b}");
    assert!(b["started_at_ms"].as_u64().unwrap() > 0, "{b}");
    assert!(b["duration_ms"].is_u64(), "{b}");
    assert!(b.get("exit_code").is_none(), "{b}");

    let logs = d.tether("logs", &[&id]);
    assert_eq!(
        (logs.code(), logs.stdout_text(), logs.stderr_text()),
        (0, "first\n".to_owned(), "err\n".to_owned()),
        "logs of a running build"
    );

    // attach --from-start replays and follows to the end, with the build's status.
    let attach = d.spawn("attach", &[&id, "--from-start"]);
    assert!(attach.stdout.wait_contains(LONG, "first\n"), "{}", attach.stderr.text());
    fs::write(&go, "").unwrap();
    let attach = attach.finish(LONG);
    assert_eq!(
        (attach.code(), attach.stdout_text(), attach.stderr_text()),
        (4, "first\nsecond\n".to_owned(), "err\n".to_owned())
    );

    assert!(
        d.ps(false).iter().all(|b| b["build"] != id.as_str()),
        "a finished build is not running"
    );
    let b = d.build(&id).expect("ps --all lists the finished build");
    assert_eq!(
        (b["state"].as_str(), b["exit_code"].as_i64()),
        (Some("exited"), Some(4)),
        "{b}"
    );
    assert_eq!(b["status"]["code"], 4, "{b}");
    assert_eq!(b["output_bytes"], 17, "{b}");
    let (finished, expires) = (
        b["finished_at_ms"].as_u64().unwrap(),
        b["expires_at_ms"].as_u64().unwrap(),
    );
    assert!(finished >= b["started_at_ms"].as_u64().unwrap(), "{b}");
    assert_eq!(expires - finished, 3_600_000, "retained for the default hour: {b}");

    let logs = d.tether("logs", &[&id]);
    assert_eq!(
        (logs.code(), logs.stdout_text(), logs.stderr_text()),
        (4, "first\nsecond\n".to_owned(), "err\n".to_owned()),
        "logs of a finished build"
    );

    // Cancelling a detached build ends its followers with its status.
    let id2 = d.detach(&["--sh", "echo ready; exec sleep 1000"]);
    let attach = d.spawn("attach", &[&id2, "--from-start"]);
    assert!(attach.stdout.wait_contains(LONG, "ready\n"), "{}", attach.stderr.text());
    let cancel = d.tether("cancel", &[&id2]);
    assert_eq!(cancel.code(), 0, "{}", cancel.stderr_text());
    let attach = attach.finish(LONG);
    assert_eq!((attach.code(), attach.stdout_text()), (143, "ready\n".to_owned()));
    let b = d.build(&id2).unwrap();
    assert_eq!(
        (b["state"].as_str(), b["exit_code"].as_i64()),
        (Some("cancelled"), Some(143)),
        "{b}"
    );

    let again = d.tether("cancel", &[&id2]);
    assert_eq!(again.code(), 125);
    assert!(
        again.stderr_text().contains("already finished"),
        "{}",
        again.stderr_text()
    );
}

#[test]
fn run_with_the_same_id_never_runs_twice() {
    let d = Daemon::start(&[]);
    let marker = d.path("marker");
    let script = format!("echo ran >> {}; echo out; echo err >&2; exit 5", q(&marker));
    for attempt in 1..=2 {
        let r = d.tether("run", &["--id", "once", "--sh", &script]);
        assert_eq!(
            (r.code(), r.stdout_text(), r.stderr_text()),
            (5, "out\n".to_owned(), "err\n".to_owned()),
            "run #{attempt}"
        );
    }
    assert_eq!(fs::read_to_string(&marker).unwrap(), "ran\n", "the build ran once");

    // A second run while the first still runs follows it from its start.
    let marker2 = d.path("marker2");
    let go = d.path("go");
    let script2 = format!(
        "echo ran >> {}; echo begin; {}; echo end; exit 5",
        q(&marker2),
        wait_for_file(&go)
    );
    let first = d.spawn("run", &["--id", "live", "--sh", &script2]);
    assert!(first.stdout.wait_contains(LONG, "begin\n"), "{}", first.stderr.text());
    let second = d.spawn("run", &["--id", "live", "--sh", &script2]);
    assert!(second.stdout.wait_contains(LONG, "begin\n"), "{}", second.stderr.text());
    fs::write(&go, "").unwrap();
    for (name, p) in [("first", first), ("second", second)] {
        let r = p.finish(LONG);
        assert_eq!(
            (r.code(), r.stdout_text()),
            (5, "begin\nend\n".to_owned()),
            "{name} run: {}",
            r.stderr_text()
        );
    }
    assert_eq!(fs::read_to_string(&marker2).unwrap(), "ran\n", "the build ran once");
    assert_eq!(
        d.ps(true).iter().filter(|b| b["build"] == "live").count(),
        1,
        "one build with the id"
    );

    // The id belongs to its command.
    let other = d.tether("run", &["--id", "once", "--sh", "echo something else"]);
    assert_eq!(other.code(), 125, "{}", other.stderr_text());
    assert!(
        other.stderr_text().contains("build id once"),
        "the error names the id: {}",
        other.stderr_text()
    );
    assert_eq!(other.stdout_text(), "");
    assert_eq!(fs::read_to_string(&marker).unwrap(), "ran\n");

    let long = "a".repeat(65);
    for bad in ["../x", ".hidden", "-dash", "a/b", long.as_str()] {
        let id_arg = format!("--id={bad}");
        let r = d.tether("run", &[&id_arg, "--sh", "echo should not run"]);
        assert_eq!(r.code(), 125, "id {bad:?}: {}", r.stderr_text());
        assert!(
            r.stderr_text().contains("invalid build id"),
            "id {bad:?}: {}",
            r.stderr_text()
        );
        assert_eq!(r.stdout_text(), "", "id {bad:?}");
    }
    let max = "b".repeat(64);
    let ok = d.tether("run", &["--id", &max, "--sh", "echo fine"]);
    assert_eq!(
        (ok.code(), ok.stdout_text()),
        (0, "fine\n".to_owned()),
        "{}",
        ok.stderr_text()
    );
}

#[test]
fn attach_from_a_position_and_from_the_end() {
    let d = Daemon::start(&[]);
    let go = d.path("go");
    let script = format!("printf 0123456789; {}; printf tail; exit 6", wait_for_file(&go));
    d.detach(&["--id", "pos", "--sh", &script]);
    let mut seen = None;
    assert!(
        wait_until(LONG, || {
            seen = d.build("pos");
            seen.as_ref().is_some_and(|b| b["output_bytes"] == 10)
        }),
        "the first 10 bytes never showed: {seen:?}"
    );

    let from4 = d.spawn("attach", &["pos", "--from", "4"]);
    let from_start = d.spawn("attach", &["pos", "--from-start"]);
    let from_end = d.spawn("attach", &["pos", "-vv"]);
    assert!(from4.stdout.wait_contains(LONG, "456789"), "{}", from4.stderr.text());
    assert!(
        from_start.stdout.wait_contains(LONG, "0123456789"),
        "{}",
        from_start.stderr.text()
    );
    // Attached (the daemon answered, so it has subscribed it at the end) before "tail".
    assert!(
        from_end.stderr.wait_contains(LONG, "attached"),
        "attach -vv never logged being attached: {}",
        from_end.stderr.text()
    );
    assert!(
        without_ansi(&from_end.stderr.text()).contains("end=10"),
        "attached at the end, 10: {}",
        from_end.stderr.text()
    );

    // Past the end: refused.
    let past = d.tether("attach", &["pos", "--from", "11"]);
    assert_eq!(past.code(), 125);
    assert!(past.stderr_text().contains("past the end"), "{}", past.stderr_text());

    fs::write(&go, "").unwrap();
    for (name, p, want) in [
        ("--from 4", from4, "456789tail"),
        ("--from-start", from_start, "0123456789tail"),
        ("from the end", from_end, "tail"),
    ] {
        let r = p.finish(LONG);
        assert_eq!(
            (r.code(), r.stdout_text()),
            (6, want.to_owned()),
            "{name}: {}",
            r.stderr_text()
        );
    }
    // At the very end of a finished build: nothing more, the status.
    let end = d.tether("attach", &["pos", "--from", "14"]);
    assert_eq!(
        (end.code(), end.stdout_text()),
        (6, String::new()),
        "{}",
        end.stderr_text()
    );
}

#[test]
fn a_quota_gap_is_reported_and_the_tail_is_kept() {
    let d = Daemon::start(&["--quota-build", "256KiB"]);
    let expected: String = (1..=600_000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 4_000_000);
    let id = d.detach(&["--id", "big", "--sh", "seq 1 600000; exit 9"]);
    let b = d.wait_finished(&id);
    assert_eq!(
        (b["state"].as_str(), b["exit_code"].as_i64()),
        (Some("exited"), Some(9)),
        "{b}"
    );
    assert_eq!(b["output_bytes"].as_u64(), Some(expected.len() as u64), "{b}");

    for args in [&["big"][..], &["big", "--from-start"][..]] {
        let sub = if args.len() == 1 { "logs" } else { "attach" };
        let r = d.tether(sub, args);
        assert_eq!(r.code(), 9, "{sub}: {}", r.stderr_text());
        let out = r.stdout_text();
        assert!(
            out.len() < expected.len() / 4,
            "{sub}: {} bytes kept of {}: the quota dropped nothing?",
            out.len(),
            expected.len()
        );
        assert!(
            !out.is_empty() && expected.ends_with(&out),
            "{sub}: the output kept ({} bytes) is not a suffix of the build's",
            out.len()
        );
        assert!(out.ends_with("599999\n600000\n"), "{sub}");
        let missing = expected.len() - out.len();
        let gap = format!(
            "tether: {missing} bytes of output of big are missing here (positions 0..{missing}: dropped by the daemon's output quota)\n"
        );
        assert_eq!(r.stderr_text(), gap, "{sub}: the gap is reported once on stderr");
    }
}

#[test]
fn retention_drops_finished_records() {
    let d = Daemon::start(&["--retain", "3s"]);
    let r = d.tether("run", &["--id", "ret", "--sh", "echo kept; exit 2"]);
    assert_eq!(
        (r.code(), r.stdout_text()),
        (2, "kept\n".to_owned()),
        "{}",
        r.stderr_text()
    );
    let logs = d.tether("logs", &["ret"]);
    assert_eq!(
        (logs.code(), logs.stdout_text()),
        (2, "kept\n".to_owned()),
        "logs right after the end: {}",
        logs.stderr_text()
    );
    let b = d.build("ret").expect("the finished build is retained");
    let retained = b["expires_at_ms"].as_u64().unwrap() - b["finished_at_ms"].as_u64().unwrap();
    assert_eq!(retained, 3000, "{b}");

    assert!(
        wait_until(Duration::from_secs(30), || d.build("ret").is_none()),
        "the record was not dropped within 30 s; daemon log: {}",
        d.log()
    );
    for (sub, args) in [("attach", &["ret", "--from-start"][..]), ("logs", &["ret"][..])] {
        let r = d.tether(sub, args);
        assert_eq!(r.code(), 125, "{sub} of an expired build: {}", r.stderr_text());
        assert!(r.stderr_text().contains("no build"), "{sub}: {}", r.stderr_text());
        assert_eq!(r.stdout_text(), "", "{sub}");
    }
}

/// An executable script, used as the `--via` command, that appends its pid to `pids`
/// and then becomes `tether dial-stdio --socket SOCK` (so that pid is the relay's).
fn dial_script(d: &Daemon, name: &str) -> (PathBuf, PathBuf) {
    let pids = d.path(&format!("{name}.pids"));
    let script = d.path(&format!("{name}.sh"));
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ >> {}\nexec {} dial-stdio --socket {}\n",
            q(&pids),
            shell_quote(tether_bin().as_os_str()),
            q(&d.sock)
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    (script, pids)
}

/// The pids the dial script wrote so far.
fn relay_pids(pids: &Path) -> Vec<i32> {
    fs::read_to_string(pids)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits until the `n`th relay was started (a test failure after `LONG`); returns its pid.
fn nth_relay(pids: &Path, n: usize, client: &Proc) -> i32 {
    assert!(
        wait_until(LONG, || relay_pids(pids).len() >= n),
        "relay #{n} never started; client stderr: {}",
        client.stderr.text()
    );
    relay_pids(pids)[n - 1]
}

#[test]
fn reconnect_through_a_dying_via_command() {
    let d = Daemon::start(&[]);
    let (script, pids) = dial_script(&d, "dial");
    let via = format!("exec {}", q(&script));
    let lines = 250;
    let client = d_via(&via, &["--sh", &numbered_script(lines, "0.02", 7)]);
    for k in 1..=3usize {
        let pid = nth_relay(&pids, k, &client);
        // Output through this relay: after it was started, more lines were printed.
        let line = format!("line-{}\n", 20 + 35 * (k - 1));
        assert!(
            client.stdout.wait_contains(LONG, &line),
            "no {line:?} after relay #{k}; stderr: {}",
            client.stderr.text()
        );
        assert!(
            !client.stdout.text().contains(&format!("line-{lines}\n")),
            "the build ended before kill #{k}: make it slower"
        );
        signal(pid as u32, Signal::SIGKILL);
    }
    let r = client.finish(LONG);
    assert_eq!(r.code(), 7, "stderr: {}", r.stderr_text());
    assert_numbered(&r.stdout_text(), lines, &r.stderr_text());
    assert!(
        relay_pids(&pids).len() >= 4,
        "three reconnections: {:?}",
        relay_pids(&pids)
    );
    assert!(r.stderr_text().contains("reconnecting"), "{}", r.stderr_text());

    // Without reconnecting, the first broken relay ends the client (not the build).
    let (script, pids) = dial_script(&d, "noreconnect");
    let go = d.path("go");
    let build = format!("echo begin; {}; echo end", wait_for_file(&go));
    let via = format!("exec {}", q(&script));
    let client = d_via(&via, &["--no-reconnect", "--id", "nr", "--sh", &build]);
    assert!(client.stdout.wait_contains(LONG, "begin\n"), "{}", client.stderr.text());
    let pid = nth_relay(&pids, 1, &client);
    signal(pid as u32, Signal::SIGKILL);
    let r = client.finish(LONG);
    assert_eq!(r.code(), 125, "stderr: {}", r.stderr_text());
    assert!(r.stderr_text().contains("connection"), "says why: {}", r.stderr_text());
    assert_eq!(relay_pids(&pids).len(), 1, "no reconnection");
    let b = d.build("nr").expect("the build is still there");
    assert_eq!(
        b["state"], "running",
        "the client's failure did not cancel the build: {b}"
    );
    fs::write(&go, "").unwrap();
    let b = d.wait_finished("nr");
    assert_eq!(b["exit_code"], 0, "{b}");
}

/// Spawns `tether run --via VIA ARGS`.
fn d_via(via: &str, args: &[&str]) -> Proc {
    let mut cmd = tether(["run", "--via", via]);
    cmd.args(args).stdin(Stdio::null());
    Proc::spawn(&mut cmd)
}

#[test]
fn a_silent_daemon_is_detected_and_followed_after_it_wakes() {
    // The client waits for at least three of the daemon's heartbeat intervals, so the
    // daemon pings often enough for the client's 1 s timeout to count.
    let d = Daemon::start(&["--heartbeat", "200ms"]);
    let lines = 40;
    let client = d.spawn(
        "run",
        &["--heartbeat-timeout", "1s", "--sh", &numbered_script(lines, "0.1", 8)],
    );
    assert!(
        client.stdout.wait_contains(LONG, "line-5\n"),
        "{}",
        client.stderr.text()
    );
    let daemon = d.serve.pid();
    signal(daemon, Signal::SIGSTOP);
    let noticed = client.stderr.wait_contains(LONG, "sent nothing");
    // Resumed whatever happened: the assertion below must not leave it stopped.
    signal(daemon, Signal::SIGCONT);
    assert!(
        noticed,
        "the client never noticed the stopped daemon; stderr: {}",
        client.stderr.text()
    );
    assert!(
        !client.stdout.text().contains(&format!("line-{lines}\n")),
        "the client saw the end while the daemon was stopped?"
    );
    let r = client.finish(LONG);
    assert_eq!(r.code(), 8, "stderr: {}", r.stderr_text());
    assert_numbered(&r.stdout_text(), lines, &r.stderr_text());
    assert!(r.stderr_text().contains("reconnecting"), "{}", r.stderr_text());
}

#[test]
fn a_silent_client_loses_its_session_not_its_build() {
    let d = Daemon::start(&["--heartbeat", "200ms", "--heartbeat-timeout", "1s"]);
    let marker = d.path("marker");
    let mut stream = UnixStream::connect(&d.sock).unwrap();
    let events = decode_events(stream.try_clone().unwrap());
    let mut opening = PREAMBLE.to_vec();
    opening.extend_from_slice(&frame(&hello_message()));
    stream.write_all(&opening).unwrap();
    let next = || match events.recv_timeout(LONG) {
        Ok(ev) => ev,
        Err(_) => panic!("nothing from the daemon within {LONG:?}; its log: {}", d.log()),
    };
    loop {
        match next() {
            Event::Preamble => {}
            Event::Message(DaemonMessage::Welcome(w)) => {
                assert_eq!(w.limits.heartbeat_ms, 200, "the daemon's heartbeat is announced");
                break;
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }
    let mut spec = script_spec(&format!("echo hi; sleep 3; echo done > {}", q(&marker)));
    spec.id = Some("silent".into());
    stream
        .write_all(&frame(&ClientMessage::Run {
            req: 1,
            spec: Box::new(spec),
            follow: true,
        }))
        .unwrap();
    let sent = Instant::now();
    // From here on the client says nothing (and keeps the connection open).
    let (mut pings, mut started, mut output) = (0, false, Vec::new());
    loop {
        match next() {
            Event::Message(DaemonMessage::Ping { .. }) => pings += 1,
            Event::Message(DaemonMessage::Started(_)) => started = true,
            Event::Message(DaemonMessage::Output { data, .. }) => output.extend_from_slice(&data.into_vec()),
            Event::Message(DaemonMessage::Exited(e)) => panic!("the session lived to the build's end: {e:?}"),
            Event::Eof => break,
            _ => {}
        }
    }
    let closed_after = sent.elapsed();
    let build_done = marker.exists();
    assert!(started, "the build was started");
    assert_eq!(output, b"hi\n");
    assert!(pings >= 1, "the daemon pinged the silent client");
    assert!(
        !build_done,
        "the connection was closed only after the build ended ({closed_after:?}), not for silence"
    );
    assert!(
        d.serve.stderr.wait_contains(LONG, "heartbeat timeout"),
        "the daemon says why it dropped the session: {}",
        d.log()
    );
    drop(stream);

    // The build goes on without its session.
    assert!(
        wait_until(LONG, || marker.exists()),
        "the build never finished; daemon log: {}",
        d.log()
    );
    let b = d.wait_finished("silent");
    assert_eq!(
        (b["state"].as_str(), b["exit_code"].as_i64()),
        (Some("exited"), Some(0)),
        "{b}"
    );
    let logs = d.tether("logs", &["silent"]);
    assert_eq!((logs.code(), logs.stdout_text()), (0, "hi\n".to_owned()));
}
