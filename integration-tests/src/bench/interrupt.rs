//! Interrupting the bench (Ctrl-C, `kill`, a CI timeout) leaves nothing behind.
//!
//! A scenario starts daemons, containers, an sshd and clients, and ends each on every
//! return path; a signal would skip those paths. So the signals that end a run are
//! blocked in every thread from the start (children get a clear mask: std resets it
//! when it spawns) and one thread waits for them: it kills every descendant of the bench
//! (found through `/proc`, by parent links; the bench is a child subreaper, so orphans
//! such as a daemon a client spawned stay its descendants), removes the bench's
//! temporary directory and exits with 128 + the signal's number.

use std::collections::HashMap;
use std::path::PathBuf;

use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Blocks the run-ending signals and starts the thread that cleans up after one. Call
/// before any other thread starts (they inherit the mask).
pub fn install(tmpdir: PathBuf) -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    for s in SIGNALS {
        set.add(s);
    }
    set.thread_block()?;
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("bench: cannot become a child subreaper ({e}); orphans of an interrupted run may survive it");
    }
    std::thread::Builder::new().name("interrupt".into()).spawn(move || {
        let Ok(sig) = set.wait() else { return };
        eprintln!("bench: {sig:?}: ending every process the run started");
        // A few rounds: a process may fork while the first one kills.
        for _ in 0..5 {
            let victims = descendants(std::process::id() as i32);
            if victims.is_empty() {
                break;
            }
            for pid in victims {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&tmpdir);
        std::process::exit(128 + sig as i32);
    })?;
    Ok(())
}

/// Every process below `root` in the process tree (`/proc/PID/stat`'s parent links).
fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The parent is the second field after the command name's closing paren.
            let Some(ppid) = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_a_descendant() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let found = descendants(std::process::id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&(child.id() as i32)), "{found:?}");
    }
}
