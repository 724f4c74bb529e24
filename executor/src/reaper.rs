//! The single owner of every `wait` in the daemon.
//!
//! tether runs as PID 1 (or as a child subreaper), so orphans of every build are
//! re-parented to it and must be reaped, or the container fills with zombies. Reaping
//! orphans means `waitpid(-1)`, and a `waitpid(-1)` next to anyone else's per-pid wait
//! (tokio's `Child::wait`, std's `Child::wait`) steals statuses from them. So one
//! component does all waiting: on every SIGCHLD it reaps every exited child and hands each
//! status to whoever registered that pid; statuses of unregistered pids (orphans) are
//! dropped. Nothing else in the process may wait for a child.
//!
//! Spawning goes through [`Reaper::spawn_with`], which holds the waiters' lock across
//! the spawn: the reaper cannot reap (and so cannot lose) a child before its waiter is
//! registered, and glibc's own wait for a child whose `exec` failed never races it.
//!
//! The reaper is a dedicated thread, one per process ([`Reaper::global`]), so it does not
//! depend on any async runtime staying alive. It sleeps in `waitid(P_ALL, WEXITED |
//! WNOWAIT)`, which waits for a child to become waitable without reaping it, then reaps
//! under the lock. With no children at all it waits on a condition variable that spawns
//! signal (and a short timeout: as a subreaper, orphans can arrive without a spawn).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

/// How a child ended, exactly as `wait` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStatus {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

type Waiters = HashMap<i32, oneshot::Sender<ChildStatus>>;

/// Handle to the reaper task; cheap to clone.
#[derive(Clone, Debug)]
pub struct Reaper {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    waiters: Mutex<Waiters>,
    /// Signalled when a child is spawned, for a reaper that had none.
    spawned: Condvar,
    /// Counts every reaped process; waiters for "some process died" watch it.
    reaped: watch::Sender<u64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

static GLOBAL: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The process's reaper, started on first use.
    pub fn global() -> io::Result<Reaper> {
        if let Some(r) = GLOBAL.get() {
            return Ok(r.clone());
        }
        let (reaped, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            waiters: Mutex::new(HashMap::new()),
            spawned: Condvar::new(),
            reaped,
        });
        let candidate = Reaper { inner };
        // Two racing first calls: only the winner's thread is started.
        let reaper = GLOBAL.get_or_init(|| candidate.clone());
        if Arc::ptr_eq(&reaper.inner, &candidate.inner) {
            let inner = Arc::clone(&reaper.inner);
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reap_forever(&inner))?;
        }
        Ok(reaper.clone())
    }

    /// Runs `spawn` (which returns the new child's pid) under the reaper's lock and
    /// registers the pid; the receiver yields its status. The lock keeps the reaper from
    /// reaping the child before it is registered, and from stealing a failed child that
    /// the spawn function reaps itself (glibc's `posix_spawn`, std's `Command::spawn`).
    pub fn spawn_with<E>(
        &self,
        spawn: impl FnOnce() -> Result<i32, E>,
    ) -> Result<(i32, oneshot::Receiver<ChildStatus>), E> {
        let mut waiters = self.inner.lock();
        let pid = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        drop(waiters);
        self.inner.spawned.notify_one();
        Ok((pid, rx))
    }

    /// Whether this process has children it did not spawn through [`Reaper::spawn_with`]
    /// (orphans re-parented to it, as PID 1 or a child subreaper), or that ended and
    /// are not reaped yet. `None` when it cannot tell: it is neither PID 1 nor a
    /// subreaper (orphans go elsewhere), or `/proc` does not list children.
    pub fn has_strangers(&self) -> Option<bool> {
        let reaps_orphans = std::process::id() == 1 || nix::sys::prctl::get_child_subreaper().unwrap_or(false);
        if !reaps_orphans {
            return None;
        }
        let children = children_of_self()?;
        let waiters = self.inner.lock();
        Some(children.iter().any(|pid| !waiters.contains_key(pid)))
    }

    /// A receiver that changes whenever any process was reaped.
    pub fn reaped(&self) -> watch::Receiver<u64> {
        self.inner.reaped.subscribe()
    }
}

/// The children of every thread of this process (`/proc/self/task/*/children`, which
/// needs a kernel with `CONFIG_PROC_CHILDREN`); `None` when it cannot be read.
fn children_of_self() -> Option<Vec<i32>> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("children");
        match std::fs::read_to_string(&path) {
            Ok(text) => pids.extend(text.split_ascii_whitespace().filter_map(|p| p.parse::<i32>().ok())),
            // A thread that ended during the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path.parent().is_some_and(|t| !t.exists()) => {}
            Err(_) => return None,
        }
    }
    Some(pids)
}

fn reap_forever(inner: &Inner) {
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => reap_all(inner),
            Err(Errno::ECHILD) => {
                let guard = inner.lock();
                let _ = inner.spawned.wait_timeout(guard, Duration::from_millis(100));
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "waitid failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn reap_all(inner: &Inner) {
    let mut waiters = inner.lock();
    let mut count = 0u64;
    loop {
        let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ChildStatus::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, core_dumped)) => (
                pid,
                ChildStatus::Signaled {
                    signal: sig as i32,
                    core_dumped,
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            // Stopped/continued are not requested; nothing to do for them.
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "waitpid failed");
                break;
            }
        };
        count += 1;
        match waiters.remove(&pid.as_raw()) {
            Some(tx) => {
                // The waiter may have given up (build dropped); nothing to do then.
                let _ = tx.send(status);
            }
            None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan"),
        }
    }
    drop(waiters);
    if count > 0 {
        inner.reaped.send_modify(|n| *n += count);
    }
}
