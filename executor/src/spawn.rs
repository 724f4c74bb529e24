//! Starting a build's process with `posix_spawn`: a new session, explicit stdio, a cwd,
//! an environment, default signal dispositions and an empty signal mask.
//!
//! Why not `std::process::Command`: a new session needs `setsid` in the child, which std
//! offers only through `pre_exec`, and `pre_exec` forces a full `fork` (copying the
//! daemon's page tables) instead of glibc's `clone(CLONE_VM | CLONE_VFORK)`. That made
//! starting a build slower than a whole spawn-and-wait of `true`. glibc's `posix_spawn`
//! does `setsid` itself (`POSIX_SPAWN_SETSID`, glibc >= 2.26) and `chdir`
//! (`posix_spawn_file_actions_addchdir_np`, glibc >= 2.29).
//!
//! `posix_spawnp` would search the daemon's PATH, not the build's, so the program is
//! resolved here against the build's PATH, as `execvp` would in the child.
//!
//! With [`SpawnRequest::tty`], the child opens a pty's slave as its stdin, stdout and
//! stderr (a file action, still no `fork`). glibc performs `POSIX_SPAWN_SETSID` before
//! the file actions, so the child is a session leader without a controlling terminal
//! when it opens the slave, and opening it without `O_NOCTTY` makes it the session's
//! controlling terminal, as a login does.
//!
//! A build confined to another user or to resource limits ([`SpawnRequest::confine`])
//! is started with `fork` instead, through `std::process::Command` and a `pre_exec` hook
//! that does what `posix_spawn` cannot: `setrlimit`, `setgroups`, `setgid`, `setuid`
//! ([`crate::confine`]), and only then `chdir`, so that the kernel checks the build's
//! user's access to its cwd (a shared workdir, [`crate::workdir`]). Only such builds pay
//! for the `fork`.
//!
//! On an exec failure glibc (and std) reap the failed child themselves: callers must
//! hold the reaper's lock across [`spawn`] (see [`crate::reaper::Reaper::spawn_with`]).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What to start.
pub struct SpawnRequest<'a> {
    /// The program: a path (with a `/`) or a name looked up in the build's PATH.
    pub program: &'a OsStr,
    /// The full argv, `argv[0]` included.
    pub argv: &'a [OsString],
    pub env: &'a [(OsString, OsString)],
    pub cwd: &'a Path,
    /// The child's stdin; `None` for /dev/null. Ignored with `tty`.
    pub stdin: Option<RawFd>,
    /// Ignored with `tty`.
    pub stdout: RawFd,
    /// Ignored with `tty`.
    pub stderr: RawFd,
    /// A terminal (a pty's slave) the child opens as fd 0, 1 and 2 and acquires as its
    /// controlling terminal; `stdin`, `stdout` and `stderr` are not used then.
    pub tty: Option<&'a Path>,
    /// The user and limits to apply in the child; `None` (or nothing to apply) spawns
    /// without a `fork`.
    pub confine: Option<&'a crate::confine::Confinement>,
}

/// Why spawning failed.
#[derive(Debug)]
pub enum SpawnError {
    /// No such program (ENOENT), after searching the build's PATH.
    NotFound,
    /// The program exists but cannot be executed (EACCES, ENOEXEC, a directory...).
    NotExecutable(io::Error),
    /// An argument or variable holds a NUL byte.
    Nul,
    Other(io::Error),
}

/// Finds `program` as `execvp` would, with the build's PATH (`/bin:/usr/bin` if unset),
/// except that relative PATH entries (and empty ones, meaning the cwd) are skipped: they
/// would resolve against the daemon's cwd here and the build's in the child.
pub fn resolve(program: &OsStr, path_var: Option<&OsStr>) -> Result<PathBuf, SpawnError> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path_var = path_var.unwrap_or(OsStr::new("/bin:/usr/bin"));
    let mut denied = None;
    for dir in std::env::split_paths(path_var) {
        if !dir.is_absolute() {
            continue;
        }
        let candidate = dir.join(program);
        match candidate.metadata() {
            Ok(m) if m.is_file() && crate::shell::is_executable_file(&candidate) => return Ok(candidate),
            Ok(_) => denied = Some(candidate),
            Err(_) => {}
        }
    }
    match denied {
        Some(p) => Err(SpawnError::NotExecutable(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not an executable file", p.display()),
        ))),
        None => Err(SpawnError::NotFound),
    }
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul)
}

