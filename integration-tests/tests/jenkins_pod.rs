//! The Jenkins set-up of `images/jenkins/` as a user gets it: the shipped pod templates
//! run as pods of runc containers sharing one fresh workspace volume (see
//! `integration_tests::pod`), and the shipped Jenkinsfile and shared library executed by
//! Groovy in a harness whose `sh` runs in the jnlp container as the agent's user (see
//! `integration_tests::jenkins`). README's "Jenkins in 5 minutes" is this test.
//!
//! Skipped without root, runc and a static busybox, or without groovy and a JDK.

use std::os::unix::fs::MetadataExt;

use integration_tests::container::runc_usable;
use integration_tests::jenkins::{groovy_usable, jenkins_file, run_pipeline, run_snippet};
use integration_tests::pod::{Pod, User, AGENT_DIR};
use sha2::{Digest, Sha256};

const JOB: &str = "app";

fn workspace() -> String {
    format!("{AGENT_DIR}/workspace/{JOB}")
}

/// The build's environment as Jenkins gives it to `sh` in the jnlp container: the
/// container's own variables (from the template, as the agent inherits them) and the
/// build's.
fn build_env(pod: &Pod) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![("PATH".into(), "/busybox:/bin".into())];
    env.extend(pod.template.container("jnlp").env.iter().cloned());
    env.extend(
        [
            ("HOME", "/home/jenkins".to_owned()),
            ("WORKSPACE", workspace()),
            ("BUILD_NUMBER", "7".into()),
            ("BUILD_ID", "7".into()),
            ("BUILD_TAG", format!("jenkins-{JOB}-7")),
            ("JOB_NAME", JOB.into()),
            ("JOB_BASE_NAME", JOB.into()),
            ("NODE_NAME", "agent-pod-1".into()),
            ("EXECUTOR_NUMBER", "0".into()),
            ("JENKINS_URL", "http://jenkins:8080/".into()),
            ("GIT_COMMIT", "0123abcd".into()),
            // The agent's own credential: it must never reach a build container.
            ("JENKINS_SECRET", "agent-secret-0123456789".into()),
            // What withCredentials would bind for the step.
            ("API_TOKEN", "s3cr3t-t0ken-value".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env
}

/// Checks out "the sources": the jnlp user makes the workspace, as the agent does.
fn checkout(pod: &Pod, dockerfile: &str) {
    let script = format!(
        "mkdir -p {ws} && cd {ws} && printf '%s' '{dockerfile}' > Dockerfile",
        ws = workspace()
    );
    let r = pod.jnlp_sh("/", &script);
    assert!(r.status.success(), "checkout: {}", r.stderr_text());
}

/// Asserts that the pipeline run `r` succeeded, listed the checkout in the build's
/// directory and pushed the image kaniko built from `dockerfile`; its stdout and stderr.
fn built_and_pushed(r: &integration_tests::Finished, dockerfile: &str) -> (String, String) {
    let (out, err) = (r.stdout_text(), r.stderr_text());
    assert_eq!(r.code(), 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("building {JOB} #7 in {}\nDockerfile\n", workspace())),
        "{out}"
    );
    let digest = hex(&Sha256::digest(dockerfile.as_bytes()));
    assert!(
        out.contains(&format!("pushed localhost:5000/app@sha256:{digest}\n")),
        "{out}"
    );
    (out, err)
}

fn usable() -> bool {
    runc_usable() && groovy_usable()
}

#[test]
fn jenkins_in_five_minutes_runs_as_shipped() {
    if !usable() {
        return;
    }
    let pod = Pod::start("pod-template.yaml", User { uid: 1000, gid: 1000 });
    let jnlp = pod.template.container("jnlp");
    let tether_dir = jnlp.env_var("TETHER_DIR").expect("the jnlp container names TETHER_DIR");

    // On the fresh volume the daemon made its directory: reachable by the pod's group
    // (fsGroup) and nobody else, holding the client and the socket.
    let dir = pod.host_path(tether_dir);
    let meta = std::fs::metadata(&dir).unwrap();
    let fs_group = pod.template.fs_group.expect("the template sets fsGroup");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, fs_group, 0o750));
    let client = std::fs::metadata(dir.join("tether")).unwrap();
    assert_eq!(client.mode() & 0o777, 0o755);

    let dockerfile = "FROM scratch\nCOPY app /app\n";
    checkout(&pod, dockerfile);
    let r = run_pipeline(
        &jenkins_file("Jenkinsfile"),
        &build_env(&pod),
        &workspace(),
        &pod.exec_prefix(),
    );
    let (out, err) = built_and_pushed(&r, dockerfile);
    assert!(err.contains("INFO pushing localhost:5000/app:7"), "{err}");
    assert!(out.contains("Finished: SUCCESS"), "{out}");
    // The workspace is the build's: it stays; the builds' private dirs are gone.
    assert!(pod.host_path(&workspace()).join("Dockerfile").is_file());
    assert!(pod.build_dirs("kaniko").is_empty(), "{:?}", pod.build_dirs("kaniko"));
}

