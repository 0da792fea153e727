//! Pure translation: one Service and its EndpointSlices -> the frontends to program and, for each,
//! the backends that serve it, following kube-proxy's rules.
//!
//! ```text
//!  Service ns/web  clusterIPs [10.96.0.10]  ports [http 80->http/TCP, dns 53/UDP]
//!  EndpointSlices  ports [http 8080, dns 5353]  endpoints [10.244.1.5 ready, 10.244.2.7 not ready]
//!        |
//!        v
//!  10.96.0.10:80/TCP -> [10.244.1.5:8080]      10.96.0.10:53/UDP -> [10.244.1.5:5353]
//! ```
use std::fmt;
use std::net::Ipv4Addr;

use crate::net::Cidr;
use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};

/// Services carrying this label belong to another proxy; kube-proxy leaves them alone, and so do we.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => dataplane_common::PROTO_TCP,
            Proto::Udp => dataplane_common::PROTO_UDP,
        }
    }

    fn parse(protocol: Option<&str>) -> Option<Proto> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// An address clients dial: service IP, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// An endpoint address that serves a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    /// The endpoint's `nodeName` is the node being programmed.
    pub local: bool,
}

/// One frontend and its serving backends (sorted, unique).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub frontend: Frontend,
    /// For clients in the cluster (pods, the node's own processes). Empty means reject, or drop
    /// with `drop_empty`.
    pub backends: Vec<BackendAddr>,
    /// `internalTrafficPolicy: Local` on a ClusterIP: no local endpoint is a drop.
    pub drop_empty: bool,
    /// NodePorts, LoadBalancer IPs and externalIPs: what clients outside the node reach.
    pub external: Option<ExternalSpec>,
    /// `loadBalancerSourceRanges`, on LoadBalancer IPs: only these clients reach the frontend.
    pub source_ranges: Vec<Cidr>,
}

/// A frontend as traffic from outside the node reaches it (`externalTrafficPolicy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalSpec {
    /// Every endpoint (`Cluster`), or this node's (`Local`).
    pub backends: Vec<BackendAddr>,
    /// `Local`: the client address is kept, and no local endpoint is a drop.
    pub local: bool,
}

impl FrontendSpec {
    /// Every backend the frontend uses, from inside or outside.
    pub fn all_backends(&self) -> impl Iterator<Item = &BackendAddr> {
        let external = self.external.iter().flat_map(|e| &e.backends);
        let mut all: Vec<&BackendAddr> = self.backends.iter().chain(external).collect();
        all.sort();
        all.dedup();
        all.into_iter()
    }
}

/// What a translation needs to know about the node it programs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// The node's name: endpoints with this `nodeName` are local. `None` (tests, the benchmark):
    /// no endpoint is.
    pub name: Option<String>,
    /// Where NodePorts answer.
    pub nodeport_addresses: Vec<Ipv4Addr>,
}

/// The result of translating one Service: what to program, and what was skipped and why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub frontends: Vec<FrontendSpec>,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("clusterIP {0:?} is not an IP address")]
    InvalidClusterIp(String),
    #[error("port {0} is out of range")]
    InvalidPort(i32),
}

impl TranslateError {
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            TranslateError::InvalidClusterIp(_) => "invalid_cluster_ip",
            TranslateError::InvalidPort(_) => "invalid_port",
        }
    }
}

/// Whether kube-proxy would program this Service at all.
#[must_use]
pub fn is_proxied(svc: &Service) -> bool {
    let proxy_name = svc
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL));
    let spec = svc.spec.as_ref();
    let external_name = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
    !proxy_name && !external_name
}

fn cluster_ips(svc: &Service) -> Result<Vec<Ipv4Addr>, TranslateError> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
            // IPv6 service addresses are not translated by this IPv4 datapath yet.
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => return Err(TranslateError::InvalidClusterIp(ip.to_owned())),
        }
    }
    Ok(out)
}

fn port_number(port: i32) -> Result<u16, TranslateError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(TranslateError::InvalidPort(port))
}

