//! `tether serve` as PID 1 of a real OCI container, run with `runc`: the static binary,
//! a bundle laid out like kaniko's debug image (busybox at `/busybox`, tether at
//! `/kaniko/tether`, no `/bin/sh`), and a protocol session over `runc run`'s stdio.
//!
//! Every container gets a unique id and a private runc state root inside its bundle's
//! temporary directory, and is removed (`runc delete -f`) when its [`Bundle`] drops, so a
//! failing test leaves no container behind. Tests call [`runc_usable`] first: without
//! root, runc or a static busybox (or when `runc run` of a trivial bundle fails) they
//! print `skipped: ...` and return.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use tether_protocol::{BuildId, ClientMessage, DaemonMessage, Exited, OutputStream, RunSpec, Started};

use crate::{
    build_if_stale, decode_events, shell_quote, target_dir, tether, wait_child, wait_until, Collector, DaemonLink,
    Event, Finished, Proc, TIMEOUT,
};

/// Where the daemon keeps its state inside the container.
pub const STATE_DIR: &str = "/kaniko/state";
/// Where the static binary lives inside the container.
pub const TETHER_PATH: &str = "/kaniko/tether";
/// The host's static busybox (Debian `busybox-static`), copied into every rootfs.
const HOST_BUSYBOX: &str = "/bin/busybox";
const TARGET: &str = "x86_64-unknown-linux-gnu";

// ---------------------------------------------------------------------------------------
// The static binary
// ---------------------------------------------------------------------------------------

/// The static `tether` (`target/x86_64-unknown-linux-gnu/release/tether`). When it is
/// missing or older than its sources, `scripts/build-static` builds it, once per test
/// process (about a minute from scratch).
pub fn static_tether() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = target_dir().join(TARGET).join("release").join("tether");
        let root = crate::workspace_root();
        build_if_stale(
            &bin,
            Command::new(root.join("scripts").join("build-static")),
            "scripts/build-static",
        );
        bin
    })
    .clone()
}

// ---------------------------------------------------------------------------------------
// Can runc run containers here?
// ---------------------------------------------------------------------------------------

/// Why containers cannot run here, or `None` when they can (checked once per process:
/// root, `runc` on PATH, a static busybox, and `runc run` of a trivial bundle).
pub fn runc_skip_reason() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON.get_or_init(probe_runc).as_deref()
}

