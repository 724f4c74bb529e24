//! A Jenkins Kubernetes agent pod, run here from a pod template in `images/jenkins/`:
//! the template's YAML is read, not restated, so a field changed there changes what
//! runs here.
//!
//! What is emulated, and how (Kubernetes itself cannot run here):
//! - the workspace volume the Kubernetes plugin mounts at `/home/jenkins/agent` in every
//!   container: one empty host directory, as a fresh `emptyDir` with `fsGroup` is
//!   (group fsGroup, mode 2777), bind-mounted into every container;
//! - each `emptyDir` volume of the template: an empty host directory (0777), mounted
//!   where the containers' `volumeMounts` say (read-only where they say so);
//! - images: `FROM scratch` images of `images/` hold what their Dockerfile `COPY`s (the
//!   static tether); every other image is kaniko's debug image's layout (busybox at
//!   `/busybox`, no `/bin/sh`), with the static tether where a Dockerfile of `images/`
//!   copies it, and, for kaniko's images, [`KANIKO_STAND_IN`] at `/kaniko/executor`;
//! - a container's command: the template's `command` (else the Dockerfile's
//!   `ENTRYPOINT`) followed by its `args` (else the Dockerfile's `CMD`), its `env`, and
//!   `stdin: true` as a pipe the test keeps open and never writes to;
//! - the capabilities Kubernetes' runtimes give a container's root by default
//!   ([`crate::container::KUBERNETES_CAPABILITIES`]);
//! - `fsGroup` as a supplementary group of the jnlp container's user, which the test
//!   chooses (`1000:1000` as the Jenkins agent image has, or an arbitrary uid with gid 0
//!   as OpenShift runs pods).
//!
//! Init containers run to completion first; then the build containers start (`runc run`
//! with tether as PID 1), or, given an [`ApiServer`], are started and served by it (for
//! `kubectl attach`; the jnlp container then shares the host's network, to reach it);
//! the pod is ready when every daemon's `--socket` accepts connections (or, without
//! one, its `--publish-client` copy is there). `bitnami/kubectl` images get the host's
//! static kubectl. The jnlp container is a busybox image with `/bin/sh` whose process
//! sleeps: its part is played by [`Pod::exec_prefix`], with which a test runs commands
//! there as its user (as the Jenkins agent runs `sh` steps).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use crate::container::{Bundle, Session};
use crate::k8s::ApiServer;
use crate::{wait_until, Proc, TIMEOUT};

/// Where the Kubernetes plugin mounts the workspace volume in every container.
pub const AGENT_DIR: &str = "/home/jenkins/agent";

/// The pod's name (what the downward API's `metadata.name` gives).
pub const POD_NAME: &str = "agent-1";

/// Where `bitnami/kubectl` images keep kubectl.
const BITNAMI_KUBECTL: &str = "/opt/bitnami/kubectl/bin/kubectl";

/// kaniko's image is not available here: this busybox script takes its place at
/// `/kaniko/executor`. It checks the arguments a build gives it (a `dir://` context
/// holding a Dockerfile, a destination) and "pushes" by writing the Dockerfile's
/// SHA-256 to `--digest-file`, so a test can tell that a step ran in the workspace.
pub const KANIKO_STAND_IN: &str = r#"#!/busybox/sh
context= dest= digest_file=
while [ $# -gt 0 ]; do
  case "$1" in
    --context) context=${2#dir://}; shift 2 ;;
    --destination) dest=$2; shift 2 ;;
    --digest-file) digest_file=$2; shift 2 ;;
    *) shift ;;
  esac
done
[ -f "$context/Dockerfile" ] || { echo "error: no Dockerfile in ${context:-the context}" >&2; exit 1; }
[ -n "$dest" ] || { echo "error: no --destination" >&2; exit 1; }
digest="sha256:$(sha256sum "$context/Dockerfile" | cut -d' ' -f1)"
echo "INFO pushing $dest ($digest)" >&2
[ -z "$digest_file" ] || printf '%s' "$digest" > "$digest_file"
"#;

