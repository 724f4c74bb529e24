//! Conversions between wire types (tether-protocol) and executor types, at the edge.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::time::Duration;

use tether_executor::confine::{Confinement, Limits, RunAs};
use tether_executor::mask::{MaskError, Secrets};
use tether_executor::{BuildOutcome, BuildSpec, ChildStatus, CommandSpec, EndCause, Stream};
use tether_protocol as wire;

fn os(b: &wire::Bytes) -> OsString {
    OsString::from_vec(b.to_vec())
}

/// Bytes of a path, for the wire.
pub fn path_bytes(p: &std::path::Path) -> wire::Bytes {
    wire::Bytes::from(p.as_os_str().as_bytes().to_vec())
}

/// A path sent as bytes.
pub fn path(b: &wire::Bytes) -> PathBuf {
    PathBuf::from(os(b))
}

/// A wire run request as an executor spec; refuses secrets too short to be masked.
pub fn build_spec(spec: &wire::RunSpec) -> Result<BuildSpec, MaskError> {
    let names: Vec<String> = spec
        .secrets
        .iter()
        .map(|s| String::from_utf8_lossy(&s.name).into_owned())
        .collect();
    let secrets = Secrets::new(names.iter().zip(&spec.secrets).map(|(n, s)| (n.as_str(), &s.value[..])))?;
    Ok(BuildSpec {
        id: spec.id.clone(),
        name: spec.name.clone(),
        command: match &spec.command {
            wire::CommandSpec::Argv(argv) => CommandSpec::Argv(argv.iter().map(os).collect()),
            wire::CommandSpec::Script { script, shell } => CommandSpec::Script {
                script: os(script),
                shell: shell.as_ref().map(|s| PathBuf::from(os(s))),
            },
        },
        // Secrets last: they override a plain variable of the same name.
        env: spec
            .env
            .iter()
            .map(|v| (os(&v.name), os(&v.value)))
            .chain(spec.secrets.iter().map(|s| (os(&s.name), os(&s.value))))
            .collect(),
        workdir: spec.workdir.as_ref().map(|w| PathBuf::from(os(w))),
        timeout: spec.timeout_ms.map(Duration::from_millis),
        grace: spec.grace_ms.map(Duration::from_millis),
        stdin: spec.stdin,
        hold_after: spec.hold_after_ms.map(Duration::from_millis),
        hold_on_failure: spec.hold_on_failure_ms.map(Duration::from_millis),
        secrets,
        confine: confinement(spec),
    })
}

/// The user and limits of a run (not checked here: see `Confinement::check`).
fn confinement(spec: &wire::RunSpec) -> Confinement {
    let l = &spec.limits;
    Confinement {
        user: spec.user.map(|u| RunAs::new(u.uid, u.gid)),
        limits: Limits {
            nofile: l.nofile,
            nproc: l.nproc,
            cpu_s: l.cpu_s,
            fsize: l.fsize,
            address_space: l.address_space,
        },
    }
}

/// One line describing the command, for listings.
pub fn describe(spec: &wire::RunSpec) -> String {
    let text = match &spec.command {
        wire::CommandSpec::Argv(argv) => argv
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        wire::CommandSpec::Script { script, .. } => {
            String::from_utf8_lossy(script).lines().next().unwrap_or("").to_owned()
        }
    };
    text.chars().take(200).collect()
}

pub fn stream(s: Stream) -> wire::OutputStream {
    match s {
        Stream::Stdout => wire::OutputStream::Stdout,
        Stream::Stderr => wire::OutputStream::Stderr,
    }
}

pub fn stream_from_wire(s: wire::OutputStream) -> Stream {
    match s {
        wire::OutputStream::Stdout => Stream::Stdout,
        wire::OutputStream::Stderr => Stream::Stderr,
    }
}

/// A process status for the wire.
pub fn exit_status(status: Option<ChildStatus>) -> wire::ExitStatus {
    match status {
        Some(ChildStatus::Exited(code)) => wire::ExitStatus::Code(code),
        Some(ChildStatus::Signaled { signal, core_dumped }) => wire::ExitStatus::Signal { signal, core_dumped },
        // The reaper vanished (hard shutdown): report it as killed, which it will be.
        None => wire::ExitStatus::Signal {
            signal: libc::SIGKILL,
            core_dumped: false,
        },
    }
}

/// A wire status as a process status (a release choosing how a held build finishes).
pub fn child_status(status: wire::ExitStatus) -> ChildStatus {
    match status {
        wire::ExitStatus::Code(code) => ChildStatus::Exited(code),
        wire::ExitStatus::Signal { signal, core_dumped } => ChildStatus::Signaled { signal, core_dumped },
    }
}

pub fn end_cause(cause: EndCause) -> wire::EndCause {
    match cause {
        EndCause::Completed => wire::EndCause::Completed,
        EndCause::Cancelled => wire::EndCause::Cancelled,
        EndCause::TimedOut => wire::EndCause::TimedOut,
        EndCause::Released => wire::EndCause::Released,
    }
}

pub fn exited(build: wire::BuildId, o: &BuildOutcome) -> wire::Exited {
    wire::Exited {
        build,
        status: exit_status(o.status),
        cause: end_cause(o.cause),
        duration_ms: o.duration.as_millis() as u64,
        stdout_bytes: o.stdout_bytes,
        stderr_bytes: o.stderr_bytes,
    }
}