/// True when containers can run; otherwise prints `skipped: WHY` (the caller returns).
pub fn runc_usable() -> bool {
    match runc_skip_reason() {
        None => true,
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

fn probe_runc() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("runc containers need root".into());
    }
    match Command::new("runc").arg("--version").stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return Some(format!("`runc --version` failed ({})", o.status)),
        Err(e) => return Some(format!("cannot run runc (Debian package `runc`): {e}")),
    }
    if !Path::new(HOST_BUSYBOX).is_file() {
        return Some(format!("{HOST_BUSYBOX} is missing (Debian package `busybox-static`)"));
    }
    let bundle = Bundle::builder()
        .without_tether()
        .args(["/busybox/true"])
        .try_build()
        .map_err(|e| format!("cannot lay out a bundle: {e}"));
    let bundle = match bundle {
        Ok(b) => b,
        Err(e) => return Some(e),
    };
    let mut cmd = bundle.run_command();
    cmd.stdin(Stdio::null());
    let mut p = Proc::spawn(&mut cmd);
    match p.wait_timeout(TIMEOUT) {
        Some(st) if st.success() => None,
        Some(st) => {
            p.stderr.wait_eof(Duration::from_secs(2));
            Some(format!(
                "`runc run` of a trivial busybox bundle failed ({st}): {}",
                p.stderr.text().trim()
            ))
        }
        None => Some(format!(
            "`runc run` of a trivial busybox bundle still runs after {TIMEOUT:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Bundles
// ---------------------------------------------------------------------------------------

/// Builds a [`Bundle`].
pub struct BundleBuilder {
    serve_args: Vec<String>,
    args: Option<Vec<String>>,
    mounts: Vec<Value>,
    with_tether: bool,
    empty_rootfs: bool,
    env: Option<Vec<String>>,
    user: Option<Value>,
    bin: bool,
    files: Vec<(String, Vec<u8>, u32)>,
    capabilities: Option<&'static [&'static str]>,
    host_network: bool,
}

/// The capabilities a container's root gets by default from Kubernetes' runtimes
/// (containerd's and CRI-O's default set, as Docker's); `runc spec` gives only three.
pub const KUBERNETES_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

impl BundleBuilder {
    /// Arguments after `/kaniko/tether serve --state-dir /kaniko/state`.
    pub fn serve_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.serve_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The container's whole command instead of `tether serve`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Bind-mounts the host's `source` (read-write) at `destination` in the container.
    pub fn bind_mount(mut self, source: &Path, destination: &str) -> Self {
        self.mounts.push(json!({
            "destination": destination,
            "type": "bind",
            "source": source,
            "options": ["rbind", "rw"],
        }));
        self
    }

    /// The container process's environment (`K=V` items) instead of
    /// `PATH=/busybox:/kaniko`.
    pub fn env<I, S>(mut self, env: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.env = Some(env.into_iter().map(Into::into).collect());
        self
    }

    /// Runs the container's process as `uid:gid` with these supplementary groups (a
    /// pod's `fsGroup` is one of every container's), instead of root.
    pub fn user(mut self, uid: u32, gid: u32, additional: &[u32]) -> Self {
        self.user = Some(json!({"uid": uid, "gid": gid, "additionalGids": additional}));
        self
    }

    /// A `/bin` holding busybox's applets (`/bin/sh`), as an ordinary image has; kaniko's
    /// debug image has none.
    pub fn with_bin(mut self) -> Self {
        self.bin = true;
        self
    }

    /// Gives the container's root these capabilities (e.g. [`KUBERNETES_CAPABILITIES`]).
    pub fn capabilities(mut self, caps: &'static [&'static str]) -> Self {
        self.capabilities = Some(caps);
        self
    }

    /// Shares the host's network (its loopback included) instead of a namespace of its
    /// own.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// Writes a file (with its parents) into the rootfs.
    pub fn file(mut self, path: &str, contents: &[u8], mode: u32) -> Self {
        self.files
            .push((path.trim_start_matches('/').to_owned(), contents.to_vec(), mode));
        self
    }

    /// Bind-mounts the host's `source` read-only at `destination` in the container.
    pub fn bind_mount_ro(mut self, source: &Path, destination: &str) -> Self {
        self.mounts.push(json!({
            "destination": destination,
            "type": "bind",
            "source": source,
            "options": ["rbind", "ro"],
        }));
        self
    }

    /// Leaves the static tether out (a bundle that does not run it).
    pub fn without_tether(mut self) -> Self {
        self.with_tether = false;
        self
    }

    /// An empty rootfs (no busybox, no tether), for the caller to fill, e.g. with an
    /// image's layers, before the container starts; `args` must say what to run.
    pub fn empty_rootfs(mut self) -> Self {
        self.empty_rootfs = true;
        self
    }

    /// Lays out the bundle (a test failure if that fails).
    pub fn build(self) -> Bundle {
        self.try_build()
            .unwrap_or_else(|e| panic!("cannot lay out a bundle: {e}"))
    }

    fn try_build(self) -> anyhow::Result<Bundle> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = tempfile::Builder::new().prefix("tether-bundle").tempdir()?;
        let id = format!(
            "tether-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let runc_root = dir.path().join("runc-state");
        fs::create_dir(&runc_root)?;

        // The rootfs: kaniko's debug image has busybox and its applets in /busybox and
        // no /bin at all (or nothing, for the caller to fill).
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs)?;
        if !self.empty_rootfs {
            for d in ["busybox", "kaniko", "proc", "dev", "tmp"] {
                fs::create_dir_all(rootfs.join(d))?;
            }
            {
                use std::os::unix::fs::PermissionsExt;
                // As in every image: anyone may write to /tmp.
                fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
            }
            fs::copy(HOST_BUSYBOX, rootfs.join("busybox/busybox"))?;
            let list = Command::new(HOST_BUSYBOX).arg("--list").stdin(Stdio::null()).output()?;
            anyhow::ensure!(list.status.success(), "{HOST_BUSYBOX} --list failed");
            for applet in String::from_utf8_lossy(&list.stdout).lines() {
                let applet = applet.trim();
                if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
                    symlink("busybox", rootfs.join("busybox").join(applet))?;
                }
            }
        }
        if self.with_tether && !self.empty_rootfs {
            fs::copy(static_tether(), rootfs.join(TETHER_PATH.trim_start_matches('/')))?;
        }
        if self.bin {
            symlink("busybox", rootfs.join("bin"))?;
        }
        for (path, contents, mode) in &self.files {
            use std::os::unix::fs::PermissionsExt;
            let dest = rootfs.join(path);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&dest, contents)?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(*mode))?;
        }

        // config.json: runc's default spec, edited.
        let spec = Command::new("runc")
            .arg("spec")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            spec.status.success(),
            "runc spec failed: {}",
            String::from_utf8_lossy(&spec.stderr)
        );
        let config_path = dir.path().join("config.json");
        let mut config: Value = serde_json::from_slice(&fs::read(&config_path)?)?;
        let args = self.args.unwrap_or_else(|| {
            let mut a: Vec<String> = vec![
                TETHER_PATH.into(),
                "serve".into(),
                "--state-dir".into(),
                STATE_DIR.into(),
            ];
            a.extend(self.serve_args);
            a
        });
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(args);
        config["process"]["env"] = json!(self.env.unwrap_or_else(|| vec!["PATH=/busybox:/kaniko".into()]));
        if let Some(user) = self.user {
            config["process"]["user"] = user;
        }
        if self.host_network {
            if let Some(ns) = config["linux"]["namespaces"].as_array_mut() {
                ns.retain(|n| n["type"] != "network");
            }
        }
        if let Some(caps) = self.capabilities {
            for set in ["bounding", "effective", "permitted"] {
                config["process"]["capabilities"][set] = json!(caps);
            }
        }
        config["root"]["readonly"] = json!(false);
        if let Some(mounts) = config["mounts"].as_array_mut() {
            mounts.extend(self.mounts);
        }
        fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        Ok(Bundle { dir, id, runc_root })
    }
}

