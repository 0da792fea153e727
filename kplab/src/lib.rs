//! The lab: a Kubernetes cluster modelled with network namespaces on this machine.
//!
//! ```text
//!  external ns --+
//!                |-- underlay ns (br0) --+-- node ns (eth0, agent) --lxc*== pod ns (eth0, server)
//!                |                       +-- node ns (eth0, agent) --lxc*== pod ns ...
//! ```
//!
//! No namespace is ever connected to the machine's own network: every veth is created directly
//! between two lab namespaces. Names carry a per-run prefix (`<base>-<run id>-`); `down` (and `up`,
//! before it starts) removes every namespace of the base, so a crashed lab is cleaned too.
mod api;
pub mod cgroup;
mod cluster;
pub mod demo;
mod explain;
mod matrix;
pub mod netns;
pub mod probe;
mod serve;
mod topology;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

pub use cluster::{NodeSpec, PodSpec, ServiceSpec};
pub use matrix::{Matrix, probe_all as probe_matrix, render as matrix_table};

#[derive(Subcommand)]
pub enum LabCmd {
    /// The demo: a lab from DIR, probes from every client pod to every Service, a report, down.
    Demo {
        #[arg(long)]
        manifests: PathBuf,
    },
    /// Build the lab from a manifests directory and start one agent per node.
    Up {
        #[arg(long)]
        manifests: PathBuf,
        /// Create the objects in this API server and run the agents with the Kubernetes source.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// External hosts on the underlay, as NAME=IP, optionally serving ports like a pod:
        /// NAME=IP:tcp/80,udp/53 (the lab's server: HTTP on TCP, echo on UDP). They route every
        /// node's podCIDR to that node, so they reach pods directly.
        #[arg(long = "external")]
        externals: Vec<String>,
    },
    /// Replace the lab's objects with those of DIR; returns once every agent programmed them.
    Apply { dir: PathBuf },
    /// One probe (or --count probes): prints a JSON line per probe.
    Probe(probe::ProbeArgs),
    /// Run a command as a lab pod, node or external host runs it: in its network namespace and,
    /// for a node, its cgroup (where the node's socket hooks see it), e.g. `kplab exec --on node-a
    /// -- dig @10.96.0.10 kubernetes.default.svc.cluster.local`. Exits with the command's status.
    Exec {
        /// A pod (ns/name), node or external host.
        #[arg(long)]
        on: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Reachability table: pods and external hosts x (pods, external hosts and services) x ports.
    Matrix {
        /// Per-probe timeout in milliseconds.
        #[arg(long, default_value_t = 300)]
        timeout_ms: u64,
        /// A table in the format this prints, edited to what should be: print the cells that
        /// differ, and fail when any does.
        #[arg(long)]
        expect: Option<PathBuf>,
    },
    /// Whether a connection is allowed and by which NetworkPolicy, as the agents of the nodes
    /// involved answer it by running their loaded programs on a synthetic packet.
    Explain {
        /// A pod (ns/name) or external host.
        #[arg(long)]
        from: String,
        /// ADDR:PORT/PROTO (tcp, udp or sctp).
        #[arg(long)]
        to: String,
    },
    /// Every node's flow log (policy verdicts of new flows in isolated directions), by time.
    Flows {
        /// The agents' JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop or start every node's agent (a restart keeps connections: see ARCHITECTURE.md).
    Agents {
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        /// With `stop`: also remove the pins, so the programs detach and the nodes forward
        /// without our datapath (to compare, or to run an agent of your own in a node).
        #[arg(long)]
        detach: bool,
        /// With `start`: the agents' `--pod-translation` (`socket` or `tc`), kept for later
        /// starts; unset keeps the lab's (the agent's default at first).
        #[arg(long, value_parser = ["socket", "tc"])]
        pod_translation: Option<String>,
    },
    /// Remove everything the lab created.
    Down,
    /// Print the lab's state (JSON).
    Status,
    /// (internal) Forwards connections: `tcp:HOST:PORT` or `unix:PATH`, both ways.
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        to: String,
    },
    /// (internal) The server each pod runs: HTTP on its TCP ports, echo on its UDP ports.
    #[command(hide = true)]
    Serve(serve::ServeArgs),
}

/// The lab's name: its state directory is `/run/<name>` and its namespaces start with `<name>-`.
/// Tests use their own name so they never touch a lab someone is using.
fn lab_name() -> String {
    std::env::var("KPLAB_NAME").unwrap_or_else(|_| "kpl".to_owned())
}

fn home() -> PathBuf {
    PathBuf::from("/run").join(lab_name())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub spec: NodeSpec,
    pub netns: String,
    pub agent_pid: u32,
    /// The node's cgroup v2 directory (created by the lab): its agent and its node-side clients
    /// run there, and the agent's socket hooks attach there.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub spec: PodSpec,
    pub netns: String,
    pub host_if: String,
    pub server_pid: u32,
    /// The pod's cgroup v2 directory, below its node's (created by the lab): its server and
    /// `kplab exec --on POD` run there, so the node's socket hooks see its sockets (and leave
    /// them to the pod's interface programs: another network namespace).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExternalState {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    pub netns: String,
    /// Ports its lab server listens on.
    #[serde(default)]
    pub tcp: Vec<u16>,
    #[serde(default)]
    pub udp: Vec<u16>,
    #[serde(default)]
    pub server_pid: u32,
}

/// Everything `down` needs to undo, and `probe`/`matrix` need to find.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub prefix: String,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub externals: Vec<ExternalState>,
    pub services: Vec<ServiceSpec>,
    pub generation: u64,
    /// With an API server: its kubeconfig, what the lab created there, the relays' pids.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    #[serde(default)]
    pub created: Vec<api::Created>,
    #[serde(default)]
    pub relay_pids: Vec<u32>,
    /// The agents' `--pod-translation`; `None` leaves the agent's default.
    #[serde(default)]
    pub pod_translation: Option<String>,
}

