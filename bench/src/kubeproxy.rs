//! The baselines: the rules kube-proxy's iptables and nftables proxiers write for the same
//! Services and endpoints the agent reads. Test fixtures for the benchmark, not a product
//! feature. Shapes follow kube-proxy (pkg/proxy/iptables and pkg/proxy/nftables): a dispatch of
//! every service port (KUBE-SERVICES, walked rule by rule; or the `service-ips` verdict map), a
//! chain per service port choosing an endpoint at random (`statistic --mode random` with
//! probabilities 1/n, 1/(n-1), ...; or `numgen random mod n` vmaps), a chain per endpoint that
//! marks hairpin traffic for masquerade and DNATs, masquerade of marked traffic on the way out,
//! and the filter-table rejects of Services without endpoints.
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use dataplane_core::object::NsName;
use dataplane_core::translate::{BackendAddr, FrontendSpec, Proto};

/// The pod network: traffic from outside it to a ClusterIP is masqueraded (kube-proxy's
/// `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/14";

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// kube-proxy names chains by a hash of the service port (and endpoint): 16 characters.
fn chain_id(s: &str) -> String {
    format!("{:016X}", hash(s))
}

fn proto(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn port_name(svc: &NsName, fe: &FrontendSpec) -> String {
    format!(
        "{}/{}:{}/{}",
        svc.namespace,
        svc.name,
        fe.frontend.port,
        proto(fe.frontend.proto)
    )
}

fn svc_chain(svc: &NsName, fe: &FrontendSpec) -> String {
    format!("KUBE-SVC-{}", chain_id(&port_name(svc, fe)))
}

fn sep_chain(svc: &NsName, fe: &FrontendSpec, b: &BackendAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_id(&format!("{}{}:{}", port_name(svc, fe), b.addr, b.port))
    )
}

fn iptables_service(out: &mut String, svc: &NsName, fe: &FrontendSpec, chains: &mut String) {
    let f = &fe.frontend;
    let p = proto(f.proto);
    let name = port_name(svc, fe);
    let chain = svc_chain(svc, fe);
    let _ = writeln!(chains, ":{chain} - [0:0]");
    // As kube-proxy: traffic from outside the pod network is marked for masquerade first, then an
    // endpoint is chosen.
    let _ = writeln!(
        out,
        "-A {chain} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        f.addr, f.port
    );
    let n = fe.backends.len();
    for (i, b) in fe.backends.iter().enumerate() {
        let sep = sep_chain(svc, fe, b);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        // The last endpoint takes what the others left, unconditionally.
        let remaining = n - i;
        let statistic = if remaining > 1 {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / remaining as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "-A {chain} -m comment --comment \"{name} -> {}:{}\"{statistic} -j {sep}",
            b.addr, b.port
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{name}\" -s {}/32 -j KUBE-MARK-MASQ",
            b.addr
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{name}\" -m {p} -p {p} -j DNAT --to-destination {}:{}",
            b.addr, b.port
        );
    }
}

/// A NodePort frontend: reachable from outside, on one of the node's addresses.
fn is_node_port(fe: &FrontendSpec, node_ips: &[Ipv4Addr]) -> bool {
    fe.external.is_some() && node_ips.contains(&fe.frontend.addr)
}

/// The `iptables-restore --noflush` input kube-proxy's iptables mode writes for these Services.
#[must_use]
pub fn iptables(services: &[(NsName, Vec<FrontendSpec>)]) -> String {
    iptables_on(services, &[])
}

