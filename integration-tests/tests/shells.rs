//! `tether shell` and breakpoints, end to end with the real binary.
//!
//! Interactive shells are driven through a real terminal: each test starts its own tmux
//! server (on a socket in its temp dir) with a fixed 100x30 pane running bash, types the
//! `tether shell` command into it, and reads the screen (`capture-pane`). Piped shells,
//! `run --hold-on-failure`, `--hold-before` and `tether release` are driven directly.
//! Every test has its own daemon on a socket in its temp dir, and checks that the
//! builds it started leave no directory behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::{
    serve_socket, shell_quote, signal, subdirs, tether, tether_bin, via_serve, wait_until, Finished, Proc, Serve,
    TIMEOUT,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// For waits that include a daemon's hold or hang-up grace, on a loaded machine.
const LONG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// A `tether serve` on `<dir>/tether.sock` with its state in `<dir>/state` (SIGKILLed
/// on drop).
struct Daemon {
    serve: Serve,
    sock: PathBuf,
    state: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let (serve, sock) = serve_socket(dir, &["--log-level", "info"]);
        Daemon {
            serve,
            sock,
            state: dir.join("state"),
        }
    }

    fn sock(&self) -> &str {
        self.sock.to_str().expect("a UTF-8 temp path")
    }

    /// `tether SUB --socket SOCK ARGS`, stdin from /dev/null, started.
    fn spawn(&self, sub: &str, args: &[&str]) -> Proc {
        let mut cmd = tether([sub, "--socket", self.sock()]);
        cmd.args(args).stdin(Stdio::null());
        Proc::spawn(&mut cmd)
    }

    /// `tether SUB --socket SOCK ARGS`, stdin from /dev/null, waited for.
    fn cmd(&self, sub: &str, args: &[&str]) -> Finished {
        self.spawn(sub, args).finish(TIMEOUT)
    }

    /// `tether shell --socket SOCK ARGS` with piped stdin, started.
    fn spawn_shell(&self, args: &[&str]) -> Proc {
        let mut cmd = tether(["shell", "--socket", self.sock()]);
        cmd.args(args).stdin(Stdio::piped());
        Proc::spawn(&mut cmd)
    }

    /// `tether shell --socket SOCK ARGS` fed `input` (then its end), waited for.
    fn shell(&self, args: &[&str], input: &[u8]) -> Finished {
        let mut p = self.spawn_shell(args);
        let mut stdin = p.stdin();
        stdin.write_all(input).unwrap();
        drop(stdin);
        p.finish(TIMEOUT)
    }

    /// The command line that opens a shell here, for typing into a terminal.
    fn shell_cmdline(&self, args: &str) -> String {
        format!(
            "{} shell --socket {} {args}",
            shell_quote(tether_bin().as_os_str()),
            shell_quote(self.sock.as_os_str())
        )
    }

    /// `tether ps --json [--all]`, one value per build.
    fn ps(&self, all: bool) -> Vec<Value> {
        let args: &[&str] = if all { &["--json", "--all"] } else { &["--json"] };
        let r = self.cmd("ps", args);
        assert_eq!(r.code(), 0, "ps failed: {}", r.stderr_text());
        r.stdout_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    /// The `ps --json --all` line of build `id`.
    fn build(&self, id: &str) -> Option<Value> {
        self.ps(true).into_iter().find(|b| b["build"] == id)
    }

    /// Waits until `ps` shows build `id` in `state`; returns its line.
    fn wait_state(&self, id: &str, state: &str) -> Value {
        let mut last = None;
        let ok = wait_until(TIMEOUT, || {
            last = self.build(id);
            last.as_ref().is_some_and(|b| b["state"] == state)
        });
        assert!(ok, "build {id} never was {state}: {last:?}");
        last.unwrap()
    }

    /// The build directories in the state dir.
    fn build_dirs(&self) -> Vec<PathBuf> {
        subdirs(&self.state.join("instances"))
            .iter()
            .flat_map(|i| subdirs(&i.join("builds")))
            .collect()
    }

    /// The directory of build `id` (`<id>.<random>`).
    fn build_dir(&self, id: &str) -> PathBuf {
        let prefix = format!("{id}.");
        let dirs = self.build_dirs();
        dirs.iter()
            .find(|d| d.file_name().unwrap().to_string_lossy().starts_with(&prefix))
            .unwrap_or_else(|| panic!("no directory for build {id} in {dirs:?}"))
            .clone()
    }

    /// Waits until no build directory is left.
    fn assert_no_build_dirs(&self) {
        assert!(
            wait_until(TIMEOUT, || self.build_dirs().is_empty()),
            "build dirs left: {:?}",
            self.build_dirs()
        );
    }

    fn assert_alive(&mut self) {
        assert!(
            self.serve.child.try_wait().unwrap().is_none(),
            "the daemon died; stderr:\n{}",
            self.serve.stderr.text()
        );
    }
}

