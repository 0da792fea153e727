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
}

/// One frontend and its serving backends (sorted, unique; empty means "reject").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub frontend: Frontend,
    pub backends: Vec<BackendAddr>,
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

/// Translates a Service and its EndpointSlices into frontends with their backends.
///
/// # Errors
/// A Service whose addresses or ports are invalid; the caller keeps what it had programmed.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
) -> Result<Translation, TranslateError> {
    let mut out = Translation::default();
    if !is_proxied(svc) {
        return Ok(out);
    }
    let ips = cluster_ips(svc)?;
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    for port in ports {
        let number = port_number(port.port)?;
        let Some(proto) = Proto::parse(port.protocol.as_deref()) else {
            out.warnings.push(format!(
                "port {number}: protocol {:?} is not supported, skipped",
                port.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let backends = select_backends(port, proto, slices, &mut out.warnings);
        for addr in &ips {
            out.frontends.push(FrontendSpec {
                frontend: Frontend {
                    addr: *addr,
                    port: number,
                    proto,
                },
                backends: backends.clone(),
            });
        }
    }
    out.frontends.sort_by_key(|f| f.frontend);
    Ok(out)
}

/// kube-proxy's endpoint rules: endpoints whose `ready` condition is true or unset serve; when none
/// is ready, endpoints that are both serving and terminating do (graceful termination). The port
/// comes from the slice port with the Service port's name and protocol, which is how a named
/// `targetPort` resolves.
fn select_backends(
    port: &ServicePort,
    proto: Proto,
    slices: &[&EndpointSlice],
    warnings: &mut Vec<String>,
) -> Vec<BackendAddr> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut ready = Vec::new();
    let mut terminating = Vec::new();
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
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                    warnings.push(format!(
                        "EndpointSlice {}: endpoint address {addr:?} is not IPv4, skipped",
                        slice.metadata.name.as_deref().unwrap_or_default()
                    ));
                    continue;
                };
                let backend = BackendAddr {
                    addr: ip,
                    port: number,
                    proto,
                };
                if is_ready {
                    ready.push(backend);
                } else if serving && is_terminating {
                    terminating.push(backend);
                }
            }
        }
    }
    let mut chosen = if ready.is_empty() { terminating } else { ready };
    chosen.sort();
    chosen.dedup();
    chosen
}
