//! Runs the Python client's own tests (tools/python) against the binary
//! this build produced, so `cargo test` covers the Python client too.

use std::process::Command;

#[test]
fn python_client_tests_pass_against_the_real_server() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/python");
    let output = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            dir,
            "-p",
            "test_*.py",
            "-v",
        ])
        .env("TETHER_BIN", env!("CARGO_BIN_EXE_tether"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 is needed for the Python client's tests (3.9 or newer)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "Python client tests failed:\n{stderr}"
    );
    assert!(stderr.contains("\nOK"), "no tests ran?\n{stderr}");
    // The package checks skip themselves where venv or PyPI is missing; the
    // README says `cargo test` needs both, so here a skip is a failure.
    for required in [
        "test_pip_installs_the_package_and_the_readme_examples_run",
        "test_mypy_strict_passes",
    ] {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(required))
            .unwrap_or_else(|| panic!("{required} did not run:\n{stderr}"));
        assert!(line.ends_with("ok"), "{line}");
    }
}

/// The pinned version of the Prometheus Python client whose OpenMetrics
/// parser checks what `/metrics` serves.
const PROMETHEUS_CLIENT: &str = "0.21.1";

/// A `PYTHONPATH` under which `import prometheus_client` gives the pinned
/// version, installed with pip into the build's scratch directory if it is
/// not there yet. `--target` leaves the system's Python untouched (and
/// works where it is "externally managed"); the install goes to a fresh
/// directory renamed into place, so an interrupted one is never taken for
/// done and two test runs never share a half-written directory.
fn python_path_with_prometheus_client() -> String {
    let deps = concat!(env!("CARGO_TARGET_TMPDIR"), "/python-deps");
    let pinned = |path: &str| {
        Command::new("python3")
            .args([
                "-c",
                &format!("import prometheus_client.openmetrics.parser, importlib.metadata as m; assert m.version('prometheus_client') == '{PROMETHEUS_CLIENT}'"),
            ])
            .env("PYTHONPATH", path)
            .env("PYTHONNOUSERSITE", "1")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if pinned(deps) {
        return deps.to_owned();
    }
    let fresh = format!("{deps}.{}", std::process::id());
    let _ = std::fs::remove_dir_all(&fresh);
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--timeout",
            "30",
            "--retries",
            "2",
            "--no-deps",
            "--target",
            &fresh,
        ])
        .arg(format!("prometheus_client=={PROMETHEUS_CLIENT}"))
        .env_remove("PIP_REQUIRE_VIRTUALENV")
        .env_remove("PIP_USER")
        .output()
        .expect("python3 is needed for the operator checks");
    assert!(
        output.status.success(),
        "could not install prometheus_client {PROMETHEUS_CLIENT} from PyPI for the operator checks (is PyPI reachable, and `python3 -m pip` installed?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(deps);
    // Another run may have renamed its copy into place first: either is good.
    if std::fs::rename(&fresh, deps).is_err() {
        let _ = std::fs::remove_dir_all(&fresh);
    }
    assert!(
        pinned(deps),
        "prometheus_client {PROMETHEUS_CLIENT} not importable from {deps}"
    );
    deps.to_owned()
}

#[test]
fn metrics_health_and_dashboard_pass_the_prometheus_python_clients_parser() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/operator/check_endpoints.py"
    );
    let output = Command::new("python3")
        .args([script, "-v"])
        .env("TETHER_BIN", env!("CARGO_BIN_EXE_tether"))
        .env("PYTHONPATH", python_path_with_prometheus_client())
        .env("PYTHONNOUSERSITE", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 is needed for the operator checks");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "operator checks failed:\n{stderr}");
    assert!(stderr.contains("\nOK"), "no checks ran?\n{stderr}");
}
