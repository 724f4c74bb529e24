//! `tether install DIR` and `tether serve --publish-client DIR`: put this very binary on
//! a volume other containers share, so the `jnlp` container can run `tether run` without
//! any image change.
//!
//! The copy is atomic: written to a temporary file in DIR, made 0755, then renamed over
//! `DIR/tether`. A client starting at the same moment sees the old binary or the new one,
//! never half of one. The source is `/proc/self/exe`, which stays readable even when the
//! file the daemon was started from has been replaced since. A DIR that does not exist
//! yet is created first, with the group and mode the caller's [`Reach`] gives it.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::shared_dirs::{self, Reach};

/// Copies the running binary to `dir/tether`, creating `dir` as `reach` says when it is
/// missing; returns that path.
pub fn install(dir: &Path, reach: Reach) -> anyhow::Result<PathBuf> {
    for made in shared_dirs::ensure(dir, reach)? {
        tracing::info!(dir = %made.display(), mode = format!("{:04o}", reach.mode), group = ?reach.group, "created");
    }
    let mut src = File::open("/proc/self/exe")
        .or_else(|_| File::open(std::env::current_exe()?))
        .context("cannot read the running tether binary")?;
    let dest = dir.join("tether");
    let mut tmp = tempfile::Builder::new()
        .prefix(".tether.")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    std::io::copy(&mut src, tmp.as_file_mut()).with_context(|| format!("cannot write into {}", dir.display()))?;
    tmp.as_file().sync_all().context("cannot flush the copy")?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o755))
        .context("cannot make the copy executable")?;
    tmp.persist(&dest)
        .with_context(|| format!("cannot rename the copy to {}", dest.display()))?;
    Ok(dest)
}
