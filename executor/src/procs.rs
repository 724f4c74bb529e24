//! Finding the processes of a session through `/proc`.
//!
//! A build is one process group, which `killpg` reaches in one call. An interactive shell
//! is not: with job control every job gets a process group of its own, and all that its
//! processes share is the session the shell leads. Linux has no "signal a session" call,
//! so the session's members are found by scanning `/proc/PID/stat` (field 6 is the
//! session id). The scan is racy by nature: a process may fork while it runs, which is why
//! callers scan again until a scan finds nobody.
//!
//! What escapes: a process that calls `setsid` itself leaves the session (as a daemonizing
//! process does on purpose); nothing short of a PID namespace or a cgroup finds it again.

use std::io;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What `/proc/PID/stat` says about one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: u8,
    pgrp: i32,
    session: i32,
    threads: i64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself
/// hold spaces and parentheses, so the fields are taken after the *last* `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Fields 3 (state), 4 (ppid), 5 (pgrp), 6 (session), ..., 20 (num_threads).
    let state = *fields.next()?.as_bytes().first()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    let threads = fields.nth(13)?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        session,
        threads,
    })
}

fn read_stat(pid: i32) -> Option<Stat> {
    // A process that exits (and is reaped) during the scan simply has no stat any more.
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Whether a process with this stat still runs code. A zombie has released its memory,
/// files and cwd: it only waits for its parent to reap it, and an orphan zombie whose
/// new parent never reaps (an init that does not, outside tether's own container) would
/// otherwise count forever. A zombie *thread-group leader* with other threads left (its
/// main thread called `pthread_exit`) still runs: it has more than one thread.
fn runs(stat: &Stat) -> bool {
    !matches!(stat.state, b'Z' | b'X') || stat.threads > 1
}

/// Every pid listed in `/proc` (none when it cannot be read). Readers of a process's
/// files must expect it to be gone by then.
pub(crate) fn all_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
}

/// A pidfd for `pid` (Linux 5.3+): it names that process even after its pid is reused.
pub(crate) fn pidfd_open(pid: i32) -> Result<std::os::fd::OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

fn scan(sid: i32, keep: impl Fn(&Stat) -> bool) -> Vec<i32> {
    all_pids()
        .filter(|&pid| read_stat(pid).is_some_and(|s| s.session == sid && keep(&s)))
        .collect()
}

/// The pids of every process whose session id is `sid`, zombies included. Processes that
/// vanish while the scan runs are skipped.
pub fn session_members(sid: i32) -> Vec<i32> {
    scan(sid, |_| true)
}

/// Like [`session_members`], without the zombies (see `runs` above): the processes of
/// the session that still run code, which is what "the session is gone" waits for.
pub fn live_session_members(sid: i32) -> Vec<i32> {
    scan(sid, runs)
}

/// Sends `sig` to every member of the session; returns how many were signalled.
pub fn signal_session(sid: i32, sig: Signal) -> usize {
    session_members(sid)
        .into_iter()
        .filter(|&pid| signal(pid, sig).is_ok())
        .count()
}

/// What a terminal's hang-up does, to a whole session led by `sid`: SIGHUP, then SIGCONT
/// so that stopped jobs see it, to the leader's process group first (a shell that gets
/// SIGHUP passes it on to its jobs), then to every other process of the session, each
/// signal once. Returns how many processes outside the leader's group were signalled.
pub fn hang_up_session(sid: i32) -> usize {
    for sig in [Signal::SIGHUP, Signal::SIGCONT] {
        // ESRCH: the group is gone; the rest of the session may not be.
        let _ = nix::sys::signal::killpg(Pid::from_raw(sid), sig);
    }
    let others: Vec<i32> = scan(sid, |s| s.pgrp != sid);
    for sig in [Signal::SIGHUP, Signal::SIGCONT] {
        for &pid in &others {
            let _ = signal(pid, sig);
        }
    }
    others.len()
}

/// `kill`, where a process that is already gone is not an error worth reporting.
pub fn signal(pid: i32, sig: Signal) -> io::Result<()> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) => Ok(()),
        Err(Errno::ESRCH) => Err(io::Error::from(io::ErrorKind::NotFound)),
        Err(e) => {
            tracing::warn!(pid, signal = ?sig, error = %e, "cannot signal a process");
            Err(e.into())
        }
    }
}

