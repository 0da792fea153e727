//! `bench`: every measurement. `bench all` is the whole run (`cargo xtask bench` builds, then runs
//! it); `bench datapath` and `bench gen-lab` are its steps on their own, for A/B comparisons and
//! for trying the benchmark's lab by hand. Needs root for the eBPF and network-namespace steps.
use std::path::PathBuf;

use anyhow::Context as _;
use bench::{all, labrun, policy, testrun};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmark steps; `cargo xtask bench` runs them all")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes a lab cluster of N Services (manifests, kube-proxy's rules for it, and a plan).
    GenLab {
        #[arg(long)]
        services: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Per-packet cost of each program and path at each scale (BPF_PROG_TEST_RUN).
    Datapath {
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
        scales: Vec<usize>,
        #[arg(long, default_value_t = 8)]
        endpoints: usize,
        #[arg(long, default_value_t = 20_000)]
        runs: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Paired new connections through a Service address and to its backends' own (the lab runs
    /// it inside a node's namespace and cgroup); prints the figures as JSON.
    #[command(hide = true)]
    Connect {
        #[arg(long, value_delimiter = ',')]
        service: Vec<std::net::SocketAddr>,
        #[arg(long, value_delimiter = ',')]
        direct: Vec<std::net::SocketAddr>,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// NetworkPolicy's costs: the policy stage per packet (0, 1, 100, 1,000 rules) and event ->
    /// enforced at 10,000 pods and 1,000 policies; prints the figures as JSON.
    Policy {
        #[arg(long, default_value_t = 20_000)]
        runs: usize,
        #[arg(long, default_value_t = 50)]
        changes: usize,
    },
    /// Everything, side by side with kube-proxy's modes, and the report (what `cargo xtask
    /// bench` runs).
    All(all::BenchArgs),
}

fn write_json(path: &std::path::Path, v: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line, never a backtrace (RUST_BACKTRACE may be set).
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::GenLab { services, out } => labrun::gen_lab(services, &out),
        Cmd::Datapath {
            scales,
            endpoints,
            runs,
            out,
        } => {
            let mut results = Vec::new();
            for n in scales {
                eprintln!("bench: datapath at {n} Services");
                results.push(testrun::measure(n, endpoints, runs)?);
            }
            write_json(&out, &results)
        }
        Cmd::Connect {
            service,
            direct,
            count,
        } => {
            let figures = labrun::paired(&service, &direct, count)?;
            println!("{}", serde_json::to_string(&figures)?);
            Ok(())
        }
        Cmd::Policy { runs, changes } => {
            let figures = (policy::per_packet(runs)?, policy::control(changes)?);
            println!("{}", serde_json::to_string_pretty(&figures)?);
            Ok(())
        }
        Cmd::All(args) => {
            // What the user typed after `cargo xtask bench`: without the criterion directory
            // xtask adds.
            let mut invocation = Vec::new();
            let mut given = std::env::args().skip(2);
            while let Some(a) = given.next() {
                if a == "--criterion" {
                    given.next();
                } else {
                    invocation.push(a);
                }
            }
            all::run(args, &format!("bench {}", invocation.join(" ")))
        }
    }
}
