//! The messages, one enum per direction.
//!
//! Encoding rules that keep old peers working (PROTOCOL.md gives the bytes):
//! * a variant's index is its wire tag: new variants are only ever appended, and
//!   `Hello`, `Ping`, `Pong` and `Error` never change shape (`Welcome` goes only to a
//!   client of the same version), so any two versions can tell each other they differ;
//! * byte strings that may not be UTF-8 (argv, environment, paths, output) are
//!   `serde_bytes` buffers: a length and the raw bytes;
//! * every build-related message names its build, every request carries a client-chosen
//!   [`RequestId`] that the reply echoes, so one stream multiplexes many builds.

use serde::{Deserialize, Serialize};

/// Chosen by the client, unique among its outstanding requests; replies echo it.
pub type RequestId = u64;

pub use crate::bytes::Bytes;

/// Names a build for as long as the daemon knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BuildId(pub String);

impl std::fmt::Display for BuildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Tag 0. Opens a session, right after the preamble.
    Hello(Hello),
    /// Tag 1. Liveness probe; answered by [`DaemonMessage::Pong`] with the same nonce.
    Ping { nonce: u64 },
    /// Tag 2. Answer to a [`DaemonMessage::Ping`].
    Pong { nonce: u64 },
    /// Tag 3. Start a build; answered by [`DaemonMessage::Started`] or an error. With
    /// `spec.id` naming a build the daemon runs or retains, nothing is started: the
    /// session follows that build from its first byte (`Started::existing`). With
    /// `follow` false the session is not sent the build's output or exit (`run --detach`).
    Run {
        req: RequestId,
        /// Boxed: a spec is far larger than every other message (the wire is the same).
        spec: Box<RunSpec>,
        follow: bool,
    },
    /// Tag 4. Bytes for a build's stdin (only for builds started with `stdin: true`).
    /// At most [`crate::MAX_CHUNK`] bytes. `offset` is the position of `data[0]` in the
    /// build's stdin stream: a daemon that sees one that is not where the previous piece
    /// ended knows input was lost in transit (a damaged frame it skipped) and cancels
    /// the build rather than run it on incomplete input.
    Stdin { build: BuildId, offset: u64, data: Bytes },
    /// Tag 5. End of the build's stdin.
    CloseStdin { build: BuildId },
    /// Tag 6. Stop a build: SIGTERM to its process group, SIGKILL after its grace period,
    /// or SIGKILL at once with `force`. Answered by [`DaemonMessage::Ack`].
    Cancel {
        req: RequestId,
        build: BuildId,
        force: bool,
    },
    /// Tag 7. The client can no longer deliver this output stream (its own stdout was
    /// closed, as in `tether run -- yes | head -1`): the daemon stops reading it and closes
    /// its end of the build's pipe, so the build's next write there fails with EPIPE, as
    /// in a local pipeline. No reply.
    CloseOutput { build: BuildId, stream: OutputStream },
    /// Tag 8. List the daemon's builds, running ones only unless `all` (then finished
    /// and retained ones too); answered by [`DaemonMessage::Builds`].
    List { req: RequestId, all: bool },
    /// Tag 9. Send a build's output from position `from` (see [`DaemonMessage::Output`]),
    /// answered by [`DaemonMessage::Attached`], then `Output`/`Gap` in position order.
    /// With `follow` the session gets new output as it comes and then `Exited`;
    /// without it, output up to the end at the time of the request, then `Exited` if the
    /// build had finished or [`DaemonMessage::LogEnd`] if it still runs.
    Attach {
        req: RequestId,
        build: BuildId,
        from: u64,
        follow: bool,
    },
    /// Tag 10. A piece of upload `index` of the `Run` request `req` (a tar stream, see
    /// [`UploadSpec`]). At most [`crate::MAX_CHUNK`] bytes; the client keeps at most
    /// [`Limits::upload_window`] bytes of a run's uploads unacknowledged
    /// ([`DaemonMessage::UploadAck`]).
    Upload { req: RequestId, index: u32, data: Bytes },
    /// Tag 11. Upload `index` of run `req` is complete: `bytes` bytes were sent in all,
    /// whose SHA-256 is `sha256`. The daemon compares both with what it received.
    UploadEnd {
        req: RequestId,
        index: u32,
        bytes: u64,
        sha256: Digest,
    },
    /// Tag 12. Send `path` (relative to the build's work dir) of a running or held build
    /// as a tar stream: answered by [`DaemonMessage::DownloadData`] pieces and one
    /// [`DaemonMessage::DownloadEnd`], or an error.
    Download {
        req: RequestId,
        build: BuildId,
        path: Bytes,
    },
    /// Tag 13. End a build's hold ([`DaemonMessage::Held`]): its directory is removed and
    /// it finishes with `status`, or the status it held with when `None`. A build held
    /// before its command ([`DaemonMessage::HeldBefore`]) starts it (`status` must be
    /// `None` then). Answered by [`DaemonMessage::Ack`].
    Release {
        req: RequestId,
        build: BuildId,
        status: Option<ExitStatus>,
    },
    /// Tag 14. Open a shell (or `spec.argv`) in the daemon's container, in a terminal the
    /// daemon allocates (`spec.tty`) or with pipes; answered by
    /// [`DaemonMessage::ShellOpened`] or an error. `req` names the shell in every later
    /// message about it. A shell belongs to its session: when the session ends, the
    /// shell is hung up (SIGHUP to its session, SIGKILL after a grace period).
    OpenShell { req: RequestId, spec: ShellSpec },
    /// Tag 15. Bytes for shell `shell`'s terminal (keystrokes) or stdin pipe, at most
    /// [`crate::MAX_CHUNK`], starting at stream position `offset`, within
    /// [`Limits::stdin_window`] of the last [`DaemonMessage::ShellInputAck`]. A piece
    /// that does not start where the previous one ended hangs the shell up.
    ShellInput { shell: RequestId, offset: u64, data: Bytes },
    /// Tag 16. End of the shell's input: its stdin pipe is closed. Ignored with a
    /// terminal (a terminal's end of input is the `^D` the user types).
    ShellInputEnd { shell: RequestId },
    /// Tag 17. The client's terminal changed size: the shell's terminal follows (its
    /// foreground job gets SIGWINCH). Ignored without a terminal.
    ShellResize { shell: RequestId, size: WindowSize },
    /// Tag 18. End the shell: SIGHUP (and SIGCONT) to every process of its session,
    /// SIGKILL after a grace period. [`DaemonMessage::ShellExited`] follows.
    ShellHangUp { shell: RequestId },
    /// Tag 19. The client is done with this session: the daemon ends it (its builds go
    /// on) and, on its stdin stream, announces that nobody holds the stream any more
    /// ([`DaemonMessage::Channel`]), so a client waiting for it can start at once.
    Goodbye,
    /// Tag 20. A message of sub-session `sub`: `message` is the payload of one frame
    /// (an encoded `ClientMessage`, never a `Sub` or `SubEnd`) of a client that a relay
    /// serves through this session (`tether relay`). The daemon serves each sub-session
    /// as it serves a socket connection; its first message is its `Hello`. At most
    /// [`crate::MAX_SUB_PAYLOAD`] bytes.
    Sub { sub: u32, message: Bytes },
    /// Tag 21. Sub-session `sub`'s client went away: the daemon ends that session, as at
    /// the end of a socket connection (its builds go on).
    SubEnd { sub: u32 },
}

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// Daemon to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonMessage {
    /// Tag 0. Accepts a session.
    Welcome(Welcome),
    /// Tag 1. Something went wrong; `req`/`build` say what it concerns, when known.
    Error(ErrorReport),
    /// Tag 2. Liveness probe; answered by [`ClientMessage::Pong`].
    Ping { nonce: u64 },
    /// Tag 3. Answer to a [`ClientMessage::Ping`].
    Pong { nonce: u64 },
    /// Tag 4. A build's process is running.
    Started(Started),
    /// Tag 5. Build output. `offset` is the *build-wide position* of `data[0]`: stdout
    /// and stderr share one position space, counted in the order the daemon read them,
    /// so one number says where a client is (`attach --from`).
    Output {
        build: BuildId,
        stream: OutputStream,
        offset: u64,
        data: Bytes,
    },
    /// Tag 6. The build is over: its processes are gone, its output fully sent before
    /// this message, its directory removed.
    Exited(Exited),
    /// Tag 7. `consumed` stdin bytes of the build have been written to its pipe in total.
    StdinAck { build: BuildId, consumed: u64 },
    /// Tag 8. A request without a richer answer succeeded.
    Ack { req: RequestId },
    /// Tag 9. Answer to [`ClientMessage::List`]: builds of any session.
    Builds { req: RequestId, builds: Vec<BuildSummary> },
    /// Tag 10. Answer to [`ClientMessage::Attach`]: the build exists; its output follows.
    Attached { req: RequestId, build: BuildSummary },
    /// Tag 11. Output at positions `from..to` of the build is gone and will never be
    /// sent (a disk quota dropped it, or the daemon could not write it to its spool, which
    /// every follower, live or later, learns by this same `Gap`). The next `Output` starts
    /// at `to` or later.
    Gap {
        build: BuildId,
        from: u64,
        to: u64,
        reason: GapReason,
    },
    /// Tag 12. End of a non-following [`ClientMessage::Attach`] of a running build: all
    /// output below `position` was sent.
    LogEnd {
        req: RequestId,
        build: BuildId,
        position: u64,
    },
    /// Tag 13. The daemon consumed `consumed` bytes of run `req`'s uploads in total (all
    /// indexes together); the client may send up to [`Limits::upload_window`] beyond.
    UploadAck { req: RequestId, consumed: u64 },
    /// Tag 14. The build's command ended with `status`, and its directory is kept (the
    /// run asked for [`RunSpec::hold_after_ms`]) until a [`ClientMessage::Release`] or
    /// `until_ms` (milliseconds since the Unix epoch). Its processes are gone and its
    /// output is complete; [`DaemonMessage::Exited`] follows the release.
    Held {
        build: BuildId,
        status: ExitStatus,
        cause: EndCause,
        until_ms: u64,
    },
    /// Tag 15. A piece of the tar stream answering [`ClientMessage::Download`] `req`.
    DownloadData { req: RequestId, data: Bytes },
    /// Tag 16. The download `req` is complete: `bytes` bytes with SHA-256 `sha256`.
    DownloadEnd { req: RequestId, bytes: u64, sha256: Digest },
    /// Tag 17. Run `req` was accepted as `build`, whose command starts once its
    /// preparation (readiness gates, fetches, uploads) is done; [`DaemonMessage::Started`]
    /// or an error follows.
    Preparing { req: RequestId, build: BuildId },
    /// Tag 18. Answer to [`ClientMessage::OpenShell`] `req`: the shell runs as `pid`
    /// (`program`), in `build`'s work dir with its environment when the spec named one.
    ShellOpened {
        req: RequestId,
        pid: u32,
        program: Bytes,
        build: Option<BuildId>,
    },
    /// Tag 19. Output of shell `shell`: its terminal's output (always `Stdout`), or its
    /// stdout or stderr pipe. Not spooled: a shell lives only as long as its session.
    ShellOutput {
        shell: RequestId,
        stream: OutputStream,
        data: Bytes,
    },
    /// Tag 20. `consumed` input bytes of shell `shell` were written to it in total.
    ShellInputAck { shell: RequestId, consumed: u64 },
    /// Tag 21. Shell `shell` ended with `status` (its main process's, exactly as `wait`
    /// reported it) after all its output, and no process of its session is left.
    ShellExited { shell: RequestId, status: ExitStatus },
    /// Tag 22. The build's preparation is done and its command waits for a
    /// [`ClientMessage::Release`] ([`RunSpec::hold_before_ms`]), or for `until_ms`
    /// (milliseconds since the Unix epoch), when it starts on its own.
    /// [`DaemonMessage::Started`] follows the release.
    HeldBefore { build: BuildId, until_ms: u64 },
    /// Tag 23. The daemon is stopping (`reason` says why, e.g. it received SIGTERM, as
    /// at a pod's deletion): it accepts no new build and cancels the running ones, each
    /// of which then ends with [`EndCause::Shutdown`]; the stream closes after that.
    /// Sent once to every session.
    ShuttingDown { reason: String },
    /// Tag 24. Who holds the daemon's stdin stream (only ever sent there, preceded by a
    /// preamble so that a client that just joined the stream finds it): when a session
    /// starts or ends, periodically while one is held, and to refuse a `Hello` that came
    /// while another client held the stream.
    Channel(ChannelState),
    /// Tag 25. A message to sub-session `sub` ([`ClientMessage::Sub`]): the payload of
    /// one frame for that client (an encoded `DaemonMessage`).
    Sub { sub: u32, message: Bytes },
    /// Tag 26. Sub-session `sub` ended on the daemon's side (it was dropped or refused):
    /// the relay closes its client's connection.
    SubEnd { sub: u32 },
}