// ---------------------------------------------------------------------------------------
// A terminal: tmux
// ---------------------------------------------------------------------------------------

/// The prompt of the bash in the pane.
const OUTER: &str = "out$";
/// The prompt set in the remote shell.
const INNER: &str = "in>";

/// A tmux server of the test's own, with one 100x30 pane running bash with the prompt
/// `out$ `; killed on drop.
struct Tmux {
    sock: PathBuf,
}

impl Tmux {
    fn start(dir: &Path) -> Tmux {
        let t = Tmux {
            sock: dir.join("tmux.sock"),
        };
        t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "100",
            "-y",
            "30",
            "env PS1='out$ ' HISTFILE=/dev/null bash --norc --noprofile",
        ]);
        t.wait_prompt(OUTER);
        t
    }

    /// Runs `tmux -S SOCK ARGS` and returns its stdout.
    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .args(["-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .env_remove("TMUX_PANE")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` literally, then Enter.
    fn type_line(&self, text: &str) {
        self.type_text(text);
        self.keys(&["Enter"]);
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        // tmux takes an argument that ends with ';' for a command separator.
        assert!(!text.ends_with(';'), "{text:?} must not end with ';'");
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
    }

    /// Presses keys by tmux's names (`Enter`, `C-c`, `Escape`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// The visible screen, wrapped lines joined, trailing blanks cut.
    fn screen(&self) -> Vec<String> {
        self.tmux(&["capture-pane", "-p", "-J", "-t", "t"])
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    /// Waits until `pred` holds for the screen; returns that screen.
    fn wait(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let mut screen = Vec::new();
        let ok = wait_until(TIMEOUT, || {
            screen = self.screen();
            pred(&screen)
        });
        assert!(ok, "the screen never showed {what}; it shows:\n{}", screen.join("\n"));
        screen
    }

    /// Waits until a line of the screen is exactly `line`.
    fn wait_line(&self, line: &str) {
        self.wait(&format!("the line {line:?}"), |s| s.iter().any(|l| l == line));
    }

    /// Waits until the last non-empty line is `prompt` (nothing typed after it).
    fn wait_prompt(&self, prompt: &str) {
        self.wait(&format!("the prompt {prompt:?}"), |s| last_line(s) == prompt);
    }

    /// Types `cmdline` (which runs `tether shell` in the terminal), waits for the remote
    /// shell's prompt and sets it to `in> `.
    fn open_shell(&self, cmdline: &str) {
        self.type_line(cmdline);
        // The remote shell is root's dash: its prompt is `#`.
        self.wait_prompt("#");
        self.type_line("PS1='in> '");
        self.wait_prompt(INNER);
    }

    fn resize(&self, cols: u16, rows: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .arg("kill-server")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The last non-empty line of a screen.
fn last_line(screen: &[String]) -> &str {
    screen.iter().rev().find(|l| !l.is_empty()).map_or("", |l| l.as_str())
}

/// The outer command line that records the pane's terminal settings into
/// `<dir>/before` and `<dir>/after` around `shell`, and its exit code into `<dir>/rc`
/// (written last, by a rename).
fn recorded(dir: &Path, shell: &str) -> String {
    let d = shell_quote(dir.as_os_str());
    format!("stty -a > {d}/before && {shell}; echo $? > {d}/rc.tmp; stty -a > {d}/after; mv {d}/rc.tmp {d}/rc")
}

/// Waits for `<dir>/rc` of [`recorded`]; returns the code and checks that the
/// terminal's settings after the shell are those from before it.
fn recorded_result(dir: &Path) -> i32 {
    let rc = dir.join("rc");
    assert!(wait_until(LONG, || rc.exists()), "the shell client never exited");
    let before = fs::read_to_string(dir.join("before")).unwrap();
    let after = fs::read_to_string(dir.join("after")).unwrap();
    assert!(before.contains("speed"), "stty -a said: {before}");
    assert_eq!(after, before, "the pane's terminal settings changed");
    fs::read_to_string(&rc).unwrap().trim().parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// The live (not zombie) processes whose command line is exactly `argv`.
fn pids_of(argv: &[&str]) -> Vec<i32> {
    pids_where(|args| args == argv)
}

/// The live (not zombie) processes whose command line satisfies `pred`.
fn pids_where(pred: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(&cmdline);
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !cmdline.is_empty() && pred(&args) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
    state.is_some_and(|c| c != 'Z')
}

/// A `sleep` duration of about `base` seconds that no other test process uses, so that
/// the test can find its sleep among all processes.
fn secs(base: u32) -> String {
    format!("{base}.{}", std::process::id())
}

/// Waits until a process runs `argv`; returns its pid.
fn wait_for_process(argv: &[&str]) -> i32 {
    let mut pids = Vec::new();
    assert!(
        wait_until(TIMEOUT, || {
            pids = pids_of(argv);
            !pids.is_empty()
        }),
        "no process {argv:?} started"
    );
    assert_eq!(pids.len(), 1, "more than one {argv:?}: {pids:?}");
    pids[0]
}

fn assert_gone(pid: i32, what: &str, timeout: Duration) {
    assert!(wait_until(timeout, || !alive(pid)), "{what} (pid {pid}) is still there");
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Waits for the hold hint of a `run --hold-on-failure` or `--hold-before`.
fn await_hint(run: &Proc) {
    assert!(
        run.stderr.wait_contains(TIMEOUT, "tether release"),
        "no hold hint; stderr: {}",
        run.stderr.text()
    );
}

// ---------------------------------------------------------------------------------------
// Interactive shells
// ---------------------------------------------------------------------------------------

#[test]
fn typed_commands_run_in_the_shell_with_the_terminals_term() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let tmux = Tmux::start(dir.path());
    tmux.type_line("echo \"pane-term=$TERM\"");
    let screen = tmux.wait("the pane's TERM", |s| s.iter().any(|l| l.starts_with("pane-term=")));
    let term = screen
        .iter()
        .find_map(|l| l.strip_prefix("pane-term="))
        .unwrap()
        .to_owned();
    assert!(!term.is_empty(), "the pane has a TERM");

    tmux.open_shell(&d.shell_cmdline(""));
    tmux.type_line("echo $((6*7))");
    tmux.wait_line("42");
    tmux.type_line("echo \"in-term=$TERM\"");
    tmux.wait_line(&format!("in-term={term}"));
    tmux.type_line("exit");
    tmux.wait_prompt(OUTER);
    tmux.type_line("echo \"exit=$?\"");
    tmux.wait_line("exit=0");
}

#[test]
fn resizing_the_terminal_resizes_the_shells_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let tmux = Tmux::start(dir.path());
    tmux.open_shell(&d.shell_cmdline(""));
    tmux.type_line("stty size");
    tmux.wait_line("30 100");

    // The new size reaches the remote terminal asynchronously (SIGWINCH to the client,
    // then a message): the remote shell waits for it to change.
    tmux.type_line("while [ \"$(stty size)\" = '30 100' ]; do sleep 0.05; done; echo \"now=$(stty size)\"");
    tmux.resize(120, 40);
    tmux.wait_line("now=40 120");
    tmux.wait_prompt(INNER);
    tmux.type_line("while [ \"$(stty size)\" = '40 120' ]; do sleep 0.05; done; echo \"then=$(stty size)\"");
    tmux.resize(80, 24);
    tmux.wait_line("then=24 80");
    tmux.type_line("exit");
    tmux.wait_prompt(OUTER);
}

#[test]
fn ctrl_c_interrupts_the_shells_job_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let (bg_secs, job_secs) = (secs(7303), secs(7304));
    let bg = d.cmd("run", &["--detach", "--id", "bg", "--", "sleep", &bg_secs]);
    assert_eq!(bg.code(), 0, "{}", bg.stderr_text());
    let bg_pid = wait_for_process(&["sleep", &bg_secs]);

    let tmux = Tmux::start(dir.path());
    tmux.open_shell(&d.shell_cmdline(""));
    tmux.type_line(&format!("sleep {job_secs}"));
    let job = wait_for_process(&["sleep", &job_secs]);
    tmux.keys(&["C-c"]);
    assert_gone(job, "the interrupted sleep", TIMEOUT);
    tmux.wait_prompt(INNER);
    tmux.type_line("echo still-$((1+1))");
    tmux.wait_line("still-2");

    d.assert_alive();
    assert!(alive(bg_pid), "the build next to the shell was hit");
    assert_eq!(d.wait_state("bg", "running")["state"], "running");
    tmux.type_line("exit");
    tmux.wait_prompt(OUTER);

    assert_eq!(d.cmd("cancel", &["bg"]).code(), 0);
    d.assert_no_build_dirs();
}

#[test]
fn a_full_screen_editor_draws_saves_and_gives_the_prompt_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let tmux = Tmux::start(dir.path());
    let file = dir.path().join("edited.txt");
    tmux.open_shell(&d.shell_cmdline(""));
    tmux.type_line(&format!("busybox vi {}", shell_quote(file.as_os_str())));
    tmux.wait("vi's empty-line markers", |s| {
        s.iter().filter(|l| *l == "~").count() >= 20
    });
    tmux.keys(&["i"]);
    tmux.type_text("hello from vi");
    tmux.wait_line("hello from vi");
    tmux.keys(&["Escape"]);
    // Escape must be read on its own, not as the start of a key sequence with ':'.
    tmux.wait("vi back in command mode", |s| last_line(s).starts_with("- "));
    tmux.type_line(":wq");
    assert!(
        wait_until(TIMEOUT, || fs::read_to_string(&file)
            .is_ok_and(|t| t == "hello from vi\n")),
        "the file was not written: {:?}",
        fs::read_to_string(&file)
    );
    let screen = tmux.wait("the prompt after vi", |s| last_line(s) == INNER);
    assert!(
        !screen.iter().any(|l| l == "~"),
        "vi's screen is left:\n{}",
        screen.join("\n")
    );
    tmux.type_line("echo vi-$((1+2))");
    tmux.wait_line("vi-3");
    tmux.type_line("exit");
    tmux.wait_prompt(OUTER);
}

#[test]
fn the_terminal_is_restored_when_the_shell_exits() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let tmux = Tmux::start(dir.path());
    tmux.open_shell(&recorded(dir.path(), &d.shell_cmdline("")));
    // Settings of the remote terminal stay there.
    tmux.type_line("stty -echo -isig");
    tmux.wait_prompt(INNER);
    tmux.type_line("exit 7");
    assert_eq!(recorded_result(dir.path()), 7, "the shell's exit code");
    // Without the remote echo, no newline followed the remote prompt.
    tmux.wait("the prompt", |s| last_line(s).ends_with(OUTER));
    tmux.type_line("echo ok-$((2+3))");
    tmux.wait_line("ok-5");
}

#[test]
fn when_the_daemon_dies_the_shell_exits_125_and_the_terminal_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let tmux = Tmux::start(dir.path());
    tmux.open_shell(&recorded(dir.path(), &d.shell_cmdline("")));
    // Once `started-2` shows, the output before the daemon's death is all on screen.
    let job_secs = secs(7305);
    tmux.type_line(&format!("echo started-$((1+1)) && sleep {job_secs}"));
    tmux.wait_line("started-2");
    let job = wait_for_process(&["sleep", &job_secs]);
    d.serve.child.kill().unwrap();
    d.serve.child.wait().unwrap();

    assert_eq!(recorded_result(dir.path()), 125);
    let screen = tmux.wait("the prompt", |s| last_line(s) == OUTER);
    assert!(
        screen.iter().any(|l| l.starts_with("tether: ") && l.contains("lost")),
        "no error line:\n{}",
        screen.join("\n")
    );
    // The remote terminal went with the daemon, and its hang-up ended the job.
    assert_gone(job, "the shell's job", TIMEOUT);
    tmux.type_line("echo ok-$((2+4))");
    tmux.wait_line("ok-6");
}

