//! Shared helpers for the end-to-end tests in `tests/`: locating the real `tether`
//! binary, running processes with bounded waits, collecting their output while they run,
//! and speaking the framed protocol to `tether serve` directly.
//!
//! Nothing here mocks tether: every helper drives the real binary through real pipes and
//! signals. Waits are bounded by deadlines and end on events (output seen, exit, EOF);
//! polling is used only for process and file states that have no event to wait on.

pub mod container;
pub mod http;
pub mod jenkins;
pub mod k8s;
pub mod pod;
pub mod registry;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tether_protocol::{
    decode, encode_frame, ClientMessage, Corruption, DaemonMessage, Decoded, FrameDecoder, Hello, PREAMBLE,
    PROTOCOL_VERSION,
};

/// How long any single wait in a test may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

pub(crate) fn workspace_root() -> PathBuf {
    // integration-tests/ is a direct member of the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests has a parent directory")
        .to_path_buf()
}

/// The `tether` binary under test: `$TETHER_BIN` if set, else `debug/tether` in the
/// workspace's target dir (`$CARGO_TARGET_DIR` if set). When that does not exist, or is
/// older than the sources it is built from (`cargo test` does not rebuild it), it is
/// built once per test process with `cargo build -p tether --bin tether`.
pub fn tether_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TETHER_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "TETHER_BIN={} is not a file", p.display());
            return p;
        }
        let bin = target_dir().join("debug").join("tether");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "tether", "--bin", "tether"]);
        build_if_stale(&bin, build, "cargo build -p tether --bin tether");
        bin
    })
    .clone()
}

/// The workspace's target dir (`$CARGO_TARGET_DIR` if set).
pub(crate) fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => root.join(t), // join keeps an absolute path as it is
        None => root.join("target"),
    }
}

/// Runs `build` (in the workspace root) when `bin` is missing or older than the sources
/// of the `tether` binary, and checks that it produced `bin`.
pub(crate) fn build_if_stale(bin: &Path, mut build: Command, what: &str) {
    let root = workspace_root();
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let stale = match built {
        None => true,
        Some(t) => newest_source(&root).is_some_and(|s| s > t),
    };
    if !stale {
        return;
    }
    eprintln!("{} is missing or stale; running {what}", bin.display());
    let st = build
        .current_dir(&root)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(st.success(), "{what} failed ({st})");
    assert!(bin.is_file(), "{what} succeeded but {} does not exist", bin.display());
}

/// The newest modification time of the sources of the `tether` binary.
fn newest_source(root: &Path) -> Option<std::time::SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<std::time::SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                walk(&e.path(), newest);
            } else if let Ok(t) = meta.modified() {
                *newest = (*newest).max(Some(t));
            }
        }
    }
    let mut newest = None;
    for crate_dir in ["agent", "executor", "protocol"] {
        walk(&root.join(crate_dir).join("src"), &mut newest);
    }
    let manifests = [
        "Cargo.toml",
        "Cargo.lock",
        "agent/Cargo.toml",
        "executor/Cargo.toml",
        "protocol/Cargo.toml",
    ];
    for file in manifests {
        if let Ok(t) = std::fs::metadata(root.join(file)).and_then(|m| m.modified()) {
            newest = newest.max(Some(t));
        }
    }
    newest
}

/// A `tether` command with the given arguments.
pub fn tether<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(tether_bin());
    cmd.args(args);
    cmd
}

/// The `--via` command that starts a daemon on `state_dir` over a plain pipe (logging
/// only warnings, so that its stderr, shared with the client's, stays quiet).
pub fn via_serve(state_dir: &Path) -> String {
    format!(
        "exec {} serve --exit-on-eof --log-level warn --state-dir {}",
        shell_quote(tether_bin().as_os_str()),
        shell_quote(state_dir.as_os_str())
    )
}

