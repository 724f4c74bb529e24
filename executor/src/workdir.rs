//! Where a build's command runs.
//!
//! By default in its private work dir, or in a relative `workdir` inside it, created if
//! missing and never leaving it ([`resolve`]). Or in a *shared* directory given by an
//! absolute path: the Jenkins workspace on the pod's shared volume, where the sources
//! already are. A shared directory must exist; tether never creates, changes or removes
//! it. The build still gets its private directory (its `TMPDIR`), its own process group
//! and its cleanup: only its cwd is elsewhere.
//!
//! [`check_shared`] refuses, before anything is created, what a build must not work in:
//! the daemon's state dir (other builds' private directories and every build's
//! records), `/proc` and `/sys` (where writes change the kernel's state, not files),
//! and, for a build that runs as another user, a directory that user could not enter
//! on its own. The command of such a build changes into its directory only after it
//! became that user ([`crate::spawn`]), so the kernel checks the user's access at that
//! moment, whatever happened to the path since.

use std::path::{Component, Path, PathBuf};

use crate::build::StartError;
use crate::confine::RunAs;

/// Kernel file systems no build runs in.
const FORBIDDEN: &[&str] = &["/proc", "/sys"];

fn bad(path: &Path, reason: impl Into<String>) -> StartError {
    StartError::BadWorkdir {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Checks a shared (absolute) workdir for a build run by a daemon whose state dir is
/// `state_root`, as `user` when given. Returns the path as given (so that the build's
/// `$PWD` is the path its client named).
pub fn check_shared(path: &Path, state_root: &Path, user: Option<RunAs>) -> Result<PathBuf, StartError> {
    let real = path
        .canonicalize()
        .map_err(|e| bad(path, format!("cannot use it: {e}")))?;
    if !real.is_dir() {
        return Err(bad(path, "not a directory"));
    }
    let real_state = state_root.canonicalize().unwrap_or_else(|_| state_root.to_path_buf());
    if real.starts_with(&real_state) {
        return Err(bad(
            path,
            format!(
                "inside the daemon's state dir {} (other builds' directories and records)",
                state_root.display()
            ),
        ));
    }
    if let Some(fs) = FORBIDDEN.iter().find(|f| real.starts_with(f)) {
        return Err(bad(path, format!("inside {fs}, where no build runs")));
    }
    if let Some(user) = user.filter(|u| u.uid != 0) {
        crate::owner::check_enterable(&real, user).map_err(|e| bad(path, e))?;
    }
    Ok(path.to_path_buf())
}

/// The build's cwd: `work` itself; a relative `workdir` inside it, created if missing,
/// that must not leave `work` (lexically or through symlinks; see
/// [`crate::transfer::create_dirs_inside`]); or an absolute one, which must have passed
/// [`check_shared`] when the build was prepared and must still be a directory.
pub fn resolve(work: &Path, workdir: Option<&Path>) -> Result<PathBuf, StartError> {
    let Some(rel) = workdir else {
        return Ok(work.to_path_buf());
    };
    if rel.is_absolute() {
        return match rel.metadata() {
            Ok(m) if m.is_dir() => Ok(rel.to_path_buf()),
            Ok(_) => Err(bad(rel, "not a directory")),
            Err(e) => Err(bad(rel, format!("cannot use it: {e}"))),
        };
    }
    let mut components = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(c) => components.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad(rel, "must not contain '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(rel, "must be relative to the build's work dir, or absolute"))
            }
        }
    }
    let real_work = work.canonicalize().map_err(|e| bad(rel, e.to_string()))?;
    crate::transfer::create_dirs_inside(&real_work, &components).map_err(|e| match e {
        crate::transfer::InsideError::Outside(_) => bad(rel, "resolves outside the build's work dir"),
        other => bad(rel, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(e: StartError) -> String {
        match e {
            StartError::BadWorkdir { reason, .. } => reason,
            other => panic!("expected a bad workdir, got {other:?}"),
        }
    }

    #[test]
    fn shared_dirs_must_exist_and_stay_out_of_the_state_dir() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let ws = t.path().join("workspace/job");
        std::fs::create_dir_all(state.join("instances/x/builds/b")).unwrap();
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(t.path().join("file"), "x").unwrap();
        assert_eq!(check_shared(&ws, &state, None).unwrap(), ws);

        let missing = reason(check_shared(&t.path().join("nope"), &state, None).unwrap_err());
        assert!(missing.contains("No such file"), "{missing}");
        let file = reason(check_shared(&t.path().join("file"), &state, None).unwrap_err());
        assert!(file.contains("not a directory"), "{file}");
        for inside in [state.clone(), state.join("instances/x/builds/b")] {
            let e = reason(check_shared(&inside, &state, None).unwrap_err());
            assert!(e.contains("state dir"), "{e}");
        }
        // Through a symlink too.
        std::os::unix::fs::symlink(state.join("instances"), t.path().join("sneaky")).unwrap();
        let e = reason(check_shared(&t.path().join("sneaky/x"), &state, None).unwrap_err());
        assert!(e.contains("state dir"), "{e}");
        for kernel in ["/proc", "/proc/self", "/sys"] {
            let e = reason(check_shared(Path::new(kernel), &state, None).unwrap_err());
            assert!(e.contains("where no build runs"), "{kernel}: {e}");
        }
        // An ancestor of the state dir is a directory like any other.
        assert!(check_shared(t.path(), &state, None).is_ok());
    }

    #[test]
    fn a_user_must_be_able_to_enter_a_shared_dir() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = t.path().join("state");
        let private = t.path().join("private");
        std::fs::create_dir_all(private.join("ws")).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let user = RunAs { uid: 4242, gid: 4343 };
        let e = reason(check_shared(&private.join("ws"), &state, Some(user)).unwrap_err());
        assert!(e.contains("4242"), "{e}");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(check_shared(&private.join("ws"), &state, Some(user)).is_ok());
        std::fs::set_permissions(private.join("ws"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = reason(check_shared(&private.join("ws"), &state, Some(user)).unwrap_err());
        assert!(e.contains("ws"), "{e}");
    }

    #[test]
    fn relative_workdirs_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let made = resolve(t.path(), Some(Path::new("a/./b"))).unwrap();
        assert!(made.is_dir() && made.ends_with("a/b"), "{}", made.display());
        for escape in ["../x", "a/../../x"] {
            assert!(reason(resolve(t.path(), Some(Path::new(escape))).unwrap_err()).contains(".."));
        }
        std::os::unix::fs::symlink("/", t.path().join("out")).unwrap();
        let e = reason(resolve(t.path(), Some(Path::new("out/etc"))).unwrap_err());
        assert!(e.contains("outside"), "{e}");
        assert_eq!(resolve(t.path(), None).unwrap(), t.path());
        assert_eq!(resolve(t.path(), Some(t.path())).unwrap(), t.path());
    }
}
