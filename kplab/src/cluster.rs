//! What the lab builds, read from the same Kubernetes manifests the agents get: nodes (InternalIP,
//! podCIDR), pods (nodeName, status.podIP, containerPorts) and services (for the matrix).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context as _, bail};
use dataplane_core::manifest::is_manifest;
use dataplane_core::net::Cidr;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize as _;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSpec {
    pub name: String,
    /// The first InternalIP: the node's address on the underlay.
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Its other IPv4 addresses (more InternalIPs, ExternalIPs), on the same interface.
    #[serde(default)]
    pub extra_ips: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodSpec {
    /// `namespace/name`.
    pub key: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    /// A real server to run instead of the lab's own (annotation `kplab.dev/server`: `nginx` or
    /// `iperf3` on the first TCP port, `dnsmasq` on the first UDP port).
    #[serde(default)]
    pub server: Option<String>,
    /// The pod's labels: they change nothing the lab builds (see [`PodSpec::same_sandbox`]).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    /// Whether `other` runs in the same lab namespace and server as this pod: everything but
    /// the labels, which a running pod may change without being rebuilt.
    pub fn same_sandbox(&self, other: &PodSpec) -> bool {
        PodSpec {
            labels: BTreeMap::new(),
            ..self.clone()
        } == PodSpec {
            labels: BTreeMap::new(),
            ..other.clone()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceSpec {
    pub key: String,
    pub ip: Ipv4Addr,
    /// (port, "tcp" | "udp")
    pub ports: Vec<(u16, String)>,
    /// `spec.selector`; empty for a Service without one.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`: what the external hosts route
    /// to a node, as a load balancer would.
    #[serde(default)]
    pub external_addresses: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`.
    #[serde(default)]
    pub external_local: bool,
    /// (nodePort, "tcp" | "udp") of the ports that have one.
    #[serde(default)]
    pub node_ports: Vec<(u16, String)>,
    /// `healthCheckNodePort`.
    #[serde(default)]
    pub health_check_port: Option<u16>,
    /// The nodes (`nodeName`) of the Service's ready endpoints, from its EndpointSlices: where
    /// its health check node port answers 200.
    #[serde(default)]
    pub endpoint_nodes: Vec<String>,
}

impl ServiceSpec {
    /// Whether the Service's selector picks `pod` (same namespace, every selector label).
    pub fn selects(&self, pod: &PodSpec) -> bool {
        !self.selector.is_empty()
            && self.key.split('/').next() == pod.key.split('/').next()
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

/// The lab's view of a manifests directory, and the files themselves (name, content).
#[derive(Debug, Default)]
pub struct Cluster {
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Reads every manifest file of `dir`.
///
/// # Errors
/// Unreadable files, or nodes/pods without what the lab needs to build them.
pub fn read(dir: &Path) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::default();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && is_manifest(&name) {
            cluster.files.insert(name, std::fs::read(entry.path())?);
        }
    }
    let mut slices = Vec::new();
    for (name, content) in &cluster.files {
        for doc in serde_yaml::Deserializer::from_slice(content) {
            // Malformed documents are the agents' business (they warn and skip); the lab only
            // needs the nodes and pods it can read.
            let Ok(value) = serde_yaml::Value::deserialize(doc) else {
                break;
            };
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default();
            match kind {
                "Node" => {
                    let node: Node = serde_yaml::from_value(value)
                        .with_context(|| format!("{name}: Node is malformed"))?;
                    cluster.nodes.push(node_spec(&node)?);
                }
                "Pod" => {
                    if let Ok(pod) = serde_yaml::from_value::<Pod>(value)
                        && let Some(spec) = pod_spec(&pod)
                    {
                        cluster.pods.push(spec);
                    }
                }
                "Service" => {
                    if let Ok(svc) = serde_yaml::from_value::<Service>(value)
                        && let Some(spec) = service_spec(&svc)
                    {
                        cluster.services.push(spec);
                    }
                }
                "EndpointSlice" => {
                    if let Ok(slice) = serde_yaml::from_value::<EndpointSlice>(value) {
                        slices.push(slice);
                    }
                }
                _ => {}
            }
        }
    }
    if cluster.nodes.is_empty() {
        bail!(
            "{}: no Node objects; the lab builds its nodes from them",
            dir.display()
        );
    }
    for slice in &slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        let key = format!("{ns}/{svc}");
        let Some(spec) = cluster.services.iter_mut().find(|s| s.key == key) else {
            continue;
        };
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if let (true, Some(node)) = (ready, &ep.node_name)
                && !spec.endpoint_nodes.contains(node)
            {
                spec.endpoint_nodes.push(node.clone());
            }
        }
    }
    cluster.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    cluster.pods.sort_by(|a, b| a.key.cmp(&b.key));
    cluster.services.sort_by(|a, b| a.key.cmp(&b.key));
    for pod in &cluster.pods {
        if !cluster.nodes.iter().any(|n| n.name == pod.node) {
            bail!(
                "Pod {} is on node {:?}, which has no Node object",
                pod.key,
                pod.node
            );
        }
    }
    Ok(cluster)
}

fn node_spec(node: &Node) -> anyhow::Result<NodeSpec> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let addresses: Vec<(&str, Ipv4Addr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| Some((a.type_.as_str(), a.address.parse().ok()?)))
        .collect();
    let ip = addresses
        .iter()
        .find(|(t, _)| *t == "InternalIP")
        .map(|(_, ip)| *ip)
        .with_context(|| format!("Node {name} has no IPv4 InternalIP"))?;
    let mut extra_ips: Vec<Ipv4Addr> = addresses
        .iter()
        .map(|(_, a)| *a)
        .filter(|a| *a != ip)
        .collect();
    extra_ips.dedup();
    let pod_cidr = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidr.clone())
        .with_context(|| format!("Node {name} has no spec.podCIDR"))?;
    Ok(NodeSpec {
        name,
        ip,
        pod_cidr,
        extra_ips,
    })
}

fn pod_spec(pod: &Pod) -> Option<PodSpec> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for port in spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
    {
        let Ok(number) = u16::try_from(port.container_port) else {
            continue;
        };
        match port.protocol.as_deref().unwrap_or("TCP") {
            "UDP" => udp.push(number),
            "TCP" => tcp.push(number),
            _ => {}
        }
    }
    tcp.sort_unstable();
    tcp.dedup();
    udp.sort_unstable();
    udp.dedup();
    Some(PodSpec {
        key: format!("{ns}/{}", pod.metadata.name.as_deref()?),
        node: spec.node_name.clone()?,
        ip: pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?,
        tcp,
        udp,
        server: pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("kplab.dev/server").cloned()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    })
}

fn service_spec(svc: &Service) -> Option<ServiceSpec> {
    let spec = svc.spec.as_ref()?;
    let ip = spec.cluster_ip.as_deref()?.parse().ok()?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "tcp",
                "UDP" => "udp",
                _ => return None,
            };
            Some((u16::try_from(p.port).ok()?, proto.to_owned()))
        })
        .collect();
    Some(ServiceSpec {
        key: format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or("default"),
            svc.metadata.name.as_deref()?
        ),
        ip,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        external_addresses: spec
            .external_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .chain(
                svc.status
                    .iter()
                    .filter_map(|s| s.load_balancer.as_ref()?.ingress.as_ref())
                    .flatten()
                    .filter_map(|i| i.ip.as_deref()),
            )
            .filter_map(|ip| ip.parse().ok())
            .collect(),
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        node_ports: spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let proto = p.protocol.as_deref().unwrap_or("TCP").to_lowercase();
                Some((u16::try_from(p.node_port?).ok()?, proto))
            })
            .collect(),
        health_check_port: spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok()),
        endpoint_nodes: Vec::new(),
    })
}

/// Whether `ip` lies in `cidr` (`a.b.c.d/n`); a malformed CIDR contains nothing.
fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    cidr.parse::<Cidr>().is_ok_and(|c| c.contains(ip))
}

impl Cluster {
    /// What is legal but probably a mistake: a pod whose address lies outside its node's
    /// podCIDR (the lab routes it anyway, by /32, but other nodes route the CIDR, not the pod).
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter_map(|p| {
                let node = self.nodes.iter().find(|n| n.name == p.node)?;
                (!in_cidr(p.ip, &node.pod_cidr)).then(|| {
                    format!(
                        "pod {} has address {}, outside node {}'s podCIDR {}",
                        p.key, p.ip, node.name, node.pod_cidr
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(key: &str, node: &str, ip: [u8; 4]) -> PodSpec {
        PodSpec {
            key: key.into(),
            node: node.into(),
            ip: Ipv4Addr::from(ip),
            tcp: Vec::new(),
            udp: Vec::new(),
            server: None,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_pod_outside_its_nodes_pod_cidr_is_named() {
        let cluster = Cluster {
            nodes: vec![NodeSpec {
                name: "node-a".into(),
                ip: Ipv4Addr::new(172, 31, 0, 2),
                pod_cidr: "10.245.1.0/24".into(),
                extra_ips: Vec::new(),
            }],
            pods: vec![
                pod("t/in", "node-a", [10, 245, 1, 9]),
                pod("t/out", "node-a", [10, 245, 2, 9]),
            ],
            services: Vec::new(),
            files: BTreeMap::new(),
        };
        assert_eq!(
            cluster.warnings(),
            ["pod t/out has address 10.245.2.9, outside node node-a's podCIDR 10.245.1.0/24"]
        );
        assert!(in_cidr(Ipv4Addr::new(1, 2, 3, 4), "0.0.0.0/0"));
        assert!(!in_cidr(Ipv4Addr::new(1, 2, 3, 4), "1.2.3.5/32"));
        assert!(!in_cidr(Ipv4Addr::new(1, 2, 3, 4), "garbage"));
    }
}