/// As [`iptables`], on a node with these addresses: NodePort frontends go to KUBE-NODEPORTS by
/// port (reached through the last KUBE-SERVICES rule, `--dst-type LOCAL`), via a KUBE-EXT chain
/// that marks them for masquerade (externalTrafficPolicy Cluster), as kube-proxy writes them.
#[must_use]
pub fn iptables_on(services: &[(NsName, Vec<FrontendSpec>)], node_ips: &[Ipv4Addr]) -> String {
    let mut filter = String::from(
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n",
    );
    let mut filter_rules = String::from(
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    let mut nat = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut nat_rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut chains = String::new();
    let mut per_service = String::new();
    for (svc, fes) in services {
        for fe in fes {
            let f = &fe.frontend;
            let p = proto(f.proto);
            let name = port_name(svc, fe);
            if fe.backends.is_empty() {
                let _ = writeln!(
                    filter_rules,
                    "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {p} -p {p} -d {}/32 --dport {} -j REJECT --reject-with icmp-port-unreachable",
                    f.addr, f.port
                );
                continue;
            }
            if is_node_port(fe, node_ips) {
                let ext = svc_chain(svc, fe).replace("KUBE-SVC-", "KUBE-EXT-");
                let _ = writeln!(chains, ":{ext} - [0:0]");
                let _ = writeln!(
                    nat_rules,
                    "-A KUBE-NODEPORTS -m comment --comment \"{name}\" -m {p} -p {p} --dport {} -j {ext}",
                    f.port
                );
                let _ = writeln!(
                    per_service,
                    "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
                     -A {ext} -j {}",
                    svc_chain(svc, fe)
                );
            } else {
                let _ = writeln!(
                    nat_rules,
                    "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {}",
                    f.addr,
                    f.port,
                    svc_chain(svc, fe)
                );
            }
            iptables_service(&mut per_service, svc, fe, &mut chains);
        }
    }
    nat_rules += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
    filter += &filter_rules;
    filter += "COMMIT\n";
    nat += &chains;
    nat += &nat_rules;
    nat += &per_service;
    nat += "COMMIT\n";
    filter + &nat
}

/// kube-proxy's partial sync after one Service's endpoints changed: that Service's chains
/// rewritten (its KUBE-SVC chain flushed, endpoint chains declared), with `--noflush`.
#[must_use]
pub fn iptables_change(svc: &NsName, fe: &FrontendSpec) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    iptables_service(&mut rules, svc, fe, &mut chains);
    format!("*nat\n{chains}{rules}COMMIT\n")
}

fn nft_service_chain(svc: &NsName, fe: &FrontendSpec) -> String {
    format!(
        "service-{}-{}/{}/{}/p{}",
        &chain_id(&port_name(svc, fe))[..8],
        svc.namespace,
        svc.name,
        proto(fe.frontend.proto),
        fe.frontend.port
    )
}

fn nft_endpoint_chain(svc: &NsName, fe: &FrontendSpec, b: &BackendAddr) -> String {
    format!(
        "endpoint-{}-{}/{}/{}/p{}__{}/{}",
        &chain_id(&format!("{}{}:{}", port_name(svc, fe), b.addr, b.port))[..8],
        svc.namespace,
        svc.name,
        proto(fe.frontend.proto),
        fe.frontend.port,
        b.addr,
        b.port
    )
}

fn nft_service(out: &mut String, svc: &NsName, fe: &FrontendSpec, replace: bool) {
    let f = &fe.frontend;
    let p = proto(f.proto);
    let chain = nft_service_chain(svc, fe);
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    if replace {
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        f.addr, f.port
    );
    let mut vmap = Vec::new();
    for (i, b) in fe.backends.iter().enumerate() {
        let ep = nft_endpoint_chain(svc, fe, b);
        let _ = writeln!(out, "add chain ip kube-proxy {ep}");
        if replace {
            let _ = writeln!(out, "flush chain ip kube-proxy {ep}");
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ep} ip saddr {} jump mark-for-masquerade",
            b.addr
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ep} meta l4proto {p} dnat to {}:{}",
            b.addr, b.port
        );
        vmap.push(format!("{i} : goto {ep}"));
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        fe.backends.len(),
        vmap.join(" , ")
    );
}

/// The `nft -f` input kube-proxy's nftables mode writes for these Services.
#[must_use]
pub fn nftables(services: &[(NsName, Vec<FrontendSpec>)]) -> String {
    nftables_on(services, &[])
}

/// As [`nftables`], on a node with these addresses: NodePort frontends are `service-nodeports`
/// elements (protocol . port, matched for local destinations) going to an `external-` chain that
/// marks them for masquerade, then to the service chain, as kube-proxy writes them.
#[must_use]
pub fn nftables_on(services: &[(NsName, Vec<FrontendSpec>)], node_ips: &[Ipv4Addr]) -> String {
    let mut out = String::from(
        "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add chain ip kube-proxy reject-chain\n\
         add rule ip kube-proxy reject-chain reject\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n\
         add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip kube-proxy service-endpoints-check\n\
         add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n\
         add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n\
         add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }\n\
         add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n",
    );
    let mut elements = Vec::new();
    let mut node_ports = Vec::new();
    let mut rejects = Vec::new();
    for (svc, fes) in services {
        for fe in fes {
            let f = &fe.frontend;
            let key = format!("{} . {} . {}", f.addr, proto(f.proto), f.port);
            if fe.backends.is_empty() {
                rejects.push(format!("{key} : goto reject-chain"));
                continue;
            }
            nft_service(&mut out, svc, fe, false);
            if is_node_port(fe, node_ips) {
                let ext = nft_service_chain(svc, fe).replacen("service-", "external-", 1);
                let _ = writeln!(out, "add chain ip kube-proxy {ext}");
                let _ = writeln!(out, "add rule ip kube-proxy {ext} jump mark-for-masquerade");
                let _ = writeln!(
                    out,
                    "add rule ip kube-proxy {ext} goto {}",
                    nft_service_chain(svc, fe)
                );
                node_ports.push(format!("{} . {} : goto {ext}", proto(f.proto), f.port));
            } else {
                elements.push(format!("{key} : goto {}", nft_service_chain(svc, fe)));
            }
        }
    }
    add_elements(&mut out, "service-nodeports", &node_ports);
    add_elements(&mut out, "service-ips", &elements);
    add_elements(&mut out, "no-endpoint-services", &rejects);
    out
}

