//! `tether serve` as PID 1 of a real runc container laid out like kaniko's debug image
//! (busybox at /busybox, no /bin/sh), with the static binary: `--via runc run`, orphan
//! reaping, `runc kill` and a terminal as stdin. Skipped without root, runc or a static
//! busybox (see `integration_tests::container`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use integration_tests::container::{pty_termios, runc_usable, Bundle, ProcInfo};
use integration_tests::{script_spec, wait_until, TIMEOUT};
use nix::sys::termios::LocalFlags;
use tether_protocol::{CommandSpec, EndCause, ExitStatus, RunSpec};

#[test]
fn a_script_runs_with_busybox_sh_under_tether_as_pid_1_through_via_runc() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn"]);
    assert!(!bundle.rootfs().join("bin").exists(), "no /bin in the image");
    let script = r#"echo "shell=$0"
echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline)"
echo "ppid=$PPID"
[ -e /bin/sh ] && echo "/bin/sh exists"
printf 'to stderr\n' >&2
exit 7"#;
    let started = Instant::now();
    let r = bundle.tether_run(&["--sh", script]);
    let took = started.elapsed();
    assert_eq!(r.code(), 7, "stdout: {}\nstderr: {}", r.stdout_text(), r.stderr_text());
    assert_eq!(
        r.stdout_text(),
        "shell=/busybox/sh\n\
         pid1=/kaniko/tether serve --state-dir /kaniko/state --log-level warn \n\
         ppid=1\n",
        "stderr: {}",
        r.stderr_text()
    );
    assert_eq!(r.stderr_text(), "to stderr\n");
    // The client ended the container (stdin closed, then SIGTERM to runc, which forwards
    // it to tether); `runc run` removed it.
    assert_eq!(bundle.state(), None, "the container is gone");
    assert!(
        bundle.build_dirs().is_empty(),
        "build dirs left: {:?}",
        bundle.build_dirs()
    );
    eprintln!("tether run --via runc took {took:?}");
}

/// Zombies and `sleep`s among the container's processes.
fn zombies_and_sleeps(procs: &[ProcInfo]) -> (Vec<&ProcInfo>, Vec<&ProcInfo>) {
    let zombies = procs.iter().filter(|p| p.state == 'Z').collect();
    let sleeps = procs.iter().filter(|p| p.comm == "sleep").collect();
    (zombies, sleeps)
}

#[test]
fn orphans_of_a_build_are_reaped_by_tether_as_pid_1() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn", "--grace", "2s"]);
    let mut s = bundle.start();
    s.expect_preamble();
    s.hello();

    // 200 grandchildren orphaned inside the build's process group (tether ends what is
    // left of them when the build exits), and 50 that escape it with setsid and outlive
    // the build: all of them are re-parented to PID 1, which must reap them.
    let script = r#"i=0
while [ $i -lt 200 ]; do (sleep 0.3 &); i=$((i+1)); done
i=0
while [ $i -lt 50 ]; do (setsid sleep 3 </dev/null >/dev/null 2>&1 &); i=$((i+1)); done
echo spawned"#;
    let started = Instant::now();
    let build = s.start_build(1, script_spec(script)).build;
    let out = s.wait_exited(&build);
    let exited = out.exited.clone().unwrap();
    eprintln!("orphan-making build took {:?}", started.elapsed());
    assert_eq!(exited.status, ExitStatus::Code(0), "{exited:?}");
    assert_eq!(exited.cause, EndCause::Completed);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "spawned\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    // The escaped sleeps still run, re-parented to tether.
    let procs = bundle.processes();
    let (_, sleeps) = zombies_and_sleeps(&procs);
    assert!(!sleeps.is_empty(), "the escaped sleeps run on: {procs:?}");
    assert!(
        sleeps.iter().all(|p| p.ppid == 1),
        "orphans are re-parented to PID 1: {sleeps:?}"
    );
    let pid1 = procs.iter().find(|p| p.pid == 1).expect("PID 1");
    assert_eq!(pid1.comm, "tether");

    // Once they exit, nothing is left: no sleep, and no zombie.
    let mut last = Vec::new();
    let clean = wait_until(Duration::from_secs(10), || {
        last = bundle.processes();
        let (zombies, sleeps) = zombies_and_sleeps(&last);
        zombies.is_empty() && sleeps.is_empty()
    });
    assert!(clean, "zombies or sleeps remain after 10 s: {last:?}");
    eprintln!("no orphan left {:?} after the build started", started.elapsed());

    // The daemon serves on, and stops cleanly.
    let build = s.start_build(2, script_spec("echo still serving")).build;
    let out = s.wait_exited(&build);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still serving\n");
    bundle.kill("TERM");
    let st = s
        .wait_timeout(Duration::from_secs(5))
        .expect("runc run exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", s.stderr.text());
}