/// What a pipeline relies on `tetherSh` for, in build container `container` of `pod`:
/// output and exit status as `sh` gives them, `returnStdout`, the build's variables (and
/// not the agent's), the step's directory, secrets masked, a failing step failing the
/// build, and an `id` that makes a rerun follow the build instead of running it again.
fn tether_sh_is_sh_in(pod: &Pod, container: &str) {
    checkout(pod, "FROM scratch\n");
    let snippet = r#"
tether('CONTAINER') {
  sh 'mkdir -p sub'
  int rc = tetherSh(script: 'echo to-out; echo to-err >&2; exit 3', returnStatus: true)
  echo "status=${rc}"
  echo "seen=" + tetherSh(returnStdout: true,
      script: 'printf "%s|" "$PWD" "$BUILD_NUMBER" "$JOB_NAME" "$GIT_COMMIT" "$WORKSPACE" "${JENKINS_SECRET-unset}" "$(id -u)" "${TETHER_DIR-unset}"')
  withEnv(['STAGE_VAR=from-withEnv']) {
    echo "named=" + tetherSh(returnStdout: true, env: ['STAGE_VAR', 'MISSING_HERE'], script: 'printf "%s|%s" "$STAGE_VAR" "${MISSING_HERE-unset}"')
    echo "set=" + tetherSh(returnStdout: true, env: [ANSWER: 42], script: 'printf %s "$ANSWER"')
  }
  dir('sub') {
    echo "cwd=" + tetherSh(returnStdout: true, script: 'pwd')
  }
  echo "masked=" + tetherSh(returnStdout: true, secrets: ['API_TOKEN'], script: 'echo "token $API_TOKEN"')
  tetherSh(id: 'app-7-once', script: 'echo run >> "$WORKSPACE/runs"; echo first run')
  echo "again=" + tetherSh(id: 'app-7-once', returnStdout: true, script: 'echo run >> "$WORKSPACE/runs"; echo first run')
  echo "runs=" + sh(returnStdout: true, script: 'cat runs')
  echo "listed=" + sh(returnStdout: true, script: '"$TETHER_DIR/tether" ps --all --socket "$TETHER_DIR/CONTAINER.sock" | grep -c app-7-once')
}
"#
    .replace("CONTAINER", container);
    let r = run_snippet(&snippet, &build_env(pod), &workspace(), &pod.exec_prefix());
    let (out, err) = (r.stdout_text(), r.stderr_text());
    assert_eq!(r.code(), 0, "stdout:\n{out}\nstderr:\n{err}");
    let ws = workspace();
    for want in [
        "to-out\nstatus=3\n".to_owned(),
        format!("seen={ws}|7|{JOB}|0123abcd|{ws}|unset|0|unset|\n"),
        "named=from-withEnv|unset\n".to_owned(),
        "set=42\n".to_owned(),
        format!("cwd={ws}/sub\n\n"),
        "masked=token ****\n\n".to_owned(),
        "first run\n".to_owned(),
        "again=first run\n\n".to_owned(),
        "runs=run\n\n".to_owned(),
        "listed=1\n\n".to_owned(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}\nstderr:\n{err}");
    }
    assert!(err.contains("to-err\n"), "{err}");
    assert!(
        !out.contains("s3cr3t") && !err.contains("s3cr3t"),
        "a secret leaked:\n{out}\n{err}"
    );

    // A failing step fails the build, with the step's exit code.
    let r = run_snippet(
        &format!("tether('{container}') {{ tetherSh 'echo before; exit 4' }}\necho 'not reached'\n"),
        &build_env(pod),
        &workspace(),
        &pod.exec_prefix(),
    );
    let out = r.stdout_text();
    assert_eq!(r.code(), 1, "{out}\n{}", r.stderr_text());
    assert!(out.contains("before\nERROR: script returned exit code 4\n"), "{out}");
    assert!(!out.contains("not reached"), "{out}");
    assert!(pod.build_dirs(container).is_empty());
}

