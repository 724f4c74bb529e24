//! The tether image (`images/tether/Dockerfile`: `FROM scratch` and the static binary)
//! built for real with buildah, offline, exported as an OCI image layout
//! (`buildah push IMAGE oci:DIR`), checked blob by blob, unpacked and run under runc:
//! tether as PID 1 of its own image answering `tether run --via 'runc run ...'`, and the
//! image as an init container (`install /shared`).
//!
//! buildah keeps its storage in the test's temporary directory with the vfs driver (no
//! overlay mounts, no fuse, no user namespaces: it runs as root). Skipped, with the
//! reason printed, without root, buildah (Debian package `buildah`), runc or a static
//! busybox.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use integration_tests::container::{runc_usable, static_tether, Bundle};
use integration_tests::{Finished, Proc, TIMEOUT};
use serde_json::Value;
use sha2::{Digest, Sha256};

const DOCKERFILE: &str = "images/tether/Dockerfile";
const TAG: &str = "localhost/tether-image-test:latest";
/// The host's static busybox, bind-mounted into a container to run a script there (the
/// image has no shell; it is meant to be copied from).
const HOST_BUSYBOX: &str = "/bin/busybox";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Why images cannot be built here, or `None`.
fn buildah_skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("building images with buildah (vfs storage, no user namespace) needs root".into());
    }
    match Command::new("buildah").arg("--version").stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`buildah --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run buildah (Debian package `buildah`): {e}")),
    }
}

/// True when images can be built and run here; otherwise prints `skipped: WHY`.
fn usable() -> bool {
    if let Some(why) = buildah_skip_reason() {
        eprintln!("skipped: {why}");
        return false;
    }
    runc_usable()
}

/// buildah with private storage, run root and TMPDIR in a temporary directory.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        let dir = tempfile::Builder::new().prefix("tether-buildah").tempdir().unwrap();
        for d in ["storage", "run", "tmp"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        Buildah { dir }
    }

    /// Runs `buildah GLOBAL-FLAGS ARGS` and waits for it (a test failure if it fails).
    fn run(&self, args: &[&str]) -> Finished {
        let d = self.dir.path();
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("TMPDIR", d.join("tmp"))
            .stdin(Stdio::null());
        let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
        assert!(
            r.status.success(),
            "buildah {args:?} failed ({}):\n{}\n{}",
            r.status,
            r.stdout_text(),
            r.stderr_text()
        );
        r
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The build context: the Dockerfile, and the static binary at the path each of its
/// `COPY` lines names (relative to the workspace root, where `scripts/build-static`
/// writes it). A copy rather than the workspace itself: target/ is huge and
/// `$CARGO_TARGET_DIR` may put it elsewhere.
fn build_context(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(workspace().join(DOCKERFILE)).unwrap();
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("Dockerfile"), &text).unwrap();
    let mut copies = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        let src = rest.split_whitespace().next().expect("COPY has a source");
        assert!(src.ends_with("/tether"), "{DOCKERFILE}: unexpected COPY source {src}");
        let dst = dir.join(src);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(static_tether(), &dst).unwrap();
        copies += 1;
    }
    assert_eq!(copies, 1, "{DOCKERFILE} copies the binary once");
    dir.to_path_buf()
}

/// An image in an OCI image layout, its blobs checked against their digests.
struct OciImage {
    /// The image config's `config` (Entrypoint, Cmd, Env...).
    config: Value,
    /// Each layer's media type and blob, bottom first.
    layers: Vec<(String, PathBuf)>,
}

/// The path of a blob of the layout, after checking its digest.
fn blob(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    let path = layout.join("blobs").join("sha256").join(hex);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(format!("{:x}", Sha256::digest(&bytes)), hex, "{}", path.display());
    path
}

fn json_blob(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&fs::read(blob(layout, digest)).unwrap()).unwrap()
}

fn read_layout(layout: &Path) -> OciImage {
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().expect("index.json lists manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    let manifest = json_blob(layout, manifests[0]["digest"].as_str().unwrap());
    assert_eq!(
        manifest["mediaType"].as_str(),
        Some("application/vnd.oci.image.manifest.v1+json"),
        "{manifest}"
    );
    let config = json_blob(layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["os"].as_str(), Some("linux"), "{config}");
    assert_eq!(config["architecture"].as_str(), Some("amd64"), "{config}");
    let layers = manifest["layers"]
        .as_array()
        .expect("the manifest lists layers")
        .iter()
        .map(|l| {
            let media = l["mediaType"].as_str().unwrap().to_owned();
            (media, blob(layout, l["digest"].as_str().unwrap()))
        })
        .collect();
    OciImage {
        config: config["config"].clone(),
        layers,
    }
}

/// Builds the image from the Dockerfile and exports it as an OCI layout (its buildah
/// storage lives as long as the returned [`Buildah`]).
fn build_image() -> (Buildah, OciImage) {
    let buildah = Buildah::new();
    let context = build_context(&buildah.path("context"));
    let dockerfile = context.join("Dockerfile");
    let r = buildah.run(&[
        "bud",
        "-f",
        dockerfile.to_str().unwrap(),
        "-t",
        TAG,
        context.to_str().unwrap(),
    ]);
    eprintln!("buildah bud:\n{}", r.stdout_text().trim());
    let layout = buildah.path("oci");
    buildah.run(&["push", TAG, &format!("oci:{}:latest", layout.display())]);
    let image = read_layout(&layout);
    (buildah, image)
}

/// The image's command: Entrypoint then Cmd.
fn image_command(image: &OciImage) -> Vec<String> {
    let words = |k: &str| -> Vec<String> {
        image.config[k]
            .as_array()
            .map(|a| a.iter().map(|w| w.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut cmd = words("Entrypoint");
    cmd.extend(words("Cmd"));
    cmd
}

/// Unpacks the layers into `rootfs` with the host's tar (the image has one layer, from
/// its one COPY, so there are no whiteouts to apply).
fn unpack(image: &OciImage, rootfs: &Path) {
    assert_eq!(image.layers.len(), 1, "FROM scratch and one COPY make one layer");
    for (media, blob) in &image.layers {
        let mut cmd = Command::new("tar");
        match media.as_str() {
            "application/vnd.oci.image.layer.v1.tar" => {}
            "application/vnd.oci.image.layer.v1.tar+gzip" => {
                cmd.arg("-z");
            }
            other => panic!("unexpected layer media type {other}"),
        }
        cmd.arg("-xf").arg(blob).arg("-C").arg(rootfs).stdin(Stdio::null());
        let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
        assert!(r.status.success(), "tar -xf {}: {}", blob.display(), r.stderr_text());
    }
}

/// The files of a directory tree, relative to it, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A bundle whose rootfs is the image, running `args`, with `mounts` (host path,
/// destination) bound in.
fn image_bundle(image: &OciImage, args: &[String], mounts: &[(&Path, &str)]) -> Bundle {
    let mut b = Bundle::builder().empty_rootfs().args(args.iter().cloned());
    for (source, destination) in mounts {
        b = b.bind_mount(source, destination);
    }
    let bundle = b.build();
    unpack(image, &bundle.rootfs());
    bundle
}

fn same_file(a: &Path, b: &Path) -> bool {
    fs::read(a).unwrap() == fs::read(b).unwrap()
}

#[test]
fn the_image_built_with_buildah_runs_tether_as_pid_1_answering_via_runc() {
    if !usable() {
        return;
    }
    let (_buildah, image) = build_image();
    let command = image_command(&image);
    assert_eq!(command, ["/tether", "serve"], "{}", image.config);

    // Exactly the static binary, executable, and nothing else.
    let bundle = image_bundle(&image, &command, &[(Path::new(HOST_BUSYBOX), "/busybox")]);
    let rootfs = bundle.rootfs();
    assert_eq!(tree(&rootfs), ["tether"]);
    assert!(same_file(&rootfs.join("tether"), &static_tether()));
    let mode = fs::metadata(rootfs.join("tether")).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "executable: {mode:o}");

    // A build through the image's own command: the binary in the image runs it.
    let r = bundle.tether_run(&["--", "/tether", "--version"]);
    assert_eq!(r.code(), 0, "stdout: {}\nstderr: {}", r.stdout_text(), r.stderr_text());
    let version = Command::new(static_tether()).arg("--version").output().unwrap();
    assert_eq!(r.stdout, version.stdout);
    assert_eq!(bundle.state(), None, "the container is gone");

    // Output on both streams and an exit status, with the host's busybox bound in (the
    // image has no shell).
    let script = r#"echo "pid1=$(/busybox tr '\0' ' ' < /proc/1/cmdline)"; echo to stderr >&2; exit 7"#;
    let r = bundle.tether_run(&["--", "/busybox", "sh", "-c", script]);
    assert_eq!(r.code(), 7, "stdout: {}\nstderr: {}", r.stdout_text(), r.stderr_text());
    assert_eq!(r.stdout_text(), "pid1=/tether serve \n");
    assert!(r.stderr_text().contains("to stderr\n"), "stderr: {}", r.stderr_text());
    assert_eq!(bundle.state(), None, "the container is gone");

    // The default state dir ($TMPDIR, or /tmp, which the image lacked) holds nothing
    // once the daemons stopped.
    let instances = rootfs.join("tmp/tether-0/instances");
    assert!(instances.is_dir(), "{:?}", tree(&rootfs));
    assert_eq!(fs::read_dir(&instances).unwrap().count(), 0, "{:?}", tree(&instances));
}

#[test]
fn the_image_as_an_init_container_installs_the_client_on_a_shared_volume() {
    if !usable() {
        return;
    }
    let (_buildah, image) = build_image();
    // `args: ["install", "/shared"]` in a pod replaces the image's Cmd.
    let mut command: Vec<String> = image.config["Entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .collect();
    command.extend(["install".to_owned(), "/shared".to_owned()]);
    let shared = tempfile::tempdir().unwrap();
    let bundle = image_bundle(&image, &command, &[(shared.path(), "/shared")]);
    let mut cmd = bundle.run_command();
    cmd.stdin(Stdio::null());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "stdout: {}\nstderr: {}", r.stdout_text(), r.stderr_text());
    assert_eq!(r.stdout_text(), "/shared/tether\n");
    let installed = shared.path().join("tether");
    assert!(same_file(&installed, &static_tether()));
    let mode = fs::metadata(&installed).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "executable: {mode:o}");
    // The installed client runs on the host too (static, no loader needed).
    let out = Command::new(&installed).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(bundle.state(), None, "the container is gone");
}