/// Elements of a map, in chunks as kube-proxy's transactions write them (each line reasonable).
fn add_elements(out: &mut String, map: &str, elements: &[String]) {
    for chunk in elements.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip kube-proxy {map} {{ {} }}",
            chunk.join(" , ")
        );
    }
}

/// The `nft -f` transaction kube-proxy's nftables mode writes after one Service's endpoints
/// changed: its service chain and endpoint chains flushed and rewritten.
#[must_use]
pub fn nftables_change(svc: &NsName, fe: &FrontendSpec) -> String {
    let mut out = String::new();
    nft_service(&mut out, svc, fe, true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster;

    fn sample() -> Vec<(NsName, Vec<FrontendSpec>)> {
        let objs = cluster::objects(3, 4, &[]);
        let index = cluster::index(&objs);
        cluster::translated(&objs, &index)
    }

    #[test]
    fn iptables_has_a_dispatch_rule_per_service_and_random_choice_over_every_endpoint() {
        let rules = iptables(&sample());
        let dispatch = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("cluster IP"))
            .count();
        assert_eq!(dispatch, 3);
        for p in ["0.2500000000", "0.3333333333", "0.5000000000"] {
            assert_eq!(rules.matches(&format!("--probability {p}")).count(), 3);
        }
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 12);
        assert!(rules.ends_with("COMMIT\n"));
        // The nodeports jump is the last rule of KUBE-SERVICES.
        let last = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last.contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn nftables_maps_every_service_to_a_chain_that_picks_an_endpoint() {
        let rules = nftables(&sample());
        assert_eq!(rules.matches("numgen random mod 4 vmap").count(), 3);
        assert_eq!(rules.matches(" dnat to ").count(), 12);
        let elements = rules
            .lines()
            .find(|l| l.starts_with("add element ip kube-proxy service-ips"))
            .unwrap();
        assert_eq!(elements.matches("goto service-").count(), 3);
    }

    #[test]
    fn node_ports_go_through_the_nodeport_dispatch_with_masquerade() {
        use dataplane_core::translate::NodeView;
        let real = cluster::Real {
            name: "np".into(),
            vip: Ipv4Addr::new(10, 96, 1, 1),
            port: 80,
            target_port: 8080,
            backends: vec![Ipv4Addr::new(10, 245, 1, 21)],
            node_port: Some(30500),
        };
        let objs = cluster::objects(3, 2, std::slice::from_ref(&real));
        let index = cluster::index(&objs);
        let node_ip = Ipv4Addr::new(172, 31, 0, 2);
        let node = NodeView {
            name: None,
            nodeport_addresses: vec![node_ip],
        };
        let t = cluster::translated_on(&objs, &index, &node);
        let ipt = iptables_on(&t, &[node_ip]);
        let dispatch: Vec<&str> = ipt
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .collect();
        assert_eq!(dispatch.len(), 1, "{ipt}");
        assert!(
            dispatch[0].contains("--dport 30500 -j KUBE-EXT-"),
            "{}",
            dispatch[0]
        );
        let ext = dispatch[0].rsplit(' ').next().unwrap();
        assert!(ipt.contains(&format!(
            "-A {ext} -m comment --comment \"masquerade traffic"
        )));
        assert!(
            !ipt.contains("-d 172.31.0.2/32 --dport 30500 -j KUBE-SVC"),
            "not a KUBE-SERVICES match"
        );
        let nft = nftables_on(&t, &[node_ip]);
        assert!(
            nft.contains(
                "add element ip kube-proxy service-nodeports { tcp . 30500 : goto external-"
            ),
            "{nft}"
        );
        assert!(
            !nft.contains("172.31.0.2 . tcp . 30500"),
            "not a service-ips element"
        );
    }
}