impl State {
    fn path() -> PathBuf {
        home().join("state.json")
    }

    /// Loads the running lab's state.
    ///
    /// # Errors
    /// No lab is up.
    pub fn load() -> anyhow::Result<State> {
        let path = Self::path();
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "no lab is up ({} missing): run `kplab up` first",
                path.display()
            )
        })?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(home())?;
        let tmp = home().join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path())?;
        Ok(())
    }

    /// The namespace a probe runs in: `ns/pod`, a node name, or an external host name.
    ///
    /// # Errors
    /// Nothing of that name in the lab.
    pub fn netns_of(&self, who: &str) -> anyhow::Result<&str> {
        if let Some(p) = self.pods.iter().find(|p| p.spec.key == who) {
            return Ok(&p.netns);
        }
        if let Some(n) = self.nodes.iter().find(|n| n.spec.name == who) {
            return Ok(&n.netns);
        }
        if let Some(x) = self.externals.iter().find(|x| x.name == who) {
            return Ok(&x.netns);
        }
        bail!("{who:?} is not a pod (ns/name), node or external host of the lab")
    }

    /// Moves this process into `who`'s place: its network namespace and, for a node, its cgroup
    /// (where the node's socket hooks see it). The calling thread changes namespace; the whole
    /// process changes cgroup, so only a short-lived command (a probe) does this.
    ///
    /// # Errors
    /// `who` is unknown, or the namespace or cgroup cannot be entered.
    pub fn enter(&self, who: &str) -> anyhow::Result<()> {
        let node = self.nodes.iter().find(|n| n.spec.name == who);
        let pod = self.pods.iter().find(|p| p.spec.key == who);
        if let Some(cg) = node
            .and_then(|n| n.cgroup.as_ref())
            .or(pod.and_then(|p| p.cgroup.as_ref()))
        {
            cgroup::join(cg)?;
        }
        netns::enter(self.netns_of(who)?)
    }
}

/// `kplab exec`: replaces this process with `command`, placed as `who`.
fn exec(who: &str, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    require_root()?;
    State::load()?.enter(who)?;
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    Err(err).with_context(|| format!("running {}", command[0]))
}

