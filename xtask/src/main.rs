//! `cargo xtask`: setup, the lab, the demo and the test suite.
mod bench;
mod demo;
mod lab;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks: setup, lab, demo, test")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker).
    Setup,
    /// The main job: a 2-node lab cluster, real traffic through the eBPF datapath, a report.
    Demo,
    /// Every test: unit, BPF_PROG_TEST_RUN packet tests, lab end-to-end (needs root).
    Test,
    /// Benchmarks against kube-proxy's modes, side by side; writes bench/results.
    Bench(bench::BenchArgs),
    /// The lab: a cluster of network namespaces built from Kubernetes manifests.
    Lab {
        #[command(subcommand)]
        command: lab::LabCmd,
    },
}

/// Runs a command, failing with its exit status.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Builds the agent in release mode and returns its path.
pub fn build_agent() -> anyhow::Result<std::path::PathBuf> {
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "dataplane-agent",
    ]))?;
    Ok(workspace_root().join("target/release/dataplane-agent"))
}

/// Lint and test everything. The eBPF crate is linted for its own target (it cannot build for the
/// host); its programs are tested through the kernel by the agent's packet tests.
fn test() -> anyhow::Result<()> {
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the test suite loads eBPF programs and builds network namespaces: run it as root");
    }
    setup::ensure()?;
    let root = workspace_root();
    let cargo = |args: &[&str]| run(Command::new("cargo").current_dir(&root).args(args));
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "dataplane-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&[
        "+nightly",
        "clippy",
        "-p",
        "dataplane-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "dataplane-ebpf",
        "--all-targets",
    ])
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::ensure(),
        Cmd::Demo => {
            setup::ensure()?;
            demo::run()
        }
        Cmd::Test => test(),
        Cmd::Lab { command } => lab::main(command),
        Cmd::Bench(args) => bench::run_all(args),
    }
}
