//! The executor: the state dir, the reaper, and the factory of builds and shells.

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::attach::Attachments;
use crate::build::{self, Build, BuildSpec, Launch, StartError};
use crate::interactive::{self, Shell, ShellLaunch, ShellSpec};
use crate::reaper::Reaper;
use crate::spool::{SpoolLimits, SpoolSet};
use crate::statedir::BuildDir;
use crate::statedir::{StateDir, StateDirError, SweepReport};

/// Subdirectory of the instance dir holding the builds' output spools.
const RECORDS: &str = "records";

/// How the executor runs builds.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Where build dirs live (see [`crate::statedir`]).
    pub state_root: PathBuf,
    /// Grace period between SIGTERM and SIGKILL when a spec names none.
    pub default_grace: Duration,
    /// Largest output chunk read at once.
    pub chunk_size: usize,
    /// Every build's environment starts from this.
    pub base_env: Vec<(OsString, OsString)>,
    /// Shells tried for scripts when PATH has no `sh`.
    pub fallback_shells: Vec<PathBuf>,
    /// Disk quotas of the output spools.
    pub spool: SpoolLimits,
}

/// Default per-build spool quota: 1 GiB.
pub const DEFAULT_BUILD_QUOTA: u64 = 1 << 30;
/// Default spool quota of all builds together: 4 GiB.
pub const DEFAULT_TOTAL_QUOTA: u64 = 4 << 30;

impl ExecutorConfig {
    /// Defaults: the default state root, 10 s grace, 64 KiB chunks, the current
    /// environment, `/bin/sh` then `/busybox/sh`.
    pub fn new() -> Self {
        ExecutorConfig {
            state_root: crate::statedir::default_root(),
            default_grace: Duration::from_secs(10),
            chunk_size: 64 * 1024,
            base_env: std::env::vars_os().collect(),
            fallback_shells: crate::shell::FALLBACK_SHELLS.iter().map(PathBuf::from).collect(),
            spool: SpoolLimits {
                build_quota: DEFAULT_BUILD_QUOTA,
                total_quota: DEFAULT_TOTAL_QUOTA,
            },
        }
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The executor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error("cannot start the reaper: {0}")]
    Reaper(std::io::Error),
    #[error("cannot create the output spool directory: {0}")]
    Spool(std::io::Error),
}

/// Starts builds. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ExecutorConfig,
    reaper: Reaper,
    state: StateDir,
    spools: Arc<SpoolSet>,
}

impl Executor {
    /// Opens the state dir (sweeping what dead daemons left) and starts the reaper.
    /// From here on this process must not wait for children by any other means.
    pub fn new(config: ExecutorConfig) -> Result<(Executor, SweepReport), ExecutorError> {
        let reaper = Reaper::global().map_err(ExecutorError::Reaper)?;
        let (state, swept) = StateDir::open(&config.state_root)?;
        let spools = SpoolSet::new(state.instance_dir().join(RECORDS), config.spool).map_err(ExecutorError::Spool)?;
        let inner = Inner {
            config,
            reaper,
            state,
            spools,
        };
        Ok((Executor { inner: Arc::new(inner) }, swept))
    }

    /// Starts a build in a fresh private directory.
    pub fn start(&self, spec: BuildSpec) -> Result<Build, StartError> {
        self.prepare(spec)?.start()
    }

    /// Creates a build's private directory without starting its command, so that files
    /// can be put into its work dir first ([`Prepared::work_dir`]); [`Prepared::start`]
    /// starts it. A `Prepared` that is dropped instead removes its directory.
    pub fn prepare(&self, spec: BuildSpec) -> Result<Prepared, StartError> {
        let inner = &*self.inner;
        if let Some(shared) = spec.workdir.as_deref().filter(|w| w.is_absolute()) {
            crate::workdir::check_shared(shared, inner.state.root(), spec.confine.user)?;
        }
        let name = spec.name.as_deref().unwrap_or("build");
        // The dir is `<id>.<random>` when the id is known, so a person finds it by id.
        let dir = inner
            .state
            .create_build_dir(spec.id.as_deref().unwrap_or(name))
            .map_err(|e| StartError::BuildDir(e.to_string()))?;
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => dir
                .root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| name.to_owned()),
        };
        if let Some(user) = spec.confine.user {
            // Shells opened before the command (as that user) can work in it at once;
            // what goes into it later is given again at the start.
            let given = crate::owner::check_reachable(&dir.root, user)
                .map_err(io::Error::other)
                .and_then(|()| crate::owner::give_tree(&dir.root, user));
            if let Err(e) = given {
                if let Err(e) = dir.remove() {
                    tracing::warn!(error = %e, "cannot remove the directory of a build that could not start");
                }
                return Err(StartError::GiveDir {
                    uid: user.uid,
                    source: e,
                });
            }
        }
        let cookie = crate::hunt::new_cookie();
        let env = build::build_env(&inner.config.base_env, &spec.env, &id, &dir.tmp, &cookie).into();
        Ok(Prepared {
            executor: self.clone(),
            parts: Some((spec, dir)),
            id,
            env,
            cookie,
            attachments: Attachments::new(),
        })
    }

    /// Starts an interactive shell (or `spec.argv`) in a pty or with pipes; see
    /// [`crate::interactive`]. With `attach`, the shell is listed there (a build's
    /// [`Build::attachments`] or [`Prepared::attachments`]) and ends before the build's
    /// directory is removed; a build that already began to end refuses it
    /// ([`StartError::BadWorkdir`]). Must be called within a tokio runtime.
    pub fn shell(&self, spec: ShellSpec, attach: Option<&Attachments>) -> Result<Shell, StartError> {
        let inner = &*self.inner;
        let cwd = spec.cwd.clone();
        let start = move || {
            interactive::start(
                spec,
                ShellLaunch {
                    reaper: &inner.reaper,
                    fallback_shells: &inner.config.fallback_shells,
                    chunk_size: inner.config.chunk_size,
                },
            )
        };
        match attach {
            Some(attachments) => attachments.attach(&cwd, start),
            None => start(),
        }
    }

    /// The output spools of this executor's builds.
    pub fn spools(&self) -> &Arc<SpoolSet> {
        &self.inner.spools
    }

    /// The state dir this executor owns.
    pub fn state(&self) -> &StateDir {
        &self.inner.state
    }

    /// Removes this executor's state (its instance dir), at shutdown once every build
    /// finished. Builds started afterwards fail.
    pub fn remove_state(&self) -> Result<crate::cleanup::RemoveReport, StateDirError> {
        self.inner.state.remove_in_place()
    }

    /// The reaper (for callers that must know when processes die).
    pub fn reaper(&self) -> &Reaper {
        &self.inner.reaper
    }
}

