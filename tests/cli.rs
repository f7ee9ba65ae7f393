//! The `tether` command as an operator and a shell script meet it: error
//! texts and exit codes, the client's private session file, the event
//! stream on stdout and across SIGHUP, systemd's notifications, generated
//! completions and manual. Runs the real binary over loopback; every wait
//! is bounded.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{run_tether, ServerProcess};
use tether::{Client, ClientConfig};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tether client --server ADDR --client-id ID ARGS` with its session kept
/// under `runtime`: (exit code, stdout, stderr).
fn client(server: &ServerProcess, id: u64, runtime: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["client", "--server", &server.addr.to_string()])
        .args(["--client-id", &id.to_string()])
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_keep_clap_whole_message_and_point_at_the_subcommand_help() {
    let (code, err) = run_tether(&["client", "submit"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("the following required arguments were not provided"),
        "{err}"
    );
    assert!(
        err.contains("<JOB>"),
        "the missing argument is named: {err}"
    );
    assert!(err.contains("tether client submit --help"), "{err}");

    let (code, err) = run_tether(&["serve", "--log-format", "yaml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("[possible values: text, json]"), "{err}");
    assert!(err.contains("tether serve --help"), "{err}");

    let (code, err) = run_tether(&["serve", "--listn", "127.0.0.1:0"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--listen"),
        "the did-you-mean tip is kept: {err}"
    );

    let (code, err) = run_tether(&["clinet"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'client'"), "{err}");
}

#[test]
fn settings_that_make_no_sense_are_refused_in_the_flags_words() {
    for (args, expect) in [
        (&["serve", "--queue", "0"][..], "--queue must be at least 1"),
        (
            &["serve", "--slow-loop", "0s"][..],
            "--slow-loop must be more than 0s",
        ),
        (
            &["serve", "--slow-cancel", "0s"][..],
            "--slow-cancel must be more than 0s",
        ),
        (
            &["serve", "--ttl", "2h"][..],
            "--ttl (2h) <= --max-ttl (1h)",
        ),
        (
            &["serve", "--tick", "1500us"][..],
            "whole milliseconds, got 1ms 500us",
        ),
    ] {
        let (code, err) = run_tether(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(
            !err.contains("000ms"),
            "durations print as durations: {err}"
        );
    }
    let dir = scratch("keydir");
    let (code, err) = run_tether(&["serve", "--key-file", dir.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is a directory"), "{err}");
    assert!(!err.contains("chmod"), "{err}");
}

#[test]
fn client_exit_codes_tell_done_failed_cancelled_unknown_and_pending_apart() {
    let server = ServerProcess::start(&[]);
    let runtime = scratch("codes");
    let run = |args: &[&str]| client(&server, 5151, &runtime, args);

    let (code, out, _) = run(&["submit", "echo", "hi", "--follow"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("done: hi"), "{out}");

    let (code, out, _) = run(&["submit", "fail", "disk full", "--follow"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("failed: disk full"), "{out}");
    let (code, _, _) = run(&["submit", "panic", "boom", "--follow"]);
    assert_eq!(code, 3);

    let (code, out, _) = run(&[
        "submit",
        "sleep",
        "u32:60000",
        "--deadline",
        "50ms",
        "--follow",
    ]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("cancelled (deadline)"), "{out}");

    let (code, out, _) = run(&["status", "999999"]);
    assert_eq!(code, 5, "{out}");
    let (code, out, _) = run(&["cancel", "999999"]);
    assert_eq!(code, 5, "{out}");

    let (code, out, _) = run(&["submit", "sleep", "u32:60000"]);
    assert_eq!(code, 0);
    let task = out.trim().strip_prefix("task ").unwrap().to_owned();
    let (code, out, _) = run(&["status", &task]);
    assert_eq!(code, 6, "not finished: {out}");
    let (code, _, _) = run(&["cancel", &task]);
    assert_eq!(code, 0);
    let (code, out, _) = run(&["status", &task]);
    assert_eq!(code, 4, "{out}");
}

#[test]
fn the_session_file_is_private_and_a_planted_symlink_is_replaced_not_followed() {
    let server = ServerProcess::start(&[]);
    let runtime = scratch("private");
    let (code, _, err) = client(&server, 6161, &runtime, &["hello"]);
    assert_eq!(code, 0, "{err}");
    let dir = runtime.join("tether");
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    assert_eq!(std::fs::metadata(file).unwrap().mode() & 0o777, 0o600);

    // Someone plants a symlink where the file goes: the client must not
    // write through it.
    let victim = runtime.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::remove_file(file).unwrap();
    std::os::unix::fs::symlink(&victim, file).unwrap();
    let (code, _, err) = client(&server, 6161, &runtime, &["hello"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    let meta = std::fs::symlink_metadata(file).unwrap();
    assert!(meta.file_type().is_file(), "the symlink was replaced");
    assert_eq!(meta.mode() & 0o777, 0o600);

    // A directory others can enter is tightened before use.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, _) = client(&server, 6161, &runtime, &["hello"]);
    assert_eq!(code, 0);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
}

/// `tether serve ARGS` with stdout and stderr read line by line.
struct Spawned {
    child: std::process::Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Spawned {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Spawned {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Spawned {
            child,
            stdout,
            stderr,
        }
    }

    /// The first stderr line starting with `prefix`, the rest of it.
    fn stderr_line(&self, prefix: &str) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let line = self
                .stderr
                .recv_timeout(until.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no stderr line starting {prefix:?}"));
            assert!(
                !line.contains('\u{1b}'),
                "colour codes into a pipe: {line:?}"
            );
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn session(addr: std::net::SocketAddr, id: u64) -> Client {
    Client::connect(ClientConfig::new(addr, id)).unwrap()
}

#[test]
fn with_events_on_stdout_every_stdout_line_is_json_with_ids_as_strings() {
    let server = Spawned::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--events",
            "-",
        ],
        &[],
    );
    let addr = server.stderr_line("listening on ").parse().unwrap();
    assert!(server.stderr_line("metrics on ").starts_with("http://"));
    let big_id = 15_606_566_006_069_359_346u64;
    let c = session(addr, big_id);
    let task = c.submit("fail", b"out of cheese").unwrap();
    let _ = c.wait(task, Duration::from_secs(10)).unwrap();
    let mut lines = Vec::new();
    while lines.len() < 3 {
        let line = server
            .stdout
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("stdout so far: {lines:?}"));
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
        lines.push(line);
    }
    assert!(
        lines[0].contains(&format!("\"client_id\":\"{big_id}\"")),
        "{}",
        lines[0]
    );
    assert!(
        lines[2].contains("\"event\":\"task_ended\""),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].contains(&format!("\"task_id\":\"{}\"", task.0)),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].contains("\"error\":\"out of cheese\""),
        "{}",
        lines[2]
    );
}

#[test]
fn sighup_reopens_the_event_file_after_logrotate_moved_it() {
    let dir = scratch("hup");
    let path = dir.join("events.jsonl");
    let rotated = dir.join("events.jsonl.1");
    let server = Spawned::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--events",
            path.to_str().unwrap(),
        ],
        &[],
    );
    let addr: std::net::SocketAddr = server
        .stdout
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let wait_for = |file: &Path, needle: &str| {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < until,
                "{needle} not in {}: {text}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let _first = session(addr, 7001);
    wait_for(&path, "\"client_id\":\"7001\"");
    std::fs::rename(&path, &rotated).unwrap();
    server.signal("HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < until, "not reopened after SIGHUP");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _second = session(addr, 7002);
    let text = wait_for(&path, "\"client_id\":\"7002\"");
    assert!(!text.contains("7001"), "{text}");
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains("7002"));
}

#[test]
fn systemd_hears_ready_watchdog_pings_and_stopping() {
    let dir = scratch("notify");
    let socket_path = dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = Spawned::start(
        &["--listen", "127.0.0.1:0"],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut buf = [0u8; 1024];
    let mut receive = || {
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = receive();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", server.child.id())),
        "{ready}"
    );
    // An idle server still pings, every 100 ms (half of WATCHDOG_USEC).
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(receive(), "WATCHDOG=1");
    }
    assert!(started.elapsed() >= Duration::from_millis(150));
    server.signal("TERM");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let message = receive();
        if message.starts_with("STOPPING=1") {
            break;
        }
        assert_eq!(message, "WATCHDOG=1");
        assert!(Instant::now() < until);
    }
}

#[test]
fn completions_and_the_manual_are_generated_from_the_cli() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("complete -F") && bash.contains("--max-sessions"),
        "{bash}"
    );
    assert!(run(&["completions", "zsh"]).contains("#compdef tether"));
    assert!(run(&["completions", "fish"]).contains("complete -c tether"));
    let man = run(&["man"]);
    assert!(man.contains(".TH tether"), "{man}");
    // Every command's options are on the one page.
    for heading in ["TETHER SERVE", "TETHER CLIENT", "TETHER CLIENT SUBMIT"] {
        assert!(
            man.contains(&format!(".SH \"{heading}\"")),
            "{heading}: {man}"
        );
    }
    for flag in ["listen", "max\\-sessions", "follow", "client\\-id"] {
        assert!(man.contains(flag), "{flag} missing from the manual");
    }
    let dir = scratch("man");
    run(&["man", "--dir", dir.to_str().unwrap()]);
    for page in ["tether.1", "tether-serve.1", "tether-client-submit.1"] {
        assert!(dir.join(page).is_file(), "{page} not written");
    }
}

#[test]
fn a_command_that_fails_after_connecting_keeps_the_session_for_the_next() {
    let server = ServerProcess::start(&[]);
    let runtime = scratch("keep");
    let run = |args: &[&str]| client(&server, 8181, &runtime, args);
    let (code, out, _) = run(&["submit", "sleep", "u32:60000"]);
    assert_eq!(code, 0);
    let task = out.trim().strip_prefix("task ").unwrap().to_owned();
    let (code, _, err) = run(&["submit", "no-such-job", ""]);
    assert_eq!(code, 1, "{err}");
    // Had the failure lost the session's place, this command would have
    // opened a new session and the sleeping task would read cancelled
    // (replaced).
    let (code, out, _) = run(&["status", &task]);
    assert_eq!(code, 6, "{out}");
}

#[test]
fn ctrl_c_while_following_cancels_the_task_and_exits_130() {
    let server = ServerProcess::start(&[]);
    let runtime = scratch("ctrlc");
    let mut follower = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "client",
            "--server",
            &server.addr.to_string(),
            "--client-id",
            "9191",
        ])
        .args(["submit", "sleep", "u32:60000", "--follow"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(follower.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let task = first.trim().strip_prefix("task ").unwrap().to_owned();
    let status = Command::new("kill")
        .args(["-INT", &follower.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let until = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = follower.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < until, "still following after Ctrl-C");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(130));
    let (code, out, _) = client(&server, 9191, &runtime, &["status", &task]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("cancelled (cancelled)"), "{out}");
}
