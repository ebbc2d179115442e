//! The `tinysamd` binary: start-up errors and exit codes, config checks, SIGTERM, stale sockets.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tinysam_edge::client::Client;

use crate::util::{test_model, KillOnDrop};

fn tinysamd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tinysamd"));
    c.env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("TINYSAMD_CONFIG");
    c
}

/// A daemon on the test model at `socket`, killed when the guard drops (a failed test too).
fn spawn(socket: &Path, extra: &[&str]) -> KillOnDrop {
    KillOnDrop(spawn_child(socket, extra))
}

fn spawn_child(socket: &Path, extra: &[&str]) -> Child {
    tinysamd()
        .args(["--source", "synthetic", "--width", "160", "--height", "120"])
        .args(["--fps", "5", "--threads", "1", "--encoder", "fp32"])
        .arg("--model")
        .arg(test_model())
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("tinysamd starts")
}

fn wait_for_socket(socket: &Path, child: &mut Child) -> Client {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = Client::connect(socket, "test") {
            return c;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tinysamd exited early: {status}");
        }
        assert!(Instant::now() < until, "tinysamd never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_stops_within_a_second_and_removes_the_socket() {
    let _g = crate::daemon::serial();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut child = spawn(&socket, &[]);
    let mut client = wait_for_socket(&socket, &mut child);
    assert!(client.status(1).is_ok());
    let sent = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "tinysamd ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = sent.elapsed();
    assert!(status.success(), "{status}");
    assert!(took <= Duration::from_secs(1), "stopping took {took:?}");
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_refused() {
    let _g = crate::daemon::serial();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    // A socket file nobody listens on (a crashed daemon's).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut first = spawn(&socket, &[]);
    let _c = wait_for_socket(&socket, &mut first);
    // A second daemon on the same path must not steal it.
    let second = spawn_child(&socket, &[]).wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "{err}");
    kill(Pid::from_raw(first.id() as i32), Signal::SIGTERM).unwrap();
    assert!(first.wait().unwrap().success());
    // A regular file in the way is never deleted.
    std::fs::write(&socket, "precious").unwrap();
    let out = spawn_child(&socket, &[]).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
}

#[test]
fn bad_configs_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[source]\nfps = -1\n", "source.fps"),
        ("[socket]\nmode = \"999\"\n", "socket.mode"),
        ("[pipeline]\nring = 1000\n", "pipeline.ring"),
        (
            "[socket]\nidle_timeout_s = 100000\n",
            "socket.idle_timeout_s",
        ),
        ("[sauce]\nuri = \"synthetic\"\n", "sauce"),
        ("[source\n", "line 1"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = tinysamd()
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{text}: {err}");
        assert!(err.contains(key), "{text}: {err}");
    }
    let out = tinysamd()
        .args(["--source", "usb:0", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("source.uri"));
    let out = tinysamd()
        .args(["--config", "/nonexistent/tinysamd.toml", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tinysamd.toml"));
    // The shipped example config is valid (its camera and installed model are those of the
    // target device: here the test model and pattern stand in, so the rest is checked).
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/config.toml");
    let out = tinysamd()
        .arg("--config")
        .arg(&example)
        .args(["--check-config", "--source", "synthetic", "--model"])
        .arg(test_model())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--check-config` checks what a start would fail on (before: "configuration is valid" for a
/// model folder, a source file or a socket group that did not exist), and a start with a
/// missing group exits 78 like any configuration error (before: 1, and systemd restarted it
/// every 2 s).
#[test]
fn check_config_checks_what_a_start_needs() {
    let dir = tempfile::tempdir().unwrap();
    let out = tinysamd()
        .args(["--check-config", "--model", "/nonexistent/model"])
        .args(["--source", "file:/nonexistent/frames"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(78), "{stdout}{stderr}");
    assert!(stdout.contains("2 problem(s)"), "{stdout}");
    assert!(stderr.contains("/nonexistent/model") && stderr.contains("/nonexistent/frames"));
    // The effective configuration is printed as TOML a config file can take.
    let toml_part = stdout.split("# effective configuration").nth(1).unwrap();
    let toml_part = toml_part.split_once('\n').unwrap().1;
    let written = dir.path().join("effective.toml");
    std::fs::write(&written, toml_part).unwrap();
    assert!(tinysamd_edge_config_parses(&written), "{toml_part}");

    // A damaged model file is named, with its hash.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(test_model()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let victim = model.join("encoder.fp32.onnx");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let config = dir.path().join("group.toml");
    std::fs::write(&config, "[socket]\ngroup = \"no-such-group-here\"\n").unwrap();
    let out = tinysamd()
        .arg("--config")
        .arg(&config)
        .args(["--check-config", "--encoder", "fp32", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("encoder.fp32.onnx") && stderr.contains("SHA-256"),
        "{stderr}"
    );
    assert!(stderr.contains("no-such-group-here"), "{stderr}");

    // The real start with that group: a configuration failure, exit 78.
    let out = tinysamd()
        .arg("--config")
        .arg(&config)
        .args(["--source", "synthetic", "--encoder", "fp32", "--model"])
        .arg(test_model())
        .arg("--socket")
        .arg(dir.path().join("d.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("no-such-group-here"), "{stderr}");
}

fn tinysamd_edge_config_parses(path: &Path) -> bool {
    tinysam_edge::config::Config::from_file(path)
        .and_then(|c| c.validate())
        .is_ok()
}

#[test]
fn missing_model_or_source_exits_1_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let out = tinysamd()
        .args(["--model", "/nonexistent/model", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
    let out = tinysamd()
        .args(["--source", "file:/nonexistent/frames", "--socket"])
        .arg(&socket)
        .arg("--model")
        .arg(test_model())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/frames"));
    assert!(!socket.exists());
}

#[test]
fn sighup_reloads_what_it_safely_can() {
    let _g = crate::daemon::serial();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let config = dir.path().join("d.toml");
    let log = dir.path().join("d.log");
    let write_config = |fps: u32, side: u32| {
        std::fs::write(
            &config,
            format!(
                "[source]\nuri = \"synthetic\"\nwidth = 160\nheight = 120\nfps = {fps}\n\
                 [everything]\npoints_per_side = {side}\n"
            ),
        )
        .unwrap();
    };
    write_config(5, 32);
    let mut child = KillOnDrop(
        tinysamd()
            .arg("--config")
            .arg(&config)
            .args(["--threads", "1", "--encoder", "fp32", "--model"])
            .arg(test_model())
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut client = wait_for_socket(&socket, &mut child);
    let pid = Pid::from_raw(child.id() as i32);
    // Waits until the log says `needle` once more than it had when the previous wait ended.
    let seen = std::cell::RefCell::new(std::collections::HashMap::<String, usize>::new());
    let wait_log = |needle: &str| {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let count = text.matches(needle).count();
            let mut seen = seen.borrow_mut();
            let before = seen.entry(needle.to_string()).or_insert(0);
            if count > *before {
                *before = count;
                return;
            }
            assert!(Instant::now() < until, "log never said {needle:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    write_config(5, 16);
    kill(pid, Signal::SIGHUP).unwrap();
    wait_log("configuration reloaded\n");
    write_config(9, 16);
    kill(pid, Signal::SIGHUP).unwrap();
    wait_log("changes to source take effect after a restart");
    // Settings that used to change silently without taking effect.
    std::fs::write(
        &config,
        "[source]\nuri = \"synthetic\"\nwidth = 160\nheight = 120\nfps = 9\nloop = false\n\
         [everything]\npoints_per_side = 16\n",
    )
    .unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    wait_log("changes to source take effect after a restart");
    std::fs::write(
        &config,
        "[source]\nuri = \"synthetic\"\nwidth = 160\nheight = 120\nfps = 9\nloop = false\n\
         [model]\nint8_matmul = \"portable\"\n[everything]\npoints_per_side = 16\n",
    )
    .unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    // The source change is still pending (it is compared with what runs), so both are named.
    wait_log("changes to source, model take effect after a restart");
    std::fs::write(&config, "[source]\nfps = \"fast\"\n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    wait_log("reload refused");
    // Still serving.
    assert!(client.status(1).is_ok());
    kill(pid, Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// systemd socket activation, through systemd's own `systemd-socket-activate` (LISTEN_FDS).
#[test]
fn accepts_a_socket_passed_by_systemd() {
    let _g = crate::daemon::serial();
    let activate = Path::new("/usr/bin/systemd-socket-activate");
    assert!(
        activate.exists(),
        "systemd-socket-activate is part of Debian's systemd package"
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = KillOnDrop(
        Command::new(activate)
            .arg("-l")
            .arg(&socket)
            .arg(env!("CARGO_BIN_EXE_tinysamd"))
            .args([
                "--source",
                "synthetic",
                "--width",
                "160",
                "--height",
                "120",
                "--fps",
                "5",
            ])
            .args(["--threads", "1", "--encoder", "fp32", "--model"])
            .arg(test_model())
            // The path tinysamd would bind itself: it must not, and must not create it.
            .arg("--socket")
            .arg(dir.path().join("own.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // systemd-socket-activate listens first and starts tinysamd on the first connection. Its
    // socket file appears at bind(), a moment before listen(): a connect in between is refused,
    // so retry (CI once lost that race).
    let until = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match Client::connect(&socket, "activated") {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < until,
                    "no handshake over the passed socket: {e:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert!(client.status(1).is_ok());
    assert!(!dir.path().join("own.sock").exists());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// `tinysam sub --timeout` counts only while the daemon makes no progress: an everything pass
/// that takes longer than the timeout (seconds on the test model, with 1 thread) is waited for
/// while frames keep being encoded (before: "no result within 1s").
#[test]
fn sub_waits_while_the_daemon_makes_progress() {
    let _g = crate::daemon::serial();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut child = spawn(&socket, &[]);
    drop(wait_for_socket(&socket, &mut child));
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tinysam"))
        .args(["sub", "--everything", "--count", "1", "--timeout", "1"])
        .args(["--encoding", "bbox", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "after {took:?}: {stderr}");
    assert!(
        took > Duration::from_secs(1),
        "the pass took {took:?}: this test needs one longer than the timeout"
    );
    // The daemon is stopped by its guard.
}

/// `tinysam sub` ends non-zero with the wire code and the daemon's reason when its subscription
/// is refused (before: it printed the error, then "0 mask(s)", and exited 0), and says where it
/// looked when no daemon listens.
#[test]
fn sub_reports_refusals_and_a_missing_daemon() {
    let _g = crate::daemon::serial();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let mut child = spawn(&socket, &[]);
    drop(wait_for_socket(&socket, &mut child));
    let out = Command::new(env!("CARGO_BIN_EXE_tinysam"))
        .args([
            "sub",
            "--point",
            "5000,5000",
            "--count",
            "1",
            "--timeout",
            "20",
        ])
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let _ = child.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid_prompt") && stderr.contains("outside the 160x120 image"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_tinysam"))
        .args(["sub", "--status", "--socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is tinysamd running"), "{stderr}");
}

/// Under systemd's watchdog (`WATCHDOG_USEC`), tinysamd pings while its pipeline makes progress:
/// `READY=1` once, then `WATCHDOG=1` at least every half interval. (That it stops pinging when a
/// stage hangs is tested in-process: `daemon::a_stalled_encoder_is_reported_an_idle_one_is_not`.)
#[test]
fn pings_the_systemd_watchdog_while_the_pipeline_runs() {
    use std::os::unix::net::UnixDatagram;
    let _g = crate::daemon::serial();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket = dir.path().join("d.sock");
    let _child = KillOnDrop(
        tinysamd()
            .args(["--source", "synthetic", "--width", "160", "--height", "120"])
            .args([
                "--fps",
                "5",
                "--threads",
                "1",
                "--encoder",
                "fp32",
                "--model",
            ])
            .arg(test_model())
            .arg("--socket")
            .arg(&socket)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (mut ready, mut pings) = (false, Vec::new());
    let until = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 512];
    while pings.len() < 4 && Instant::now() < until {
        let Ok(n) = notify.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.lines().any(|l| l == "READY=1") {
            ready = true;
        }
        if text.lines().any(|l| l == "WATCHDOG=1") {
            assert!(ready, "a watchdog ping before READY=1: {text:?}");
            pings.push(Instant::now());
        }
    }
    assert_eq!(pings.len(), 4, "watchdog pings in 30 s (ready: {ready})");
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap <= Duration::from_millis(800), "pings {gap:?} apart");
    }
}
