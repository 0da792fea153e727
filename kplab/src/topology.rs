//! Namespaces, veths, routes and processes of the lab. Every veth is created from inside a lab
//! namespace with its peer in another lab namespace; nothing touches the machine's own namespace.
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{NodeSpec, PodSpec, PodState};
use crate::{cgroup, netns};

/// The pods' default gateway, answered by a static neighbour entry (as Calico does).
const POD_GATEWAY: &str = "169.254.1.1";

/// Runs a command to completion; its stderr becomes the error.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    netns::exec(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
    .map(drop)
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    netns::run(ns, program, args).map(drop)
}

/// Short, stable interface-name suffix (interface names are limited to 15 bytes).
fn short_hash(s: &str) -> String {
    let h = dataplane_core::manifest::manifest_fingerprint([(s.as_bytes(), &[][..])]);
    format!("{:08x}", h as u32)
}

fn mac(kind: u8, s: &str) -> String {
    let h = dataplane_core::manifest::manifest_fingerprint([(s.as_bytes(), &[][..])]).to_be_bytes();
    format!(
        "02:{kind:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3]
    )
}

fn new_netns(netns: &str) -> anyhow::Result<()> {
    netns::add(netns)?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    in_ns(
        netns,
        "sysctl",
        &[
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
            // Refused vs timeout must not depend on how many errors a test already caused.
            "net.ipv4.icmp_ratelimit=0",
        ],
    )
}

/// Turns TX checksum offload off, so every checksum on the wire is a real one and a datapath
/// checksum bug shows up as a receive error instead of being papered over.
fn tx_csum_off(netns: &str, iface: &str) -> anyhow::Result<()> {
    in_ns(netns, "ethtool", &["-K", iface, "tx", "off"])
}

/// Gives a namespace's eth0 its address (/32), brings it up, turns its TX checksum offload off.
fn eth0_up(netns: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    tx_csum_off(netns, "eth0")
}

fn underlay(prefix: &str) -> String {
    format!("{prefix}-ul")
}

/// The underlay: one namespace with a bridge that nodes and external hosts plug into.
pub fn create_underlay(prefix: &str) -> anyhow::Result<()> {
    let ul = underlay(prefix);
    new_netns(&ul)?;
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", "br0", "up"])
}

/// A host on the underlay (a node or an external host): eth0 with its address, routes to nodes.
fn create_host(
    prefix: &str,
    netns: &str,
    addr: Ipv4Addr,
    nodes: &[NodeSpec],
) -> anyhow::Result<()> {
    let ul = underlay(prefix);
    let ul_if = format!("u{}", short_hash(netns));
    new_netns(netns)?;
    ip(&[
        "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", &ul_if, "netns", &ul,
    ])?;
    ip(&["-n", &ul, "link", "set", &ul_if, "master", "br0", "up"])?;
    eth0_up(netns, addr)?;
    tx_csum_off(&ul, &ul_if)?;
    for node in nodes.iter().filter(|n| n.ip != addr) {
        for a in std::iter::once(&node.ip).chain(&node.extra_ips) {
            ip(&[
                "-n",
                netns,
                "route",
                "add",
                &format!("{a}/32"),
                "dev",
                "eth0",
            ])?;
        }
    }
    Ok(())
}

/// A node: a host that forwards, with routes to the other nodes' pod CIDRs.
fn node_netns(prefix: &str, node: &NodeSpec) -> String {
    format!("{prefix}-n-{}", node.name)
}

pub fn create_node(prefix: &str, spec: &NodeSpec, nodes: &[NodeSpec]) -> anyhow::Result<String> {
    let netns = node_netns(prefix, spec);
    create_host(prefix, &netns, spec.ip, nodes)?;
    // Secondary addresses (more InternalIPs, ExternalIPs) on the same interface.
    for extra in &spec.extra_ips {
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{extra}/32"),
            "dev",
            "eth0",
        ])?;
    }
    in_ns(&netns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    for other in nodes.iter().filter(|n| n.name != spec.name) {
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &other.pod_cidr,
            "via",
            &other.ip.to_string(),
            "dev",
            "eth0",
        ])?;
    }
    // A default route, as a real node has through its gateway: the underlay, which reaches only
    // the lab's own namespaces, so what no lab host answers goes nowhere. Without one, a node's
    // connect() to a Service address fails before any rule could translate it (kube-proxy's
    // OUTPUT-chain DNAT runs after the route lookup).
    ip(&["-n", &netns, "route", "add", "default", "dev", "eth0"])?;
    Ok(netns)
}

/// An external host on the underlay (outside the cluster); every node routes to it.
pub fn create_external(
    prefix: &str,
    name: &str,
    addr: Ipv4Addr,
    nodes: &[NodeSpec],
) -> anyhow::Result<String> {
    let netns = format!("{prefix}-x-{name}");
    create_host(prefix, &netns, addr, nodes)?;
    // A routed underlay (as BGP-peered CNIs give): each node's pods are reached through it.
    for node in nodes {
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &node.pod_cidr,
            "via",
            &node.ip.to_string(),
            "dev",
            "eth0",
        ])?;
    }
    for node in nodes {
        ip(&[
            "-n",
            &node_netns(prefix, node),
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            "eth0",
        ])?;
    }
    Ok(netns)
}