/// The state of a daemon's stdin stream, shared by every client attached to it
/// ([`DaemonMessage::Channel`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// The session that holds the stream, or `None` when it is free.
    pub holder: Option<Holder>,
    /// The session nonce of a `Hello` refused because the stream is held (its client
    /// waits, or takes the stream over with [`Hello::TAKEOVER`]).
    pub refused: Option<u64>,
}

/// The client session holding a daemon's stdin stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The nonce from its `Hello` ([`Hello::session`]).
    pub session: u64,
    /// Its `Hello.client_version`.
    pub client: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// What [`ClientMessage::OpenShell`] runs, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellSpec {
    /// Run in this build's work dir (its `workdir` when it has one) with the
    /// environment its command has: a running build, a held one, or one held before
    /// its command starts. `None`: the daemon's cwd and environment.
    pub build: Option<BuildId>,
    /// The program to run, `argv[0]` looked up in the PATH of that environment;
    /// `None` for an interactive shell (`shell`, or one found as builds find theirs).
    pub argv: Option<Vec<Bytes>>,
    /// The shell to run when `argv` is `None`.
    pub shell: Option<Bytes>,
    /// Added to (and overriding) that environment (the client's `TERM`).
    pub env: Vec<EnvVar>,
    /// A terminal of this size, or `None` for pipes (stdin, stdout, stderr).
    pub tty: Option<WindowSize>,
}

