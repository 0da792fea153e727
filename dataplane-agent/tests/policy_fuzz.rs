//! Generated packets through every program with Services and NetworkPolicy loaded (the real
//! kernel, BPF_PROG_TEST_RUN): a bounded number of random and mutated frames (protocols, flags,
//! ports, fragments, IP options, flipped and truncated bytes) from a fixed seed, each run
//! through `from_pod`, `to_pod`, `from_external` (XDP; what it passes goes on through `to_pod`,
//! as the node would deliver it) and `to_external`. Invariants over every frame a program lets
//! through: nothing the compiled policy denies reaches or leaves an enforced pod (a passed
//! packet belongs to a flow its policy admits, in one direction or as the reply of the other),
//! a rewritten destination is a backend of the frontend the packet was sent to, and a rewritten
//! source is a frontend of the backend that sent it. Root only; without it the test fails.
use std::net::Ipv4Addr;

use aya::TestRun as _;
use dataplane_agent::datapath::{Datapath, FORWARDED_IFINDEX};
use dataplane_common::{DropReason, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, prog_names};
use dataplane_core::fixtures::objects::{network_policy, pod};
use dataplane_core::fixtures::packet::{ACK, Pkt};
use dataplane_core::fixtures::{ready, service, slice};
use dataplane_core::index::Index;
use dataplane_core::object::{NsName, Object};
use dataplane_core::policy_maps::{PolicySync, PolicyTables};
use dataplane_core::reconcile::{NodePortAddresses, Reconciler};
use k8s_openapi::api::core::v1::Node;
use kplab::netns::{self, Netns};
use serde_json::json;

mod common;
use common::{drops, test_run};

const NODE: &str = "node-a";
const TC_ACT_OK: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_ABORTED: u32 = 0;
/// The node's InternalIP: web's NodePort 30080 answers there.
const NODE_IP: [u8; 4] = [172, 31, 0, 2];
const NODE_PORT: u16 = 30080;
/// The ports the node source-NATs remote backends' flows from.
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=61009;
const FRAMES: usize = 20_000;

const WEB_A: [u8; 4] = [10, 244, 1, 11];
const DNS_A: [u8; 4] = [10, 244, 1, 12];
const OPEN: [u8; 4] = [10, 244, 1, 13];
const WEB_B: [u8; 4] = [10, 244, 2, 21];
const DNS_B: [u8; 4] = [10, 244, 2, 22];
const WEB_VIP: [u8; 4] = [10, 96, 0, 10];
const DNS_VIP: [u8; 4] = [10, 96, 0, 53];
const ADDRS: [[u8; 4]; 10] = [
    WEB_A,
    DNS_A,
    OPEN,
    WEB_B,
    DNS_B,
    WEB_VIP,
    DNS_VIP,
    NODE_IP,
    [172, 16, 0, 5],
    [192, 168, 9, 9],
];
const PORTS: [u16; 9] = [53, 80, 5353, 8080, 9000, 9005, 40000, 0, NODE_PORT];

/// Services: web (TCP 80 -> 8080 on web-a, web-b; NodePort 30080 on the node), dns (UDP 53 -> 5353 on dns-a, dns-b). Local:
/// web-a (ingress from app=client on 8080; egress to app=dns on UDP 5353 and to 10.244.2.0/24
/// except dns-b on TCP 8080), dns-a (ingress from 172.16.0.0/16 on UDP 5353 and SCTP
/// 9000-9010), open (no policy). Remote: web-b (app=client), dns-b.
fn cluster() -> Index {
    let mut index = Index::default();
    let pods = [
        ("web-a", NODE, WEB_A, "web", 8080),
        ("dns-a", NODE, DNS_A, "dns", 5353),
        ("open", NODE, OPEN, "open", 8080),
        ("web-b", "node-b", WEB_B, "client", 8080),
        ("dns-b", "node-b", DNS_B, "dns", 5353),
    ];
    for (name, node, ip, app, port) in pods {
        let ip = Ipv4Addr::from(ip).to_string();
        let _ = index.apply(Object::from(pod(
            "t",
            name,
            node,
            &ip,
            &[("app", app)],
            json!([{"name": "p", "containerPort": port}]),
        )));
    }
    let addr = |a: [u8; 4]| Ipv4Addr::from(a).to_string();
    let web = [("http", 80, "TCP", json!(8080))];
    let dns = [("dns", 53, "UDP", json!(5353))];
    let mut web = service("t", "web", &addr(WEB_VIP), &web);
    let spec = web.spec.as_mut().expect("a Service spec");
    spec.type_ = Some("NodePort".into());
    spec.ports.as_mut().expect("ports")[0].node_port = Some(i32::from(NODE_PORT));
    let _ = index.apply(Object::from(web));
    let _ = index.apply(Object::from(
        serde_json::from_value::<Node>(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": addr(NODE_IP)}]}
        }))
        .expect("a Node"),
    ));
    let _ = index.apply(Object::from(service("t", "dns", &addr(DNS_VIP), &dns)));
    let (wa, wb, da, db) = (addr(WEB_A), addr(WEB_B), addr(DNS_A), addr(DNS_B));
    let _ = index.apply(Object::from(slice(
        "t",
        "web-1",
        "web",
        &[("http", 8080, "TCP")],
        &[ready(&wa), ready(&wb)],
    )));
    let _ = index.apply(Object::from(slice(
        "t",
        "dns-1",
        "dns",
        &[("dns", 5353, "UDP")],
        &[ready(&da), ready(&db)],
    )));
    let _ = index.apply(Object::from(network_policy(
        "t",
        "web",
        json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080}]}],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": {"app": "dns"}}}],
                 "ports": [{"protocol": "UDP", "port": 5353}]},
                {"to": [{"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.22/32"]}}],
                 "ports": [{"protocol": "TCP", "port": 8080}]},
            ],
        }),
    )));
    let _ = index.apply(Object::from(network_policy(
        "t",
        "dns",
        json!({
            "podSelector": {"matchLabels": {"app": "dns"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "172.16.0.0/16"}}],
                         "ports": [{"protocol": "UDP", "port": 5353},
                                   {"protocol": "SCTP", "port": 9000, "endPort": 9010}]}],
        }),
    )));
    index
}

