//! `cargo xtask bench`: every benchmark in one bounded run, on this machine, side by side with
//! kube-proxy's modes, then the report (`bench/results/latest.{md,json}` and SVG plots).
//!
//! Steps: the datapath's per-packet cost (BPF_PROG_TEST_RUN, `bench datapath`); control-plane
//! timings (`bench control`); criterion benches of the agent's hot paths; and lab runs at each
//! scale: one node with a client pod, ten nginx pods behind a Service and an iperf3 pod, measured
//! with our agent, then (agent detached) with no proxy at all, nftables, iptables-nft and
//! iptables-legacy rules loaded into the node's namespace in turn. Every load run is bounded in
//! count and time, and all traffic stays inside the lab's namespaces.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{run, setup, workspace_root};
use kplab as lab;

/// The lab name the benchmark uses (its own, so a lab someone is running stays untouched).
const LAB: &str = "kplbench";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Service counts of the lab runs.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    lab_scales: Vec<usize>,
    /// Service counts of the per-packet runs.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    datapath_scales: Vec<usize>,
    /// Service counts of the control-plane runs.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    control_scales: Vec<usize>,
    /// Time cap for loading one kube-proxy ruleset (nftables, iptables-legacy), in seconds.
    /// nftables needs about 210 s for 10k Services on this machine kind.
    #[arg(long, default_value_t = 300)]
    cap_secs: u64,
    /// Time cap for iptables-nft, which needs over 30 minutes at 10k Services (5.5 s at 1k): kept
    /// short by default so the run stays within 20 minutes.
    #[arg(long, default_value_t = 60)]
    iptables_nft_cap_secs: u64,
    /// New connections per latency measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Seconds of wrk and of iperf3 per mode.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Small scales and short runs, to check the harness end to end (no criterion).
    #[arg(long)]
    quick: bool,
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(crate::cargo().args(args))
}

/// Runs everything and writes the report.
///
/// # Errors
/// A step failed; the lab is taken down first.
pub fn run_all(mut a: BenchArgs) -> anyhow::Result<()> {
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
    setup::ensure()?;
    cargo(&["build", "--release", "--quiet", "-p", "bench"])?;
    let release = crate::build_programs()?;
    let root = workspace_root();
    let bench = release.join("bench");
    // SAFETY: still single-threaded; the lab code finds its programs through these.
    unsafe {
        std::env::set_var("KPLAB_AGENT", release.join("dataplane-agent"));
        std::env::set_var("KPLAB_BIN", release.join("kplab"));
    }
    let parts = std::env::temp_dir().join(format!("kplbench-{}", std::process::id()));
    std::fs::create_dir_all(&parts)?;
    let scales = |v: &[usize]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let runs = if a.quick { "2000" } else { "20000" };
    eprintln!("bench: datapath per-packet cost");
    run(Command::new(&bench).args([
        "datapath",
        "--scales",
        &scales(&a.datapath_scales),
        "--runs",
        runs,
        "--out",
        &parts.join("datapath.json").display().to_string(),
    ]))?;
    eprintln!("bench: control plane");
    let (changes, baseline_changes) = if a.quick { ("20", "2") } else { ("200", "10") };
    run(Command::new(&bench).args([
        "control",
        "--scales",
        &scales(&a.control_scales),
        "--changes",
        changes,
        "--baseline-changes",
        baseline_changes,
        "--cap-secs",
        &a.cap_secs.to_string(),
        "--iptables-nft-cap-secs",
        &a.iptables_nft_cap_secs.to_string(),
        "--prefix",
        &format!("{LAB}-{}", std::process::id()),
        "--out",
        &parts.join("control.json").display().to_string(),
    ]))?;
    if !a.quick {
        eprintln!("bench: criterion");
        cargo(&["bench", "-p", "bench", "--bench", "agent", "--", "--noplot"])?;
        std::fs::write(
            parts.join("criterion.json"),
            criterion_results(&root.join("target/criterion"))?.to_string(),
        )?;
    }
    let control: Value = serde_json::from_slice(&std::fs::read(parts.join("control.json"))?)?;
    let mut rows = Vec::new();
    let mut rss = Vec::new();
    for &n in &a.lab_scales {
        eprintln!("bench: lab at {n} Services");
        let dir = parts.join(format!("lab-{n}"));
        run(Command::new(&bench).args([
            "gen-lab",
            "--services",
            &n.to_string(),
            "--out",
            &dir.display().to_string(),
        ]))?;
        let result = lab_scale(&a, &dir, &control, &mut rows, &mut rss);
        let down = lab::down();
        result?;
        down?;
    }
    std::fs::write(parts.join("lab.json"), Value::from(rows).to_string())?;
    std::fs::write(parts.join("agent_rss.json"), Value::from(rss).to_string())?;
    let out = if a.out.is_absolute() {
        a.out.clone()
    } else {
        root.join(&a.out)
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    run(Command::new(&bench).args([
        "report",
        "--parts",
        &parts.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--args",
        &args.join(" "),
        "--elapsed",
        &started.elapsed().as_secs_f64().to_string(),
    ]))?;
    std::fs::remove_dir_all(&parts)?;
    eprintln!(
        "bench: done in {:.0} s; report in {}",
        started.elapsed().as_secs_f64(),
        out.join("latest.md").display()
    );
    Ok(())
}

/// Criterion's estimates: (benchmark title, mean ns).
fn criterion_results(dir: &Path) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).context("criterion wrote no results")? {
        let new = entry?.path().join("new");
        let (Ok(b), Ok(e)) = (
            std::fs::read(new.join("benchmark.json")),
            std::fs::read(new.join("estimates.json")),
        ) else {
            continue;
        };
        let b: Value = serde_json::from_slice(&b)?;
        let e: Value = serde_json::from_slice(&e)?;
        out.push(json!({"name": b["title"], "mean_ns": e["mean"]["point_estimate"]}));
    }
    out.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_owned());
    Ok(Value::from(out))
}