/// SIGKILLs every member of the session and blocks until none runs any more, or `limit`
/// passes; returns whether the session is gone. For synchronous callers (a `Drop`):
/// SIGKILL takes effect at once but not instantly, so it waits on a member's pidfd
/// (readable once the process exited) rather than sleeping, and falls back to short
/// sleeps on kernels without `pidfd_open`. Members are killed again on every round: one
/// may have forked a new one just before it died.
pub fn kill_session_blocking(sid: i32, limit: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let members = live_session_members(sid);
        let Some(&first) = members.first() else {
            return true;
        };
        for &pid in &members {
            let _ = signal(pid, Signal::SIGKILL);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        if !wait_exit_blocking(first, left) {
            std::thread::sleep(left.min(std::time::Duration::from_millis(5)));
        }
    }
}

/// Waits for one process to exit through its pidfd; false when pidfds are unavailable.
fn wait_exit_blocking(pid: i32, limit: std::time::Duration) -> bool {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        // ESRCH: it is gone already (the caller rescans); ENOSYS: no pidfds.
        Err(e) => return e == Errno::ESRCH,
    };
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_last_paren() {
        let text = "4242 (a) b) (c) S 1 4242 777 34816 4242 4194560 0 0 0 0 0 0 0 0 20 0 3 0 1 2 3";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: b'S',
                pgrp: 4242,
                session: 777,
                threads: 3
            })
        );
        assert_eq!(parse_stat("12 (truncated"), None);
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
    }

    #[test]
    fn a_zombie_leader_with_threads_left_still_runs() {
        let zombie = |threads| Stat {
            state: b'Z',
            pgrp: 1,
            session: 1,
            threads,
        };
        assert!(!runs(&zombie(1)));
        assert!(runs(&zombie(2)));
        assert!(runs(&Stat {
            state: b'S',
            pgrp: 1,
            session: 1,
            threads: 1
        }));
    }

    #[test]
    fn the_current_session_holds_this_process() {
        let me = std::process::id() as i32;
        let sid = nix::unistd::getsid(None).unwrap().as_raw();
        assert!(session_members(sid).contains(&me));
        assert!(live_session_members(sid).contains(&me));
        // No session has a negative id.
        assert!(session_members(-1).is_empty());
    }

    #[test]
    fn a_new_session_is_found_and_its_members_are_its_own() {
        let reaper = crate::reaper::Reaper::global().unwrap();
        let (r, w) = crate::spawn::pipe().unwrap();
        let argv: Vec<std::ffi::OsString> = ["sh", "-c", "sleep 1000 & echo $!; exec cat"]
            .iter()
            .map(Into::into)
            .collect();
        let env = [("PATH".into(), "/usr/bin:/bin".into())];
        let (out_r, out_w) = crate::spawn::pipe().unwrap();
        let request = crate::spawn::SpawnRequest {
            program: argv[0].as_os_str(),
            argv: &argv,
            env: &env,
            cwd: std::path::Path::new("/"),
            stdin: Some(std::os::fd::AsRawFd::as_raw_fd(&r)),
            stdout: std::os::fd::AsRawFd::as_raw_fd(&out_w),
            stderr: std::os::fd::AsRawFd::as_raw_fd(&out_w),
            tty: None,
            confine: None,
        };
        let (pid, status) = reaper.spawn_with(|| crate::spawn::spawn(&request)).unwrap();
        drop((r, out_w));
        // The background sleep's pid arrives once it was started.
        let mut line = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(std::fs::File::from(out_r)), &mut line).unwrap();
        let sleeper: i32 = line.trim().parse().unwrap();
        let mut members = session_members(pid);
        members.sort();
        let mut expected = vec![pid, sleeper];
        expected.sort();
        assert_eq!(
            members, expected,
            "the session leader and its background child, nobody else"
        );

        assert!(kill_session_blocking(pid, std::time::Duration::from_secs(10)));
        drop(w);
        assert!(live_session_members(pid).is_empty());
        let status = status.blocking_recv().unwrap();
        assert_eq!(
            status,
            crate::reaper::ChildStatus::Signaled {
                signal: 9,
                core_dumped: false
            }
        );
    }
}