/// Images the templates name that `images/` builds, and their Dockerfiles.
const OWN_IMAGES: &[(&str, &str)] = &[
    ("registry.example.com/kaniko-tether:", "kaniko/Dockerfile"),
    ("registry.example.com/tether:", "tether/Dockerfile"),
];

/// The PATH of kaniko's debug image (and of the busybox images here).
const IMAGE_PATH: &str = "PATH=/usr/local/bin:/kaniko:/busybox";

fn images_dir() -> PathBuf {
    crate::workspace_root().join("images")
}

/// A container of a pod template, as far as the pod here needs it.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// The command line the container runs (command/args over ENTRYPOINT/CMD).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (volume name, mount path, read-only)
    pub mounts: Vec<(String, String, bool)>,
    pub stdin: bool,
    pub tty: bool,
}

impl ContainerSpec {
    /// The value of `--FLAG VALUE` in the container's command line.
    pub fn flag(&self, flag: &str) -> Option<&str> {
        let i = self.argv.iter().position(|a| a == flag)?;
        self.argv.get(i + 1).map(String::as_str)
    }

    /// Whether the container's command is a tether daemon.
    pub fn serves(&self) -> bool {
        self.argv.first().is_some_and(|a| a.ends_with("/tether"))
            && self.argv.get(1).map(String::as_str) == Some("serve")
    }