#[test]
fn runc_kill_term_cancels_running_builds_and_the_container_exits_cleanly() {
    if !runc_usable() {
        return;
    }
    let grace = Duration::from_secs(2);
    let bundle = Bundle::serve(&["--log-level", "warn", "--grace", "2s"]);
    let mut s = bundle.start();
    s.expect_preamble();
    s.hello();

    // One build ends at SIGTERM; the other ignores it (and so does its sleep), so it
    // needs the SIGKILL at the end of the grace period.
    let plain = s
        .start_build(1, RunSpec::new(CommandSpec::argv(["sleep", "1000"])))
        .build;
    let stubborn = s.start_build(2, script_spec("trap '' TERM; sleep 1000")).build;
    assert_ne!(plain, stubborn);
    assert_eq!(bundle.build_dirs().len(), 2, "{:?}", bundle.build_dirs());

    let killed_at = Instant::now();
    bundle.kill("TERM");
    s.wait_eof();
    let st = s.wait_timeout(grace + Duration::from_secs(3)).unwrap_or_else(|| {
        panic!(
            "runc run still runs {:?} after runc kill TERM; stderr: {}",
            killed_at.elapsed(),
            s.stderr.text()
        )
    });
    let took = killed_at.elapsed();
    eprintln!("runc run exited {took:?} after runc kill TERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", s.stderr.text());

    let plain_exit = s.output(&plain).exited.expect("Exited for the plain build");
    let stubborn_exit = s.output(&stubborn).exited.expect("Exited for the stubborn build");
    assert_eq!(plain_exit.cause, EndCause::Cancelled, "{plain_exit:?}");
    assert_eq!(stubborn_exit.cause, EndCause::Cancelled, "{stubborn_exit:?}");
    assert_eq!(
        plain_exit.status,
        ExitStatus::Signal {
            signal: 15,
            core_dumped: false
        }
    );
    assert_eq!(
        stubborn_exit.status,
        ExitStatus::Signal {
            signal: 9,
            core_dumped: false
        }
    );
    assert!(
        took >= grace - Duration::from_millis(100),
        "the grace period applies at shutdown: exited after {took:?}"
    );
    assert!(
        bundle.build_dirs().is_empty(),
        "build dirs left: {:?}",
        bundle.build_dirs()
    );
    assert_eq!(bundle.state(), None, "the container is gone");
}

#[test]
fn frames_pass_a_terminal_on_the_containers_stdin() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn"]);
    let mut s = bundle.start_detached_on_pty();
    let original = s.pty_initial.clone().unwrap();
    assert!(original.local_flags.contains(LocalFlags::ICANON));
    // tether writes its preamble after switching its stdin to raw mode.
    s.expect_preamble();
    let raw = pty_termios(&s);
    assert!(
        !raw.local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG),
        "tether put the terminal in raw mode: {:?}; stderr: {}",
        raw.local_flags,
        s.stderr.text()
    );
    s.hello();

    // Bytes a line discipline would eat or rewrite, and a line longer than its buffer.
    let nasty: &[u8] = &[0x03, 0x04, 0x1a, 0x1c, 0x11, 0x13, b'\r', 0x7f, b'\n', 0x15, 0x17];
    let long_line = "x".repeat(5000);
    let mut script = b"printf '%s' '".to_vec();
    script.extend_from_slice(nasty);
    script.extend_from_slice(format!("{long_line}'; echo err >&2; exit 3").as_bytes());
    let build = s.start_build(1, RunSpec::new(CommandSpec::script(&script))).build;
    let out = s.wait_exited(&build);
    let exited = out.exited.clone().unwrap();
    assert_eq!(exited.status, ExitStatus::Code(3), "{exited:?}");
    let mut expected = nasty.to_vec();
    expected.extend_from_slice(long_line.as_bytes());
    assert!(
        out.stdout == expected,
        "stdout differs: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.stderr, b"err\n");

    // Several builds at once over the same terminal.
    let ids: Vec<_> = (0..3)
        .map(|i| s.start_build(10 + i, script_spec(&format!("echo build {i}"))).build)
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3);
    for (i, id) in ids.iter().enumerate() {
        let out = s.wait_exited(id);
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("build {i}\n"));
    }

    // Detached, so there is no runc process whose status is tether's: the end of its
    // stdout and its restored terminal show that it went through its orderly exit.
    bundle.kill("TERM");
    s.wait_eof();
    assert!(
        bundle.wait_stopped(Duration::from_secs(5)),
        "the container stops after SIGTERM"
    );
    assert_eq!(pty_termios(&s), original, "tether restored the terminal at exit");
    assert!(
        s.stderr.wait_contains(TIMEOUT, "tty: false"),
        "the recommendation is logged: {}",
        s.stderr.text()
    );
}