/// An OCI bundle in a temporary directory and the container run from it. Dropping it
/// removes the container (`runc delete -f`), then the directory.
pub struct Bundle {
    dir: tempfile::TempDir,
    id: String,
    runc_root: PathBuf,
}

/// One process in the container, from its `/proc/PID/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
}

impl Bundle {
    /// A bundle whose container runs `tether serve --state-dir /kaniko/state SERVE_ARGS`.
    pub fn serve(serve_args: &[&str]) -> Bundle {
        Bundle::builder().serve_args(serve_args.iter().copied()).build()
    }

    pub fn builder() -> BundleBuilder {
        BundleBuilder {
            serve_args: Vec::new(),
            args: None,
            mounts: Vec::new(),
            with_tether: true,
            empty_rootfs: false,
            env: None,
            user: None,
            bin: false,
            files: Vec::new(),
            capabilities: None,
            host_network: false,
        }
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.path().join("rootfs")
    }

    /// The container id (unique per test process and bundle).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This bundle's private runc state root (`runc --root`).
    pub fn runc_root(&self) -> &Path {
        &self.runc_root
    }

    /// The daemon's state dir, seen from the host.
    pub fn host_state_dir(&self) -> PathBuf {
        self.rootfs().join(STATE_DIR.trim_start_matches('/'))
    }

    /// Every build dir (`instances/*/builds/*`) in the daemon's state dir, from the host.
    pub fn build_dirs(&self) -> Vec<PathBuf> {
        crate::subdirs(&self.host_state_dir().join("instances"))
            .into_iter()
            .flat_map(|inst| crate::subdirs(&inst.join("builds")))
            .collect()
    }