#[test]
fn sigterm_to_the_client_hangs_the_shell_up_and_restores_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let tmux = Tmux::start(dir.path());
    tmux.open_shell(&recorded(dir.path(), &d.shell_cmdline("")));
    let job_secs = secs(7306);
    tmux.type_line(&format!("sleep {job_secs}"));
    let job = wait_for_process(&["sleep", &job_secs]);
    let bin = tether_bin().to_string_lossy().into_owned();
    let sock = d.sock().to_owned();
    let clients =
        pids_where(|a| a.first() == Some(&bin) && a.get(1).is_some_and(|s| s == "shell") && a.contains(&sock));
    assert_eq!(clients.len(), 1, "the shell client: {clients:?}");
    signal(clients[0] as u32, Signal::SIGTERM);

    assert_eq!(
        recorded_result(dir.path()),
        129,
        "the shell ended by its hang-up (SIGHUP)"
    );
    assert_gone(job, "the shell's job", TIMEOUT);
    tmux.wait_prompt(OUTER);
    tmux.type_line("echo ok-$((3+4))");
    tmux.wait_line("ok-7");
    d.assert_alive();
}

#[test]
fn a_shell_in_a_running_build_has_its_dir_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.cmd(
        "run",
        &[
            "--detach",
            "--id",
            "envb",
            "-e",
            "FOO=bar",
            "--workdir",
            "sub",
            "--sh",
            "echo from-the-build > made.txt; exec sleep 7307",
        ],
    );
    assert_eq!(
        (r.code(), r.stdout_text()),
        (0, "envb\n".to_owned()),
        "{}",
        r.stderr_text()
    );
    let workdir = d.build_dir("envb").join("work/sub");
    assert!(
        wait_until(TIMEOUT, || workdir.join("made.txt").exists()),
        "the build wrote nothing"
    );

    let s = d.shell(
        &["--build", "envb"],
        b"pwd; echo \"FOO=$FOO\"; echo \"ID=$TETHER_BUILD_ID\"; cat made.txt\n",
    );
    assert_eq!(s.code(), 0, "{}", s.stderr_text());
    let out = s.stdout_text();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].ends_with("/work/sub"), "{out}");
    assert_eq!(
        fs::canonicalize(lines[0]).unwrap(),
        fs::canonicalize(&workdir).unwrap(),
        "the build's own directory"
    );
    assert_eq!(&lines[1..], ["FOO=bar", "ID=envb", "from-the-build"]);

    assert_eq!(d.wait_state("envb", "running")["state"], "running");
    assert_eq!(d.cmd("cancel", &["envb"]).code(), 0);
    d.assert_no_build_dirs();
}