/// A build whose directory exists and whose command has not started
/// ([`Executor::prepare`]). Dropping it removes the directory.
#[derive(Debug)]
pub struct Prepared {
    executor: Executor,
    /// `None` once handed to the build or removed.
    parts: Option<(BuildSpec, BuildDir)>,
    id: String,
    /// The build's environment, computed once: the build and its shells share it.
    env: Arc<[(OsString, OsString)]>,
    /// Marks its processes ([`crate::hunt`]).
    cookie: OsString,
    /// Shells opened in the directory before the build starts; they move into the build.
    attachments: Attachments,
}

impl Prepared {
    /// The build's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The private work dir the command will run in (or in `workdir` inside it).
    pub fn work_dir(&self) -> &std::path::Path {
        match &self.parts {
            Some((_, dir)) => &dir.work,
            None => std::path::Path::new(""),
        }
    }

    /// The environment the build's command will get (and [`Build::env`] will hold), for
    /// shells opened in the prepared build.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        self.env.to_vec()
    }

    /// The user and limits the build's command will run with (its shells run so too).
    pub fn confine(&self) -> crate::confine::Confinement {
        self.parts.as_ref().map(|(spec, _)| spec.confine).unwrap_or_default()
    }

    /// Gives everything put into the directory so far to the user the build runs as
    /// (when it has one), so that shells opened before the command can change it.
    /// [`Prepared::start`] does it again for what comes later.
    pub fn give_to_user(&self) -> Result<(), StartError> {
        match &self.parts {
            Some((spec, dir)) => match spec.confine.user {
                Some(user) => crate::owner::give_tree(&dir.root, user)
                    .map(drop)
                    .map_err(|e| StartError::GiveDir {
                        uid: user.uid,
                        source: e,
                    }),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// The secrets masked in the build's output (and in its shells').
    pub fn secrets(&self) -> crate::mask::Secrets {
        self.parts
            .as_ref()
            .map(|(spec, _)| spec.secrets.clone())
            .unwrap_or_default()
    }

    /// The list shells opened in this build attach to ([`Executor::shell`]). It moves
    /// into the [`Build`] on start; dropping or discarding the `Prepared` kills them.
    pub fn attachments(&self) -> Attachments {
        self.attachments.clone()
    }

    /// Starts the command; on error the directory is removed (and attached shells end).
    pub fn start(mut self) -> Result<Build, StartError> {
        let (spec, dir) = self
            .parts
            .take()
            .ok_or_else(|| StartError::BuildDir("already removed".into()))?;
        let inner = &*self.executor.inner;
        build::spawn(
            spec,
            Launch {
                reaper: &inner.reaper,
                spools: &inner.spools,
                dir,
                id: self.id.clone(),
                env: Arc::clone(&self.env),
                cookie: self.cookie.clone(),
                attachments: self.attachments.clone(),
                fallback_shells: &inner.config.fallback_shells,
                default_grace: inner.config.default_grace,
                chunk_size: inner.config.chunk_size,
            },
        )
    }

    /// Kills the shells attached to it, then removes the directory and whatever was put
    /// into it (a blocking call: run it off the async runtime's threads when the tree
    /// may be large).
    pub fn discard(mut self) {
        self.remove_dir();
    }

    fn remove_dir(&mut self) {
        if let Some((_, dir)) = self.parts.take() {
            self.attachments.kill_all();
            if crate::hunt::needed(&self.executor.inner.reaper) {
                crate::hunt::kill_carriers(&self.cookie, &[]);
            }
            if let Err(e) = dir.remove() {
                tracing::warn!(build = %self.id, error = %e, "cannot remove the directory of a build that never started");
            }
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.remove_dir();
    }
}
