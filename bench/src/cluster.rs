//! A synthetic cluster: `n` ClusterIP Services of one TCP port, each with an EndpointSlice of
//! `endpoints` ready endpoints drawn from a pool of pod addresses (as in a real cluster, many
//! Services share pods). Services the benchmark sends traffic to ("real" ones, backed by lab pods)
//! sit in the middle of the list, so rule chains walked in order are walked half way.
use std::net::Ipv4Addr;

use dataplane_core::fixtures;
use dataplane_core::index::Index;
use dataplane_core::object::{NsName, Object};
use dataplane_core::translate::{FrontendSpec, NodeView, translate_service_on};
use serde_json::json;

/// The namespace of every synthetic object.
pub const NAMESPACE: &str = "bench";
/// Filler Services' addresses start here (10.100.0.0/14 holds 262,142 of them).
const FILLER_BASE: u32 = u32::from_be_bytes([10, 100, 0, 1]);
/// Filler endpoints come from this pool of pod addresses (none of them exists).
const POOL_BASE: u32 = u32::from_be_bytes([10, 200, 0, 1]);
const POOL_SIZE: u32 = 50_000;

/// A Service whose endpoints are real pods.
#[derive(Clone, Debug)]
pub struct Real {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub backends: Vec<Ipv4Addr>,
    /// Type NodePort with this nodePort (externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
}

fn service(name: &str, vip: Ipv4Addr, port: u16, target: u16) -> serde_json::Value {
    let vip = vip.to_string();
    let ports = [("p", i32::from(port), "TCP", json!(target))];
    to_json(&fixtures::service(NAMESPACE, name, &vip, &ports))
}

fn real_service(r: &Real) -> serde_json::Value {
    let mut svc = service(&r.name, r.vip, r.port, r.target_port);
    if let Some(np) = r.node_port {
        svc["spec"]["type"] = json!("NodePort");
        svc["spec"]["ports"][0]["nodePort"] = json!(np);
    }
    svc
}

/// The EndpointSlice of `svc`: every address ready, on port `target`.
#[must_use]
pub fn slice(svc: &str, target: u16, addrs: &[Ipv4Addr]) -> serde_json::Value {
    let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let endpoints: Vec<fixtures::Endpoint<'_>> = addrs
        .iter()
        .map(|a| (a.as_str(), Some(true), None, None))
        .collect();
    let ports = [("p", i32::from(target), "TCP")];
    to_json(&fixtures::slice(
        NAMESPACE,
        &format!("{svc}-1"),
        svc,
        &ports,
        &endpoints,
    ))
}

fn to_json(object: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(object).expect("a typed object serializes")
}

/// The address of filler Service `i`.
#[must_use]
pub fn filler_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(FILLER_BASE + u32::try_from(i).unwrap_or(u32::MAX))
}

/// The `j`th endpoint of filler Service `i`, from the pool.
#[must_use]
pub fn filler_endpoint(i: usize, j: usize) -> Ipv4Addr {
    let k = (i as u64 * 7919 + j as u64 * 104_729) % u64::from(POOL_SIZE);
    Ipv4Addr::from(POOL_BASE + u32::try_from(k).unwrap_or(0))
}

/// The objects (Services and EndpointSlices, as JSON) of a cluster of `n` Services in all,
/// `real` ones among them.
#[must_use]
pub fn objects(n: usize, endpoints: usize, real: &[Real]) -> Vec<serde_json::Value> {
    let fillers = n.saturating_sub(real.len());
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..fillers {
        if i == fillers / 2 {
            for r in real {
                out.push(real_service(r));
                out.push(slice(&r.name, r.target_port, &r.backends));
            }
        }
        let name = format!("svc-{i:06}");
        let eps: Vec<Ipv4Addr> = (0..endpoints).map(|j| filler_endpoint(i, j)).collect();
        out.push(service(&name, filler_vip(i), 80, 8080));
        out.push(slice(&name, 8080, &eps));
    }
    if fillers == 0 {
        for r in real {
            out.push(real_service(r));
            out.push(slice(&r.name, r.target_port, &r.backends));
        }
    }
    out
}

/// An index holding `objects`.
///
/// # Panics
/// An object is not a valid Service or EndpointSlice (the generator's own output always is).
#[must_use]
pub fn index(objects: &[serde_json::Value]) -> Index {
    let mut index = Index::default();
    for o in objects {
        let kind = match o["kind"].as_str() {
            Some("Service") => dataplane_core::object::Kind::Service,
            _ => dataplane_core::object::Kind::EndpointSlice,
        };
        let _ = index.apply(Object::parse(kind, o.clone()).expect("generated object is valid"));
    }
    index
}

/// What kube-proxy (and our agent) would program: every Service's frontends, in list order.
#[must_use]
pub fn translated(
    objects: &[serde_json::Value],
    index: &Index,
) -> Vec<(NsName, Vec<FrontendSpec>)> {
    translated_on(objects, index, &NodeView::default())
}

/// As [`translated`], for `node`: NodePorts on its addresses included.
#[must_use]
pub fn translated_on(
    objects: &[serde_json::Value],
    index: &Index,
    node: &NodeView,
) -> Vec<(NsName, Vec<FrontendSpec>)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Service")
        .filter_map(|o| {
            let name = NsName {
                namespace: NAMESPACE.to_owned(),
                name: o["metadata"]["name"].as_str()?.to_owned(),
            };
            let svc = index.services.get(&name)?;
            let t = translate_service_on(svc, &index.slices_of(&name), node).ok()?;
            Some((name, t.frontends))
        })
        .collect()
}

/// The objects as a multi-document YAML manifest.
///
/// # Errors
/// Serialisation failed.
pub fn yaml(objects: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut out = String::new();
    for o in objects {
        out += "---\n";
        out += &serde_yaml::to_string(o)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_services_sit_in_the_middle_and_translate_with_their_backends() {
        let real = Real {
            name: "web".into(),
            vip: Ipv4Addr::new(10, 96, 1, 1),
            port: 80,
            target_port: 8080,
            backends: vec![Ipv4Addr::new(10, 245, 1, 21), Ipv4Addr::new(10, 245, 1, 22)],
            node_port: None,
        };
        let objs = objects(11, 10, std::slice::from_ref(&real));
        assert_eq!(objs.len(), 22);
        assert_eq!(objs[10]["metadata"]["name"], "web");
        let index = index(&objs);
        let t = translated(&objs, &index);
        assert_eq!(t.len(), 11);
        let web = &t[5];
        assert_eq!(web.0.name, "web");
        assert_eq!(web.1[0].backends.len(), 2);
        assert!(
            t.iter()
                .filter(|(n, _)| n.name != "web")
                .all(|(_, f)| f[0].backends.len() == 10)
        );
    }
}