#[test]
fn releasing_a_build_hangs_up_the_shell_open_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let run = d.spawn("run", &["--id", "rel", "--hold-on-failure", "--sh", "exit 3"]);
    await_hint(&run);
    let build_dir = d.build_dir("rel");

    let tmux = Tmux::start(dir.path());
    tmux.open_shell(&format!("{}; echo \"shell-exit=$?\"", d.shell_cmdline("--build rel")));
    let job_secs = secs(7313);
    tmux.type_line(&format!("sleep {job_secs}"));
    let job = wait_for_process(&["sleep", &job_secs]);
    let rel = d.cmd("release", &["--exit-code", "5", "rel"]);
    assert_eq!(rel.code(), 0, "{}", rel.stderr_text());

    let r = run.finish(TIMEOUT);
    assert_eq!(r.code(), 5, "the released status; stderr: {}", r.stderr_text());
    assert!(!build_dir.exists(), "the build's directory is removed");
    assert_gone(job, "the shell's job", TIMEOUT);
    tmux.wait_line("shell-exit=129");
    tmux.wait_prompt(OUTER);
    d.assert_no_build_dirs();
}

// ---------------------------------------------------------------------------------------
// Hold on failure
// ---------------------------------------------------------------------------------------

#[test]
fn a_failed_build_is_held_for_a_look_inside_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut run = d.spawn(
        "run",
        &[
            "--id",
            "hof",
            "--hold-on-failure",
            "--sh",
            "echo evidence > clue.txt; exit 3",
        ],
    );
    await_hint(&run);
    let hint = run.stderr.text();
    assert!(
        hint.contains("tether shell") && hint.contains("--build hof"),
        "the hint: {hint}"
    );
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "run waits while the build is held"
    );
    let held = d.wait_state("hof", "held");
    assert_eq!(held["exit_code"], 3, "{held}");

    let s = d.shell(&["--build", "hof", "--", "cat", "clue.txt"], b"");
    assert_eq!(
        (s.code(), s.stdout_text()),
        (0, "evidence\n".to_owned()),
        "{}",
        s.stderr_text()
    );
    assert!(run.child.try_wait().unwrap().is_none(), "still held after the shell");

    let rel = d.cmd("release", &["--success", "hof"]);
    assert_eq!(rel.code(), 0, "{}", rel.stderr_text());
    let r = run.finish(TIMEOUT);
    assert_eq!(r.code(), 0, "released as a success; stderr: {}", r.stderr_text());
    assert!(d.build_dirs().is_empty(), "dirs left: {:?}", d.build_dirs());
    let rec = d.build("hof").expect("the record is retained");
    assert_eq!(
        (rec["state"].as_str(), rec["exit_code"].as_i64()),
        (Some("released"), Some(0))
    );
}