/// Runs `f` on a thread inside a network namespace.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> anyhow::Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: a valid namespace fd; only this thread changes namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("measurement thread panicked"))?
}

/// One new connection with one HTTP request and its whole response; microseconds.
fn one_request(to: SocketAddr) -> std::io::Result<f64> {
    let t = Instant::now();
    // Long enough for a SYN retransmitted after 1 s (a conntrack clash in the kube-proxy modes)
    // to count as a slow connection rather than a failure.
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got == 0 || !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("no 200 response"));
    }
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// p50 and p99 (us) of `count` new connections (after a warm-up) to `targets` in turn, bounded
/// by 60 s. More than 1% failed connections fails the measurement: such a mode is broken, not slow.
fn latency(netns: &str, targets: &[SocketAddr], count: usize) -> anyhow::Result<(f64, f64)> {
    let targets = targets.to_vec();
    let samples = in_netns(netns, move || -> anyhow::Result<Vec<f64>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for to in targets.iter().cycle().take(50) {
            let _ = one_request(*to);
        }
        let mut us = Vec::with_capacity(count);
        let mut failed = Vec::new();
        for to in targets.iter().cycle() {
            if us.len() + failed.len() >= count || Instant::now() >= deadline {
                break;
            }
            match one_request(*to) {
                Ok(t) => us.push(t),
                Err(e) => failed.push(format!("{to}: {e}")),
            }
        }
        if failed.len() * 100 > count {
            bail!(
                "{} of {count} connections failed: {:?}",
                failed.len(),
                &failed[..failed.len().min(5)]
            );
        }
        Ok(us)
    })??;
    let mut s = samples;
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

fn netns_cmd(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Requests per second from wrk (8 keep-alive connections, one thread) for `seconds`.
fn wrk(netns: &str, url: &str, seconds: u64) -> anyhow::Result<f64> {
    let cap = (seconds + 10).to_string();
    let d = format!("{seconds}s");
    let out = netns_cmd(
        netns,
        &[
            "timeout",
            &cap,
            "wrk",
            "-t1",
            "-c8",
            "-d",
            &d,
            "--timeout",
            "2s",
            url,
        ],
    )?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors against {url}:\n{out}");
    }
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))
}

/// TCP throughput from iperf3 (one stream) for `seconds`, Gbit/s received.
fn iperf(netns: &str, ip: &str, seconds: u64) -> anyhow::Result<f64> {
    let cap = (seconds + 10).to_string();
    let t = seconds.to_string();
    let out = netns_cmd(
        netns,
        &[
            "timeout", &cap, "iperf3", "-c", ip, "-p", "5201", "-t", &t, "-J",
        ],
    )?;
    let v: Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no throughput in iperf3's output: {out}"))
}

/// Loads a ruleset into the node's namespace under the cap; seconds taken, `None` if capped.
fn load(netns: &str, loader: &[&str], file: &Path, cap: u64) -> anyhow::Result<Option<f64>> {
    let t = Instant::now();
    let status = Command::new("ip")
        .args(["netns", "exec", netns, "timeout", &cap.to_string()])
        .args(loader)
        .stdin(std::fs::File::open(file)?)
        .status()?;
    match status.code() {
        Some(0) => Ok(Some(t.elapsed().as_secs_f64())),
        Some(124) => Ok(None),
        _ => bail!("{} failed: {status}", loader.join(" ")),
    }
}

struct Plan {
    client: String,
    node: String,
    web_vip: SocketAddr,
    web_pods: Vec<SocketAddr>,
    web_one_vip: SocketAddr,
    web_direct: SocketAddr,
    iperf_vip: String,
    iperf_direct: String,
}

