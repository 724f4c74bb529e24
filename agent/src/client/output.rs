//! Where a build's output goes on the client: raw bytes to our stdout/stderr, or one
//! JSON event per line with `--json`.
//!
//! Raw output is written by one thread per stream doing blocking writes (our stdout may
//! be a pipe, a file or a terminal shared with other processes; it is never made
//! non-blocking). The build-wide position of the next byte is tracked, so that a chunk
//! seen twice (after a reconnect) is never printed twice.

use std::os::fd::AsFd;

use base64::Engine;
use serde_json::{json, Value};
use tether_protocol::{EndCause, ExitStatus, Exited, OutputStream, Started};

use crate::wire::Sink;

pub struct Output {
    stdout: Sink,
    stderr: Sink,
    json: bool,
    /// The build-wide position of the next byte to print.
    next: u64,
    /// Streams whose destination was found closed.
    closed: [bool; 2],
}

fn index(stream: OutputStream) -> usize {
    match stream {
        OutputStream::Stdout => 0,
        OutputStream::Stderr => 1,
    }
}

impl Output {
    pub fn new(json: bool) -> std::io::Result<Output> {
        let stdout = Sink::direct(std::io::stdout().as_fd().try_clone_to_owned()?);
        let stderr = Sink::direct(std::io::stderr().as_fd().try_clone_to_owned()?);
        Ok(Output {
            stdout,
            stderr,
            json,
            next: 0,
            closed: [false; 2],
        })
    }

    async fn line(&mut self, v: Value) -> std::io::Result<()> {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        self.stdout.write(&mut line).await
    }

    pub async fn started(&mut self, s: &Started) -> std::io::Result<()> {
        if !self.json {
            return Ok(());
        }
        let shell = s.shell.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        self.line(json!({"event": "started", "build": s.build.0, "pid": s.pid, "shell": shell}))
            .await
    }

    /// The position after the last byte printed (or skipped as a gap).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Continues at `position` (attaching from a position other than 0).
    pub fn seek(&mut self, position: u64) {
        self.next = position;
    }

    /// Output at `from..to` is gone: says so on stderr (or as an event) and moves on.
    pub async fn gap(&mut self, build: &str, from: u64, to: u64, reason: &str) -> std::io::Result<()> {
        if to <= self.next {
            return Ok(());
        }
        let from = from.max(self.next);
        self.next = to;
        if self.json {
            return self
                .line(json!({"event": "gap", "build": build, "from": from, "to": to, "reason": reason}))
                .await;
        }
        eprintln!(
            "tether: {} bytes of output of {build} are missing here (positions {from}..{to}: {reason})",
            to - from
        );
        Ok(())
    }

    /// Writes a chunk, skipping any part already written. Returns the build streams that
    /// this write found undeliverable (our stdout or stderr was closed): the caller asks
    /// the daemon to close them at the build's end too, and later chunks of them are
    /// dropped here.
    pub async fn chunk(&mut self, build: &str, stream: OutputStream, offset: u64, data: Vec<u8>) -> Vec<OutputStream> {
        let next = &mut self.next;
        let end = offset + data.len() as u64;
        if end <= *next {
            return Vec::new();
        }
        let skip = next.saturating_sub(offset) as usize;
        let gap = offset.saturating_sub(*next);
        let start = offset + skip as u64;
        *next = end;
        if self.closed[index(stream)] {
            return Vec::new();
        }
        let mut data = data;
        data.drain(..skip);
        if gap > 0 {
            tracing::warn!(?stream, gap, "output missing before position {offset}");
        }
        if self.json {
            let name = match stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            };
            let mut v = json!({"event": "output", "build": build, "stream": name, "offset": start});
            match String::from_utf8(data) {
                Ok(text) => v["data"] = Value::String(text),
                Err(e) => {
                    v["data_base64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()))
                }
            }
            if let Err(e) = self.line(v).await {
                // Both build streams went to our stdout.
                tracing::debug!(error = %e, "stdout closed");
                self.closed = [true; 2];
                return vec![OutputStream::Stdout, OutputStream::Stderr];
            }
            return Vec::new();
        }
        let written = match stream {
            OutputStream::Stdout => self.stdout.write(&mut data).await,
            OutputStream::Stderr => self.stderr.write(&mut data).await,
        };
        match written {
            Ok(()) => Vec::new(),
            Err(e) => {
                tracing::debug!(error = %e, ?stream, "our output closed");
                self.closed[index(stream)] = true;
                vec![stream]
            }
        }
    }

    pub async fn exited(&mut self, e: &Exited, code: i32) -> std::io::Result<()> {
        if !self.json {
            return Ok(());
        }
        let status = match e.status {
            ExitStatus::Code(c) => json!({"code": c}),
            ExitStatus::Signal { signal, core_dumped } => json!({"signal": signal, "core_dumped": core_dumped}),
        };
        let cause = match e.cause {
            EndCause::Completed => "completed",
            EndCause::Cancelled => "cancelled",
            EndCause::TimedOut => "timed_out",
            EndCause::Released => "released",
            EndCause::Shutdown => "shutdown",
        };
        self.line(json!({
            "event": "exited", "build": e.build.0, "exit_code": code, "status": status, "cause": cause,
            "duration_ms": e.duration_ms, "stdout_bytes": e.stdout_bytes, "stderr_bytes": e.stderr_bytes,
        }))
        .await
    }

    /// A failure of tether or the request, as an event (JSON mode only).
    pub async fn error(&mut self, kind: &str, message: &str) -> std::io::Result<()> {
        if !self.json {
            return Ok(());
        }
        self.line(json!({"event": "error", "kind": kind, "message": message}))
            .await
    }

    /// Waits until everything was written.
    pub async fn close(self) -> std::io::Result<()> {
        let a = self.stdout.close().await;
        let b = self.stderr.close().await;
        a.and(b)
    }
}