#[test]
fn a_hold_that_runs_out_ends_the_run_with_the_original_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let run = d.spawn("run", &["--id", "short", "--hold-on-failure=2s", "--sh", "exit 3"]);
    await_hint(&run);
    let hinted = Instant::now();
    let until = d.wait_state("short", "held")["held_until_ms"].as_u64().unwrap();
    let r = run.finish(LONG);
    let (ended, waited) = (now_ms(), hinted.elapsed());
    assert_eq!(r.code(), 3, "stderr: {}", r.stderr_text());
    assert!(ended + 50 >= until, "ended at {ended}, before the hold's end {until}");
    assert!(
        waited >= Duration::from_millis(1500),
        "exited {waited:?} after the hint"
    );
    d.assert_no_build_dirs();
    assert_eq!(d.build("short").unwrap()["state"], "exited");
}

#[test]
fn a_build_that_succeeds_is_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let started = Instant::now();
    let r = d.cmd("run", &["--hold-on-failure", "--sh", "echo fine"]);
    assert_eq!(
        (r.code(), r.stdout_text()),
        (0, "fine\n".to_owned()),
        "{}",
        r.stderr_text()
    );
    assert!(!r.stderr_text().contains("release"), "a hint: {}", r.stderr_text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    d.assert_no_build_dirs();
}