/// Starts `tether serve --socket <dir>/tether.sock` with its state in `<dir>/state` and
/// `args` (its stdin kept open by the returned [`Serve`]), and waits until the socket
/// accepts connections: connectable, not merely present (a stale file may be there
/// before the daemon).
pub fn serve_socket(dir: &Path, args: &[&str]) -> (Serve, PathBuf) {
    let sock = dir.join("tether.sock");
    let sock_arg = sock.to_str().expect("a UTF-8 temp path").to_owned();
    let mut all = vec!["--socket", sock_arg.as_str()];
    all.extend_from_slice(args);
    let serve = Serve::with_state_dir(&dir.join("state"), &all);
    assert!(
        wait_until(Duration::from_secs(60), || std::os::unix::net::UnixStream::connect(
            &sock
        )
        .is_ok()),
        "the socket never answered; daemon stderr: {}",
        serve.stderr.text()
    );
    (serve, sock)
}

/// `tether run --socket SOCK ARGS` with stdin from /dev/null, not started yet.
pub fn run_cmd(sock: &Path, args: &[&str]) -> Command {
    let mut cmd = tether(["run", "--socket"]);
    cmd.arg(sock).args(args).stdin(Stdio::null());
    cmd
}

/// Runs `tether run --socket SOCK ARGS` (stdin from /dev/null) and waits for it.
pub fn run_on(sock: &Path, args: &[&str]) -> Finished {
    Proc::spawn(&mut run_cmd(sock, args)).finish(TIMEOUT)
}

/// Quotes a string for `sh`.
pub fn shell_quote(s: &OsStr) -> String {
    format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True once no process (not even a zombie) has this pid.
pub fn pid_gone(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH)
}

/// Sends `sig` to one process.
pub fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig:?}): {e}"));
}

/// The exit code of a process that exited normally (a test failure otherwise).
pub fn code(st: ExitStatus) -> i32 {
    st.code()
        .unwrap_or_else(|| panic!("expected an exit code, the process ended with {st}"))
}

// ---------------------------------------------------------------------------------------
// Output collection
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    eof: bool,
}

/// The bytes of one stream of a child, collected by a thread while it runs.
#[derive(Clone, Default)]
pub struct Collector {
    inner: Arc<(Mutex<Buf>, Condvar)>,
}

impl Collector {
    /// Starts a thread that reads `src` to its end.
    pub fn spawn(mut src: impl Read + Send + 'static) -> Collector {
        let c = Collector::default();
        let inner = Arc::clone(&c.inner);
        std::thread::spawn(move || {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match src.read(&mut chunk) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let (lock, cv) = &*inner;
                let mut b = lock.lock().unwrap();
                if n == 0 {
                    b.eof = true;
                    cv.notify_all();
                    return;
                }
                b.data.extend_from_slice(&chunk[..n]);
                cv.notify_all();
            }
        });
        c
    }

    /// Everything read so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.inner.0.lock().unwrap().data.clone()
    }

    /// Everything read so far, as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Waits until `pred` holds for the bytes read so far; false at EOF or timeout.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut b = lock.lock().unwrap();
        loop {
            if pred(&b.data) {
                return true;
            }
            let now = Instant::now();
            if b.eof || now >= deadline {
                return false;
            }
            b = cv.wait_timeout(b, deadline - now).unwrap().0;
        }
    }

    /// Waits until the text read so far contains `needle`.
    pub fn wait_contains(&self, timeout: Duration, needle: &str) -> bool {
        let needle = needle.as_bytes();
        self.wait_for(timeout, |d| d.windows(needle.len()).any(|w| w == needle))
    }

    /// Waits for EOF; returns whether it came in time.
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut b = lock.lock().unwrap();
        while !b.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            b = cv.wait_timeout(b, deadline - now).unwrap().0;
        }
        true
    }
}

/// A running child whose stdout and stderr (when piped) are collected. Killed (SIGKILL)
/// and reaped on drop if it still runs, so a failing test leaves nothing behind.
pub struct Proc {
    pub child: Child,
    pub stdout: Collector,
    pub stderr: Collector,
}