/// Why output is missing ([`DaemonMessage::Gap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GapReason {
    /// The build's or the daemon's output quota dropped it (oldest output goes first).
    Quota,
    /// Writing it to the spool failed (the disk was full), or reading it back did. Live
    /// followers get this gap instead of the output, as later readers do.
    WriteFailed,
}

/// The client's opening message. Its shape never changes (see PROTOCOL.md,
/// "Versioning"), so what later versions add travels in `capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub protocol: u32,
    /// The client's program version, for messages and logs.
    pub client_version: String,
    /// What the client says of itself: `session=` and 16 lowercase hex digits, its
    /// session nonce ([`Hello::session`]), and [`Hello::TAKEOVER`].
    pub capabilities: Vec<String>,
}

impl Hello {
    /// The capability that asks to take a daemon's stdin stream even while another
    /// client holds it.
    pub const TAKEOVER: &'static str = "takeover";
    const SESSION: &'static str = "session=";

    /// A Hello of this protocol version naming session `nonce`.
    pub fn new(client_version: &str, nonce: u64, takeover: bool) -> Hello {
        let mut capabilities = vec![format!("{}{nonce:016x}", Self::SESSION)];
        if takeover {
            capabilities.push(Self::TAKEOVER.to_owned());
        }
        Hello {
            protocol: crate::PROTOCOL_VERSION,
            client_version: client_version.to_owned(),
            capabilities,
        }
    }