/// Routes `addr` (a LoadBalancer IP or externalIP) on an external host to `node_ip`, as a load
/// balancer in front of the cluster sends a Service address to one node.
pub fn route_external(netns: &str, addr: Ipv4Addr, node_ip: Ipv4Addr) -> anyhow::Result<()> {
    ip(&[
        "-n",
        netns,
        "route",
        "replace",
        &format!("{addr}/32"),
        "via",
        &node_ip.to_string(),
        "dev",
        "eth0",
    ])
}

/// A pod: its own namespace, a veth to its node (host side `lxc<hash>`), a /32 route on the node.
pub fn create_pod(
    prefix: &str,
    pod: &PodSpec,
    node_netns: &str,
) -> anyhow::Result<(String, String)> {
    let netns = format!("{prefix}-p-{}", pod.key.replace('/', "."));
    let host_if = format!("lxc{}", short_hash(&netns));
    let host_mac = mac(0, &netns);
    let pod_mac = mac(1, &netns);
    let addr = pod.ip.to_string();
    new_netns(&netns)?;
    ip(&[
        "-n", node_netns, "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer",
        "name", "eth0", "address", &pod_mac, "netns", &netns,
    ])?;
    eth0_up(&netns, pod.ip)?;
    ip(&[
        "-n",
        &netns,
        "route",
        "add",
        POD_GATEWAY,
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    ip(&[
        "-n",
        &netns,
        "route",
        "add",
        "default",
        "via",
        POD_GATEWAY,
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        &netns,
        "neigh",
        "replace",
        POD_GATEWAY,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    ip(&["-n", node_netns, "link", "set", &host_if, "up"])?;
    ip(&[
        "-n",
        node_netns,
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        &host_if,
    ])?;
    ip(&[
        "-n",
        node_netns,
        "neigh",
        "replace",
        &addr,
        "lladdr",
        &pod_mac,
        "dev",
        &host_if,
        "nud",
        "permanent",
    ])?;
    tx_csum_off(node_netns, &host_if)?;
    Ok((netns, host_if))
}

/// Mounts a BPF filesystem for the agents' pinned objects.
pub fn mount_bpffs(dir: &Path) -> anyhow::Result<()> {
    netns::exec(
        Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir),
        &format!("mount -t bpf bpf {}", dir.display()),
    )
    .map(drop)
}

/// Unmounts every mount point below `dir` (deepest first), whatever run left them.
pub fn unmount_below(dir: &Path) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        netns::exec(Command::new("umount").arg(p), &format!("umount {p}"))?;
    }
    Ok(())
}

/// Stops a pod's server and removes its namespace (its veth goes with it) and its cgroup.
pub fn delete_pod(pod: &PodState) -> anyhow::Result<()> {
    stop([pod.server_pid]);
    stop(netns::pids(&pod.netns));
    if let Some(cg) = &pod.cgroup {
        cgroup::remove(cg)?;
    }
    netns::delete(&pod.netns)
}

/// Starts a long-running process inside a lab namespace (or, with `None`, in this one), detached
/// from this process (own session), with its output in `log`. Returns its pid.
pub fn spawn_in(
    netns: Option<&str>,
    cgroup: Option<&Path>,
    program: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let mut cmd = match netns {
        Some(ns) => netns::command(ns, program),
        None => Command::new(program),
    };
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    if let Some(cg) = cgroup {
        cgroup::spawn_into(&mut cmd, cg)?;
    }
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "starting {} in {}",
            program.display(),
            netns.unwrap_or("the host namespace")
        )
    })?;
    Ok(child.id())
}

/// Whether a process still runs (reaping it if it is our exited child).
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    let mut status = 0;
    // SAFETY: plain syscalls on a pid; waitpid only reaps our own children.
    unsafe {
        if libc::waitpid(pid, &raw mut status, libc::WNOHANG) == pid {
            return false;
        }
        libc::kill(pid, 0) == 0
    }
}

/// SIGTERM, then SIGKILL after 3 s for what still runs.
pub fn stop(pids: impl IntoIterator<Item = u32>) {
    let pids: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    for pid in &pids {
        // SAFETY: signalling a pid the lab started.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        // SAFETY: as above.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
}

/// The namespaces of every lab with this base name (any run).
pub fn lab_namespaces(base: &str) -> anyhow::Result<Vec<String>> {
    netns::list(&format!("{base}-"))
}

/// Removes every cgroup of the base (any run), with the processes left in them. Only directories
/// named `<base>-*` directly below the cgroup2 mount, which only the lab creates, are touched.
///
/// # Errors
/// A cgroup could not be removed.
pub fn remove_cgroups(base: &str) -> anyhow::Result<()> {
    let Ok(mount) = cgroup::mount() else {
        return Ok(());
    };
    let prefix = format!("{base}-");
    for entry in std::fs::read_dir(&mount)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) && entry.path().is_dir() {
            cgroup::remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Stops the processes in, and deletes, every namespace of the base. Returns how many.
pub fn remove_namespaces(base: &str) -> anyhow::Result<usize> {
    let all = lab_namespaces(base)?;
    for ns in &all {
        stop(netns::pids(ns));
    }
    for ns in &all {
        netns::delete(ns)?;
    }
    Ok(all.len())
}
