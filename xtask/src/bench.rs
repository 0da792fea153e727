//! `cargo xtask bench [ARGS]`: setup, build the release agent, `kplab` and `bench`, run the
//! agent's criterion benches (not with `--quick`), then `bench all ARGS` from the workspace root.
//! Every argument is `bench all`'s own (`target/release/bench all --help`); this only spawns.
use std::process::Command;

use anyhow::Context as _;

use crate::{build_programs, cargo, run, setup, workspace_root};

/// Runs the benchmark, exiting with its status.
///
/// # Errors
/// Setup, a build, or the criterion run failed.
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    setup::ensure()?;
    run(cargo().args(["build", "--release", "--quiet", "-p", "bench"]))?;
    let release = build_programs()?;
    let root = workspace_root();
    let mut all = Command::new(release.join("bench"));
    all.arg("all")
        .args(args)
        .current_dir(&root)
        .env("KPLAB_AGENT", release.join("dataplane-agent"))
        .env("KPLAB_BIN", release.join("kplab"));
    let flag = |f: &str| args.iter().any(|a| a == f);
    if !(flag("--quick") || flag("--help") || flag("-h")) {
        eprintln!("bench: criterion");
        run(cargo().args(["bench", "-p", "bench", "--bench", "agent", "--", "--noplot"]))?;
        all.arg("--criterion").arg(root.join("target/criterion"));
    }
    let status = all.status().context("starting bench")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