/// splitmix64: a fixed seed, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// One frame: a well-formed packet of a random protocol between addresses of the cluster (or,
/// one time in eight, the reply to a packet a program translated: replies are where reverse
/// translation happens), then (half the time) mutated: fragment bits, a flipped byte in the
/// headers, or a truncation.
fn frame(rng: &mut Rng, translated: &[Flow]) -> Vec<u8> {
    let src = Ipv4Addr::from(rng.pick(&ADDRS));
    let dst = Ipv4Addr::from(rng.pick(&ADDRS));
    let (sport, dport) = (rng.pick(&PORTS), rng.pick(&PORTS));
    let reply = (!translated.is_empty() && rng.below(8) == 0).then(|| rng.pick(translated));
    let mut p = match (reply, rng.below(5)) {
        (Some((src, dst, 6, sport, dport, _)), _) => Pkt::tcp(dst, dport, src, sport, ACK),
        (Some((src, dst, _, sport, dport, _)), _) => Pkt::udp(dst, dport, src, sport),
        (None, 0 | 1) => Pkt::tcp(src, sport, dst, dport, (rng.next() & 0x3f) as u8),
        (None, 2) => Pkt::udp(src, sport, dst, dport),
        (None, 3) => Pkt {
            proto: rng.pick(&[132u8, 1, 47]),
            ..Pkt::udp(src, sport, dst, dport)
        },
        (None, _) => Pkt {
            frag: rng.pick(&[0x2000u16, 0x0001, 0x2004, 0x0100]),
            ..Pkt::udp(src, sport, dst, dport)
        },
    };
    if rng.below(8) == 0 {
        p.ip_options = vec![1, 1, 1, 1];
    }
    let mut f = p.build();
    match rng.below(6) {
        0 => {
            let at = 14 + rng.below(f.len().min(60) - 14);
            f[at] ^= 1 << rng.below(8);
        }
        // Within the layer 4 header: BPF_PROG_TEST_RUN refuses an IPv4 frame cut inside the
        // 20-byte IP header.
        1 => f.truncate(34 + rng.below(f.len() - 34)),
        _ => {}
    }
    f
}

/// What the policy stage reads of an IPv4 frame: addresses, protocol, ports (0 for a fragment
/// after the first, or a protocol without ports), or `None` when it is not one it would pass
/// intact (not IPv4, or its headers are cut short).
fn flow(f: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, u16, u16, bool)> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let proto = f[23];
    let frag = u16::from_be_bytes([f[20], f[21]]);
    let later_fragment = frag & 0x1fff != 0;
    let any_fragment = later_fragment || frag & 0x2000 != 0;
    let l4 = 14 + ihl;
    let icmp_error = proto == 1 && f.get(l4).is_some_and(|t| matches!(t, 3 | 11 | 12));
    if later_fragment || !matches!(proto, 6 | 17 | 132) || f.len() < l4 + 4 {
        return Some((src, dst, proto, 0, 0, icmp_error));
    }
    let ports = if any_fragment && proto != 132 {
        (0, 0)
    } else {
        (
            u16::from_be_bytes([f[l4], f[l4 + 1]]),
            u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        )
    };
    Some((src, dst, proto, ports.0, ports.1, icmp_error))
}