    /// `runc --root R`.
    pub fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(&self.runc_root);
        cmd
    }

    /// `runc --root R run --bundle B ID`, the container in the foreground.
    pub fn run_command(&self) -> Command {
        let mut cmd = self.runc();
        cmd.arg("run").arg("--bundle").arg(self.path()).arg(&self.id);
        cmd
    }

    /// The same as a `--via` command for `tether run`.
    pub fn via(&self) -> String {
        format!(
            "exec runc --root {} run --bundle {} {}",
            shell_quote(self.runc_root.as_os_str()),
            shell_quote(self.path().as_os_str()),
            shell_quote(OsStr::new(&self.id)),
        )
    }

    /// Runs `tether run --via VIA ARGS` (stdin from /dev/null) and waits for it.
    pub fn tether_run(&self, args: &[&str]) -> Finished {
        let mut cmd = tether(["run", "--via", &self.via()]);
        cmd.args(args).stdin(Stdio::null());
        Proc::spawn(&mut cmd).finish(TIMEOUT)
    }

    /// Starts the container in the background with its stdin and stdout piped, and the
    /// protocol spoken over them.
    pub fn start(&self) -> Session {
        let mut cmd = self.run_command();
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take().expect("stdin is piped");
        let out = child.stdout.take().expect("stdout is piped");
        let stderr = Collector::spawn(child.stderr.take().expect("stderr is piped"));
        Session::new(Some(child), Box::new(stdin), out, stderr, None)
    }

    /// Starts the container detached (`runc run -d`) with a pseudo-terminal's slave as
    /// its stdin and a pipe as its stdout; the protocol is written to the master.
    ///
    /// Detached, because only then does runc hand its own stdio to the container
    /// process: a foreground `runc run` with `terminal: false` gives the container pipes
    /// and copies its stdio to and from them, so the container would see a pipe (and the
    /// host pty's line discipline would mangle the frames before runc reads them).
    /// There is no `runc run` child to wait for afterwards: see [`Bundle::wait_stopped`].
    pub fn start_detached_on_pty(&self) -> Session {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let initial = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr on a new pty");
        let mut cmd = self.runc();
        cmd.arg("run").arg("-d").arg("--bundle").arg(self.path()).arg(&self.id);
        cmd.stdin(Stdio::from(pty.slave.try_clone().expect("dup the pty slave")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        drop(cmd); // closes the parent's copy of the slave given to the child
        let out = child.stdout.take().expect("stdout is piped");
        // The container's stderr too: it inherited this pipe.
        let stderr = Collector::spawn(child.stderr.take().expect("stderr is piped"));
        let st = wait_child(&mut child, TIMEOUT).unwrap_or_else(|| panic!("runc run -d still runs after {TIMEOUT:?}"));
        assert!(st.success(), "runc run -d failed ({st}): {}", stderr.text());
        let master = fs::File::from(pty.master);
        let mut session = Session::new(None, Box::new(master), out, stderr, Some(pty.slave));
        session.pty_initial = Some(initial);
        session
    }

    /// Waits (at most `timeout`) until the container is stopped or gone.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.state().is_none_or(|st| st["status"].as_str() == Some("stopped"))
        })
    }

    /// Runs `runc exec ID ARGV...` (stdin from /dev/null) and waits for it.
    pub fn exec(&self, argv: &[&str]) -> Finished {
        let mut cmd = self.runc();
        cmd.arg("exec").arg(&self.id).args(argv).stdin(Stdio::null());
        Proc::spawn(&mut cmd).finish(TIMEOUT)
    }

    /// `runc kill ID SIGNAL` (a test failure if runc refuses).
    pub fn kill(&self, signal: &str) {
        let mut cmd = self.runc();
        cmd.arg("kill").arg(&self.id).arg(signal).stdin(Stdio::null());
        let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
        assert!(r.status.success(), "runc kill {signal} failed: {}", r.stderr_text());
    }

    /// `runc state ID` as JSON, or `None` when runc knows no such container.
    pub fn state(&self) -> Option<Value> {
        let mut cmd = self.runc();
        cmd.arg("state").arg(&self.id).stdin(Stdio::null());
        let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
        if !r.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&r.stdout).unwrap_or_else(|e| panic!("runc state: {e}: {}", r.stdout_text())))
    }

    /// The processes in the container, read from `/proc/*/stat` through `runc exec` (the
    /// exec'd `sh` and `cat` included).
    pub fn processes(&self) -> Vec<ProcInfo> {
        let r = self.exec(&["/busybox/sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null; true"]);
        assert!(r.status.success(), "runc exec failed: {}", r.stderr_text());
        r.stdout_text().lines().filter_map(parse_stat).collect()
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let mut cmd = self.runc();
        cmd.arg("delete").arg("-f").arg(&self.id);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => {
                if wait_child(&mut child, TIMEOUT).is_none() {
                    eprintln!("runc delete -f {} still runs after {TIMEOUT:?}", self.id);
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            Err(e) => eprintln!("cannot run runc delete -f {}: {e}", self.id),
        }
    }
}

