//! Object builders for unit tests.
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;

/// A ClusterIP Service with (name, port, protocol, targetPort) ports.
pub fn service(
    ns: &str,
    name: &str,
    ip: &str,
    ports: &[(&str, i32, &str, serde_json::Value)],
) -> Service {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p, proto, target)| json!({"name": n, "port": p, "protocol": proto, "targetPort": target}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports}
    }))
    .expect("valid Service")
}

/// An endpoint: address, then the ready, serving and terminating conditions (`None` = unset).
pub type Endpoint<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

/// An IPv4 EndpointSlice of `svc` with (name, port, protocol) ports and (address, ready, serving,
/// terminating) endpoints; `None` leaves a condition unset.
pub fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    ports: &[(&str, i32, &str)],
    endpoints: &[Endpoint<'_>],
) -> EndpointSlice {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(a, ready, serving, terminating)| {
            json!({"addresses": [a], "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints
    }))
    .expect("valid EndpointSlice")
}

/// A ready endpoint (conditions unset count as ready).
pub fn ready(addr: &str) -> Endpoint<'_> {
    (addr, None, None, None)
}