/// Whether the compiled policy admits a packet of `local` with `peer` (`ports`: the local
/// pod's, the peer's), whichever program saw it: as a new flow in its direction, or as the reply
/// of one opened the other way. Ingress names the pod's port, egress the peer's.
fn admitted(
    t: &PolicyTables,
    local: Ipv4Addr,
    peer: Ipv4Addr,
    proto: u8,
    ports: (u16, u16),
) -> bool {
    let (local_port, peer_port) = ports;
    let ok = |dir, port| {
        t.verdict(local, dir, peer, proto, port)
            .is_none_or(|v| v.is_ok())
    };
    ok(POLICY_DIR_INGRESS, local_port) || ok(POLICY_DIR_EGRESS, peer_port)
}

/// Where one frame went: its flow before and after a program that let it through.
struct Passed {
    before: Flow,
    after: Flow,
}

type Flow = (Ipv4Addr, Ipv4Addr, u8, u16, u16, bool);

/// What the invariants saw, so the test can show it exercised them.
#[derive(Default)]
struct Seen {
    passed: usize,
    judged: usize,
    translated: usize,
    from_outside: usize,
    reversed: usize,
}

/// The test's view of the cluster: the compiled policy, the frontends and their backends.
struct Checks {
    tables: PolicyTables,
}

impl Checks {
    /// The backends a frontend (address, port) may be translated to.
    fn backends(vip: Ipv4Addr, port: u16) -> Vec<(Ipv4Addr, u16)> {
        match (vip.octets(), port) {
            (WEB_VIP, 80) | (NODE_IP, NODE_PORT) => {
                vec![(WEB_A.into(), 8080), (WEB_B.into(), 8080)]
            }
            (DNS_VIP, 53) => vec![(DNS_A.into(), 5353), (DNS_B.into(), 5353)],
            _ => Vec::new(),
        }
    }

    /// A rewritten destination is a backend of the frontend the packet was sent to; whether it
    /// was rewritten.
    fn destination(n: usize, what: &str, p: &Passed, seen: &mut usize) -> bool {
        let (before, after) = ((p.before.1, p.before.4), (p.after.1, p.after.4));
        if before != after {
            *seen += 1;
            assert!(
                Self::backends(before.0, before.1).contains(&after),
                "frame {n} ({what}): {}:{} translated to {}:{}, not one of its backends",
                before.0,
                before.1,
                after.0,
                after.1
            );
        }
        before != after
    }

    /// A rewritten source (a reply leaving a backend) is a frontend of that backend.
    fn source(n: usize, what: &str, p: &Passed, seen: &mut usize) {
        let (backend, frontend) = ((p.before.0, p.before.3), (p.after.0, p.after.3));
        if backend != frontend {
            *seen += 1;
            assert!(
                Self::backends(frontend.0, frontend.1).contains(&backend),
                "frame {n} ({what}): source {}:{} rewritten to {}:{}, not a frontend of it",
                backend.0,
                backend.1,
                frontend.0,
                frontend.1
            );
        }
    }

    /// A passed packet of an enforced pod belongs to a flow its policy admits. Policy judges a
    /// pod's packets after translation (the backend they were sent to), and packets to a pod as
    /// they arrive (a reply shows its Service address only after `to_pod`).
    fn policy(&self, n: usize, what: &str, flow: Flow, egress: bool, f: &[u8], seen: &mut usize) {
        let (src, dst, proto, sport, dport, icmp_error) = flow;
        let (local, peer, ports) = if egress {
            (src, dst, (sport, dport))
        } else {
            (dst, src, (dport, sport))
        };
        if icmp_error || local == peer {
            // ICMP errors pass only when the flow they quote is tracked; a pod's own address is
            // not judged.
            return;
        }
        if self
            .tables
            .verdict(local, POLICY_DIR_INGRESS, peer, proto, 0)
            .is_some()
        {
            *seen += 1;
            assert!(
                admitted(&self.tables, local, peer, proto, ports),
                "frame {n} ({what}): {src}:{sport} -> {dst}:{dport} proto {proto} passed, but \
                 the policy of {local} admits it in neither direction: {f:02x?}"
            );
        }
    }
}

/// Moves this test's thread into a fresh network namespace (only `lo`), so the XDP program's
/// FIB lookups see no route of the machine's.
fn isolate() {
    let ns = Netns::create(format!("kpltest-fuzz-{}", std::process::id())).expect("a namespace");
    netns::enter(ns.name()).expect("entering it");
}

fn tc(dp: &Datapath, prog: &str, f: &[u8], n: usize) -> Option<Vec<u8>> {
    let run = dp
        .test_run_tc(prog, f, FORWARDED_IFINDEX)
        .unwrap_or_else(|e| panic!("frame {n} {f:02x?}: {e:#}"));
    (run.verdict == TC_ACT_OK).then_some(run.frame)
}