/// The other addresses a Service answers on with its ports: `spec.externalIPs` and every
/// `status.loadBalancer.ingress[].ip` except those with `ipMode: Proxy` (left to the load balancer,
/// as kube-proxy does, KEP-1860). IPv6 addresses are skipped; an unparsable one is skipped with a
/// warning (the API server validates them, so this is a damaged object, not a user's choice).
fn extra_addresses(svc: &Service, warnings: &mut Vec<String>) -> Vec<(Ipv4Addr, Address)> {
    let external = svc
        .spec
        .as_ref()
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| (Address::External, "externalIP", ip.as_str()));
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_deref())
        .map(|ip| (Address::LoadBalancer, "loadBalancer ingress IP", ip));
    let mut out = Vec::new();
    for (kind, what, ip) in external.chain(ingress) {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => out.push((v4, kind)),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => warnings.push(format!("{what} {ip:?} is not an IP address, skipped")),
        }
    }
    out
}

/// What kind of address a frontend is: who reaches it, and under which traffic policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Address {
    Cluster,
    External,
    LoadBalancer,
    NodePort,
}

/// `loadBalancerSourceRanges`; an unparsable range is skipped with a warning (the API server
/// validates them). An empty list admits everyone.
fn source_ranges(svc: &Service, warnings: &mut Vec<String>) -> Vec<Cidr> {
    let ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten();
    let mut out = Vec::new();
    for r in ranges {
        match r.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => warnings.push(format!("loadBalancerSourceRanges: {e}, skipped")),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Translates a Service and its EndpointSlices into frontends with their backends: every
/// clusterIP, externalIP and load-balancer ingress IP with every port (no NodePorts: see
/// [`translate_service_on`]).
///
/// # Errors
/// A Service whose addresses or ports are invalid; the caller keeps what it had programmed.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
) -> Result<Translation, TranslateError> {
    translate_service_on(svc, slices, &NodeView::default())
}

/// The NodePort of a Service port, when kube-proxy would program one: a NodePort or
/// LoadBalancer Service (not one with `allocateLoadBalancerNodePorts: false`) with `nodePort` set.
fn node_port(svc: &Service, port: &ServicePort) -> Option<u16> {
    let spec = svc.spec.as_ref()?;
    let allocates = match spec.type_.as_deref() {
        Some("NodePort") => true,
        Some("LoadBalancer") => spec.allocate_load_balancer_node_ports != Some(false),
        _ => false,
    };
    allocates
        .then_some(port.node_port?)
        .and_then(|p| port_number(p).ok())
}

/// As [`translate_service`], for node `node`: each NodePort is also a frontend on each of its
/// NodePort addresses, and the traffic policies choose the backends per kind of client:
///
/// ```text
///                  from the cluster (pods, nodes)           from outside the node
///  clusterIP       all | this node's (iTP Local: drop none)  -
///  NodePort, LB IP all (as kube-proxy: in-cluster clients    all, SNAT to remote ones (eTP Cluster)
///  externalIP           ignore eTP)                          this node's, client kept (eTP Local)
/// ```
///
/// # Errors
/// As [`translate_service`].
pub fn translate_service_on(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeView,
) -> Result<Translation, TranslateError> {
    let mut out = Translation::default();
    if !is_proxied(svc) {
        return Ok(out);
    }
    let mut ips: Vec<(Ipv4Addr, Address)> = cluster_ips(svc)?
        .into_iter()
        .map(|ip| (ip, Address::Cluster))
        .collect();
    ips.extend(extra_addresses(svc, &mut out.warnings));
    ips.sort();
    ips.dedup_by_key(|(ip, _)| *ip);
    let spec = svc.spec.as_ref();
    let internal_local = spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local");
    let external_local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    let ranges = source_ranges(svc, &mut out.warnings);
    let ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
    for port in ports {
        let number = port_number(port.port)?;
        let Some(proto) = Proto::parse(port.protocol.as_deref()) else {
            out.warnings.push(format!(
                "port {number}: protocol {:?} is not supported, skipped",
                port.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let candidates = candidates(port, proto, slices, node, &mut out.warnings);
        let all = choose(&candidates, false);
        let local = choose(&candidates, true);
        let external = ExternalSpec {
            backends: if external_local {
                local.clone()
            } else {
                all.clone()
            },
            local: external_local,
        };
        let on_nodes = node_port(svc, port).into_iter().flat_map(|p| {
            node.nodeport_addresses
                .iter()
                .map(move |a| (*a, p, Address::NodePort))
        });
        let addresses = ips.iter().map(|(a, kind)| (*a, number, *kind));
        for (addr, port, kind) in addresses.chain(on_nodes) {
            let frontend = Frontend { addr, port, proto };
            out.frontends.push(match kind {
                Address::Cluster => FrontendSpec {
                    frontend,
                    backends: if internal_local {
                        local.clone()
                    } else {
                        all.clone()
                    },
                    drop_empty: internal_local,
                    external: None,
                    source_ranges: Vec::new(),
                },
                Address::External | Address::LoadBalancer | Address::NodePort => FrontendSpec {
                    frontend,
                    backends: all.clone(),
                    drop_empty: false,
                    external: Some(external.clone()),
                    source_ranges: if kind == Address::LoadBalancer {
                        ranges.clone()
                    } else {
                        Vec::new()
                    },
                },
            });
        }
    }
    out.frontends.sort_by_key(|f| f.frontend);
    Ok(out)
}

/// A `healthCheckNodePort` of an `externalTrafficPolicy: Local` LoadBalancer Service, as a node
/// answers it: a cloud load balancer sends the Service's traffic only to nodes with local
/// endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// Ready endpoints on this node (kube-proxy's `localEndpoints`).
    pub local_endpoints: usize,
}

/// The health check node port a Service needs on node `node`, if any: `externalTrafficPolicy:
/// Local`, type LoadBalancer, `healthCheckNodePort` set.
#[must_use]
pub fn health_check(svc: &Service, slices: &[&EndpointSlice], node: &str) -> Option<HealthCheck> {
    let spec = svc.spec.as_ref()?;
    if !is_proxied(svc)
        || spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let port = port_number(spec.health_check_node_port?).ok()?;
    let mut local: Vec<&str> = slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .flat_map(|s| &s.endpoints)
        .filter(|ep| ep.node_name.as_deref() == Some(node))
        .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|ep| ep.addresses.iter().map(String::as_str))
        .collect();
    local.sort_unstable();
    local.dedup();
    Some(HealthCheck {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        port,
        local_endpoints: local.len(),
    })
}

/// An endpoint that may serve: ready, or serving and terminating (a fallback).
struct Candidate {
    backend: BackendAddr,
    ready: bool,
}

/// kube-proxy's endpoint rules, per scope (all endpoints, or this node's): endpoints whose
/// `ready` condition is true or unset serve; when none in the scope is ready, those that are both
/// serving and terminating do (graceful termination).
fn choose(candidates: &[Candidate], local_only: bool) -> Vec<BackendAddr> {
    let scope = || {
        candidates
            .iter()
            .filter(move |c| !local_only || c.backend.local)
    };
    let any_ready = scope().any(|c| c.ready);
    let mut chosen: Vec<BackendAddr> = scope()
        .filter(|c| c.ready == any_ready)
        .map(|c| c.backend)
        .collect();
    chosen.sort();
    chosen.dedup();
    chosen
}

/// The endpoints of a Service port that may serve. The port comes from the slice port with the
/// Service port's name and protocol, which is how a named `targetPort` resolves.
fn candidates(
    port: &ServicePort,
    proto: Proto,
    slices: &[&EndpointSlice],
    node: &NodeView,
    warnings: &mut Vec<String>,
) -> Vec<Candidate> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && Proto::parse(p.protocol.as_deref()) == Some(proto)
        });
        let Some(number) = slice_port.and_then(|p| p.port) else {
            continue;
        };
        let Ok(number) = port_number(number) else {
            warnings.push(format!(
                "EndpointSlice {}: port {number} out of range, skipped",
                slice.metadata.name.as_deref().unwrap_or_default()
            ));
            continue;
        };
        for ep in &slice.endpoints {
            let cond = ep.conditions.as_ref();
            let is_ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            if !(is_ready || serving && is_terminating) {
                continue;
            }
            let local = node.name.is_some() && ep.node_name == node.name;
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                    warnings.push(format!(
                        "EndpointSlice {}: endpoint address {addr:?} is not IPv4, skipped",
                        slice.metadata.name.as_deref().unwrap_or_default()
                    ));
                    continue;
                };
                out.push(Candidate {
                    backend: BackendAddr {
                        addr: ip,
                        port: number,
                        proto,
                        local,
                    },
                    ready: is_ready,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fixtures::{ready, service, slice};

    fn backends(t: &Translation, port: u16, proto: Proto) -> Vec<String> {
        t.frontends
            .iter()
            .find(|f| f.frontend.port == port && f.frontend.proto == proto)
            .expect("frontend")
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    #[test]
    fn only_ready_endpoints_serve_and_unset_counts_as_ready() {
        let svc = service(
            "ns",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", json!(8080))],
        );
        let s = slice(
            "ns",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[
                ready("10.0.0.1"),
                ("10.0.0.2", Some(true), None, None),
                ("10.0.0.3", Some(false), None, None),
                ("10.0.0.4", Some(false), Some(true), Some(true)),
            ],
        );
        let t = translate_service(&svc, &[&s]).unwrap();
        assert_eq!(
            backends(&t, 80, Proto::Tcp),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
    }

    #[test]
    fn serving_terminating_endpoints_serve_only_when_none_is_ready() {
        let svc = service(
            "ns",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", json!(8080))],
        );
        let s = slice(
            "ns",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[
                ("10.0.0.3", Some(false), Some(false), Some(true)),
                ("10.0.0.4", Some(false), Some(true), Some(true)),
                ("10.0.0.5", Some(false), Some(true), Some(false)),
            ],
        );
        let t = translate_service(&svc, &[&s]).unwrap();
        assert_eq!(backends(&t, 80, Proto::Tcp), ["10.0.0.4:8080"]);
    }

    #[test]
    fn no_ready_endpoint_gives_an_empty_frontend_that_rejects() {
        let svc = service(
            "ns",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", json!(8080))],
        );
        let t = translate_service(&svc, &[]).unwrap();
        assert_eq!(t.frontends.len(), 1);
        assert!(t.frontends[0].backends.is_empty());
    }

    #[test]
    fn named_target_ports_resolve_through_the_slice_ports_per_protocol() {
        let svc = service(
            "ns",
            "dns",
            "10.96.0.53",
            &[
                ("dns", 53, "UDP", json!("dns")),
                ("dns-tcp", 53, "TCP", json!("dns-tcp")),
            ],
        );
        let a = slice(
            "ns",
            "dns-a",
            "dns",
            &[("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")],
            &[ready("10.0.0.1")],
        );
        let b = slice(
            "ns",
            "dns-b",
            "dns",
            &[("dns", 6363, "UDP"), ("dns-tcp", 6364, "TCP")],
            &[ready("10.0.0.2")],
        );
        let t = translate_service(&svc, &[&a, &b]).unwrap();
        assert_eq!(
            backends(&t, 53, Proto::Udp),
            ["10.0.0.1:5353", "10.0.0.2:6363"]
        );
        assert_eq!(
            backends(&t, 53, Proto::Tcp),
            ["10.0.0.1:5354", "10.0.0.2:6364"]
        );
    }

    #[test]
    fn a_slice_port_with_another_name_or_protocol_does_not_serve() {
        let svc = service(
            "ns",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", json!("http"))],
        );
        let wrong_name = slice(
            "ns",
            "a",
            "web",
            &[("metrics", 9090, "TCP")],
            &[ready("10.0.0.1")],
        );
        let wrong_proto = slice(
            "ns",
            "b",
            "web",
            &[("http", 8080, "UDP")],
            &[ready("10.0.0.2")],
        );
        let t = translate_service(&svc, &[&wrong_name, &wrong_proto]).unwrap();
        assert!(backends(&t, 80, Proto::Tcp).is_empty());
    }

    #[test]
    fn duplicate_endpoints_across_slices_count_once() {
        let svc = service("ns", "web", "10.96.0.10", &[("", 80, "TCP", json!(8080))]);
        let a = slice("ns", "a", "web", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
        let b = slice(
            "ns",
            "b",
            "web",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.9")],
        );
        let t = translate_service(&svc, &[&a, &b]).unwrap();
        assert_eq!(
            backends(&t, 80, Proto::Tcp),
            ["10.0.0.1:8080", "10.0.0.9:8080"]
        );
    }

    #[test]
    fn headless_external_name_and_foreign_proxy_services_are_not_proxied() {
        let mut headless = service("ns", "h", "None", &[("", 80, "TCP", json!(80))]);
        assert!(
            translate_service(&headless, &[])
                .unwrap()
                .frontends
                .is_empty()
        );
        headless.spec.as_mut().unwrap().cluster_ips = None;
        assert!(
            translate_service(&headless, &[])
                .unwrap()
                .frontends
                .is_empty()
        );

        let mut external = service("ns", "e", "10.96.0.11", &[("", 80, "TCP", json!(80))]);
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".to_owned());
        assert!(!is_proxied(&external));
        assert!(
            translate_service(&external, &[])
                .unwrap()
                .frontends
                .is_empty()
        );

        let mut foreign = service("ns", "f", "10.96.0.12", &[("", 80, "TCP", json!(80))]);
        foreign.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_owned(), "other".to_owned())].into());
        assert!(
            translate_service(&foreign, &[])
                .unwrap()
                .frontends
                .is_empty()
        );
    }

    #[test]
    fn sctp_ports_are_skipped_with_a_warning_and_ipv6_slices_ignored() {
        let svc = service(
            "ns",
            "m",
            "10.96.0.13",
            &[("s", 9, "SCTP", json!(9)), ("t", 80, "TCP", json!(80))],
        );
        let mut v6 = slice("ns", "v6", "m", &[("t", 80, "TCP")], &[ready("fd00::1")]);
        v6.address_type = "IPv6".to_owned();
        let t = translate_service(&svc, &[&v6]).unwrap();
        assert_eq!(t.frontends.len(), 1);
        assert!(t.frontends[0].backends.is_empty());
        assert!(t.warnings.iter().any(|w| w.contains("SCTP")));
    }

    #[test]
    fn invalid_addresses_and_ports_are_errors_or_warnings() {
        let bad_ip = service("ns", "b", "10.96.0.300", &[("", 80, "TCP", json!(80))]);
        assert_eq!(
            translate_service(&bad_ip, &[]),
            Err(TranslateError::InvalidClusterIp("10.96.0.300".to_owned()))
        );
        let bad_port = service("ns", "b", "10.96.0.14", &[("", 70000, "TCP", json!(80))]);
        assert_eq!(
            translate_service(&bad_port, &[]),
            Err(TranslateError::InvalidPort(70000))
        );
        let svc = service("ns", "w", "10.96.0.15", &[("", 80, "TCP", json!(80))]);
        let s = slice(
            "ns",
            "w",
            "w",
            &[("", 80, "TCP")],
            &[ready("not-an-ip"), ready("10.0.0.1")],
        );
        let t = translate_service(&svc, &[&s]).unwrap();
        assert_eq!(backends(&t, 80, Proto::Tcp), ["10.0.0.1:80"]);
        assert!(t.warnings.iter().any(|w| w.contains("not-an-ip")));
    }

    #[test]
    fn external_ips_and_load_balancer_ingress_ips_answer_with_the_service_ports() {
        let mut svc = service(
            "ns",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", json!(8080))],
        );
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("LoadBalancer".into());
        spec.external_ips = Some(vec![
            "192.0.2.7".into(),
            "bogus".into(),
            "2001:db8::1".into(),
        ]);
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "198.51.100.1"},
                {"ip": "198.51.100.2", "ipMode": "VIP"},
                {"ip": "198.51.100.3", "ipMode": "Proxy"},
                {"hostname": "lb.example"},
            ]}}))
            .unwrap(),
        );
        let eps = slice(
            "ns",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[ready("10.0.0.1")],
        );
        let t = translate_service(&svc, &[&eps]).unwrap();
        let addrs: Vec<String> = t.frontends.iter().map(|f| f.frontend.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "10.96.0.10:80/TCP",
                "192.0.2.7:80/TCP",
                "198.51.100.1:80/TCP",
                "198.51.100.2:80/TCP"
            ],
            "ipMode Proxy is left to the load balancer; IPv6 and hostnames are not ours"
        );
        assert!(t.frontends.iter().all(|f| f.backends.len() == 1));
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("\"bogus\""), "{:?}", t.warnings);
    }

    #[test]
    fn node_ports_are_frontends_on_the_nodes_addresses_unless_not_allocated() {
        let node = ["172.31.0.2".parse().unwrap(), "172.31.9.2".parse().unwrap()];
        let eps = slice(
            "ns",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[ready("10.0.0.1")],
        );
        let with = |ty: &str, allocate: Option<bool>| {
            let mut svc = service(
                "ns",
                "web",
                "10.96.0.10",
                &[("http", 80, "TCP", json!(8080))],
            );
            let spec = svc.spec.as_mut().unwrap();
            spec.type_ = Some(ty.into());
            spec.allocate_load_balancer_node_ports = allocate;
            spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
            let node = NodeView {
                name: None,
                nodeport_addresses: node.to_vec(),
            };
            let t = translate_service_on(&svc, &[&eps], &node).unwrap();
            t.frontends
                .iter()
                .map(|f| f.frontend.to_string())
                .collect::<Vec<_>>()
        };
        let on_both = [
            "10.96.0.10:80/TCP",
            "172.31.0.2:30080/TCP",
            "172.31.9.2:30080/TCP",
        ];
        assert_eq!(with("NodePort", None), on_both);
        assert_eq!(with("LoadBalancer", None), on_both);
        assert_eq!(with("LoadBalancer", Some(false)), ["10.96.0.10:80/TCP"]);
        assert_eq!(
            with("ClusterIP", None),
            ["10.96.0.10:80/TCP"],
            "a ClusterIP Service has no NodePort"
        );
    }

    /// A LoadBalancer Service `web` (port 80 -> 8080, NodePort 30080, LB IP 198.51.100.1, one
    /// externalIP) with endpoints on node-a (one ready, one terminating) and node-b (ready).
    fn policy_case(etp: &str, itp: &str, a_ready: bool) -> (Service, EndpointSlice) {
        let mut svc = service(
            "ns",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", json!(8080))],
        );
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("LoadBalancer".into());
        spec.external_traffic_policy = Some(etp.into());
        spec.internal_traffic_policy = Some(itp.into());
        spec.external_ips = Some(vec!["192.0.2.7".into()]);
        spec.load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into(), "bad".into()]);
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}))
                .unwrap(),
        );
        let eps: EndpointSlice = serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "ns", "name": "web-1",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.1.1"], "nodeName": "node-a", "conditions": {"ready": a_ready, "serving": true, "terminating": !a_ready}},
                {"addresses": ["10.0.1.2"], "nodeName": "node-a", "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.2.1"], "nodeName": "node-b", "conditions": {"ready": true}},
            ]
        }))
        .unwrap();
        (svc, eps)
    }

    fn node_a() -> NodeView {
        NodeView {
            name: Some("node-a".into()),
            nodeport_addresses: vec!["172.31.0.2".parse().unwrap()],
        }
    }

    fn addrs(b: &[BackendAddr]) -> Vec<String> {
        b.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect()
    }

    fn spec_of<'a>(t: &'a Translation, frontend: &str) -> &'a FrontendSpec {
        t.frontends
            .iter()
            .find(|f| f.frontend.to_string() == frontend)
            .unwrap_or_else(|| panic!("no frontend {frontend} in {:?}", t.frontends))
    }

    #[test]
    fn external_traffic_policy_chooses_backends_for_outside_clients_only() {
        let (svc, eps) = policy_case("Cluster", "Cluster", true);
        let t = translate_service_on(&svc, &[&eps], &node_a()).unwrap();
        for fe in [
            "172.31.0.2:30080/TCP",
            "198.51.100.1:80/TCP",
            "192.0.2.7:80/TCP",
        ] {
            let spec = spec_of(&t, fe);
            let ext = spec.external.as_ref().expect("reachable from outside");
            assert!(!ext.local);
            assert_eq!(
                addrs(&ext.backends),
                ["10.0.1.1:8080", "10.0.2.1:8080"],
                "{fe}"
            );
            assert_eq!(
                addrs(&spec.backends),
                ["10.0.1.1:8080", "10.0.2.1:8080"],
                "{fe}"
            );
        }
        assert!(
            spec_of(&t, "10.96.0.10:80/TCP").external.is_none(),
            "a ClusterIP is inside only"
        );
        let local: Vec<bool> = spec_of(&t, "10.96.0.10:80/TCP")
            .backends
            .iter()
            .map(|b| b.local)
            .collect();
        assert_eq!(local, [true, false], "endpoints on node-a are local");

        let (svc, eps) = policy_case("Local", "Cluster", true);
        let t = translate_service_on(&svc, &[&eps], &node_a()).unwrap();
        let spec = spec_of(&t, "172.31.0.2:30080/TCP");
        let ext = spec.external.as_ref().unwrap();
        assert!(ext.local);
        assert_eq!(
            addrs(&ext.backends),
            ["10.0.1.1:8080"],
            "eTP Local: this node's ready one"
        );
        assert_eq!(
            addrs(&spec.backends),
            ["10.0.1.1:8080", "10.0.2.1:8080"],
            "pods and nodes reaching a NodePort still get every endpoint"
        );

        let (svc, eps) = policy_case("Local", "Cluster", false);
        let t = translate_service_on(&svc, &[&eps], &node_b_view()).unwrap();
        let ext = spec_of(&t, "172.31.0.3:30080/TCP")
            .external
            .clone()
            .unwrap();
        assert_eq!(addrs(&ext.backends), ["10.0.2.1:8080"]);
        let t = translate_service_on(&svc, &[&eps], &node_a()).unwrap();
        let ext = spec_of(&t, "172.31.0.2:30080/TCP")
            .external
            .clone()
            .unwrap();
        assert_eq!(
            addrs(&ext.backends),
            ["10.0.1.1:8080", "10.0.1.2:8080"],
            "no local endpoint ready: the local serving-terminating ones, not the remote ready one"
        );
    }

    fn node_b_view() -> NodeView {
        NodeView {
            name: Some("node-b".into()),
            nodeport_addresses: vec!["172.31.0.3".parse().unwrap()],
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_the_nodes_endpoints_and_drops_without() {
        let (svc, eps) = policy_case("Cluster", "Local", true);
        let t = translate_service_on(&svc, &[&eps], &node_b_view()).unwrap();
        let cluster_ip = spec_of(&t, "10.96.0.10:80/TCP");
        assert!(cluster_ip.drop_empty);
        assert_eq!(addrs(&cluster_ip.backends), ["10.0.2.1:8080"]);
        let nodeport = spec_of(&t, "172.31.0.3:30080/TCP");
        assert!(!nodeport.drop_empty, "iTP applies to ClusterIPs only");
        assert_eq!(nodeport.backends.len(), 2);

        let no_local = NodeView {
            name: Some("node-c".into()),
            nodeport_addresses: Vec::new(),
        };
        let t = translate_service_on(&svc, &[&eps], &no_local).unwrap();
        let cluster_ip = spec_of(&t, "10.96.0.10:80/TCP");
        assert!(cluster_ip.backends.is_empty() && cluster_ip.drop_empty);
    }

    #[test]
    fn source_ranges_guard_load_balancer_ips_only() {
        let (svc, eps) = policy_case("Cluster", "Cluster", true);
        let t = translate_service_on(&svc, &[&eps], &node_a()).unwrap();
        let ranges: Vec<String> = spec_of(&t, "198.51.100.1:80/TCP")
            .source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ranges, ["203.0.113.0/24"]);
        for fe in [
            "172.31.0.2:30080/TCP",
            "192.0.2.7:80/TCP",
            "10.96.0.10:80/TCP",
        ] {
            assert!(spec_of(&t, fe).source_ranges.is_empty(), "{fe}");
        }
        assert!(
            t.warnings.iter().any(|w| w.contains("\"bad\"")),
            "the malformed range is named: {:?}",
            t.warnings
        );
    }

    #[test]
    fn health_check_node_ports_count_this_nodes_ready_endpoints() {
        let (mut svc, eps) = policy_case("Local", "Cluster", true);
        assert_eq!(
            health_check(&svc, &[&eps], "node-a"),
            None,
            "no port allocated"
        );
        svc.spec.as_mut().unwrap().health_check_node_port = Some(32000);
        let count =
            |node: &str| health_check(&svc, &[&eps], node).map(|h| (h.port, h.local_endpoints));
        assert_eq!(
            count("node-a"),
            Some((32000, 1)),
            "the terminating one does not count"
        );
        assert_eq!(count("node-b"), Some((32000, 1)));
        assert_eq!(count("node-c"), Some((32000, 0)));
        let (mut cluster, _) = policy_case("Cluster", "Cluster", true);
        cluster.spec.as_mut().unwrap().health_check_node_port = Some(32000);
        assert_eq!(
            health_check(&cluster, &[&eps], "node-a"),
            None,
            "eTP Cluster has none"
        );
    }
}