/// What a finished [`Proc`] produced.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn code(&self) -> i32 {
        code(self.status)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr piped (and collected); stdin is left as the
    /// caller set it (`/dev/null` unless set).
    pub fn spawn(cmd: &mut Command) -> Proc {
        Self::spawn_with(cmd, true)
    }

    /// Like [`Proc::spawn`]; with `pipe_stdout` false the caller set stdout itself.
    pub fn spawn_with(cmd: &mut Command, pipe_stdout: bool) -> Proc {
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        }
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdout = match child.stdout.take() {
            Some(out) => Collector::spawn(out),
            None => {
                let c = Collector::default();
                c.inner.0.lock().unwrap().eof = true;
                c
            }
        };
        let stderr = Collector::spawn(child.stderr.take().expect("stderr is piped"));
        Proc { child, stdout, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdin, when it was piped.
    pub fn stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("stdin was piped and not taken yet")
    }

    /// Waits (at most `timeout`) for the child to exit; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Waits for the exit (a test failure after `timeout`) and for the ends of its
    /// output streams (briefly: a process the child left behind may hold them).
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let Some(status) = self.wait_timeout(timeout) else {
            panic!(
                "{} still running after {timeout:?}\nstdout: {}\nstderr: {}",
                self.child.id(),
                self.stdout.text(),
                self.stderr.text()
            );
        };
        self.stdout.wait_eof(Duration::from_secs(5));
        self.stderr.wait_eof(Duration::from_secs(5));
        Finished {
            status,
            stdout: self.stdout.bytes(),
            stderr: self.stderr.bytes(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `tether run ARGS` with stdin from /dev/null and waits for it.
pub fn run(args: &[&str]) -> Finished {
    let mut cmd = tether(["run"]);
    cmd.args(args).stdin(Stdio::null());
    Proc::spawn(&mut cmd).finish(TIMEOUT)
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), the same for the same seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Decodes standard base64 (with padding), as `tether run --json` writes `data_base64`.
pub fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    }
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for group in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in group.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..group.len()]);
    }
    out
}

