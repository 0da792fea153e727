//! `cargo xtask`: setup, building the programs, the demo and the test suite. The lab is its own
//! program (`kplab`, built by `cargo xtask build`); nothing here is needed to run it.
mod bench;
mod image;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks: setup, build, demo, test, bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker).
    Setup,
    /// Setup, then build the release programs: `target/release/{dataplane-agent,kplab}`.
    Build,
    /// The agent's container image from Debian's packages and deploy/Dockerfile (no registry).
    Image,
    /// The main job: a 2-node lab cluster, real traffic through the eBPF datapath, a report.
    Demo,
    /// Every test: unit, BPF_PROG_TEST_RUN packet tests, lab end-to-end (needs root).
    Test,
    /// `kplab ARGS` after `build` (the lab's own command line, e.g. `cargo xtask lab up --manifests
    /// DIR`); calling `target/release/kplab` directly saves the build check.
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks against kube-proxy's modes, side by side; writes bench/results. ARGS go to
    /// `bench all` (`--quick`, `--lab-scales`, `--out`, ...; see `target/release/bench all --help`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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

/// Variables cargo sets for the program it runs (`cargo run`, a test, a build script), which a
/// cargo started from that program must not inherit: build scripts that read one of them (ring's
/// reads `CARGO_MANIFEST_DIR`) would see a value the user's own `cargo build` never has, and the
/// two builds would recompile each other's dependencies every time.
fn set_by_cargo(var: &str) -> bool {
    const EXACT: &[&str] = &[
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
        "LD_LIBRARY_PATH",
    ];
    EXACT.contains(&var) || var.starts_with("CARGO_PKG_") || var.starts_with("CARGO_BIN_EXE_")
}

/// `cargo` in the workspace, with the environment of the user's shell rather than the one cargo
/// gave this program.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    for (var, _) in std::env::vars_os() {
        if var.to_str().is_some_and(set_by_cargo) {
            cmd.env_remove(var);
        }
    }
    cmd
}

/// Builds the release programs the demo, the lab and the benchmark run: the agent and `kplab`
/// (side by side in `target/release`, where `kplab` finds the agent). Says how many units cargo
/// compiled (0 on an unchanged tree: `xtask/tests/build.rs` holds it to that).
pub fn build_programs() -> anyhow::Result<std::path::PathBuf> {
    let out = cargo()
        .args([
            "build",
            "--release",
            "--quiet",
            "--message-format=json-render-diagnostics",
            "-p",
            "dataplane-agent",
            "-p",
            "kplab",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build of dataplane-agent and kplab failed: {}",
            out.status
        );
    }
    let (mut units, mut compiled) = (0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            units += 1;
            if msg["fresh"] == false {
                compiled += 1;
            }
        }
    }
    eprintln!("build: {compiled} of {units} units compiled");
    Ok(workspace_root().join("target/release"))
}

/// Lint and test everything. The eBPF crate is linted for its own target (it cannot build for the
/// host); its programs are tested through the kernel by the agent's packet tests.
fn test() -> anyhow::Result<()> {
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the test suite loads eBPF programs and builds network namespaces: run it as root");
    }
    setup::ensure()?;
    let cargo = |args: &[&str]| run(cargo().args(args));
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

fn main() -> std::process::ExitCode {
    match task(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Setup, build, then `kplab ARGS`, exiting with kplab's status (its own message says why).
fn kplab(args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    setup::ensure()?;
    let bin = build_programs()?;
    let status = Command::new(bin.join("kplab"))
        .args(args)
        .status()
        .context("starting kplab")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn task(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => {
            setup::ensure()?;
            build_programs().map(drop)
        }
        Cmd::Image => {
            setup::ensure()?;
            image::build().map(drop)
        }
        Cmd::Demo => {
            let demo = workspace_root().join("examples/demo");
            kplab(&["demo".as_ref(), "--manifests".as_ref(), demo.as_os_str()])
        }
        Cmd::Lab { args } => kplab(&args.iter().map(AsRef::as_ref).collect::<Vec<_>>()),
        Cmd::Test => test(),
        Cmd::Bench { args } => bench::bench(&args),
    }
}