    /// The client's session nonce: chosen at random by the client, echoed in
    /// [`Welcome::session`], so that a client reading a stream shared with others
    /// (`kubectl attach` broadcasts the daemon's output) knows its own session.
    pub fn session(&self) -> Option<u64> {
        self.capabilities.iter().find_map(|c| {
            let hex = c.strip_prefix(Self::SESSION)?;
            (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
        })
    }

    /// Whether the client asks to take the stream over ([`Hello::TAKEOVER`]).
    pub fn takeover(&self) -> bool {
        self.capabilities.iter().any(|c| c == Self::TAKEOVER)
    }
}

/// The daemon's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    pub daemon_version: String,
    pub capabilities: Vec<String>,
    pub limits: Limits,
    /// Builds the daemon is running right now, of any session.
    pub builds: Vec<BuildSummary>,
    /// The session nonce of the `Hello` this answers ([`Hello::session`]; 0 without).
    pub session: u64,
}

/// Limits the daemon enforces on this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame payload the daemon accepts.
    pub max_payload: u32,
    /// Largest data block in one message.
    pub max_chunk: u32,
    /// Stdin bytes a client may send ahead of [`DaemonMessage::StdinAck`].
    pub stdin_window: u32,
    /// The heartbeat interval in milliseconds: each side sends a `Ping` at least this
    /// often, and may treat a peer that sent nothing for several intervals as gone.
    pub heartbeat_ms: u32,
    /// Upload bytes a client may send ahead of [`DaemonMessage::UploadAck`].
    pub upload_window: u32,
}

