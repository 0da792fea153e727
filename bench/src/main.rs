//! `bench`: the benchmark steps `cargo xtask bench` runs (it needs root for the eBPF and
//! network-namespace steps) and the report that gathers them.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bench::{cluster, control, kubeproxy, report, testrun};
use clap::{Parser, Subcommand};
use serde_json::json;

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
    /// Full-sync and one-change timings: ours and kube-proxy's loaders.
    Control {
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        scales: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
        #[arg(long, default_value_t = 10)]
        baseline_changes: usize,
        /// Time cap for one loader run, in seconds.
        #[arg(long, default_value_t = 300)]
        cap_secs: u64,
        /// Time cap for one iptables-nft-restore run, in seconds.
        #[arg(long, default_value_t = 60)]
        iptables_nft_cap_secs: u64,
        /// Prefix of the network namespaces made (per run).
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Gathers the parts in DIR into latest.json, latest.md and the plots.
    Report {
        #[arg(long)]
        parts: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "")]
        args: String,
        #[arg(long, default_value_t = 0.0)]
        elapsed: f64,
    },
}

/// The lab's real pods: a client, ten nginx backends of the web Service (the first also alone
/// behind web-one, for wrk against one server either way), an iperf3 server.
const NODE: (&str, &str, &str) = ("node-a", "172.31.0.2", "10.245.1.0/24");
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 10);
const WEB_ONE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 11);
const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 20);

fn gen_lab(services: usize, out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out.join("manifests"))?;
    let web: Vec<Ipv4Addr> = (0..10).map(|i| Ipv4Addr::new(10, 245, 1, 20 + i)).collect();
    let iperf = Ipv4Addr::new(10, 245, 1, 40);
    let client = Ipv4Addr::new(10, 245, 1, 10);
    let real = [
        cluster::Real {
            name: "web".into(),
            vip: WEB_VIP,
            port: 80,
            target_port: 8080,
            backends: web.clone(),
        },
        cluster::Real {
            name: "web-one".into(),
            vip: WEB_ONE_VIP,
            port: 80,
            target_port: 8080,
            backends: vec![web[0]],
        },
        cluster::Real {
            name: "iperf".into(),
            vip: IPERF_VIP,
            port: 5201,
            target_port: 5201,
            backends: vec![iperf],
        },
    ];
    let objects = cluster::objects(services, 10, &real);
    let mut pods = vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE.0},
               "spec": {"podCIDR": NODE.2},
               "status": {"addresses": [{"type": "InternalIP", "address": NODE.1}]}}),
    ];
    let pod = |name: &str, ip: Ipv4Addr, port: u16, server: Option<&str>| {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": cluster::NAMESPACE},
            "spec": {"nodeName": NODE.0, "containers": [{"name": "c", "image": "bench",
                     "ports": [{"containerPort": port, "protocol": "TCP"}]}]},
            "status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        if let Some(s) = server {
            p["metadata"]["annotations"] = json!({"kplab.dev/server": s});
        }
        p
    };
    pods.push(pod("client", client, 8080, None));
    for (i, ip) in web.iter().enumerate() {
        pods.push(pod(&format!("web-{i}"), *ip, 8080, Some("nginx")));
    }
    pods.push(pod("iperf", iperf, 5201, Some("iperf3")));
    std::fs::write(out.join("manifests/pods.yaml"), cluster::yaml(&pods)?)?;
    std::fs::write(
        out.join("manifests/services.yaml"),
        cluster::yaml(&objects)?,
    )?;
    let index = cluster::index(&objects);
    let translated = cluster::translated(&objects, &index);
    std::fs::write(out.join("iptables.rules"), kubeproxy::iptables(&translated))?;
    std::fs::write(out.join("nftables.rules"), kubeproxy::nftables(&translated))?;
    let plan = json!({
        "client": format!("{}/client", cluster::NAMESPACE),
        "web_vip": format!("{WEB_VIP}:80"),
        "web_pods": web.iter().map(|w| format!("{w}:8080")).collect::<Vec<_>>(),
        "web_one_vip": format!("{WEB_ONE_VIP}:80"),
        "web_direct": format!("{}:8080", web[0]),
        "iperf_vip": IPERF_VIP.to_string(),
        "iperf_direct": iperf.to_string(),
        "services": services,
    });
    std::fs::write(out.join("plan.json"), plan.to_string())?;
    Ok(())
}

fn write_json(path: &std::path::Path, v: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::GenLab { services, out } => gen_lab(services, &out),
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
        Cmd::Control {
            scales,
            endpoints,
            changes,
            baseline_changes,
            cap_secs,
            iptables_nft_cap_secs,
            prefix,
            out,
        } => {
            let scratch = out.with_extension("d");
            std::fs::create_dir_all(&scratch)?;
            let mut results = Vec::new();
            for &n in &scales {
                eprintln!("bench: control plane, ours, {n} Services");
                results.push(control::ours(n, endpoints, changes)?);
                for (mode, b) in control::BASELINES.iter().enumerate() {
                    eprintln!("bench: control plane, {}, {n} Services", b.0);
                    let cap = Duration::from_secs(if b.0 == "iptables-nft" {
                        iptables_nft_cap_secs
                    } else {
                        cap_secs
                    });
                    results.push(control::baseline(
                        mode,
                        n,
                        endpoints,
                        baseline_changes,
                        cap,
                        &prefix,
                        &scratch,
                    )?);
                }
            }
            let _ = std::fs::remove_dir_all(&scratch);
            write_json(&out, &results)
        }
        Cmd::Report {
            parts,
            out,
            args,
            elapsed,
        } => {
            let mut results = json!({"machine": report::machine(&args, elapsed)});
            for part in ["datapath", "control", "lab", "agent_rss", "criterion"] {
                if let Ok(text) = std::fs::read_to_string(parts.join(format!("{part}.json"))) {
                    results[part] = serde_json::from_str(&text)
                        .with_context(|| format!("parsing {part}.json"))?;
                }
            }
            report::write(&results, &out)
        }
    }
}