#[test]
fn release_with_an_exit_code_decides_the_runs_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let run = d.spawn("run", &["--id", "nine", "--hold-on-failure", "--sh", "exit 3"]);
    await_hint(&run);
    let rel = d.cmd("release", &["--exit-code", "9", "nine"]);
    assert_eq!(rel.code(), 0, "{}", rel.stderr_text());
    let r = run.finish(TIMEOUT);
    assert_eq!(r.code(), 9, "stderr: {}", r.stderr_text());
    d.assert_no_build_dirs();
    // Nothing is held any more.
    let again = d.cmd("release", &["nine"]);
    assert_eq!(again.code(), 125, "{}", again.stderr_text());
}

#[test]
fn a_timed_out_build_is_held_and_released_as_a_success() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let run = d.spawn(
        "run",
        &[
            "--id",
            "slow",
            "--timeout",
            "1s",
            "--hold-on-failure",
            "--",
            "sleep",
            "7320",
        ],
    );
    await_hint(&run);
    let held = d.wait_state("slow", "held");
    assert_eq!(held["exit_code"], 124, "{held}");
    let rel = d.cmd("release", &["--success", "slow"]);
    assert_eq!(rel.code(), 0, "{}", rel.stderr_text());
    let r = run.finish(TIMEOUT);
    assert_eq!(
        r.code(),
        0,
        "released as a success, not a timeout; stderr: {}",
        r.stderr_text()
    );
    d.assert_no_build_dirs();
    assert_eq!(d.build("slow").unwrap()["state"], "released");
}

#[test]
fn the_hint_of_a_held_timed_out_build_gives_the_runs_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let run = d.spawn(
        "run",
        &[
            "--id",
            "slow",
            "--timeout",
            "1s",
            "--hold-on-failure=1s",
            "--",
            "sleep",
            "7321",
        ],
    );
    await_hint(&run);
    let r = run.finish(LONG);
    assert_eq!(r.code(), 124, "stderr: {}", r.stderr_text());
    // `tether ps` and the run's exit say 124 for a timeout; so must the hint.
    assert!(
        r.stderr_text().contains("failed (exit 124)"),
        "the hint: {}",
        r.stderr_text()
    );
    d.assert_no_build_dirs();
}

// ---------------------------------------------------------------------------------------
// Hold before the command
// ---------------------------------------------------------------------------------------