/// One build, as `Welcome::builds` and [`DaemonMessage::Builds`] list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSummary {
    pub build: BuildId,
    /// Human-readable command (argv joined, or the script's first line).
    pub command: String,
    pub pid: u32,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Output positions so far (stdout and stderr bytes together).
    pub output_end: u64,
    pub state: BuildState,
}

/// Where a build is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildState {
    Running,
    /// Over; its record (output and status) is retained until `expires_at_ms`.
    Finished {
        status: ExitStatus,
        cause: EndCause,
        duration_ms: u64,
        finished_at_ms: u64,
        expires_at_ms: u64,
    },
    /// Accepted; waiting for readiness gates, fetches or uploads before its command starts.
    Preparing,
    /// The command ended with `status`; the directory is kept until a release or
    /// `until_ms` ([`DaemonMessage::Held`]).
    Held {
        status: ExitStatus,
        cause: EndCause,
        until_ms: u64,
    },
    /// Prepared; its command waits for a release, or starts on its own at `until_ms`
    /// ([`DaemonMessage::HeldBefore`]).
    HeldBefore {
        until_ms: u64,
    },
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub command: CommandSpec,
    /// Added to (and overriding) the daemon's environment.
    pub env: Vec<EnvVar>,
    /// Where the command runs: relative, a directory inside the build's private work
    /// dir (created if missing; must not leave it); absolute, an existing directory
    /// shared with other containers (a workspace), never created or removed by the
    /// daemon. `None`: the work dir itself.
    pub workdir: Option<Bytes>,
    /// Cancel the build (cause: timeout) after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Milliseconds between SIGTERM and SIGKILL on cancel and timeout; `None` for the
    /// daemon's default.
    pub grace_ms: Option<u64>,
    /// Whether the client will send stdin; otherwise the build's stdin is /dev/null.
    pub stdin: bool,
    /// A name for the build, used in its id and directory name (sanitized).
    pub name: Option<String>,
    /// The build's id, chosen by the client to make starting idempotent: a build with
    /// this id that runs or is retained is followed instead of started again. At most
    /// 64 bytes of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`. `None`: the daemon
    /// picks one.
    pub id: Option<String>,
    /// Tar streams the client sends (as [`ClientMessage::Upload`]) before the command
    /// starts, one per entry, in order.
    pub uploads: Vec<UploadSpec>,
    /// URLs the daemon downloads into the work dir before the command starts.
    pub fetches: Vec<FetchSpec>,
    /// Readiness gates (`http://`, `https://` answering 2xx, or `tcp://host:port`
    /// accepting) that must open before the command starts, on top of the daemon's own.
    pub wait_for: Vec<String>,
    /// How long to wait for the gates (the run's and the daemon's); `None` for the
    /// daemon's default.
    pub wait_timeout_ms: Option<u64>,
    /// Keep the build's directory after its command ends, for at most this many
    /// milliseconds, until a [`ClientMessage::Release`] (for downloads).
    pub hold_after_ms: Option<u64>,
    /// When the command fails (a non-zero status, a signal, a timeout; not a cancel),
    /// hold the build as [`RunSpec::hold_after_ms`] does, for at most this many
    /// milliseconds (the longer of the two when both apply), for a person to look inside.
    pub hold_on_failure_ms: Option<u64>,
    /// After the preparation, hold the build before its command starts
    /// ([`DaemonMessage::HeldBefore`]) until a [`ClientMessage::Release`], or this many
    /// milliseconds, after which it starts on its own.
    pub hold_before_ms: Option<u64>,
    /// Set in the build's environment like [`RunSpec::env`] (and over it), and masked
    /// in the build's output: every occurrence of a value, literal, shell-quoted or
    /// base64, becomes `****` before it is spooled or sent. Values are at least 4 bytes.
    pub secrets: Vec<SecretVar>,
    /// Run the build (and shells opened in it) as this user instead of the daemon's. Only
    /// a daemon running as root can; others refuse with [`ErrorKind::BadRequest`].
    pub user: Option<RunAs>,
    /// Resource limits (`setrlimit`, soft and hard) of the build's processes.
    pub limits: ResourceLimits,
}