/// Owns the glibc spawn attributes and file actions, destroying them on drop.
struct Spawner {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

fn check(rc: libc::c_int) -> Result<(), SpawnError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(SpawnError::Other(io::Error::from_raw_os_error(rc)))
    }
}

impl Spawner {
    fn new() -> Result<Box<Spawner>, SpawnError> {
        // SAFETY: init functions fill the zeroed structs; destroy runs in Drop only
        // after both inits succeeded (a failed init returns before the Box exists).
        unsafe {
            let mut attr = MaybeUninit::<libc::posix_spawnattr_t>::zeroed();
            check(libc::posix_spawnattr_init(attr.as_mut_ptr()))?;
            let mut actions = MaybeUninit::<libc::posix_spawn_file_actions_t>::zeroed();
            if let Err(e) = check(libc::posix_spawn_file_actions_init(actions.as_mut_ptr())) {
                libc::posix_spawnattr_destroy(attr.as_mut_ptr());
                return Err(e);
            }
            Ok(Box::new(Spawner {
                attr: attr.assume_init(),
                actions: actions.assume_init(),
            }))
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `new`.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

/// Starts the process and returns its pid.
pub fn spawn(req: &SpawnRequest<'_>) -> Result<i32, SpawnError> {
    let path_var = req.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_os_str());
    let program = cstring(resolve(req.program, path_var)?.as_os_str())?;
    let argv: Vec<CString> = req.argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;
    let env: Vec<CString> = req
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone().into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| SpawnError::Nul)
        })
        .collect::<Result<_, _>>()?;
    let cwd = cstring(req.cwd.as_os_str())?;
    let tty = req.tty.map(|p| cstring(p.as_os_str())).transpose()?;
    if let Some(confine) = req.confine.filter(|c| !c.is_none()) {
        return spawn_confined(req, &program, tty, confine.for_child());
    }
    let null = match (req.stdin, &tty) {
        (None, None) => Some(std::fs::File::open("/dev/null").map_err(SpawnError::Other)?),
        _ => None,
    };

    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let mut s = Spawner::new()?;
    // SAFETY: every pointer passed lives until posix_spawn returns: the CStrings and
    // pointer vectors above, the fds owned by the caller and `null`.
    unsafe {
        let flags = i32::from(libc::POSIX_SPAWN_SETSID) | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        check(libc::posix_spawnattr_setflags(&mut s.attr, flags as libc::c_short))?;
        let mut empty = MaybeUninit::<libc::sigset_t>::zeroed();
        libc::sigemptyset(empty.as_mut_ptr());
        check(libc::posix_spawnattr_setsigmask(&mut s.attr, empty.as_ptr()))?;
        // Every signal back to its default action: the daemon ignores some (SIGPIPE,
        // and as PID 1 more), and an ignored disposition would survive exec.
        let mut all = MaybeUninit::<libc::sigset_t>::zeroed();
        libc::sigfillset(all.as_mut_ptr());
        check(libc::posix_spawnattr_setsigdefault(&mut s.attr, all.as_ptr()))?;
        match &tty {
            Some(tty) => {
                // No O_NOCTTY: the session leader's first terminal becomes its own. The
                // path is copied by glibc; the open happens in the child.
                check(libc::posix_spawn_file_actions_addopen(
                    &mut s.actions,
                    0,
                    tty.as_ptr(),
                    libc::O_RDWR,
                    0,
                ))?;
                for target in [1, 2] {
                    check(libc::posix_spawn_file_actions_adddup2(&mut s.actions, 0, target))?;
                }
            }
            None => {
                // `null` is open exactly when there is no stdin fd.
                let stdin = req.stdin.or(null.as_ref().map(|f| f.as_raw_fd()));
                for (fd, target) in [(stdin, 0), (Some(req.stdout), 1), (Some(req.stderr), 2)] {
                    if let Some(fd) = fd {
                        check(libc::posix_spawn_file_actions_adddup2(&mut s.actions, fd, target))?;
                    }
                }
            }
        }
        check(libc::posix_spawn_file_actions_addchdir_np(&mut s.actions, cwd.as_ptr()))?;
        let mut pid: libc::pid_t = 0;
        let rc = libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &s.actions,
            &s.attr,
            argv_ptrs.as_ptr() as *const *mut libc::c_char,
            env_ptrs.as_ptr() as *const *mut libc::c_char,
        );
        match rc {
            0 => Ok(pid),
            libc::ENOENT => Err(SpawnError::NotFound),
            libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ENOTDIR | libc::EPERM => {
                Err(SpawnError::NotExecutable(io::Error::from_raw_os_error(rc)))
            }
            _ => Err(SpawnError::Other(io::Error::from_raw_os_error(rc))),
        }
    }
}

