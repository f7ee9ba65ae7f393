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