/// Dispatches a lab command.
///
/// # Errors
/// The command failed; `up` and `apply` fail when the agents do not converge.
pub fn main(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            manifests,
            kubeconfig,
            externals,
        } => {
            require_root()?;
            up(&manifests, kubeconfig.as_deref(), &externals)?;
            Ok(())
        }
        LabCmd::Demo { manifests } => {
            require_root()?;
            demo::run(&manifests)
        }
        LabCmd::Relay { listen, to } => api::relay(&listen, &to),
        LabCmd::Agents {
            action,
            detach,
            pod_translation,
        } => {
            require_root()?;
            match (action.as_str(), detach, pod_translation) {
                ("stop", true, None) => detach_datapath(),
                ("stop", false, None) => stop_agents(),
                ("start", false, p) => start_agents(p),
                ("stop", _, Some(_)) => bail!("--pod-translation goes with `agents start`"),
                _ => bail!("--detach goes with `agents stop`"),
            }
        }
        LabCmd::Apply { dir } => {
            require_root()?;
            apply(&dir)
        }
        LabCmd::Probe(args) => probe::main(&args),
        LabCmd::Exec { on, command } => exec(&on, &command),
        LabCmd::Explain { from, to } => {
            print!("{}", explain::explain(&from, &to)?);
            Ok(())
        }
        LabCmd::Flows { json } => {
            print!("{}", explain::flows(json)?);
            Ok(())
        }
        LabCmd::Matrix { timeout_ms, expect } => {
            matrix::main(Duration::from_millis(timeout_ms), expect.as_deref())
        }
        LabCmd::Down => {
            require_root()?;
            down()
        }
        LabCmd::Status => {
            println!("{}", serde_json::to_string_pretty(&State::load()?)?);
            Ok(())
        }
        LabCmd::Serve(args) => serve::main(&args),
    }
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab creates network namespaces: run it as root");
    }
    Ok(())
}

/// The programs the lab runs: `kplab` itself (pod servers, relays) and the agent. They sit side
/// by side (`cargo xtask build` puts both in `target/release`); `KPLAB_BIN` and `KPLAB_AGENT`
/// override. No lab command builds anything.
struct Programs {
    kplab: PathBuf,
    agent: PathBuf,
}

fn programs() -> anyhow::Result<Programs> {
    let me = std::env::current_exe().context("locating the running program")?;
    let dir = me
        .parent()
        .context("the running program has no directory")?;
    let find = |var: &str, name: &str| {
        let path = std::env::var_os(var).map_or_else(|| dir.join(name), PathBuf::from);
        if path.is_file() {
            Ok(path)
        } else {
            Err(anyhow::anyhow!(
                "{} not found (set {var}, or build it: `cargo xtask build`)",
                path.display()
            ))
        }
    };
    Ok(Programs {
        kplab: find("KPLAB_BIN", "kplab")?,
        agent: find("KPLAB_AGENT", "dataplane-agent")?,
    })
}

fn run_id() -> String {
    let mut bytes = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut bytes);
    }
    format!("{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2])
}