/// Parses one `/proc/PID/stat` line: `PID (COMM) STATE PPID ...`.
fn parse_stat(line: &str) -> Option<ProcInfo> {
    let open = line.find(" (")?;
    let close = line.rfind(") ")?;
    let pid = line[..open].trim().parse().ok()?;
    let comm = line[open + 2..close].to_owned();
    let mut rest = line[close + 2..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcInfo { pid, comm, state, ppid })
}

// ---------------------------------------------------------------------------------------
// A protocol session over the container's stdio
// ---------------------------------------------------------------------------------------

/// What a build sent, collected by a [`Session`] whatever it waited for meanwhile.
#[derive(Debug, Default, Clone)]
pub struct BuildOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exited: Option<Exited>,
}

/// The test speaking the protocol to the daemon in a container, over the container's
/// stdio. Messages are recorded per build as they are read, so waiting for one build
/// never loses another's output.
pub struct Session {
    /// The foreground `runc run` (`None` for a detached container).
    pub child: Option<Child>,
    writer: Option<Box<dyn Write + Send>>,
    events: mpsc::Receiver<Event>,
    pub stderr: Collector,
    /// The pty slave, when stdin is a terminal (kept for `tcgetattr`).
    pub pty_slave: Option<OwnedFd>,
    /// The pty's settings before the container started.
    pub pty_initial: Option<nix::sys::termios::Termios>,
    builds: std::collections::HashMap<BuildId, BuildOutput>,
    eof: bool,
}

