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
}

/// Installs `prometheus_client` (pinned) for the operator checks into the
/// build's scratch directory unless Python already has it; `--target`
/// leaves the system's Python untouched (and works where it is
/// "externally managed").
fn python_path_with_prometheus_client() -> String {
    let has_it = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    let deps = concat!(env!("CARGO_TARGET_TMPDIR"), "/python-deps");
    if !has_it
        && !std::path::Path::new(deps)
            .join("prometheus_client")
            .exists()
    {
        let output = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                deps,
                "prometheus_client==0.21.1",
            ])
            .output()
            .expect("python3 is needed for the operator checks");
        assert!(
            output.status.success(),
            "could not install prometheus_client (PyPI reachable? python3 -m pip available?):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    deps.to_owned()
}

#[test]
fn metrics_health_and_dashboard_pass_checks_with_prometheus_own_parser() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/operator/check_endpoints.py"
    );
    let output = Command::new("python3")
        .args([script, "-v"])
        .env("TETHER_BIN", env!("CARGO_BIN_EXE_tether"))
        .env("PYTHONPATH", python_path_with_prometheus_client())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 is needed for the operator checks");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "operator checks failed:\n{stderr}");
    assert!(stderr.contains("\nOK"), "no checks ran?\n{stderr}");
}
