//! Which host interfaces lead to this node's pods: the ones the routing table uses for local pod
//! addresses. This works with any CNI that gives each pod a host-side interface and a route.
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use dataplane_core::index::Index;

/// Addresses of the pods scheduled on `node` that have their own network namespace.
#[must_use]
pub fn local_pod_ips(index: &Index, node: &str) -> BTreeSet<Ipv4Addr> {
    index
        .pods
        .values()
        .filter(|p| {
            let spec = p.spec.as_ref();
            spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && !spec.and_then(|s| s.host_network).unwrap_or(false)
        })
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
        .collect()
}

/// One IPv4 route of the main table, as `/proc/net/route` lists it.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub prefix_len: u32,
}

/// Parses `/proc/net/route` (addresses are the raw network-order words, printed in hex).
#[must_use]
pub fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(cols.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(cols.get(7)?, 16).ok()?;
            Some(Route {
                iface: (*cols.first()?).to_owned(),
                dest: Ipv4Addr::from(dest.to_ne_bytes()),
                prefix_len: mask.count_ones(),
            })
        })
        .collect()
}

/// The interfaces holding a host route (/32) to a local pod address, with the pods' addresses.
#[must_use]
pub fn pod_interfaces(
    routes: &[Route],
    pod_ips: &BTreeSet<Ipv4Addr>,
) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for r in routes {
        if r.prefix_len == 32 && pod_ips.contains(&r.dest) {
            out.entry(r.iface.clone()).or_default().push(r.dest);
        }
    }
    out
}

/// The interface index of a name in the current network namespace.
#[must_use]
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routes_to_local_pods_name_their_interfaces() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t020012AC\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                    lxc1\t0A01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                    eth0\t0002F40A\t030012AC\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let routes = parse_routes(text);
        assert_eq!(
            routes[1],
            Route {
                iface: "lxc1".into(),
                dest: Ipv4Addr::new(10, 244, 1, 10),
                prefix_len: 32
            }
        );
        assert_eq!(routes[2].prefix_len, 24);
        let pods = [Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 2, 0)].into();
        let found = pod_interfaces(&routes, &pods);
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            ["lxc1"],
            "a /24 route is not a pod's"
        );
    }
}