/// The user a build runs as ([`RunSpec::user`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    /// `None`: the primary group of `uid` in the daemon's `/etc/passwd`, or `uid` itself
    /// when it has no entry there.
    pub gid: Option<u32>,
}

/// Resource limits of a build ([`RunSpec::limits`]); `None` leaves the daemon's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// `RLIMIT_NOFILE`: open file descriptors per process.
    pub nofile: Option<u64>,
    /// `RLIMIT_NPROC`: processes (threads) of the build's real user id, system-wide.
    pub nproc: Option<u64>,
    /// `RLIMIT_CPU`: CPU seconds per process.
    pub cpu_s: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file a process may write, in bytes.
    pub fsize: Option<u64>,
    /// `RLIMIT_AS`: address space per process, in bytes.
    pub address_space: Option<u64>,
}

/// A secret of a [`RunSpec`]. Its `Debug` shows the name only, so that no log of a
/// message ever holds a value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVar {
    pub name: Bytes,
    pub value: Bytes,
}

impl std::fmt::Debug for SecretVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVar")
            .field("name", &self.name)
            .field("value", &"****")
            .finish()
    }
}

/// One upload of a [`RunSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSpec {
    /// Directory inside the work dir that receives the archive's entries (created; `.`
    /// or empty: the work dir). Relative, no `..`.
    pub dest: Bytes,
}

/// One URL of a [`RunSpec`] to download before the command starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchSpec {
    pub url: String,
    /// Checked against the SHA-256 of the downloaded bytes when given.
    pub sha256: Option<Digest>,
    /// Where it lands, relative to the work dir (see `tether run --fetch`).
    pub dest: Bytes,
}

impl RunSpec {
    /// Runs `command` with everything else at its default: the daemon's environment,
    /// the work dir, no timeout, the daemon's grace period, stdin from /dev/null.
    pub fn new(command: CommandSpec) -> RunSpec {
        RunSpec {
            command,
            env: Vec::new(),
            workdir: None,
            timeout_ms: None,
            grace_ms: None,
            stdin: false,
            name: None,
            id: None,
            uploads: Vec::new(),
            fetches: Vec::new(),
            wait_for: Vec::new(),
            wait_timeout_ms: None,
            hold_after_ms: None,
            hold_on_failure_ms: None,
            hold_before_ms: None,
            secrets: Vec::new(),
            user: None,
            limits: ResourceLimits::default(),
        }
    }

