//! Unpacking arbitrary bytes as a tar archive into a temporary directory: never panics,
//! and nothing is ever written outside the destination (a canary directory beside it
//! stays exactly as it was, and nothing new appears next to it).
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_executor::transfer::{unpack, UnpackLimits};

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dest = tmp.path().join("dest");
    let canary = tmp.path().join("canary");
    fs::create_dir(&dest).expect("dest");
    fs::create_dir(&canary).expect("canary");
    fs::write(canary.join("keep"), b"canary").expect("canary file");
    let limits = UnpackLimits {
        max_bytes: 1 << 20,
        max_entries: 1000,
    };
    let _ = unpack(data, &dest, limits);
    assert_eq!(
        listing(tmp.path()),
        ["canary", "dest"],
        "something was written beside dest"
    );
    assert_eq!(listing(&canary), ["keep"], "the canary dir changed");
    assert_eq!(fs::read(canary.join("keep")).expect("canary file"), b"canary");
});
