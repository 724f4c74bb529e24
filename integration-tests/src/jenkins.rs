//! Jenkins pipelines run outside Jenkins: `integration-tests/jenkins/harness.groovy`,
//! executed by Debian's `groovy` (Groovy 2.4, the Groovy of Jenkins' CPS pipelines),
//! loads the shared library of `images/jenkins/vars/` and runs a Jenkinsfile or a
//! scripted snippet, its `sh` steps running where the caller's exec prefix says (the
//! jnlp container of a [`crate::pod::Pod`]). Tests call [`groovy_usable`] first: without
//! `groovy` or a JDK they print `skipped: ...` and return.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use crate::{Finished, Proc};

/// A pipeline gets this long (a JVM starts per run).
pub const PIPELINE_TIMEOUT: Duration = Duration::from_secs(180);

/// The JDK groovy runs on: `$JAVA_HOME` when it holds `bin/java`, else the one `java` on
/// PATH belongs to.
fn java_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME").map(PathBuf::from) {
        if home.join("bin/java").is_file() {
            return Some(home);
        }
    }
    let path = std::env::var_os("PATH")?;
    let java = std::env::split_paths(&path)
        .map(|d| d.join("java"))
        .find(|p| p.is_file())?;
    let real = java.canonicalize().ok()?;
    Some(real.parent()?.parent()?.to_path_buf())
}

/// Why pipelines cannot run here, or `None` when they can (checked once per process).
pub fn groovy_skip_reason() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            let Some(home) = java_home() else {
                return Some("no JDK (java on PATH or JAVA_HOME) for groovy".into());
            };
            match Command::new("groovy")
                .arg("--version")
                .env("JAVA_HOME", &home)
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!(
                    "`groovy --version` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Some(format!("cannot run groovy (Debian package `groovy`): {e}")),
            }
        })
        .as_deref()
}

/// True when pipelines can run; otherwise prints `skipped: WHY` (the caller returns).
pub fn groovy_usable() -> bool {
    match groovy_skip_reason() {
        None => true,
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// `images/jenkins/FILE`.
pub fn jenkins_file(file: &str) -> PathBuf {
    crate::workspace_root().join("images/jenkins").join(file)
}

/// Runs `pipeline` (a Jenkinsfile or a scripted snippet) with the build environment
/// `env`, its `sh` steps starting in `cwd` and run through `exec` (see the harness);
/// returns what the harness printed and its exit status (0 success, 1 a failed build).
pub fn run_pipeline(pipeline: &Path, env: &[(String, String)], cwd: &str, exec: &[String]) -> Finished {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    let env: serde_json::Map<String, serde_json::Value> = env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let cfg = json!({
        "vars": jenkins_file("vars"),
        "pipeline": pipeline,
        "env": env,
        "cwd": cwd,
        "exec": exec,
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&cfg).expect("json")).expect("config");
    let harness = crate::workspace_root().join("integration-tests/jenkins/harness.groovy");
    let mut cmd = Command::new("groovy");
    cmd.arg(harness).arg(&config).stdin(Stdio::null());
    if let Some(home) = java_home() {
        cmd.env("JAVA_HOME", home);
    }
    Proc::spawn(&mut cmd).finish(PIPELINE_TIMEOUT)
}

/// [`run_pipeline`] of a snippet given as text.
pub fn run_snippet(snippet: &str, env: &[(String, String)], cwd: &str, exec: &[String]) -> Finished {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("snippet.groovy");
    std::fs::write(&file, snippet).expect("snippet");
    run_pipeline(&file, env, cwd, exec)
}