impl DaemonLink for Session {
    fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.writer.as_mut().expect("stdin already closed");
        w.write_all(bytes).expect("writing to the container's stdin");
        w.flush().expect("flushing the container's stdin");
    }

    /// The next item read from the container's stdout (a test failure after `TIMEOUT`).
    fn next_event(&mut self) -> Event {
        assert!(!self.eof, "the container's stdout already ended");
        match self.events.recv_timeout(TIMEOUT) {
            Ok(ev) => {
                if matches!(ev, Event::Eof) {
                    self.eof = true;
                }
                ev
            }
            Err(_) => panic!(
                "nothing from the container within {TIMEOUT:?}; stderr:\n{}",
                self.stderr.text()
            ),
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Records build output and exits; answers pings.
    fn seen(&mut self, m: &DaemonMessage) {
        match m {
            DaemonMessage::Output {
                build, stream, data, ..
            } => {
                let b = self.builds.entry(build.clone()).or_default();
                match stream {
                    OutputStream::Stdout => b.stdout.extend_from_slice(data),
                    OutputStream::Stderr => b.stderr.extend_from_slice(data),
                }
            }
            DaemonMessage::Exited(e) => {
                self.builds.entry(e.build.clone()).or_default().exited = Some(e.clone());
            }
            DaemonMessage::Ping { nonce } => {
                let nonce = *nonce;
                self.send(&ClientMessage::Pong { nonce });
            }
            _ => {}
        }
    }
}

impl Session {
    fn new(
        child: Option<Child>,
        writer: Box<dyn Write + Send>,
        out: impl Read + Send + 'static,
        stderr: Collector,
        pty_slave: Option<OwnedFd>,
    ) -> Session {
        Session {
            child,
            writer: Some(writer),
            events: decode_events(out),
            stderr,
            pty_slave,
            pty_initial: None,
            builds: Default::default(),
            eof: false,
        }
    }

    /// Closes the container's stdin (the pty master, for a pty session).
    pub fn close_stdin(&mut self) {
        self.writer = None;
    }

    /// Sends `Run` and waits for its `Started`.
    pub fn start_build(&mut self, req: u64, spec: RunSpec) -> Started {
        self.send(&ClientMessage::Run {
            req,
            spec: Box::new(spec),
            follow: true,
        });
        self.wait_message(|m| match m {
            DaemonMessage::Started(s) if s.req == req => Some(s.clone()),
            DaemonMessage::Error(e) if e.req == Some(req) => panic!("Run {req} refused: {e:?}"),
            _ => None,
        })
    }

    /// What `build` sent so far.
    pub fn output(&self, build: &BuildId) -> BuildOutput {
        self.builds.get(build).cloned().unwrap_or_default()
    }

    /// Waits for `build`'s `Exited`; returns everything it sent.
    pub fn wait_exited(&mut self, build: &BuildId) -> BuildOutput {
        while self.builds.get(build).is_none_or(|b| b.exited.is_none()) {
            if let DaemonMessage::Error(e) = self.next_message() {
                assert!(e.build.as_ref() != Some(build), "error for {build}: {e:?}");
            }
        }
        self.output(build)
    }

    /// Reads (and records) everything until the container's stdout ends; a test failure
    /// if anything but frames and preambles comes.
    pub fn wait_eof(&mut self) {
        while !self.eof {
            match self.next_event() {
                Event::Message(m) => self.seen(&m),
                Event::Preamble | Event::Eof => {}
                other => panic!("expected frames, got {other:?}; stderr:\n{}", self.stderr.text()),
            }
        }
    }

    /// Waits (at most `timeout`) for the foreground `runc run` to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("a foreground runc run");
        wait_child(child, timeout)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The container itself is removed by its Bundle (`runc delete -f`).
        if let Some(child) = &mut self.child {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The terminal settings of a pty session's slave.
pub fn pty_termios(session: &Session) -> nix::sys::termios::Termios {
    let slave = session.pty_slave.as_ref().expect("a pty session");
    nix::sys::termios::tcgetattr(slave.as_fd()).expect("tcgetattr on the pty slave")
}

// ---------------------------------------------------------------------------------------
// Processes seen from the host
// ---------------------------------------------------------------------------------------

impl Bundle {
    /// The host pid of the container's init (PID 1 inside), from `runc state`; `None`
    /// when runc knows no such container.
    pub fn host_pid(&self) -> Option<i32> {
        let st = self.state()?;
        st["pid"].as_i64().filter(|p| *p > 0).map(|p| p as i32)
    }
}

/// A host process from its `/proc/PID/stat` (`None` once no process has that pid).
pub fn host_proc(pid: i32) -> Option<ProcInfo> {
    let line = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&line)
}

/// `tether serve ARGS` as a plain child of the test (not PID 1 of anything), in its own
/// process group: a job like any other, whose group is not orphaned, so job-control
/// signals (SIGTSTP, SIGTTIN, SIGTTOU) meet their default action, as they would for a
/// daemon started from a shell or by a client's `--via` command. It runs in `cwd` (where
/// a core dump would land).
pub fn serve_in_own_process_group(cwd: &Path, args: &[&OsStr]) -> crate::Serve {
    use std::os::unix::process::CommandExt;
    let mut cmd = tether(["serve"]);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().expect("cannot spawn tether serve");
    let out = child.stdout.take().expect("stdout is piped");
    let stderr = Collector::spawn(child.stderr.take().expect("stderr is piped"));
    let stdin = child.stdin.take();
    crate::Serve {
        child,
        stdin,
        events: decode_events(out),
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        assert_eq!(
            parse_stat("12 (sleep) S 1 12 12 0 -1 4194560"),
            Some(ProcInfo {
                pid: 12,
                comm: "sleep".into(),
                state: 'S',
                ppid: 1
            })
        );
        assert_eq!(
            parse_stat("7 (a) b) (c) Z 3 7").map(|p| (p.comm, p.state, p.ppid)),
            Some(("a) b) (c".into(), 'Z', 3))
        );
        assert_eq!(parse_stat("garbage"), None);
    }
}