/// The directories directly inside `dir` (empty if `dir` does not exist).
pub fn subdirs(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Speaking the protocol to `tether serve`
// ---------------------------------------------------------------------------------------

/// What the test read from the daemon's stdout.
#[derive(Debug)]
pub enum Event {
    Preamble,
    Message(DaemonMessage),
    Corrupt(Corruption),
    Undecodable(String),
    Eof,
}

/// Decodes what a daemon writes, on a thread, into events (ending with `Eof`).
pub fn decode_events(mut out: impl Read + Send + 'static) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut dec = FrameDecoder::new();
        loop {
            let n = match out.read(dec.read_buf()) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Event::Eof);
                    return;
                }
                Ok(n) => n,
            };
            dec.commit(n);
            while let Some(item) = dec.decode() {
                let ev = match item {
                    Decoded::Preamble => Event::Preamble,
                    Decoded::Frame(p) => match decode::<DaemonMessage>(p) {
                        Ok(m) => Event::Message(m),
                        Err(e) => Event::Undecodable(e.to_string()),
                    },
                    Decoded::Corrupt(c) => Event::Corrupt(c),
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// A `tether serve` child driven through the protocol by the test.
pub struct Serve {
    pub child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Event>,
    pub stderr: Collector,
}

impl Serve {
    /// Starts `tether serve ARGS` with piped stdin, stdout (decoded by a thread) and stderr.
    pub fn spawn(args: &[&OsStr]) -> Serve {
        let mut cmd = tether(["serve"]);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot spawn tether serve");
        let out = child.stdout.take().unwrap();
        let stderr = Collector::spawn(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let events = decode_events(out);
        Serve {
            child,
            stdin,
            events,
            stderr,
        }
    }

    /// Starts `tether serve --state-dir DIR` plus `extra` arguments.
    pub fn with_state_dir(dir: &Path, extra: &[&str]) -> Serve {
        let mut args: Vec<&OsStr> = vec![OsStr::new("--state-dir"), dir.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        Serve::spawn(&args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the daemon's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits (at most `timeout`) for the daemon to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }
}

/// A test's end of a daemon's frame stream (a `tether serve` child, a container's
/// stdio): the reading and handshake helpers every such end shares.
pub trait DaemonLink {
    /// Writes raw bytes to the daemon.
    fn send_raw(&mut self, bytes: &[u8]);

    /// The next item from the daemon (a test failure after `TIMEOUT`).
    fn next_event(&mut self) -> Event;

    /// What the daemon wrote to stderr so far, for failure messages.
    fn stderr_text(&self) -> String;

    /// Sees every message [`DaemonLink::next_message`] returns (to record it, answer a
    /// ping, ...); nothing by default.
    fn seen(&mut self, _msg: &DaemonMessage) {}

    /// Writes one framed message.
    fn send(&mut self, msg: &ClientMessage) {
        self.send_raw(&frame(msg));
    }

    /// The next message of the session, skipping preambles and the stdin stream's
    /// `Channel` announcements (they belong to no session); a test failure on anything
    /// else.
    fn next_message(&mut self) -> DaemonMessage {
        loop {
            match self.next_event() {
                Event::Preamble | Event::Message(DaemonMessage::Channel(_)) => continue,
                Event::Message(m) => {
                    self.seen(&m);
                    return m;
                }
                other => panic!("expected a message, got {other:?}; stderr:\n{}", self.stderr_text()),
            }
        }
    }

    /// Skips messages until `pick` returns `Some`.
    fn wait_message<T>(&mut self, mut pick: impl FnMut(&DaemonMessage) -> Option<T>) -> T {
        loop {
            let m = self.next_message();
            if let Some(t) = pick(&m) {
                return t;
            }
        }
    }

    /// Waits for the daemon's own preamble (written at start-up).
    fn expect_preamble(&mut self) {
        match self.next_event() {
            Event::Preamble => {}
            other => panic!(
                "expected the preamble first, got {other:?}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Opens a session: preamble and Hello, then waits for Welcome.
    fn hello(&mut self) -> tether_protocol::Welcome {
        let mut bytes = PREAMBLE.to_vec();
        encode_frame(&hello_message(), &mut bytes).unwrap();
        self.send_raw(&bytes);
        self.wait_message(|m| match m {
            DaemonMessage::Welcome(w) => Some(w.clone()),
            DaemonMessage::Error(e) => panic!("Hello refused: {e:?}"),
            _ => None,
        })
    }

    /// Takes the daemon's stdin stream over from the session holding it, as a client
    /// does with `--takeover`: zero padding (completing any frame left half-written),
    /// a preamble and a Hello that asks for it with session `nonce`; waits for the
    /// Welcome that names `nonce`.
    fn take_over(&mut self, nonce: u64) -> tether_protocol::Welcome {
        let mut bytes = vec![0u8; tether_protocol::SYNC_PAD_LEN];
        bytes.extend_from_slice(PREAMBLE);
        encode_frame(
            &ClientMessage::Hello(tether_protocol::Hello::new("0.1.0", nonce, true)),
            &mut bytes,
        )
        .unwrap();
        self.send_raw(&bytes);
        self.wait_message(|m| match m {
            DaemonMessage::Welcome(w) if w.session == nonce => Some(w.clone()),
            _ => None,
        })
    }
}

impl DaemonLink for Serve {
    fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(bytes).expect("writing to tether serve");
        stdin.flush().expect("flushing to tether serve");
    }

    /// The next item from the daemon's stdout (a test failure after `TIMEOUT`).
    fn next_event(&mut self) -> Event {
        match self.events.recv_timeout(TIMEOUT) {
            Ok(ev) => ev,
            Err(_) => panic!(
                "no output from tether serve within {TIMEOUT:?}; stderr:\n{}",
                self.stderr.text()
            ),
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.text()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The client's Hello for this protocol version.
pub fn hello_message() -> ClientMessage {
    ClientMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        client_version: "integration-tests".into(),
        capabilities: Vec::new(),
    })
}

/// One message as a whole frame.
pub fn frame(msg: &ClientMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).expect("encoding a message");
    buf
}

/// Waits (at most `timeout`) for `child` to exit; `None` if it still runs.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status
}

/// A `RunSpec` for a shell script with defaults for everything else.
pub fn script_spec(script: &str) -> tether_protocol::RunSpec {
    tether_protocol::RunSpec::new(tether_protocol::CommandSpec::script(script))
}
