//! Keeps images/ honest: every tether command line in the pod templates and Dockerfiles
//! must be accepted by the real binary, and every flag the Jenkins files pass to
//! `tether run` must exist. (`jenkins_pod.rs` runs them.)

use std::path::PathBuf;
use std::process::Stdio;

use integration_tests::pod::PodTemplate;
use integration_tests::{tether, Proc, TIMEOUT};

fn images() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images")
}

/// `tether ARGS --help` exits 0 only if clap accepted every argument before `--help`.
fn accepted(args: &[String]) -> bool {
    let mut cmd = tether(args);
    cmd.arg("--help").stdin(Stdio::null());
    Proc::spawn(&mut cmd).finish(TIMEOUT).code() == 0
}

#[test]
fn pod_template_commands_are_accepted() {
    for file in [
        "pod-template.yaml",
        "pod-template-stock.yaml",
        "pod-template-attach.yaml",
    ] {
        let template = PodTemplate::load(file);
        let mut checked = 0;
        for c in template.init_containers.iter().chain(&template.containers) {
            let Some(program) = c.argv.first() else { continue };
            if !program.ends_with("tether") {
                continue;
            }
            assert!(accepted(&c.argv[1..]), "{file}: {}: rejected {:?}", c.name, c.argv);
            if c.serves() {
                assert!(c.stdin && !c.tty, "{file}: {}: stdin: true, tty: false", c.name);
                // The jnlp container finds each daemon's socket as $TETHER_DIR/NAME.sock
                // (the attach variant has none: its relay makes one).
                let dir = template.container("jnlp").env_var("TETHER_DIR").expect("TETHER_DIR");
                if let Some(sock) = c.flag("--socket") {
                    assert_eq!(sock, format!("{dir}/{}.sock", c.name), "{file}: {}", c.name);
                }
            }
            checked += 1;
        }
        assert!(checked >= 1, "{file}: no tether container");
    }
}

#[test]
fn dockerfile_entrypoints_are_accepted() {
    for file in ["tether/Dockerfile", "kaniko/Dockerfile"] {
        let text = std::fs::read_to_string(images().join(file)).unwrap();
        let mut words = Vec::new();
        for line in text.lines() {
            for key in ["ENTRYPOINT ", "CMD "] {
                if let Some(json) = line.strip_prefix(key) {
                    let v: Vec<String> = serde_json::from_str(json).unwrap();
                    words.extend(v);
                }
            }
        }
        assert!(words[0].ends_with("tether"), "{file}: {words:?}");
        assert!(accepted(&words[1..]), "{file}: rejected {words:?}");
    }
}

#[test]
fn jenkins_flags_exist() {
    let help = |command: &str| {
        Proc::spawn(tether([command, "--help"]).stdin(Stdio::null()))
            .finish(TIMEOUT)
            .stdout_text()
    };
    for (file, command) in [
        ("jenkins/Jenkinsfile", "run"),
        ("jenkins/Jenkinsfile.attach", "run"),
        ("jenkins/vars/tetherSh.groovy", "run"),
        ("jenkins/vars/tetherRelay.groovy", "relay"),
    ] {
        let help = help(command);
        let text = std::fs::read_to_string(images().join(file)).unwrap();
        let flags: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || "\"'[],=".contains(c))
            .filter(|w| {
                w.starts_with("--") && w.len() > 2 && w[2..].chars().all(|c| c.is_ascii_lowercase() || c == '-')
            })
            .collect();
        assert!(!flags.is_empty(), "{file}");
        for f in flags {
            // Flags of kaniko's executor appear inside the scripts; only tether's count.
            if [
                "--context",
                "--destination",
                "--insecure-registry",
                "--cleanup",
                "--digest-file",
            ]
            .contains(&f)
            {
                continue;
            }
            assert!(help.contains(f), "{file}: tether {command} has no {f}");
        }
    }
}

#[test]
fn the_readme_shows_the_files_the_pod_test_runs() {
    let readme = std::fs::read_to_string(images().join("../README.md")).unwrap();
    for file in ["jenkins/Jenkinsfile", "jenkins/pod-template.yaml"] {
        let text = std::fs::read_to_string(images().join(file)).unwrap();
        assert!(
            readme.contains(text.trim_end()),
            "README.md's \"Jenkins in 5 minutes\" must show images/{file} as it is"
        );
    }
}