    /// Whether the command waits for gates, fetches, uploads or a release before it
    /// starts.
    pub fn prepares(&self) -> bool {
        !self.uploads.is_empty()
            || !self.fetches.is_empty()
            || !self.wait_for.is_empty()
            || self.hold_before_ms.is_some()
    }
}

impl CommandSpec {
    /// An argv run directly.
    pub fn argv<A: AsRef<[u8]>>(argv: impl IntoIterator<Item = A>) -> CommandSpec {
        CommandSpec::Argv(argv.into_iter().map(|a| Bytes::from(a.as_ref())).collect())
    }

    /// A script run by the shell the daemon finds.
    pub fn script(script: impl AsRef<[u8]>) -> CommandSpec {
        CommandSpec::Script {
            script: Bytes::from(script.as_ref()),
            shell: None,
        }
    }
}

/// An argv run directly, or a script run by a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandSpec {
    /// Executed directly; `argv[0]` is looked up in the build's `PATH`.
    Argv(Vec<Bytes>),
    /// Run as `SHELL -c SCRIPT`; `shell: None` finds one (`sh` on PATH, `/bin/sh`,
    /// `/busybox/sh`).
    Script { script: Bytes, shell: Option<Bytes> },
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: Bytes,
    pub value: Bytes,
}

/// Reply to [`ClientMessage::Run`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub req: RequestId,
    pub build: BuildId,
    pub pid: u32,
    /// The shell that runs a script, when the command is one.
    pub shell: Option<Bytes>,
    /// The id named an existing build: nothing was started, the session follows that
    /// build from position 0 (its `pid` and `shell` are the original ones).
    pub existing: bool,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How a build ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    pub build: BuildId,
    pub status: ExitStatus,
    pub cause: EndCause,
    /// Wall time from spawn to the end of cleanup.
    pub duration_ms: u64,
    /// Total bytes of stdout and stderr.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

/// The main process's status, exactly as `wait` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal { signal: i32, core_dumped: bool },
}

/// Why the build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndCause {
    /// The main process exited on its own.
    Completed,
    /// A client cancelled it.
    Cancelled,
    /// Its timeout expired.
    TimedOut,
    /// It was held ([`DaemonMessage::Held`]) and a [`ClientMessage::Release`] chose the
    /// status it finished with, replacing its own.
    Released,
    /// The daemon was stopping ([`DaemonMessage::ShuttingDown`]) and cancelled it. Never
    /// a success, whatever the status: the build did not get to finish.
    Shutdown,
}

/// An error, with what it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub req: Option<RequestId>,
    pub build: Option<BuildId>,
    pub kind: ErrorKind,
    pub message: String,
}

/// Error classes a client acts on (exit codes, retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Peers speak incompatible protocol versions; the message names both.
    VersionMismatch,
    /// The stream was damaged or a message could not be decoded; skipped and resynced.
    Protocol,
    /// The request is invalid (bad workdir, empty argv, ...).
    BadRequest,
    /// No build with that id.
    UnknownBuild,
    /// The command was not found (exit 127 convention).
    CommandNotFound,
    /// The command exists but cannot be executed (exit 126 convention).
    NotExecutable,
    /// The daemon could not do it (disk, fork, ...).
    Internal,
    /// A message that needs a session came before `Hello`.
    NoSession,
    /// The peer may not use this daemon (socket peer credentials not allowed).
    PermissionDenied,
    /// An upload, download or fetch failed or was refused (a digest mismatch, a hostile
    /// archive, a missing path, an HTTP error); the message names what.
    Transfer,
    /// A readiness gate did not open in time; the message names the URL.
    NotReady,
    /// The build was cancelled before its command started.
    Cancelled,
    /// The daemon is at a limit it was started with (`--max-builds`, `--max-sessions`);
    /// the message names it. Retrying later may succeed.
    Busy,
}
