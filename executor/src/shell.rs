//! Finding a shell for scripts. Build images differ: most have `sh` on PATH or at
//! `/bin/sh`, kaniko's debug image has only `/busybox/sh`. The order is `sh` on the
//! build's PATH, then the fallbacks, and the build is told which one ran.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

/// Shells tried when PATH has no `sh`, in order.
pub const FALLBACK_SHELLS: &[&str] = &["/bin/sh", "/busybox/sh"];

/// Finds `sh` in the absolute directories of `path_var`, else the first executable
/// fallback. Relative PATH entries are ignored: they would depend on the cwd.
pub fn find_shell(path_var: Option<&OsStr>, fallbacks: &[&Path]) -> Option<PathBuf> {
    let on_path = path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join("sh"));
    on_path
        .chain(fallbacks.iter().map(|p| p.to_path_buf()))
        .find(|candidate| is_executable_file(candidate))
}

/// A regular file (after symlinks) that this process may execute.
pub fn is_executable_file(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file()) && access(path, AccessFlags::X_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/true\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn sh_on_path_wins_over_fallbacks() {
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let sh = exe(&bin, "sh");
        let fb = exe(t.path(), "fallback-sh");
        let found = find_shell(Some(bin.as_os_str()), &[&fb]);
        assert_eq!(found, Some(sh));
    }

    #[test]
    fn busybox_layout_found_through_applet_link_on_path() {
        // kaniko's debug image: PATH holds only /busybox, where sh links to busybox.
        let t = tempfile::tempdir().unwrap();
        let bb = t.path().join("busybox");
        std::fs::create_dir(&bb).unwrap();
        exe(&bb, "busybox");
        symlink("busybox", bb.join("sh")).unwrap();
        let found = find_shell(Some(bb.as_os_str()), &[]);
        assert_eq!(found, Some(bb.join("sh")));
    }

    #[test]
    fn falls_back_in_order_when_path_has_no_sh() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("bin-sh-missing");
        let busybox_sh = exe(t.path(), "busybox-sh");
        let found = find_shell(Some(OsStr::new("/nonexistent:relative")), &[&missing, &busybox_sh]);
        assert_eq!(found, Some(busybox_sh));
    }

    #[test]
    fn non_executable_and_relative_entries_are_skipped() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("sh");
        std::fs::write(&p, "").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Running as root, access(X_OK) still needs one x bit on a regular file.
        assert_eq!(find_shell(Some(t.path().as_os_str()), &[]), None);
        assert_eq!(find_shell(Some(OsStr::new(".")), &[]), None);
        assert_eq!(find_shell(None, &[]), None);
    }
}
