//! Building in the README's order compiles nothing the second time: `cargo xtask build` (what the
//! demo and the test suite run, a cargo started from inside `cargo run`) and a user's own
//! `cargo build` / `cargo xtask` of the same programs must not invalidate each other's artifacts.
//! This test runs under `cargo test`, whose environment (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...) is
//! exactly what such a nested cargo inherits.
use std::path::Path;
use std::process::Command;

/// How many units a build compiled, from xtask's own count (`build: C of U units compiled`) or
/// cargo's JSON messages. A build that reports no unit at all is a broken count, not a pass.
fn compiled(out: &std::process::Output) -> usize {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (compiled, units) = stderr
        .lines()
        .find_map(|l| {
            let w: Vec<&str> = l.strip_prefix("build: ")?.split_whitespace().collect();
            Some((w[0].parse().unwrap(), w[2].parse().unwrap()))
        })
        .unwrap_or_else(|| {
            let artifacts: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|m| m["reason"] == "compiler-artifact")
                .collect();
            let rebuilt = artifacts.iter().filter(|m| m["fresh"] == false).count();
            (rebuilt, artifacts.len())
        });
    // xtask alone is about 30 units (clap, serde_json, anyhow, libc and theirs), the agent and
    // kplab about 300: fewer than 20 means the count itself is broken.
    assert!(
        units >= 20,
        "only {units} units reported: the count is broken"
    );
    compiled
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// `cargo ARGS` as typed in a user's shell: none of the variables cargo gave this test.
fn user_cargo(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace())
        .args(args)
        .arg("--message-format=json")
        .env_clear();
    for var in ["PATH", "HOME", "RUSTUP_HOME", "CARGO_HOME"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let out = cmd.output().expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn xtask_build() -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("build")
        .output()
        .expect("run xtask build");
    assert!(
        out.status.success(),
        "xtask build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn building_in_the_readmes_order_compiles_nothing_the_second_time() {
    // Whatever is stale from before this test may compile once.
    user_cargo(&["build", "--release", "-p", "xtask"]);
    xtask_build();
    // `cargo xtask` from a shell, `cargo xtask build`, the programs from a shell, in turn.
    let none = 0;
    let shell = user_cargo(&["build", "--release", "-p", "xtask"]);
    assert_eq!(compiled(&shell), none, "cargo xtask after xtask build");
    assert_eq!(compiled(&xtask_build()), none, "xtask build, again");
    let shell = user_cargo(&["build", "--release", "-p", "dataplane-agent", "-p", "kplab"]);
    assert_eq!(compiled(&shell), none, "the same programs from a shell");
    assert_eq!(
        compiled(&xtask_build()),
        none,
        "xtask build after a shell build"
    );
    for program in ["kplab", "dataplane-agent"] {
        assert!(workspace().join("target/release").join(program).is_file());
    }
}
