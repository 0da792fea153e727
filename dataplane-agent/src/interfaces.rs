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

/// The IPv4 addresses of this network namespace's interfaces (for `--nodeport-addresses` CIDRs).
#[must_use]
pub fn local_addresses() -> Vec<Ipv4Addr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `getifaddrs` fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list `getifaddrs` returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            // SAFETY: a non-null `ifa_addr` points at a sockaddr of its family.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a `sockaddr_in`.
            let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
            out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: frees the list `getifaddrs` allocated, once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The node's ephemeral port range (`net.ipv4.ip_local_port_range`), which source NAT must stay
/// out of.
///
/// # Errors
/// The sysctl cannot be read or parsed.
pub fn ephemeral_ports() -> anyhow::Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path)?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => anyhow::bail!("{path}: unexpected contents {text:?}"),
    }
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