#[test]
fn a_build_held_before_its_command_can_be_prepared_by_hand_then_started() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut run = d.spawn("run", &["--id", "hb", "--hold-before", "--sh", "cat planted.txt"]);
    await_hint(&run);
    assert!(
        run.stderr.text().contains("tether shell --socket"),
        "{}",
        run.stderr.text()
    );
    let held = d.wait_state("hb", "held");
    assert_eq!(held["held_before_command"], true, "{held}");

    let s = d.shell(
        &["--build", "hb", "--", "sh", "-c", "echo planted-by-hand > planted.txt"],
        b"",
    );
    assert_eq!(s.code(), 0, "{}", s.stderr_text());

    // A build whose command never ran has no status to choose.
    let refused = d.cmd("release", &["--exit-code", "3", "hb"]);
    assert_eq!(refused.code(), 125, "{}", refused.stderr_text());
    assert!(
        refused.stderr_text().starts_with("tether: "),
        "{}",
        refused.stderr_text()
    );
    assert_eq!(d.wait_state("hb", "held")["held_before_command"], true);
    assert!(run.child.try_wait().unwrap().is_none(), "the run still waits");

    let rel = d.cmd("release", &["hb"]);
    assert_eq!(rel.code(), 0, "{}", rel.stderr_text());
    let r = run.finish(TIMEOUT);
    assert_eq!(
        (r.code(), r.stdout_text()),
        (0, "planted-by-hand\n".to_owned()),
        "stderr: {}",
        r.stderr_text()
    );
    d.assert_no_build_dirs();
}

#[test]
fn a_shell_in_a_build_held_before_its_command_opens_in_its_workdir() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let run = d.spawn(
        "run",
        &[
            "--id",
            "hbw",
            "--hold-before",
            "--workdir",
            "sub",
            "-e",
            "FOO=bar",
            "--sh",
            "cat planted.txt",
        ],
    );
    await_hint(&run);
    let s = d.shell(
        &["--build", "hbw"],
        b"echo \"FOO=$FOO\"; pwd; echo planted-by-hand > planted.txt\n",
    );
    assert_eq!(s.code(), 0, "{}", s.stderr_text());
    let out = s.stdout_text();
    let rel = d.cmd("release", &["hbw"]);
    assert_eq!(rel.code(), 0, "{}", rel.stderr_text());
    let r = run.finish(TIMEOUT);
    assert!(out.starts_with("FOO=bar\n"), "{out}");
    // Where the command will run (PROTOCOL.md §19.1: "in its RunSpec.workdir").
    assert!(out.trim_end().ends_with("/work/sub"), "the shell's pwd: {out}");
    assert_eq!(
        (r.code(), r.stdout_text()),
        (0, "planted-by-hand\n".to_owned()),
        "the command sees the planted file; stderr: {}",
        r.stderr_text()
    );
    d.assert_no_build_dirs();
}

#[test]
fn cancelling_a_build_held_before_its_command_never_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let marker = dir.path().join("ran");
    let script = format!("touch {}", shell_quote(marker.as_os_str()));
    let run = d.spawn("run", &["--id", "never", "--hold-before", "--sh", &script]);
    await_hint(&run);
    d.wait_state("never", "held");
    let c = d.cmd("cancel", &["never"]);
    assert_eq!(c.code(), 0, "{}", c.stderr_text());
    let r = run.finish(TIMEOUT);
    assert_ne!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert!(r.stderr_text().contains("cancelled"), "{}", r.stderr_text());
    assert!(!marker.exists(), "the command ran");
    d.assert_no_build_dirs();
}

// ---------------------------------------------------------------------------------------
// Pipes
// ---------------------------------------------------------------------------------------

#[test]
fn a_piped_shell_reads_its_script_and_exits_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.shell(&[], b"echo a\nexit 4\n");
    assert_eq!(
        (r.code(), r.stdout_text()),
        (4, "a\n".to_owned()),
        "{}",
        r.stderr_text()
    );

    let r = d.shell(&["--", "sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(r.code(), 143, "128 + SIGTERM; stderr: {}", r.stderr_text());
}

#[test]
fn a_piped_program_round_trips_stdin_and_keeps_stderr_apart() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let data = integration_tests::pseudo_random(3 << 20, 17);
    let input = dir.path().join("input.bin");
    fs::write(&input, &data).unwrap();
    let mut cmd = tether(["shell", "--socket", d.sock(), "--", "sh", "-c", "cat; echo done >&2"]);
    cmd.stdin(fs::File::open(&input).unwrap());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    assert!(
        r.stdout == data,
        "stdout differs: {} bytes of {}",
        r.stdout.len(),
        data.len()
    );
    assert_eq!(r.stderr_text(), "done\n");
}

