//! Keeps images/ honest: every tether command line in the pod template and Dockerfiles
//! must be accepted by the real binary, and every flag the Jenkins files pass to
//! `tether run` must exist.

use std::path::PathBuf;
use std::process::Stdio;

use integration_tests::{tether, Proc, TIMEOUT};
use yaml_rust2::YamlLoader;

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
    let text = std::fs::read_to_string(images().join("jenkins/pod-template.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let mut checked = 0;
    for c in docs[0]["spec"]["containers"].as_vec().unwrap() {
        let Some(cmd) = c["command"].as_vec() else { continue };
        let words: Vec<String> = cmd.iter().map(|w| w.as_str().unwrap().to_owned()).collect();
        if !words[0].ends_with("tether") {
            continue;
        }
        assert!(accepted(&words[1..]), "rejected: {words:?}");
        assert_eq!(c["stdin"].as_bool(), Some(true));
        assert_eq!(c["tty"].as_bool(), Some(false));
        checked += 1;
    }
    assert_eq!(checked, 1);
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
fn jenkins_run_flags_exist() {
    let help = Proc::spawn(tether(["run", "--help"]).stdin(Stdio::null()))
        .finish(TIMEOUT)
        .stdout_text();
    for file in [
        "jenkins/Jenkinsfile",
        "jenkins/Jenkinsfile.attach",
        "jenkins/vars/tetherRun.groovy",
    ] {
        let text = std::fs::read_to_string(images().join(file)).unwrap();
        let flags: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == '"' || c == '[' || c == ',')
            .filter(|w| {
                w.starts_with("--") && w.len() > 2 && w[2..].chars().all(|c| c.is_ascii_lowercase() || c == '-')
            })
            .collect();
        assert!(!flags.is_empty(), "{file}");
        for f in flags {
            // Flags of kaniko's executor appear inside the scripts; only tether's count.
            if ["--context", "--destination", "--insecure-registry", "--cleanup"].contains(&f) {
                continue;
            }
            assert!(help.contains(f), "{file}: tether run has no {f}");
        }
    }
}
