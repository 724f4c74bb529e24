//! A real Docker registry (distribution 2.8, Debian's `docker-registry` package) on a
//! loopback port, with its storage in a temporary directory, for tests that push and
//! pull images.
//!
//! The registry runs with its own `config.yml` (no auth, filesystem storage, warnings
//! only) and an environment without `REGISTRY_*` variables, which would override the
//! configuration. Tests call [`Registry::available`] first and print `skipped: ...` when
//! the package is not installed (`scripts/test` installs it when it runs as root).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{wait_child, Collector};

/// Where Debian's package installs the registry.
const DEBIAN_BIN: &str = "/usr/bin/docker-registry";

/// A `docker-registry serve` child; killed and reaped on drop.
pub struct Registry {
    child: Child,
    dir: TempDir,
    port: u16,
    stdout: Collector,
    stderr: Collector,
}

impl Registry {
    /// The registry binary: `/usr/bin/docker-registry`, else `docker-registry` on PATH.
    pub fn bin() -> Option<PathBuf> {
        let debian = Path::new(DEBIAN_BIN);
        if debian.is_file() {
            return Some(debian.to_path_buf());
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("docker-registry"))
            .find(|p| p.is_file())
    }

    /// True when the registry binary exists.
    pub fn available() -> bool {
        Self::bin().is_some()
    }

    /// A loopback port that was free a moment ago (bound to port 0, read, released).
    pub fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        l.local_addr().expect("local_addr").port()
    }

    /// Starts `docker-registry serve CONFIG` on `127.0.0.1:port` with a fresh storage
    /// directory; does not wait for it to listen (see [`Registry::wait_ready`]).
    pub fn start(port: u16) -> Registry {
        let bin = Self::bin().expect("docker-registry is not installed (apt-get install docker-registry)");
        let dir = tempfile::Builder::new()
            .prefix("tether-registry-")
            .tempdir()
            .expect("creating the registry's temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("creating the registry's storage dir");
        let config = dir.path().join("config.yml");
        std::fs::write(&config, config_yml(&storage, port)).expect("writing the registry's config.yml");
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", bin.display()));
        // It logs to stderr; collect stdout too, in case.
        let stdout = Collector::spawn(child.stdout.take().expect("stdout is piped"));
        let stderr = Collector::spawn(child.stderr.take().expect("stderr is piped"));
        Registry {
            child,
            dir,
            port,
            stdout,
            stderr,
        }
    }

    /// Polls `GET /v2/` until it answers 200; false if `timeout` passes first or the
    /// registry exits.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if get_status(self.port, "/v2/") == Some(200) {
                return true;
            }
            // `try_wait` needs `&mut`; the pid check tells whether it still runs.
            if crate::pid_gone(self.child.id() as i32) || is_zombie(self.child.id()) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// `http://127.0.0.1:PORT/v2/`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v2/", self.port)
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory the registry stores blobs and manifests in.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// What the registry logged so far (for failure messages).
    pub fn log(&self) -> String {
        self.stderr.text() + &self.stdout.text()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        if wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.wait();
        }
    }
}

/// The registry's configuration: filesystem storage in `storage`, plain HTTP on
/// `127.0.0.1:port`, no auth, deletes allowed, warnings only, no access log, and a fixed
/// HTTP secret (without one it warns at start-up).
fn config_yml(storage: &Path, port: u16) -> String {
    format!(
        "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: tether-integration-tests
",
        storage = yaml_quote(&storage.to_string_lossy()),
    )
}

/// A double-quoted YAML scalar.
fn yaml_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// True when `pid` is a zombie (exited, not yet reaped).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The status of `GET path` on `127.0.0.1:port`, or `None` when there is no answer.
pub fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.contains(&b'\n') {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ').nth(1)?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_answers_v2() {
        if !Registry::available() {
            eprintln!("skipped: docker-registry is not installed (apt-get install docker-registry)");
            return;
        }
        let reg = Registry::start(Registry::free_port());
        assert!(
            reg.wait_ready(Duration::from_secs(30)),
            "the registry never answered {}; log:\n{}",
            reg.url(),
            reg.log()
        );
        assert_eq!(get_status(reg.port(), "/v2/"), Some(200));
        assert_eq!(get_status(reg.port(), "/v2/_catalog"), Some(200));
        assert!(reg.url().ends_with("/v2/"));
        assert!(reg.storage_dir().is_dir());
        let port = reg.port();
        drop(reg);
        assert_eq!(get_status(port, "/v2/"), None, "the registry still answers after drop");
    }
}