#[test]
fn a_killed_client_takes_its_shells_processes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let (bg_secs, fg_secs) = (secs(7310), secs(7311));
    let script = format!("sleep {bg_secs} & sleep {fg_secs}");
    let mut p = d.spawn_shell(&["--", "sh", "-c", &script]);
    let _input = p.stdin();
    let a = wait_for_process(&["sleep", &bg_secs]);
    let b = wait_for_process(&["sleep", &fg_secs]);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert_gone(a, "the background job", LONG);
    assert_gone(b, "the foreground job", LONG);

    // A program that ignores SIGHUP is killed after the grace period.
    let stubborn_secs = secs(7312);
    let script = format!("trap '' HUP; sleep {stubborn_secs}");
    let mut p = d.spawn_shell(&["--", "sh", "-c", &script]);
    let _input = p.stdin();
    let stubborn = wait_for_process(&["sleep", &stubborn_secs]);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert_gone(stubborn, "the job that ignores SIGHUP", LONG);
    d.assert_alive();
}

#[test]
fn several_shells_at_once_through_the_socket_and_through_via() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let bg = d.cmd("run", &["--detach", "--id", "bg", "--", "sleep", "7314"]);
    assert_eq!(bg.code(), 0, "{}", bg.stderr_text());

    let spawn = |args: &[&str]| {
        let mut cmd = tether(["shell"]);
        cmd.args(args).stdin(Stdio::piped());
        Proc::spawn(&mut cmd)
    };
    let dial = format!(
        "exec {} dial-stdio --socket {}",
        shell_quote(tether_bin().as_os_str()),
        shell_quote(d.sock.as_os_str())
    );
    let own_state = dir.path().join("own-state");
    let mut a = spawn(&["--socket", d.sock()]);
    let mut b = spawn(&["--via", &dial, "--build", "bg"]);
    let mut c = spawn(&["--via", &via_serve(&own_state)]);
    let (mut ia, mut ib, mut ic) = (a.stdin(), b.stdin(), c.stdin());
    let ask = |p: &Proc, input: &mut std::process::ChildStdin, line: &str, answer: &str| {
        writeln!(input, "{line}").unwrap();
        assert!(
            p.stdout.wait_contains(TIMEOUT, answer),
            "no {answer:?}; stdout: {:?}, stderr: {}",
            p.stdout.text(),
            p.stderr.text()
        );
    };
    ask(&a, &mut ia, "echo a-$((1+1))", "a-2\n");
    ask(&b, &mut ib, "echo \"b-$TETHER_BUILD_ID\"", "b-bg\n");
    ask(&c, &mut ic, "echo c-$((3+3))", "c-6\n");
    ask(&a, &mut ia, "echo a-again-$((2+2))", "a-again-4\n");
    ask(&b, &mut ib, "echo b-again-$((2+3))", "b-again-5\n");
    writeln!(ia, "exit 3").unwrap();
    writeln!(ib, "exit 4").unwrap();
    drop((ia, ib, ic));
    assert_eq!(a.finish(TIMEOUT).code(), 3);
    assert_eq!(b.finish(TIMEOUT).code(), 4);
    assert_eq!(c.finish(TIMEOUT).code(), 0, "the end of its stdin ends the shell");

    assert_eq!(d.wait_state("bg", "running")["state"], "running");
    assert_eq!(d.cmd("cancel", &["bg"]).code(), 0);
    d.assert_no_build_dirs();
    assert!(
        wait_until(TIMEOUT, || subdirs(&own_state.join("instances")).is_empty()),
        "the --via daemon left {:?}",
        subdirs(&own_state.join("instances"))
    );
}

#[test]
fn shells_that_cannot_open_say_why_with_the_usual_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.shell(&["--build", "nosuchbuild"], b"");
    assert_eq!(r.code(), 125);
    assert!(
        r.stderr_text().starts_with("tether: ") && r.stderr_text().contains("nosuchbuild"),
        "{}",
        r.stderr_text()
    );

    let r = d.shell(&["--", "nosuchprog"], b"");
    assert_eq!(r.code(), 127);
    assert!(r.stderr_text().contains("nosuchprog"), "{}", r.stderr_text());
    let r = d.shell(&["--shell", "/no/such/shell"], b"");
    assert_eq!(r.code(), 127, "{}", r.stderr_text());
    let plain = dir.path().join("not-executable");
    fs::write(&plain, "echo hi\n").unwrap();
    let r = d.shell(&["--", plain.to_str().unwrap()], b"");
    assert_eq!(r.code(), 126, "{}", r.stderr_text());

    // A finished build has no directory to open a shell in.
    assert_eq!(d.cmd("run", &["--id", "over", "--", "true"]).code(), 0);
    let r = d.shell(&["--build", "over"], b"");
    assert_eq!(r.code(), 125);
    assert!(r.stderr_text().contains("finished"), "{}", r.stderr_text());
    d.assert_no_build_dirs();
}