fn plan(dir: &Path) -> anyhow::Result<Plan> {
    let p: Value = serde_json::from_slice(&std::fs::read(dir.join("plan.json"))?)?;
    let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
    let state = lab::state()?;
    let client = state
        .pods
        .iter()
        .find(|x| x.spec.key == s("client"))
        .context("the client pod is in the lab")?
        .netns
        .clone();
    Ok(Plan {
        client,
        node: state.nodes[0].netns.clone(),
        web_vip: s("web_vip").parse()?,
        web_pods: p["web_pods"]
            .as_array()
            .context("web_pods")?
            .iter()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect(),
        web_one_vip: s("web_one_vip").parse()?,
        web_direct: s("web_direct").parse()?,
        iperf_vip: s("iperf_vip"),
        iperf_direct: s("iperf_direct"),
    })
}

/// Measures one mode. Latency: through the ClusterIP of ten nginx pods, or ("direct") to those
/// pods' own addresses in turn, and to the pods' own addresses with the mode loaded; wrk: one
/// nginx pod through its single-endpoint ClusterIP, or directly; iperf3 likewise.
fn measure(
    a: &BenchArgs,
    p: &Plan,
    n: usize,
    mode: &str,
    load_s: Option<f64>,
) -> anyhow::Result<Value> {
    let direct = mode == "direct";
    eprintln!("bench: {n} Services, {mode}");
    let (pod50, pod99) = latency(&p.client, &p.web_pods, a.connections)?;
    let (p50, p99) = if direct {
        (pod50, pod99)
    } else {
        latency(&p.client, &[p.web_vip], a.connections)?
    };
    let (web, iperf_ip) = if direct {
        (p.web_direct, p.iperf_direct.as_str())
    } else {
        (p.web_one_vip, p.iperf_vip.as_str())
    };
    let rps = wrk(&p.client, &format!("http://{web}/"), a.seconds)?;
    let gbps = iperf(&p.client, iperf_ip, a.seconds)?;
    Ok(
        json!({"services": n, "mode": mode, "p50_us": p50, "p99_us": p99,
              "pod_ip_p50_us": pod50, "pod_ip_p99_us": pod99, "rps": rps, "gbps": gbps,
              "load_s": load_s}),
    )
}

/// A kube-proxy mode in the lab: name, loader, rules file, cleanup commands.
type Baseline<'a> = (&'a str, &'a [&'a str], &'a str, &'a [&'a [&'a str]]);

fn capped_in_control(control: &Value, mode: &str, n: usize) -> bool {
    control.as_array().is_some_and(|rows| {
        rows.iter().any(|r| {
            r["mode"] == mode
                && r["services"].as_u64().is_some_and(|s| s as usize <= n)
                && r["full_sync_s"].is_null()
        })
    })
}

fn lab_scale(
    a: &BenchArgs,
    dir: &Path,
    control: &Value,
    rows: &mut Vec<Value>,
    rss: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let n = dir
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("lab-"))
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    let t = Instant::now();
    lab::up(&dir.join("manifests"), None, &[])?;
    let up_s = t.elapsed().as_secs_f64();
    let p = plan(dir)?;
    rows.push(measure(a, &p, n, "ours", Some(up_s))?);
    let pid = lab::state()?.nodes[0].agent_pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM of the agent")?;
    rss.push(json!({"services": n, "peak_rss_mb": hwm_kb / 1024.0}));
    lab::detach_datapath()?;
    rows.push(measure(a, &p, n, "direct", None)?);

    let modes: [Baseline; 3] = [
        (
            "nftables",
            &["nft", "-f", "-"],
            "nftables.rules",
            &[&["nft", "delete", "table", "ip", "kube-proxy"]],
        ),
        (
            "iptables-nft",
            &["iptables-nft-restore", "--noflush"],
            "iptables.rules",
            &[&["nft", "flush", "ruleset"]],
        ),
        (
            "iptables-legacy",
            &["iptables-legacy-restore", "--noflush"],
            "iptables.rules",
            &[
                &["iptables-legacy", "-t", "nat", "-F"],
                &["iptables-legacy", "-t", "nat", "-X"],
                &["iptables-legacy", "-t", "filter", "-F"],
                &["iptables-legacy", "-t", "filter", "-X"],
            ],
        ),
    ];
    for (mode, loader, file, cleanup) in modes {
        let cap = if mode == "iptables-nft" {
            a.iptables_nft_cap_secs
        } else {
            a.cap_secs
        };
        if capped_in_control(control, mode, n) {
            rows.push(json!({"services": n, "mode": mode,
                "note": format!("not loaded: over the {cap} s cap in the control-plane step")}));
            continue;
        }
        eprintln!("bench: loading {mode} rules for {n} Services");
        match load(&p.node, loader, &dir.join(file), cap)? {
            Some(s) => rows.push(measure(a, &p, n, mode, Some(s))?),
            None => rows.push(json!({"services": n, "mode": mode,
                "note": format!("not loaded within the {cap} s cap")})),
        }
        for c in cleanup {
            netns_cmd(&p.node, c)?;
        }
    }
    Ok(())
}