/// Maps an error of std's spawn (from the `exec`, or from the `pre_exec` hook).
fn spawn_error(e: io::Error) -> SpawnError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => SpawnError::NotFound,
        Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ENOTDIR) => SpawnError::NotExecutable(e),
        _ => SpawnError::Other(e),
    }
}

/// [`spawn`] with a `fork`, applying `confine` in the child before the `exec`. The
/// child's setup mirrors the `posix_spawn` path: a new session, the tty opened as the
/// controlling terminal (or the given fds), default signal dispositions, an empty mask.
fn spawn_confined(
    req: &SpawnRequest<'_>,
    program: &CString,
    tty: Option<CString>,
    confine: crate::confine::ChildConfinement,
) -> Result<i32, SpawnError> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let stdio = |fd: Option<RawFd>| -> Result<Stdio, SpawnError> {
        match fd {
            Some(fd) if tty.is_none() => {
                // SAFETY: the caller keeps `fd` open across this call; the dup is ours.
                let owned = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                    .try_clone_to_owned()
                    .map_err(SpawnError::Other)?;
                Ok(Stdio::from(owned))
            }
            _ => Ok(Stdio::null()),
        }
    };
    let mut cmd = Command::new(OsStr::from_bytes(program.as_bytes()));
    if let Some((first, rest)) = req.argv.split_first() {
        cmd.arg0(first).args(rest);
    }
    // The cwd is entered in the hook, after the switch to the build's user: the kernel
    // checks that user's access to it (a shared workdir, see `crate::workdir`).
    let cwd = cstring(req.cwd.as_os_str())?;
    cmd.env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdio(req.stdin)?)
        .stdout(stdio(Some(req.stdout))?)
        .stderr(stdio(Some(req.stderr))?);
    // SAFETY: the hook runs in the forked child and makes only async-signal-safe system
    // calls on data prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(tty) = &tty {
                // No O_NOCTTY: the new session's first terminal becomes its own.
                let fd = libc::open(tty.as_ptr(), libc::O_RDWR);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                for target in 0..3 {
                    if fd != target && libc::dup2(fd, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if fd > 2 {
                    libc::close(fd);
                }
            }
            // Every signal back to its default action (std resets only SIGPIPE and the
            // mask); SIGKILL and SIGSTOP refuse, which is fine.
            for sig in 1..libc::SIGRTMAX() {
                libc::signal(sig, libc::SIG_DFL);
            }
            confine.apply_in_child()?;
            if libc::chdir(cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(spawn_error)?;
    // Dropping a std `Child` neither waits for nor kills it: the reaper owns it now.
    Ok(child.id() as i32)
}

/// A pipe whose both ends are close-on-exec (the child gets `dup2` copies).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn resolve_uses_the_given_path_not_the_daemons() {
        let t = tempfile::tempdir().unwrap();
        let tool = t.path().join("only-here");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = resolve(OsStr::new("only-here"), Some(t.path().as_os_str())).unwrap();
        assert_eq!(found, tool);
        assert!(matches!(
            resolve(OsStr::new("only-here"), Some(OsStr::new("/nonexistent"))),
            Err(SpawnError::NotFound)
        ));
    }

    #[test]
    fn resolve_reports_a_non_executable_match() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("data"), "x").unwrap();
        let r = resolve(OsStr::new("data"), Some(t.path().as_os_str()));
        assert!(matches!(r, Err(SpawnError::NotExecutable(_))));
    }

    #[test]
    fn paths_with_a_slash_are_taken_as_they_are() {
        assert_eq!(resolve(OsStr::new("./x"), None).unwrap(), PathBuf::from("./x"));
    }
}
