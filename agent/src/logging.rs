//! tether's own log messages: always to stderr, never to stdout (which may carry frames
//! or a build's output).
//!
//! Two shapes, for two readers. The daemon's lines are a log (time, level, fields): they
//! land in `kubectl logs` and in whatever collects the container's output. A client's
//! lines are messages to the person or the Jenkins console that ran it: `tether: ...`,
//! like every other line the client prints, with no time or level (a `-v` run marks
//! its debug lines). Neither carries ANSI colour codes unless stderr is a terminal and
//! `NO_COLOR` is unset or empty (<https://no-color.org>): a console that is a file or a
//! pipe would otherwise show escape sequences.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Who is logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `tether serve`: a log with times and levels.
    Daemon(LogFormat),
    /// A client command: `tether: ...` messages.
    Client,
}

/// Whether stderr may carry colour: a terminal, and `NO_COLOR` unset or empty.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the subscriber. `RUST_LOG` wins over `level`.
pub fn init(level: &str, role: Role) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_target(false);
    // A second init (tests) is harmless; ignore its error.
    let _ = match role {
        Role::Daemon(LogFormat::Text) => builder.try_init(),
        Role::Daemon(LogFormat::Json) => builder.json().try_init(),
        Role::Client => builder.event_format(ClientLine).try_init(),
    };
}

/// `tether: MESSAGE key=value ...`, one line per event; debug and trace events say so.
struct ClientLine;

impl<S, N> FormatEvent<S, N> for ClientLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        writer.write_str("tether: ")?;
        match *event.metadata().level() {
            Level::DEBUG => writer.write_str("debug: ")?,
            Level::TRACE => writer.write_str("trace: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