#[test]
fn tether_sh_is_sh_in_the_build_container() {
    if !usable() {
        return;
    }
    let pod = Pod::start("pod-template.yaml", User { uid: 1000, gid: 1000 });
    tether_sh_is_sh_in(&pod, "kaniko");
}

#[test]
fn stock_images_get_tether_from_an_init_container() {
    if !usable() {
        return;
    }
    // OpenShift runs a pod under an arbitrary uid with gid 0: access is by fsGroup.
    let pod = Pod::start(
        "pod-template-stock.yaml",
        User {
            uid: 1_000_680_000,
            gid: 0,
        },
    );
    assert!(pod.daemons.len() >= 2, "every build container runs tether");
    tether_sh_is_sh_in(&pod, "golang");
    let snippet = r#"
tether('golang') {
  echo "golang=" + tetherSh(returnStdout: true, script: 'xargs -0 echo < /proc/1/cmdline; echo "in $PWD as $(id -u)"')
}
tether('kaniko') {
  echo "kaniko=" + tetherSh(returnStdout: true, script: 'ls /kaniko/executor; echo "in $PWD"')
}
"#;
    let r = run_snippet(snippet, &build_env(&pod), &workspace(), &pod.exec_prefix());
    let (out, err) = (r.stdout_text(), r.stderr_text());
    assert_eq!(r.code(), 0, "stdout:\n{out}\nstderr:\n{err}");
    let golang = pod.template.container("golang");
    assert!(
        out.contains(&format!("golang={}\nin {} as 0\n", golang.argv.join(" "), workspace())),
        "{out}"
    );
    assert!(
        out.contains(&format!("kaniko=/kaniko/executor\nin {}\n", workspace())),
        "{out}"
    );
    // The init container's copy is what runs; the client was published next to the
    // sockets, in a directory only the pod's group reaches.
    assert!(golang.argv[0].starts_with("/tether-bin/"));
    let tether_dir = pod.template.container("jnlp").env_var("TETHER_DIR").unwrap();
    let meta = std::fs::metadata(pod.host_path(tether_dir)).unwrap();
    assert_eq!(
        (meta.gid(), meta.mode() & 0o7777),
        (pod.template.fs_group.unwrap(), 0o750)
    );

    // A user outside the pod's group reaches neither the client nor the sockets.
    let r = pod.jnlp_sh_as(2000, 2000, &format!("{tether_dir}/tether ps; echo \"exit=$?\""));
    assert!(
        r.stdout_text().contains("exit=126"),
        "{}\n{}",
        r.stdout_text(),
        r.stderr_text()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_attach_variant_runs_its_steps_through_one_relay_over_kubectl_attach() {
    use integration_tests::k8s::{kubectl_usable, static_kubectl, ApiServer};
    if !usable() || !kubectl_usable() {
        return;
    }
    if static_kubectl().is_none() {
        eprintln!("skipped: no static kubectl (kubectl.1.NN beside the kubectl on PATH) for the jnlp container");
        return;
    }
    // The pod's API server: the real kubectl in the jnlp container attaches to the kaniko
    // container's stdin through it.
    let api = ApiServer::start();
    let pod = Pod::start_with("pod-template-attach.yaml", User { uid: 1000, gid: 1000 }, Some(&api));
    let dockerfile = "FROM scratch\n";
    checkout(&pod, dockerfile);
    let mut env = build_env(&pod);
    // Where in-cluster credentials would be, and a home kubectl may write its cache in.
    env.push(("KUBECONFIG".into(), "/kubeconfig".into()));
    env.retain(|(k, _)| k != "HOME");
    env.push(("HOME".into(), "/tmp".into()));
    let r = run_pipeline(
        &jenkins_file("Jenkinsfile.attach"),
        &env,
        &workspace(),
        &pod.exec_prefix(),
    );
    let (out, _) = built_and_pushed(&r, dockerfile);
    assert!(out.contains("Dockerfile found\n"), "{out}");
    // The relay was stopped after its block: it said goodbye, so the daemon's stdin
    // stream is free for the next client at once (no stream is left open either).
    assert!(
        integration_tests::wait_until(integration_tests::TIMEOUT, || api.open_streams() == 0),
        "attach streams left open: {}",
        api.open_streams()
    );
    assert!(pod.build_dirs("kaniko").is_empty(), "{:?}", pod.build_dirs("kaniko"));
}