/// Builds the lab and starts the agents; returns once every agent programmed the manifests.
///
/// # Errors
/// A namespace could not be built, or the agents did not converge.
pub fn up(
    manifests: &Path,
    kubeconfig: Option<&Path>,
    externals: &[String],
) -> anyhow::Result<State> {
    let programs = programs()?;
    if State::path().exists() || !topology::lab_namespaces(&lab_name())?.is_empty() {
        eprintln!("lab: removing a previous lab first");
        down()?;
    }
    let cluster = cluster::read(manifests)?;
    for w in cluster.warnings() {
        eprintln!("lab: warning: {w}");
    }
    let mut state = State {
        prefix: format!("{}-{}", lab_name(), run_id()),
        services: cluster.services.clone(),
        kubeconfig: kubeconfig.map(Path::to_path_buf),
        ..State::default()
    };
    std::fs::create_dir_all(home().join("bpf"))?;
    state.save()?;
    let result = (|| {
        topology::mount_bpffs(&home().join("bpf"))?;
        cgroup::mount_at(&home().join("cgroup"))?;
        topology::create_underlay(&state.prefix)?;
        for spec in &cluster.nodes {
            let netns = topology::create_node(&state.prefix, spec, &cluster.nodes)?;
            let cgroup = cgroup::create(
                &home().join("cgroup"),
                &format!("{}/{}", state.prefix, spec.name),
            )?;
            state.nodes.push(NodeState {
                spec: spec.clone(),
                netns,
                agent_pid: 0,
                cgroup: Some(cgroup),
            });
            state.save()?;
        }
        for x in externals {
            let (name, ip, tcp, udp) = parse_external(x)?;
            let netns = topology::create_external(&state.prefix, &name, ip, &cluster.nodes)?;
            let mut host = ExternalState {
                name,
                ip,
                netns,
                tcp,
                udp,
                server_pid: 0,
            };
            if !(host.tcp.is_empty() && host.udp.is_empty()) {
                let log = home().join(format!("external-{}.log", host.name));
                let as_pod = PodSpec {
                    key: format!("external/{}", host.name),
                    node: String::new(),
                    ip,
                    tcp: host.tcp.clone(),
                    udp: host.udp.clone(),
                    server: None,
                    labels: BTreeMap::new(),
                };
                host.server_pid =
                    spawn_lab_server(&as_pod, (&host.netns, None), &log, &programs.kplab)?;
            }
            state.externals.push(host);
            state.save()?;
        }
        for pod in &cluster.pods {
            let p = add_pod(&state, pod, &programs.kplab)?;
            state.pods.push(p);
            state.save()?;
        }
        if let Some(kc) = kubeconfig {
            let rt = runtime()?;
            let client = rt.block_on(api::client(kc))?;
            let applied = rt.block_on(api::apply(&client, &cluster.files, &mut state.created));
            state.save()?;
            applied?;
            start_relays(&mut state, kc, &programs.kplab)?;
        } else {
            publish(&mut state, &cluster.files)?;
        }
        route_external_addresses(&state)?;
        for node in &mut state.nodes {
            node.agent_pid = start_agent(
                node,
                &programs.agent,
                state.kubeconfig.is_some(),
                state.pod_translation.as_deref(),
            )?;
        }
        state.save()?;
        wait_programmed(&state, &cluster.files)?;
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        eprintln!("lab: up failed, tearing down: {e:#}");
        down()?;
        return Err(e);
    }
    eprintln!(
        "lab: up: {} nodes, {} pods, {} external hosts; agents programmed generation {}",
        state.nodes.len(),
        state.pods.len(),
        state.externals.len(),
        state.generation
    );
    Ok(state)
}

/// The node a LoadBalancer IP or externalIP of `svc` is routed to from the external hosts, as a
/// load balancer sends it: with `externalTrafficPolicy: Local` the first node (by name) with a
/// ready endpoint (the one whose health check node port answers 200), otherwise the first node.
/// One node per address keeps the lab deterministic; NodePorts are reached on every node.
pub(crate) fn external_route<'a>(state: &'a State, svc: &ServiceSpec) -> Option<&'a NodeState> {
    let serving = if svc.external_local {
        state
            .nodes
            .iter()
            .find(|n| svc.endpoint_nodes.contains(&n.spec.name))
    } else {
        None
    };
    serving.or(state.nodes.first())
}

fn route_external_addresses(state: &State) -> anyhow::Result<()> {
    for svc in &state.services {
        let Some(node) = external_route(state, svc) else {
            continue;
        };
        for addr in &svc.external_addresses {
            for x in &state.externals {
                topology::route_external(&x.netns, *addr, node.spec.ip)?;
            }
        }
    }
    Ok(())
}

/// `NAME=IP` or `NAME=IP:tcp/80,udp/53`.
fn parse_external(x: &str) -> anyhow::Result<(String, std::net::Ipv4Addr, Vec<u16>, Vec<u16>)> {
    let (name, rest) = x
        .split_once('=')
        .with_context(|| format!("--external {x:?}: expected NAME=IP[:tcp/PORT,udp/PORT]"))?;
    let (ip, ports) = rest.split_once(':').unwrap_or((rest, ""));
    let ip = ip
        .parse()
        .with_context(|| format!("--external {x:?}: bad IP {ip:?}"))?;
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    for p in ports.split(',').filter(|p| !p.is_empty()) {
        let (proto, port) = p.split_once('/').with_context(|| {
            format!("--external {x:?}: expected tcp/PORT or udp/PORT, got {p:?}")
        })?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("--external {x:?}: bad port {port:?}"))?;
        match proto {
            "tcp" => tcp.push(port),
            "udp" => udp.push(port),
            _ => bail!("--external {x:?}: protocol {proto:?} is not tcp or udp"),
        }
    }
    Ok((name.to_owned(), ip, tcp, udp))
}

fn add_pod(state: &State, pod: &PodSpec, kplab: &Path) -> anyhow::Result<PodState> {
    let (netns, host_if) =
        topology::create_pod(&state.prefix, pod, &node_netns(state, &pod.node)?)?;
    let cgroup = match state.nodes.iter().find(|n| n.spec.name == pod.node) {
        Some(NodeState {
            cgroup: Some(node_cg),
            ..
        }) => Some(cgroup::create(
            node_cg,
            &format!("pod-{}", pod.key.replace('/', ".")),
        )?),
        _ => None,
    };
    let log = home().join(format!("pod-{}.log", pod.key.replace('/', ".")));
    let at = (netns.as_str(), cgroup.as_deref());
    let server_pid = match pod.server.as_deref() {
        None => spawn_lab_server(pod, at, &log, kplab)?,
        Some(server) => serve::spawn_real(server, pod, at, &home(), &log)?,
    };
    Ok(PodState {
        spec: pod.clone(),
        netns,
        host_if,
        server_pid,
        cgroup,
    })
}