    pub fn env_var(&self, name: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A pod template of `images/jenkins/`.
#[derive(Debug, Clone)]
pub struct PodTemplate {
    pub fs_group: Option<u32>,
    pub init_containers: Vec<ContainerSpec>,
    pub containers: Vec<ContainerSpec>,
    /// Names of its `emptyDir` volumes.
    pub empty_dirs: Vec<String>,
}

/// `ENTRYPOINT`, `CMD` and the destinations of `COPY` of a Dockerfile.
struct Dockerfile {
    from_scratch: bool,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    copies_to: Vec<String>,
}

fn dockerfile(rel: &str) -> Dockerfile {
    let text = std::fs::read_to_string(images_dir().join(rel)).unwrap_or_else(|e| panic!("images/{rel}: {e}"));
    let mut d = Dockerfile {
        from_scratch: false,
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        copies_to: Vec::new(),
    };
    let json = |s: &str| -> Vec<String> {
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("images/{rel}: {s}: {e}"))
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("FROM ") {
            d.from_scratch = rest.trim() == "scratch";
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            d.entrypoint = json(rest);
        } else if let Some(rest) = line.strip_prefix("CMD ") {
            d.cmd = json(rest);
        } else if let Some(rest) = line.strip_prefix("COPY ") {
            if let Some(dest) = rest.split_whitespace().last() {
                d.copies_to.push(dest.to_owned());
            }
        }
    }
    d
}

fn own_image(image: &str) -> Option<Dockerfile> {
    OWN_IMAGES
        .iter()
        .find(|(prefix, _)| image.starts_with(prefix))
        .map(|(_, file)| dockerfile(file))
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|w| match w {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => panic!("not a string: {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn container(c: &Yaml) -> ContainerSpec {
    let image = c["image"].as_str().unwrap_or("").to_owned();
    let own = own_image(&image);
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    let mut argv = if !command.is_empty() {
        command
    } else {
        own.as_ref().map(|d| d.entrypoint.clone()).unwrap_or_default()
    };
    if !args.is_empty() || c["command"].is_badvalue() {
        argv.extend(if args.is_empty() {
            own.as_ref().map(|d| d.cmd.clone()).unwrap_or_default()
        } else {
            args
        });
    }
    let env = c["env"]
        .as_vec()
        .map(|v| {
            v.iter()
                .map(|e| {
                    let name = e["name"].as_str().expect("env name").to_owned();
                    let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                        (Some(v), _) => v.to_owned(),
                        // The downward API: the one field the templates use.
                        (None, Some("metadata.name")) => POD_NAME.to_owned(),
                        _ => panic!("env {name}: only values and fieldRef metadata.name are emulated"),
                    };
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default();
    let mounts = c["volumeMounts"]
        .as_vec()
        .map(|v| {
            v.iter()
                .map(|m| {
                    (
                        m["name"].as_str().expect("mount name").to_owned(),
                        m["mountPath"].as_str().expect("mountPath").to_owned(),
                        m["readOnly"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    ContainerSpec {
        name: c["name"].as_str().expect("container name").to_owned(),
        image,
        argv,
        env,
        mounts,
        stdin: c["stdin"].as_bool().unwrap_or(false),
        tty: c["tty"].as_bool().unwrap_or(false),
    }
}

impl PodTemplate {
    /// Reads `images/jenkins/FILE`.
    pub fn load(file: &str) -> PodTemplate {
        let path = images_dir().join("jenkins").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let spec = &docs[0]["spec"];
        let list = |key: &str| -> Vec<ContainerSpec> {
            spec[key]
                .as_vec()
                .map(|v| v.iter().map(container).collect())
                .unwrap_or_default()
        };
        PodTemplate {
            fs_group: spec["securityContext"]["fsGroup"].as_i64().map(|g| g as u32),
            init_containers: list("initContainers"),
            containers: list("containers"),
            empty_dirs: spec["volumes"]
                .as_vec()
                .map(|v| {
                    v.iter()
                        .filter(|vol| !vol["emptyDir"].is_badvalue())
                        .map(|vol| vol["name"].as_str().expect("volume name").to_owned())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn container(&self, name: &str) -> &ContainerSpec {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in the template"))
    }
}

/// The jnlp container's user (its supplementary group is the template's `fsGroup`).
#[derive(Debug, Clone, Copy)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// A build container running tether: its own (with the session that keeps its stdin
/// open), or served by an [`ApiServer`].
pub struct Daemon {
    pub name: String,
    rootfs: PathBuf,
    own: Option<(Bundle, Session)>,
}

/// A running pod. Dropping it removes every container, then the volumes (fields drop
/// in this order).
pub struct Pod {
    /// Build containers running tether.
    pub daemons: Vec<Daemon>,
    pub jnlp: Bundle,
    pub template: PodTemplate,
    /// The workspace volume (`/home/jenkins/agent` in every container).
    workspace: tempfile::TempDir,
    _volumes: HashMap<String, tempfile::TempDir>,
    pub user: User,
    pub groups: Vec<u32>,
}

impl Pod {
    /// Starts the pod of `images/jenkins/FILE` with the jnlp container running as
    /// `user`, and waits until every daemon's socket answers. The caller checked
    /// [`crate::container::runc_usable`].
    pub fn start(file: &str, user: User) -> Pod {
        Pod::start_with(file, user, None)
    }

    /// [`Pod::start`], its build containers served by `api` (attachable with the real
    /// kubectl) when given.
    pub fn start_with(file: &str, user: User, api: Option<&ApiServer>) -> Pod {
        let template = PodTemplate::load(file);
        let workspace = tempfile::Builder::new()
            .prefix("tether-pod-ws")
            .tempdir()
            .expect("tempdir");
        let fs_group = template.fs_group;
        if let Some(g) = fs_group {
            nix::unistd::chown(workspace.path(), None, Some(nix::unistd::Gid::from_raw(g))).expect("chgrp workspace");
        }
        std::fs::set_permissions(workspace.path(), std::fs::Permissions::from_mode(0o2777)).expect("chmod");
        let mut volumes = HashMap::new();
        for name in &template.empty_dirs {
            let dir = tempfile::Builder::new()
                .prefix("tether-pod-vol")
                .tempdir()
                .expect("tempdir");
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
            volumes.insert(name.clone(), dir);
        }
        let mounted = |spec: &ContainerSpec, b: crate::container::BundleBuilder| {
            let mut b = b.bind_mount(workspace.path(), AGENT_DIR);
            for (vol, path, ro) in &spec.mounts {
                let dir = volumes
                    .get(vol)
                    .unwrap_or_else(|| panic!("{}: no emptyDir volume {vol}", spec.name));
                b = if *ro {
                    b.bind_mount_ro(dir.path(), path)
                } else {
                    b.bind_mount(dir.path(), path)
                };
            }
            b
        };

        for init in &template.init_containers {
            let bundle = mounted(init, image_bundle(init)).build();
            let mut cmd = bundle.run_command();
            cmd.stdin(Stdio::null());
            let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
            assert!(
                r.status.success(),
                "init container {} ({:?}) failed: {}",
                init.name,
                init.argv,
                r.stderr_text()
            );
        }

        let mut daemons = Vec::new();
        for spec in template.containers.iter().filter(|c| c.serves()) {
            let bundle = mounted(spec, image_bundle(spec)).build();
            assert!(
                spec.stdin && !spec.tty,
                "{}: a daemon's stdin is its protocol channel",
                spec.name
            );
            let rootfs = bundle.rootfs();
            let own = match api {
                Some(api) => {
                    api.run_container(POD_NAME, &spec.name, bundle);
                    None
                }
                None => {
                    let session = bundle.start();
                    Some((bundle, session))
                }
            };
            daemons.push(Daemon {
                name: spec.name.clone(),
                rootfs,
                own,
            });
        }
        let groups: Vec<u32> = fs_group.into_iter().collect();
        let jnlp_spec = template.container("jnlp").clone();
        let mut env = vec!["PATH=/busybox:/bin".to_owned()];
        env.extend(jnlp_spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        let mut jnlp = Bundle::builder()
            .without_tether()
            .with_bin()
            .env(env)
            .user(user.uid, user.gid, &groups)
            .args(["/busybox/sleep", "1000000"]);
        if let Some(api) = api {
            // kubectl reaches the API server on the host's loopback, with its kubeconfig
            // where in-cluster credentials would be.
            let kubeconfig = std::fs::read(api.kubeconfig()).expect("the kubeconfig");
            jnlp = jnlp.host_network().file("/kubeconfig", &kubeconfig, 0o644);
        }
        let jnlp = mounted(&jnlp_spec, jnlp).build();
        // Detached: its stdio must not be pipes this test waits on.
        let log = jnlp.path().join("runc.log");
        let mut cmd = jnlp.runc();
        cmd.arg("run")
            .arg("-d")
            .arg("--bundle")
            .arg(jnlp.path())
            .arg(jnlp.id())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("runc log"));
        let mut child = cmd.spawn().expect("runc run -d");
        let st = crate::wait_child(&mut child, TIMEOUT).expect("runc run -d returns");
        assert!(
            st.success(),
            "runc run -d jnlp: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );

        let pod = Pod {
            daemons,
            jnlp,
            template,
            workspace,
            _volumes: volumes,
            user,
            groups,
        };
        for daemon in &pod.daemons {
            let spec = pod.template.container(&daemon.name);
            let log = || daemon.own.as_ref().map(|(_, s)| s.stderr.text()).unwrap_or_default();
            let ready = match (spec.flag("--socket"), spec.flag("--publish-client")) {
                (Some(sock), _) => {
                    let sock = pod.host_path(sock);
                    wait_until(Duration::from_secs(60), || {
                        std::os::unix::net::UnixStream::connect(&sock).is_ok()
                    })
                }
                (None, Some(dir)) => {
                    let client = pod.host_path(dir).join("tether");
                    wait_until(Duration::from_secs(60), || client.is_file())
                }
                (None, None) => true,
            };
            assert!(ready, "{}: never ready; its stderr:\n{}", daemon.name, log());
        }
        pod
    }

    /// Where a path under [`AGENT_DIR`] in a container is on the host.
    pub fn host_path(&self, in_container: &str) -> PathBuf {
        let rel = Path::new(in_container)
            .strip_prefix(AGENT_DIR)
            .unwrap_or_else(|_| panic!("{in_container} is not on the workspace volume"));
        self.workspace.path().join(rel)
    }

    /// The command prefix that runs a program in the jnlp container as its user, in the
    /// directory `{cwd}` stands for (the Groovy harness fills it in).
    pub fn exec_prefix(&self) -> Vec<String> {
        let mut v = vec![
            "runc".to_owned(),
            "--root".to_owned(),
            self.jnlp.runc_root().to_string_lossy().into_owned(),
            "exec".to_owned(),
            "--user".to_owned(),
            format!("{}:{}", self.user.uid, self.user.gid),
        ];
        for g in &self.groups {
            v.push("--additional-gids".to_owned());
            v.push(g.to_string());
        }
        v.extend(["--cwd".to_owned(), "{cwd}".to_owned(), self.jnlp.id().to_owned()]);
        v
    }

    /// Runs `script` with `/bin/sh` in the jnlp container as its user, in `cwd`.
    pub fn jnlp_sh(&self, cwd: &str, script: &str) -> crate::Finished {
        let prefix: Vec<String> = self
            .exec_prefix()
            .into_iter()
            .map(|a| a.replace("{cwd}", cwd))
            .collect();
        let mut cmd = Command::new(&prefix[0]);
        cmd.args(&prefix[1..])
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null());
        Proc::spawn(&mut cmd).finish(TIMEOUT)
    }

    /// Runs `script` with `/bin/sh` in the jnlp container as `uid:gid` with no
    /// supplementary group at all (`runc exec --user` would keep the container's).
    pub fn jnlp_sh_as(&self, uid: u32, gid: u32, script: &str) -> crate::Finished {
        let dir = tempfile::tempdir().expect("tempdir");
        let process = dir.path().join("process.json");
        let spec = serde_json::json!({
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": ["/bin/sh", "-c", script],
            "env": ["PATH=/busybox:/bin"],
            "cwd": "/",
        });
        std::fs::write(&process, serde_json::to_vec(&spec).expect("json")).expect("process.json");
        let mut cmd = self.jnlp.runc();
        cmd.arg("exec")
            .arg("-p")
            .arg(&process)
            .arg(self.jnlp.id())
            .stdin(Stdio::null());
        Proc::spawn(&mut cmd).finish(TIMEOUT)
    }

    /// The build dirs left in the state dir of daemon container `name`.
    pub fn build_dirs(&self, name: &str) -> Vec<PathBuf> {
        let daemon = self
            .daemons
            .iter()
            .find(|d| d.name == name)
            .expect("a daemon container");
        let spec = self.template.container(name);
        let state = spec.flag("--state-dir").unwrap_or("/tmp/tether-0");
        let root = daemon.rootfs.join(state.trim_start_matches('/'));
        crate::subdirs(&root.join("instances"))
            .into_iter()
            .flat_map(|inst| crate::subdirs(&inst.join("builds")))
            .collect()
    }

    /// The stderr of daemon container `name` so far (its log).
    pub fn daemon_log(&self, name: &str) -> String {
        let daemon = self
            .daemons
            .iter()
            .find(|d| d.name == name)
            .expect("a daemon container");
        daemon.own.as_ref().map(|(_, s)| s.stderr.text()).unwrap_or_default()
    }
}

/// The bundle of a container's image, running its command line.
fn image_bundle(spec: &ContainerSpec) -> crate::container::BundleBuilder {
    let own = own_image(&spec.image);
    let mut env = vec![IMAGE_PATH.to_owned()];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut b = Bundle::builder()
        .without_tether()
        .env(env)
        .capabilities(crate::container::KUBERNETES_CAPABILITIES)
        .args(spec.argv.clone());
    match &own {
        Some(d) if d.from_scratch => b = b.empty_rootfs(),
        _ => {}
    }
    if let Some(d) = &own {
        let bin = std::fs::read(crate::container::static_tether()).expect("the static tether");
        for dest in &d.copies_to {
            b = b.file(dest, &bin, 0o755);
        }
    }
    if spec.image.contains("kaniko") {
        b = b.file("/kaniko/executor", KANIKO_STAND_IN.as_bytes(), 0o755);
    }
    if spec.image.starts_with("bitnami/kubectl") {
        let kubectl = crate::k8s::static_kubectl().expect("a static kubectl binary for a bitnami/kubectl image");
        b = b.file(
            BITNAMI_KUBECTL,
            &std::fs::read(kubectl).expect("reading kubectl"),
            0o755,
        );
    }
    b
}
