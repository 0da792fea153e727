//! `dataplane-agent`: wires arguments, logging and the agent's tasks.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dataplane_agent::agent::{Config, PodTranslation, Source, run};
use dataplane_agent::explain::FlowLogFormat;
use dataplane_core::reconcile::NodePortAddresses;

/// `MIN-MAX`, inclusive.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port"))
    };
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    Ok((parse(lo)?, parse(hi)?))
}

#[derive(Parser)]
#[command(version, about = "eBPF kube-proxy replacement: per-node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program this node's datapath from the Kubernetes API (or a manifests directory) and keep it
    /// in sync.
    Run(Box<RunArgs>),
    /// Remove the iptables chains (KUBE-*) and nftables tables (kube-proxy) kube-proxy leaves on
    /// this node, and report what was removed.
    CleanupKubeProxy {
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Whether a connection is allowed, and by which NetworkPolicy: the running agent of this
    /// node runs its loaded programs on a synthetic first packet against the live maps.
    Explain {
        /// The client: NAMESPACE/POD (a pod of this node), or an address (the ingress half).
        #[arg(long)]
        from: String,
        /// ADDR:PORT/PROTO (tcp, udp or sctp): a pod, a Service address, anything.
        #[arg(long)]
        to: String,
        /// The running agent's metrics address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_address: std::net::SocketAddr,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name (Pods with this spec.nodeName are local).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Directory of Kubernetes YAML manifests to read and watch instead of the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; without it (and without --manifests) the in-cluster
    /// configuration is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Where to write status JSON (programmed generation, manifest fingerprint, counters).
    #[arg(long, env = "DATAPLANE_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// Address for /healthz, /readyz and /metrics (loopback, kube-proxy's metrics port).
    #[arg(
        long,
        env = "DATAPLANE_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249"
    )]
    metrics_bind_address: std::net::SocketAddr,
    /// Address for kube-proxy's node health endpoints /healthz and /livez (all addresses, so a
    /// cloud load balancer can probe the node, as kube-proxy's healthz port).
    #[arg(
        long,
        env = "DATAPLANE_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    healthz_bind_address: std::net::SocketAddr,
    /// A directory on a bpffs where conntrack and the program links are pinned, so that
    /// connections and the datapath survive agent restarts and upgrades.
    #[arg(long, env = "DATAPLANE_BPFFS")]
    bpffs: Option<PathBuf>,
    /// A cgroup v2 directory for the socket hooks: processes in it (or below it) in this
    /// node's own network namespace reach ClusterIPs at connect()/sendmsg(). Without it, only
    /// pods are translated (at their interfaces).
    #[arg(long, env = "DATAPLANE_SOCKET_CGROUP")]
    socket_cgroup: Option<PathBuf>,
    /// The node's external interfaces (comma-separated): NodePort, LoadBalancer and
    /// externalIP traffic from outside the node is translated there (XDP). Without them,
    /// only pods and the node's own processes reach those addresses.
    #[arg(long, env = "DATAPLANE_EXTERNAL_INTERFACES", value_delimiter = ',')]
    external_interfaces: Vec<String>,
    /// Where NodePorts answer: `primary` (the Node's InternalIPs) or comma-separated CIDRs
    /// (the node's interface addresses inside them), as kube-proxy's flag.
    #[arg(long, env = "DATAPLANE_NODEPORT_ADDRESSES", default_value = "primary")]
    nodeport_addresses: NodePortAddresses,
    /// Source ports for external traffic forwarded to another node's backend, `MIN-MAX`;
    /// must lie outside net.ipv4.ip_local_port_range.
    #[arg(long, env = "DATAPLANE_SNAT_PORTS", default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: (u16, u16),
    /// How XDP runs on the external interfaces: `native` (in the driver, falling back to
    /// generic where the driver has no XDP) or `generic` (in the kernel's receive path).
    #[arg(long, env = "DATAPLANE_XDP_MODE", default_value = "native", value_parser = ["native", "generic"])]
    xdp_mode: String,
    /// How pods' connections to Services are translated: `socket` (at connect()/sendmsg() by
    /// the socket hooks, which needs --socket-cgroup holding the pods; TC catches the rest) or
    /// `tc` (per packet on each pod's interface). Default: socket with --socket-cgroup, else tc.
    #[arg(long, env = "DATAPLANE_POD_TRANSLATION", value_parser = ["socket", "tc"])]
    pod_translation: Option<String>,
    /// Write every policy verdict event (new flows in isolated directions, rate-limited) to
    /// this file (`-`: standard output).
    #[arg(long, env = "DATAPLANE_FLOW_LOG")]
    flow_log: Option<PathBuf>,
    #[arg(
        long,
        env = "DATAPLANE_FLOW_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    flow_log_format: FlowLogFormat,
}

fn main() -> std::process::ExitCode {
    match main_inner() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line, never a backtrace (RUST_BACKTRACE may be set).
            eprintln!("dataplane-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main_inner() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let RunArgs {
                node_name,
                manifests,
                kubeconfig,
                status_file,
                poll_ms,
                metrics_bind_address,
                healthz_bind_address,
                bpffs,
                socket_cgroup,
                external_interfaces,
                nodeport_addresses,
                snat_ports,
                xdp_mode,
                pod_translation,
                flow_log,
                flow_log_format,
            } = *args;
            let pod_translation = match (pod_translation.as_deref(), &socket_cgroup) {
                (Some("socket"), None) => {
                    anyhow::bail!("--pod-translation socket needs --socket-cgroup")
                }
                (Some("socket") | None, Some(_)) => PodTranslation::Socket,
                _ => PodTranslation::Tc,
            };
            let config = Config {
                node_name,
                source: match manifests {
                    Some(dir) => Source::Manifests(dir),
                    None => Source::Kubernetes { kubeconfig },
                },
                status_file,
                poll: Duration::from_millis(poll_ms),
                metrics_bind: Some(metrics_bind_address),
                healthz_bind: Some(healthz_bind_address),
                bpffs,
                socket_cgroup,
                external_interfaces,
                nodeport_addresses,
                snat_ports,
                xdp_mode_native: xdp_mode == "native",
                pod_translation,
                flow_log,
                flow_log_format,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run(config))
        }
        Command::Explain {
            from,
            to,
            metrics_address,
            json,
        } => {
            // Checked here first, so a typo is this command's one-line error.
            dataplane_agent::explain::Query::parse(&from, &to)?;
            let (code, body) = dataplane_agent::http::get(
                metrics_address,
                &format!("/explain?from={from}&to={to}"),
            )
            .with_context(|| format!("asking the agent at {metrics_address}"))?;
            if code != 200 {
                anyhow::bail!("{}", body.trim());
            }
            let explanation: dataplane_agent::explain::Explanation = serde_json::from_str(&body)
                .with_context(|| format!("the agent answered: {}", body.trim()))?;
            if json {
                println!("{body}");
            } else {
                print!("{}", explanation.render());
            }
            Ok(())
        }
        Command::CleanupKubeProxy { dry_run } => {
            let report = dataplane_agent::cleanup::run(dry_run)?;
            for line in &report {
                println!("{line}");
            }
            println!(
                "{} kube-proxy objects {}",
                report.len(),
                if dry_run {
                    "found (dry run)"
                } else {
                    "removed"
                }
            );
            Ok(())
        }
    }
}
