//! Ending a build's processes that left its process group and session.
//!
//! `killpg` reaches a build's process group; a process that calls `setsid` (a daemon that
//! double-forks, `nohup setsid ...`) leaves it, and nothing about groups or sessions finds
//! it again. What it keeps is its environment: every build's processes get
//! [`COOKIE_VAR`]`=<32 random hex digits>` ([`new_cookie`]), inherited by everything they
//! start, and after the build ends [`kill_carriers`] kills every process whose environment holds
//! that exact entry, read from `/proc/PID/environ` (what Jenkins' ProcessTreeKiller does
//! with `BUILD_ID`).
//!
//! The scan reads one file per process of the system, so it runs only when it can find
//! something. The daemon is PID 1 or a child subreaper: when a process of a build outlives
//! its parent it is re-parented to the daemon, so after the build's group is gone its
//! escaped processes are *strangers*, children of the daemon that the reaper did not
//! spawn. [`Reaper::has_strangers`] lists the daemon's children (`/proc/self/task/*/
//! children`, a few small reads); no stranger, no scan ([`needed`]). When the daemon is neither PID 1
//! nor a subreaper, or `/proc` does not list children, every hunt scans.
//!
//! What still escapes (SECURITY.md lists it): a process that replaced its environment
//! (`env -i`, an `execve` with another one) or overwrote the memory `/proc/PID/environ`
//! shows; a process in another PID namespace (a container the build started); a process
//! of another user when the daemon is not root (its environ cannot be read).
//!
//! Each match is signalled through a pidfd opened *before* its environment is read again,
//! so a pid reused between the scan and the kill is never signalled.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

use crate::reaper::Reaper;

/// The environment variable that marks a build's processes.
pub const COOKIE_VAR: &str = "TETHER_BUILD_COOKIE";

/// How many scan-and-kill rounds a hunt makes at most (each catches what the previous
/// round's victims forked before they died).
const MAX_ROUNDS: usize = 50;

/// A fresh cookie: 128 bits from the kernel's random source, as 32 hex digits.
pub fn new_cookie() -> OsString {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never in practice (16 bytes do not block once the pool is ready); the clock
        // and pid still make a cookie no other build has.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    crate::fetch::hex(&bytes).into()
}

/// Whether a hunt can find anything: false only when the daemon has no strangers (see
/// the module doc). Cheap; call it before [`kill_carriers`], which is not.
pub fn needed(reaper: &Reaper) -> bool {
    reaper.has_strangers() != Some(false)
}

/// SIGKILLs every process carrying `cookie` (see the module doc), except those in the
/// sessions `spare` (shells still attached to the build), until a scan finds none.
/// Returns how many were killed. Blocking: it reads `/proc`.
pub fn kill_carriers(cookie: &OsStr, spare: &[i32]) -> usize {
    let mut entry = Vec::with_capacity(COOKIE_VAR.len() + 1 + cookie.len());
    entry.extend_from_slice(COOKIE_VAR.as_bytes());
    entry.push(b'=');
    entry.extend_from_slice(cookie.as_bytes());
    let mut killed = 0;
    for _ in 0..MAX_ROUNDS {
        let carriers = carriers(&entry, spare);
        if carriers.is_empty() {
            return killed;
        }
        killed += carriers.into_iter().filter(|&pid| kill_if_carrier(pid, &entry)).count();
    }
    tracing::error!("processes carrying a build's cookie keep appearing after {MAX_ROUNDS} rounds");
    killed
}

/// The pids (other than this process) whose environment holds `entry` (`NAME=VALUE`)
/// and whose session is not in `spare`.
fn carriers(entry: &[u8], spare: &[i32]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut buf = Vec::new();
    crate::procs::all_pids()
        .filter(|&pid| pid != me && carries(pid, entry, &mut buf))
        .filter(|&pid| spare.is_empty() || !spare.contains(&session_of(pid)))
        .collect()
}

/// Whether `/proc/PID/environ` holds `entry` as one of its variables.
fn carries(pid: i32, entry: &[u8], buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let read = std::fs::File::open(format!("/proc/{pid}/environ")).and_then(|mut f| f.read_to_end(buf));
    if read.is_err() {
        // Gone, a zombie (no memory left to read), or not ours to read.
        return false;
    }
    environ_holds(buf, entry)
}

fn environ_holds(environ: &[u8], entry: &[u8]) -> bool {
    // Variables are NUL-terminated; match whole entries only.
    environ.split(|&b| b == 0).any(|var| var == entry)
}

fn session_of(pid: i32) -> i32 {
    nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid)))
        .map(|p| p.as_raw())
        .unwrap_or(-1)
}

/// SIGKILLs `pid` if it still carries `entry`, through a pidfd opened before the check.
fn kill_if_carrier(pid: i32, entry: &[u8]) -> bool {
    let fd = match crate::procs::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(Errno::ENOSYS) => {
            // No pidfds (Linux < 5.3): a plain kill, with the usual pid-reuse window.
            let mut buf = Vec::new();
            return carries(pid, entry, &mut buf) && crate::procs::signal(pid, nix::sys::signal::SIGKILL).is_ok();
        }
        Err(_) => return false,
    };
    let mut buf = Vec::new();
    if !carries(pid, entry, &mut buf) {
        return false;
    }
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        tracing::info!(pid, "killed a process that escaped its build");
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_entries_match() {
        let entry = b"TETHER_BUILD_COOKIE=ab12";
        assert!(environ_holds(b"A=1\0TETHER_BUILD_COOKIE=ab12\0B=2\0", entry));
        assert!(environ_holds(b"TETHER_BUILD_COOKIE=ab12", entry));
        assert!(!environ_holds(b"TETHER_BUILD_COOKIE=ab123\0", entry));
        assert!(!environ_holds(b"XTETHER_BUILD_COOKIE=ab12\0", entry));
        assert!(!environ_holds(b"", entry));
    }

    #[test]
    fn cookies_differ_and_are_hex() {
        let (a, b) = (new_cookie(), new_cookie());
        assert_ne!(a, b);
        let a = a.into_string().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn this_process_is_never_a_carrier() {
        // The test process's own environment holds whatever it holds; it is skipped.
        let me = std::process::id() as i32;
        let entry = b"PATH=";
        assert!(!carriers(entry, &[]).contains(&me));
    }
}