fn spawn_lab_server(
    pod: &PodSpec,
    (netns, cgroup): (&str, Option<&Path>),
    log: &Path,
    kplab: &Path,
) -> anyhow::Result<u32> {
    let mut args = vec!["serve".to_owned(), "--pod".to_owned(), pod.key.clone()];
    for p in &pod.tcp {
        args.extend(["--tcp".to_owned(), p.to_string()]);
    }
    for p in &pod.udp {
        args.extend(["--udp".to_owned(), p.to_string()]);
    }
    topology::spawn_in(Some(netns), cgroup, kplab, &args, log)
}

fn node_netns(state: &State, node: &str) -> anyhow::Result<String> {
    state
        .nodes
        .iter()
        .find(|n| n.spec.name == node)
        .map(|n| n.netns.clone())
        .with_context(|| format!("node {node} is not in the lab"))
}

fn start_agent(
    node: &NodeState,
    agent: &Path,
    kubernetes: bool,
    pod_translation: Option<&str>,
) -> anyhow::Result<u32> {
    let dir = home().join("nodes").join(&node.spec.name);
    std::fs::create_dir_all(&dir)?;
    let (source, from) = if kubernetes {
        ("--kubeconfig", dir.join("kubeconfig"))
    } else {
        ("--manifests", home().join("manifests"))
    };
    let mut args = vec![
        "run".to_owned(),
        "--node-name".to_owned(),
        node.spec.name.clone(),
        source.to_owned(),
        from.display().to_string(),
        "--status-file".to_owned(),
        dir.join("status.json").display().to_string(),
        "--bpffs".to_owned(),
        home()
            .join("bpf")
            .join(&node.spec.name)
            .display()
            .to_string(),
    ];
    if let Some(cg) = &node.cgroup {
        args.extend(["--socket-cgroup".to_owned(), cg.display().to_string()]);
    }
    if let Some(p) = pod_translation {
        args.extend(["--pod-translation".to_owned(), p.to_owned()]);
    }
    // Generic XDP: a veth's native XDP_TX hands frames to its peer's NAPI, which a plain bridge
    // port does not run, so forwarded frames were lost (see ARCHITECTURE.md).
    args.extend(["--external-interfaces", "eth0", "--xdp-mode", "generic"].map(str::to_owned));
    args.extend([
        "--flow-log".to_owned(),
        dir.join("flows.jsonl").display().to_string(),
        "--flow-log-format".to_owned(),
        "json".to_owned(),
    ]);
    topology::spawn_in(
        Some(&node.netns),
        node.cgroup.as_deref(),
        agent,
        &args,
        &dir.join("agent.log"),
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The relays that let agents in unconnected node namespaces reach the API server: one on the
/// host from a unix socket to the server, one per node from the node's loopback to that socket.
fn start_relays(state: &mut State, kubeconfig: &Path, kplab: &Path) -> anyhow::Result<()> {
    let sock = format!("unix:{}", home().join("api.sock").display());
    let mut server = None;
    for node in &state.nodes {
        let dir = home().join("nodes").join(&node.spec.name);
        std::fs::create_dir_all(&dir)?;
        server = Some(api::node_kubeconfig(kubeconfig, &dir.join("kubeconfig"))?);
    }
    let server = server.context("no nodes")?;
    let relay = |listen: &str, to: &str| {
        ["relay", "--listen", listen, "--to", to]
            .map(str::to_owned)
            .to_vec()
    };
    let host = topology::spawn_in(
        None,
        None,
        kplab,
        &relay(&sock, &format!("tcp:{server}")),
        &home().join("relay-host.log"),
    )?;
    state.relay_pids.push(host);
    let local = format!("tcp:127.0.0.1:{}", api::NODE_RELAY_PORT);
    for node in &state.nodes {
        let log = home().join("nodes").join(&node.spec.name).join("relay.log");
        state.relay_pids.push(topology::spawn_in(
            Some(&node.netns),
            None,
            kplab,
            &relay(&local, &sock),
            &log,
        )?);
    }
    state.save()
}

/// Writes a new generation of the manifests and swaps it in atomically (symlink rename), so an
/// agent reads either all of the old files or all of the new.
fn publish(
    state: &mut State,
    files: &std::collections::BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    state.generation += 1;
    let gen_dir = home().join(format!("gen-{}", state.generation));
    std::fs::create_dir_all(&gen_dir)?;
    for (name, content) in files {
        std::fs::write(gen_dir.join(name), content)?;
    }
    let link = home().join("manifests");
    let tmp = home().join("manifests.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen_dir, &tmp)?;
    std::fs::rename(&tmp, &link)?;
    if state.generation > 1 {
        let _ = std::fs::remove_dir_all(home().join(format!("gen-{}", state.generation - 1)));
    }
    Ok(())
}

/// Waits until every agent reports what it should have programmed: the fingerprint of the
/// manifests, or with an API server the digest of a fresh list (re-listed while waiting, as other
/// writers may change objects meanwhile). Fails early if an agent died.
fn wait_programmed(
    state: &State,
    files: &std::collections::BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<()> {
    let api = match &state.kubeconfig {
        Some(kc) => {
            let rt = runtime()?;
            let client = rt.block_on(api::client(kc))?;
            Some((rt, client))
        }
        None => None,
    };
    let manifests = dataplane_core::manifest::manifest_fingerprint(
        files.iter().map(|(n, c)| (n.as_bytes(), c.as_slice())),
    );
    let mut want = format!("{manifests:016x}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut pending: Vec<&NodeState> = state.nodes.iter().collect();
    while !pending.is_empty() {
        if let Some((rt, client)) = &api {
            let digest = rt.block_on(api::digest(client))?;
            let fresh = format!("{digest:016x}");
            if fresh != want {
                want = fresh;
                pending = state.nodes.iter().collect();
            }
        }
        let mut still = Vec::new();
        for node in pending {
            let dir = home().join("nodes").join(&node.spec.name);
            if !topology::alive(node.agent_pid) {
                let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!(
                    "the agent of node {} exited; last log lines:\n{}",
                    node.spec.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let done = agent_status(&node.spec.name)
                .ok()
                .and_then(|s| s.fingerprint)
                .is_some_and(|f| f == want);
            if !done {
                still.push(node);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let names: Vec<&str> = pending.iter().map(|n| n.spec.name.as_str()).collect();
            bail!("agents of {names:?} did not program the manifests within 90 s");
        }
        std::thread::sleep(Duration::from_millis(if api.is_some() { 200 } else { 20 }));
    }
    Ok(())
}

/// The status an agent last wrote (see `dataplane-agent run --status-file`).
///
/// # Errors
/// The file is missing or not JSON.
pub fn agent_status(node: &str) -> anyhow::Result<dataplane_core::status::Status> {
    let path = home().join("nodes").join(node).join("status.json");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Replaces the lab's objects with DIR's: pods are added and removed, then every agent is given the
/// new manifests; returns once all of them programmed it.
///
/// # Errors
/// No lab, nodes changed, or the agents did not converge.
pub fn apply(dir: &Path) -> anyhow::Result<()> {
    let programs = programs()?;
    let mut state = State::load()?;
    let cluster = cluster::read(dir)?;
    for w in cluster.warnings() {
        eprintln!("lab: warning: {w}");
    }
    let nodes: Vec<&NodeSpec> = state.nodes.iter().map(|n| &n.spec).collect();
    if nodes != cluster.nodes.iter().collect::<Vec<_>>() {
        bail!(
            "the Node objects changed; nodes are fixed for a lab's life: run `kplab down` and `kplab up`"
        );
    }
    let (keep, gone): (Vec<PodState>, Vec<PodState>) = std::mem::take(&mut state.pods)
        .into_iter()
        .partition(|p| cluster.pods.iter().any(|c| c.same_sandbox(&p.spec)));
    state.pods = keep;
    for pod in &mut state.pods {
        if let Some(new) = cluster.pods.iter().find(|c| c.same_sandbox(&pod.spec)) {
            pod.spec = new.clone();
        }
    }
    for pod in &gone {
        topology::delete_pod(pod)?;
    }
    for pod in &cluster.pods {
        if !state.pods.iter().any(|p| p.spec.same_sandbox(pod)) {
            let p = add_pod(&state, pod, &programs.kplab)?;
            state.pods.push(p);
        }
    }
    state.services = cluster.services.clone();
    route_external_addresses(&state)?;
    if let Some(kc) = state.kubeconfig.clone() {
        let rt = runtime()?;
        let client = rt.block_on(api::client(&kc))?;
        let applied = rt.block_on(api::apply(&client, &cluster.files, &mut state.created));
        state.save()?;
        applied?;
        state.generation += 1;
    } else {
        publish(&mut state, &cluster.files)?;
    }
    state.save()?;
    wait_programmed(&state, &cluster.files)?;
    eprintln!(
        "lab: applied generation {} ({} pods removed or changed, {} pods now)",
        state.generation,
        gone.len(),
        state.pods.len()
    );
    Ok(())
}

/// `lab agents stop`: with the agents stopped, the pinned programs and conntrack keep serving.
///
/// # Errors
/// The lab is not up, or its state cannot be saved.
pub fn stop_agents() -> anyhow::Result<()> {
    let mut state = State::load()?;
    topology::stop(state.nodes.iter().map(|n| n.agent_pid));
    for node in &mut state.nodes {
        node.agent_pid = 0;
        let _ = std::fs::remove_file(
            home()
                .join("nodes")
                .join(&node.spec.name)
                .join("status.json"),
        );
    }
    state.save()?;
    eprintln!("lab: agents stopped");
    Ok(())
}

/// `lab agents start`: each stopped agent starts again and swaps its programs into the pinned
/// links once programmed; `pod_translation` (if given) becomes the lab's for this and later
/// starts. Returns once every agent programmed the lab's objects.
///
/// # Errors
/// The lab is not up, or an agent did not start or converge.
pub fn start_agents(pod_translation: Option<String>) -> anyhow::Result<()> {
    let mut state = State::load()?;
    if pod_translation.is_some() {
        state.pod_translation = pod_translation;
    }
    let agent = programs()?.agent;
    for node in &mut state.nodes {
        if !topology::alive(node.agent_pid) {
            node.agent_pid = start_agent(
                node,
                &agent,
                state.kubeconfig.is_some(),
                state.pod_translation.as_deref(),
            )?;
        }
    }
    state.save()?;
    let files = if state.kubeconfig.is_some() {
        std::collections::BTreeMap::new()
    } else {
        cluster::read(&home().join("manifests"))?.files
    };
    wait_programmed(&state, &files)?;
    eprintln!("lab: agents started and programmed");
    Ok(())
}

/// Stops the agents and removes their pins, so their programs detach from every interface and
/// the lab's traffic goes through the kernel alone (the benchmark's baselines).
///
/// # Errors
/// The lab is not up, or a pin could not be removed.
pub fn detach_datapath() -> anyhow::Result<()> {
    stop_agents()?;
    let pins = home().join("bpf");
    for entry in std::fs::read_dir(&pins)? {
        // Each node's pins are in a directory; the files beside them are bpffs's own.
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

/// The lab's state, as `lab status` prints it.
///
/// # Errors
/// The lab is not up.
pub fn state() -> anyhow::Result<State> {
    State::load()
}

/// Stops every lab process and removes every lab namespace and file, state or no state.
///
/// # Errors
/// A namespace could not be removed.
pub fn down() -> anyhow::Result<()> {
    if let Ok(state) = State::load() {
        let pids = state
            .nodes
            .iter()
            .map(|n| n.agent_pid)
            .chain(state.pods.iter().map(|p| p.server_pid))
            .chain(state.externals.iter().map(|x| x.server_pid))
            .chain(state.relay_pids.iter().copied());
        topology::stop(pids);
        if let (Some(kc), false) = (&state.kubeconfig, state.created.is_empty()) {
            let removed = runtime().and_then(|rt| {
                let client = rt.block_on(api::client(kc))?;
                rt.block_on(api::delete_all(&client, &state.created))
            });
            if let Err(e) = removed {
                eprintln!("lab: could not delete the objects created in the API server: {e:#}");
            }
        }
    }
    let removed = topology::remove_namespaces(&lab_name())?;
    topology::remove_cgroups(&lab_name())?;
    topology::unmount_below(&home())?;
    if home().exists() {
        std::fs::remove_dir_all(home())?;
    }
    eprintln!("lab: down ({removed} namespaces removed)");
    Ok(())
}
