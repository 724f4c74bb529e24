//! The build's environment as `tether run` sends it, the way `docker run` builds a
//! container's: first every variable of this client's environment whose name starts
//! with an `--env-prefix`, then the `--env-file` files in order, then the `--env` flags
//! in order; a later variable replaces an earlier one of the same name. A bare `NAME`
//! (in a file or a flag) passes this client's value of NAME, and nothing when it has
//! none. Secrets (`--secret-env`, `--secret-file`) travel apart and override all of it.
//!
//! Errors name the file, the line and at most the variable's name: a value may be a
//! secret and never appears in a message.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context};

use crate::cli::EnvArg;

/// Whitespace as docker's env-file parser trims it around a name.
const WHITESPACE: &[char] = &[' ', '\t', '\n', '\u{b}', '\u{c}', '\r'];

/// The variables to send: `prefixes` of `client_env`, then `files`, then `flags`.
pub fn collect(
    prefixes: &[OsString],
    files: &[impl AsRef<Path>],
    flags: &[EnvArg],
    client_env: &[(OsString, OsString)],
) -> anyhow::Result<Vec<(OsString, OsString)>> {
    let mut out: Vec<(OsString, OsString)> = Vec::new();
    let mut set = |name: OsString, value: OsString| {
        out.retain(|(k, _)| *k != name);
        out.push((name, value));
    };
    let mut family: Vec<&(OsString, OsString)> = client_env
        .iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.as_bytes().starts_with(p.as_bytes())))
        .collect();
    family.sort();
    for (k, v) in family {
        set(k.clone(), v.clone());
    }
    let lookup = |name: &OsStr| client_env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut apply = |arg: EnvArg| match arg {
        EnvArg::Set(k, v) => set(k, v),
        EnvArg::Pass(k) => match lookup(&k) {
            Some(v) => set(k, v),
            None => tracing::debug!(name = ?k, "not set in this environment; left out"),
        },
    };
    for file in files {
        let file = file.as_ref();
        let text = std::fs::read(file).with_context(|| format!("--env-file {}", file.display()))?;
        for arg in parse_env_file(&text).with_context(|| format!("--env-file {}", file.display()))? {
            apply(arg);
        }
    }
    for arg in flags {
        apply(arg.clone());
    }
    Ok(out)
}

/// Parses docker's env-file format: one `NAME=VALUE` or `NAME` per line; leading
/// whitespace and blank lines ignored, lines starting with `#` are comments, a UTF-8
/// byte-order mark on the first line is dropped, the value is taken as it is (no quotes
/// removed, no trimming) but for a line's trailing `\r`.
pub fn parse_env_file(text: &[u8]) -> anyhow::Result<Vec<EnvArg>> {
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let mut out = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(line) = std::str::from_utf8(raw) else {
            bail!("line {n} is not valid UTF-8");
        };
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((name, value)) => (name.trim_start_matches(WHITESPACE), Some(value)),
            None => (line, None),
        };
        if name.is_empty() {
            bail!("line {n}: no variable name");
        }
        if name.contains(WHITESPACE) {
            let shown: String = name.trim_end_matches(WHITESPACE).chars().take(64).collect();
            bail!("line {n}: variable name {shown:?} contains whitespace");
        }
        out.push(match value {
            Some(v) => EnvArg::Set(name.into(), v.into()),
            None => EnvArg::Pass(name.into()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn env_files_read_as_docker_reads_them() {
        let text = b"\xef\xbb\xbfA=1\n  # comment\n\n\tB = 2 \r\nC=\"quoted\"\nPASSED\nD=x=y\n";
        let parsed = parse_env_file(text).unwrap_err();
        // `B ` carries whitespace in its name: refused, as docker refuses it.
        assert!(
            parsed.to_string().contains("line 4") && parsed.to_string().contains("\"B\""),
            "{parsed}"
        );
        let text = b"\xef\xbb\xbfA=1\n  # comment\n\n\tB= 2 \r\nC=\"quoted\"\nPASSED\nD=x=y\nE=";
        assert_eq!(
            parse_env_file(text).unwrap(),
            vec![
                EnvArg::Set("A".into(), "1".into()),
                EnvArg::Set("B".into(), " 2 ".into()),
                EnvArg::Set("C".into(), "\"quoted\"".into()),
                EnvArg::Pass("PASSED".into()),
                EnvArg::Set("D".into(), "x=y".into()),
                EnvArg::Set("E".into(), "".into()),
            ]
        );
    }

    #[test]
    fn bad_env_files_name_the_line_never_the_value() {
        let e = parse_env_file(b"OK=1\n=s3cr3t-value\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("s3cr3t"), "{e}");
        let e = parse_env_file(b"X=\xff\xfe").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn prefixes_then_files_then_flags_later_wins() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("vars");
        std::fs::write(&file, "BUILD_ID=from-file\nFROM_FILE=1\nHOME\nUNSET_HERE\n").unwrap();
        let client = env(&[
            ("BUILD_NUMBER", "7"),
            ("BUILD_ID", "from-env"),
            ("JOB_NAME", "app"),
            ("HOME", "/home/jenkins"),
            ("JENKINS_SECRET", "agent-secret"),
        ]);
        let flags = vec![
            EnvArg::Set("FROM_FILE".into(), "2".into()),
            EnvArg::Pass("JOB_NAME".into()),
            EnvArg::Pass("ALSO_UNSET".into()),
        ];
        let got = collect(&["BUILD_".into()], &[&file], &flags, &client).unwrap();
        assert_eq!(
            got,
            env(&[
                ("BUILD_NUMBER", "7"),
                ("BUILD_ID", "from-file"),
                ("HOME", "/home/jenkins"),
                ("FROM_FILE", "2"),
                ("JOB_NAME", "app"),
            ])
        );
        let missing = collect(&[], &[t.path().join("nope")], &[], &client).unwrap_err();
        assert!(format!("{missing:#}").contains("--env-file"), "{missing:#}");
    }
}
