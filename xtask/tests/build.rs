//! Building in the README's order compiles nothing the second time: `cargo xtask build` (what the
//! demo and the test suite run, a cargo started from inside `cargo run`) and a user's own
//! `cargo build` / `cargo xtask` of the same programs must not invalidate each other's artifacts.
//! This test runs under `cargo test`, whose environment (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...) is
//! exactly what such a nested cargo inherits.
use std::path::Path;
use std::process::Command;

/// The lines where cargo says it compiles something (build scripts' replayed warnings aside).
fn compiled(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.trim_start().starts_with("Compiling "))
        .map(str::to_owned)
        .collect()
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// `cargo ARGS` as typed in a user's shell: none of the variables cargo gave this test.
fn user_cargo(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace()).args(args).env_clear();
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
    let none = Vec::<String>::new();
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