/// Keeps the last 64 translated flows, the ones replies are made for.
fn remember(translated: &mut Vec<Flow>, flow: Flow) {
    if translated.len() == 64 {
        translated.remove(0);
    }
    translated.push(flow);
}

fn passed(f: &[u8], out: &[u8]) -> Option<Passed> {
    Some(Passed {
        before: flow(f)?,
        after: flow(out)?,
    })
}

#[test]
fn generated_packets_never_pass_what_the_policy_denies_nor_reach_another_services_backend() {
    assert!(
        // SAFETY: plain syscall.
        unsafe { libc::geteuid() } == 0,
        "the generated-packet test loads eBPF programs and must run as root"
    );
    isolate();
    let index = cluster();
    let mut dp = Datapath::load()
        .map_err(|e| format!("{e:?}"))
        .expect("load eBPF object");
    dp.set_snat(
        Ipv4Addr::from(NODE_IP),
        (*SNAT_PORTS.start(), *SNAT_PORTS.end()),
    )
    .expect("the SNAT address");
    let mut reconciler = Reconciler::for_node(NODE, NodePortAddresses::Primary);
    for name in ["web", "dns"] {
        let svc = NsName {
            namespace: "t".into(),
            name: name.into(),
        };
        let report = reconciler.sync_service(&index, &svc, &mut dp);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
    let mut sync = PolicySync::new(NODE);
    let report = sync.sync(&index, &mut dp);
    assert!(report.failures.is_empty() && report.problems.is_empty());
    let checks = Checks {
        tables: sync.programmed().clone(),
    };

    let mut rng = Rng(0x6b70_6c61_6270_6f6c);
    let mut seen = Seen::default();
    let mut translated: Vec<Flow> = Vec::new();
    for n in 0..FRAMES {
        let f = frame(&mut rng, &translated);
        // A pod's packet, on its interface.
        if let Some(out) = tc(&dp, prog_names::FROM_POD, &f, n) {
            seen.passed += 1;
            if let Some(p) = passed(&f, &out) {
                if Checks::destination(n, "from_pod", &p, &mut seen.translated) {
                    remember(&mut translated, p.after);
                }
                checks.policy(n, "from_pod", p.after, true, &f, &mut seen.judged);
            }
        }
        // A packet to a pod, forwarded by the node.
        if let Some(out) = tc(&dp, prog_names::TO_POD, &f, n) {
            seen.passed += 1;
            if let Some(p) = passed(&f, &out) {
                checks.policy(n, "to_pod", p.before, false, &f, &mut seen.judged);
            }
        }
        // From outside: XDP on the node's uplink, then what it lets through on to the pod.
        let (verdict, out) = test_run(&f, |o| dp.xdp_program().expect("XDP").test_run(o));
        if verdict != XDP_DROP && verdict != XDP_ABORTED {
            seen.passed += 1;
            if let Some(p) = passed(&f, &out) {
                if p.before.1 == Ipv4Addr::from(NODE_IP) && SNAT_PORTS.contains(&p.before.4) {
                    // The reply of a source-NATed flow: back to its client, from the frontend.
                    Checks::source(n, "from_external", &p, &mut seen.reversed);
                } else if Checks::destination(n, "from_external", &p, &mut seen.from_outside) {
                    remember(&mut translated, p.after);
                }
                if let Some(delivered) = tc(&dp, prog_names::TO_POD, &out, n)
                    && let Some(q) = passed(&out, &delivered)
                {
                    checks.policy(
                        n,
                        "from_external, to_pod",
                        q.before,
                        false,
                        &out,
                        &mut seen.judged,
                    );
                }
            }
        }
        // A local backend's reply leaving through the uplink: its source turned back into the
        // frontend the client dialled.
        if let Some(out) = tc(&dp, prog_names::TO_EXTERNAL, &f, n)
            && let Some(p) = passed(&f, &out)
        {
            Checks::source(n, "to_external", &p, &mut seen.reversed);
        }
    }
    // The generator reaches every kind of verdict, so the invariants were exercised.
    assert!(seen.passed > FRAMES / 2, "{} passed", seen.passed);
    assert!(
        seen.judged > 500,
        "{} passed packets of enforced pods",
        seen.judged
    );
    assert!(
        seen.translated > 100,
        "{} translated by from_pod",
        seen.translated
    );
    assert!(
        seen.from_outside > 10,
        "{} translated by from_external",
        seen.from_outside
    );
    assert!(
        seen.reversed > 10,
        "{} replies reverse-translated (to_external, source-NAT replies)",
        seen.reversed
    );
    for reason in [
        DropReason::PolicyIngress,
        DropReason::PolicyEgress,
        DropReason::Malformed,
    ] {
        assert!(
            drops(&dp, reason) > 100,
            "{reason:?}: {}",
            drops(&dp, reason)
        );
    }
}
