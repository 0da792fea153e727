//! `bench all` (what `cargo xtask bench` runs): every benchmark in one bounded run, on this
//! machine, side by side with kube-proxy's modes, then the report (`latest.{md,json}` and SVG
//! plots). Steps: the datapath's per-packet cost (BPF_PROG_TEST_RUN); control-plane timings;
//! criterion's results when a run of the agent benches is given; the lab runs at each scale.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::control::{self, ModeSync};
use crate::labrun::{self, AgentRss, LabOptions, LabRow};
use crate::policy::{self, PolicyControl, StageCost};
use crate::report;
use crate::testrun::{self, Scale};

/// The lab name the benchmark uses (its own, so a lab someone is running stays untouched).
const LAB: &str = "kplbench";

/// Every knob of a run; `cargo xtask bench` passes its arguments here unchanged.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Service counts of the lab runs.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub lab_scales: Vec<usize>,
    /// Service counts of the per-packet runs.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    pub datapath_scales: Vec<usize>,
    /// Service counts of the control-plane runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub control_scales: Vec<usize>,
    /// Time cap for loading one kube-proxy ruleset (nftables, iptables-legacy), in seconds.
    /// nftables needs about 210 s for 10k Services on this machine kind.
    #[arg(long, default_value_t = 300)]
    pub cap_secs: u64,
    /// Time cap for iptables-nft, which needs over 30 minutes at 10k Services (5.5 s at 1k): kept
    /// short by default so the run stays within 20 minutes.
    #[arg(long, default_value_t = 60)]
    pub iptables_nft_cap_secs: u64,
    /// New connections per latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Seconds of wrk and of iperf3 per mode.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Small scales and short runs, to check the harness end to end (no criterion).
    #[arg(long)]
    pub quick: bool,
    /// A directory of criterion results to include (`cargo xtask bench` runs the agent's
    /// criterion benches first, except with --quick).
    #[arg(long)]
    pub criterion: Option<PathBuf>,
}

/// One criterion benchmark's estimate.
#[derive(Debug, Serialize)]
pub struct CriterionResult {
    pub name: String,
    pub mean_ns: f64,
}

/// Everything a run measured: what `latest.json` holds.
#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: serde_json::Value,
    pub datapath: Vec<Scale>,
    pub control: Vec<ModeSync>,
    pub lab: Vec<LabRow>,
    pub agent_rss: Vec<AgentRss>,
    pub policy: PolicyResults,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criterion: Option<Vec<CriterionResult>>,
}

/// NetworkPolicy's costs.
#[derive(Debug, Serialize)]
pub struct PolicyResults {
    pub datapath: Vec<StageCost>,
    pub control: PolicyControl,
    pub agent_peak_rss_mb: f64,
}

/// Runs everything and writes the report.
///
/// # Errors
/// A step failed; the lab is taken down first.
pub fn run(mut a: BenchArgs, invocation: &str) -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and builds network namespaces: run it as root");
    }
    // SAFETY: nothing else runs yet; the lab code reads the name from the environment.
    unsafe { std::env::set_var("KPLAB_NAME", LAB) };
    if a.quick {
        a.lab_scales = vec![100];
        a.datapath_scales = vec![1, 1000];
        a.control_scales = vec![100];
        a.connections = 200;
        a.seconds = 1;
        a.cap_secs = 30;
        a.iptables_nft_cap_secs = 30;
    }
    let started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("kplbench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    let runs = if a.quick { 2000 } else { 20_000 };
    let mut datapath = Vec::new();
    for &n in &a.datapath_scales {
        eprintln!("bench: datapath at {n} Services");
        datapath.push(testrun::measure(n, 8, runs)?);
    }

    let (changes, baseline_changes) = if a.quick { (20, 2) } else { (200, 10) };
    let control = control_plane(&a, changes, baseline_changes, &scratch)?;

    eprintln!("bench: NetworkPolicy, per packet and event -> enforced");
    let policy = PolicyResults {
        datapath: policy::per_packet(runs)?,
        control: policy::control(if a.quick { 10 } else { 50 })?,
        agent_peak_rss_mb: policy::agent_rss(&scratch, &format!("{LAB}-{}", std::process::id()))?,
    };

    let criterion = a.criterion.as_deref().map(criterion_results).transpose()?;

    let options = LabOptions {
        connections: a.connections,
        seconds: a.seconds,
        cap_secs: a.cap_secs,
        iptables_nft_cap_secs: a.iptables_nft_cap_secs,
    };
    let mut lab = Vec::new();
    let mut agent_rss = Vec::new();
    for &n in &a.lab_scales {
        eprintln!("bench: lab at {n} Services");
        let dir = scratch.join(format!("lab-{n}"));
        labrun::gen_lab(n, &dir)?;
        let result = labrun::scale(&options, &dir, &control, &mut lab, &mut agent_rss);
        let down = kplab::down();
        result?;
        down?;
    }

    let results = Results {
        machine: report::machine(invocation, started.elapsed().as_secs_f64()),
        datapath,
        control,
        lab,
        agent_rss,
        policy,
        criterion,
    };
    report::write(&serde_json::to_value(&results)?, &a.out)?;
    std::fs::remove_dir_all(&scratch)?;
    eprintln!(
        "bench: done in {:.0} s; report in {}",
        started.elapsed().as_secs_f64(),
        a.out.join("latest.md").display()
    );
    Ok(())
}

/// Ours and every kube-proxy loader at each control-plane scale.
///
/// # Errors
/// A step failed.
pub fn control_plane(
    a: &BenchArgs,
    changes: usize,
    baseline_changes: usize,
    scratch: &Path,
) -> anyhow::Result<Vec<ModeSync>> {
    let prefix = format!("{LAB}-{}", std::process::id());
    let mut results = Vec::new();
    for &n in &a.control_scales {
        eprintln!("bench: control plane, ours, {n} Services");
        results.push(control::ours(n, 10, changes)?);
        for (mode, b) in control::BASELINES.iter().enumerate() {
            eprintln!("bench: control plane, {}, {n} Services", b.0);
            let cap = Duration::from_secs(if b.0 == "iptables-nft" {
                a.iptables_nft_cap_secs
            } else {
                a.cap_secs
            });
            results.push(control::baseline(
                mode,
                n,
                10,
                baseline_changes,
                cap,
                &prefix,
                scratch,
            )?);
        }
    }
    Ok(results)
}

#[derive(Deserialize)]
struct Title {
    title: String,
}

#[derive(Deserialize)]
struct Estimates {
    mean: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
}

/// Criterion's estimates, by benchmark title.
fn criterion_results(dir: &Path) -> anyhow::Result<Vec<CriterionResult>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).context("criterion wrote no results")? {
        let new = entry?.path().join("new");
        let (Ok(b), Ok(e)) = (
            std::fs::read(new.join("benchmark.json")),
            std::fs::read(new.join("estimates.json")),
        ) else {
            continue;
        };
        let b: Title = serde_json::from_slice(&b)?;
        let e: Estimates = serde_json::from_slice(&e)?;
        out.push(CriterionResult {
            name: b.title,
            mean_ns: e.mean.point_estimate,
        });
    }
    out.sort_by(|x, y| x.name.cmp(&y.name));
    Ok(out)
}
