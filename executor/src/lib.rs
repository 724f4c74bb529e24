//! The build executor: everything about running one build, nothing about the wire.
//!
//! A build is a command run in its own private directory (work dir + tmp dir, mode
//! 0700, never shared), in its own session and process group, with stdin from /dev/null
//! or a pipe, stdout and stderr through pipes, streamed out as [`BuildEvent`]s in order,
//! and ended by a [`BuildOutcome`] after the output is drained, every process of the
//! group is gone and the directory is removed.
//!
//! Interactive shells ([`Executor::shell`], [`interactive`]) run in a pty or with pipes,
//! in a session of their own, alone or attached to a build ([`Attachments`]) whose
//! directory they work in.
//!
//! One [`reaper::Reaper`] does all waiting for children (see its module doc): nothing
//! else in a process that uses this crate may wait for children.

pub mod attach;
pub mod build;
pub mod cleanup;
pub mod confine;
mod executor;
pub mod fetch;
pub mod gate;
pub mod hunt;
pub mod interactive;
pub mod mask;
pub mod owner;
pub mod procs;
pub mod pty;
pub mod reaper;
pub mod shell;
pub mod spawn;
pub mod spool;
pub mod statedir;
pub mod status;
pub mod transfer;
pub mod workdir;

pub use attach::Attachments;
pub use build::{
    enlarge_pipe, Build, BuildControl, BuildEvent, BuildSpec, BuildStdin, CommandSpec, Held, OutputChunk, StartError,
    Stream,
};
pub use executor::{Executor, ExecutorConfig, ExecutorError, Prepared};
pub use interactive::{Shell, ShellControl, ShellEvent, ShellInput, ShellSpec};
pub use pty::WindowSize;
pub use reaper::ChildStatus;
pub use spool::{GapReason, Spool, SpoolItem, SpoolLimits, SpoolReader, SpoolSet, SpoolWriter};
pub use status::{BuildOutcome, EndCause};
