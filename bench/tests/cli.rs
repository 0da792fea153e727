//! A failing step is one readable line, not a backtrace (the environment may set RUST_BACKTRACE).
use std::process::Command;

#[test]
fn a_failed_step_is_one_readable_line() {
    // A loopback port nothing listens on: every connection is refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["connect", "--service", &closed.to_string()])
        .args(["--direct", &closed.to_string(), "--count", "3"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("bench: ") && err.contains("connections failed"),
        "{err}"
    );
    assert!(!err.contains("acktrace"), "{err}");
}
