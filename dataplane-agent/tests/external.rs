//! Packet tests of the external-interface programs (`from_external` XDP, `to_external` TC
//! egress) through the real kernel (BPF_PROG_TEST_RUN), as a table: the frontend as the core lays
//! it out, the input frame, the verdict, the output frame and the drop counters. NodePort,
//! LoadBalancer IP and externalIP frontends share one layout (a `SCOPE_EXTERNAL` header), so a
//! NodePort stands for all three, and a LoadBalancer IP for source ranges. Root only; without it
//! they fail.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::{TestRun as _, TestRunOptions};
use dataplane_agent::agent::Agent;
use dataplane_agent::datapath::{CtTable, Datapath, monotonic_ns};
use dataplane_common::{CT_FLAG_SNAT, DropReason, prog_names};
use dataplane_core::fixtures::packet::{ACK, FIN, Parsed, Pkt, RST, SYN, parse_checked};
use dataplane_core::maps::{MapState, backend_value, diff, service_entries};
use dataplane_core::net::Cidr;
use dataplane_core::reconcile::{MapWriter as _, NodePortAddresses};
use dataplane_core::translate::{BackendAddr, ExternalSpec, Frontend, FrontendSpec, Proto};
use kplab::netns::{self, Netns};

mod common;
use common::{drops, test_run};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;

const CLIENT: &str = "192.0.2.50";
const NODE: &str = "172.31.0.2";
const NODE_PORT: u16 = 30080;
const LB_IP: &str = "198.51.100.1";
const LOCAL: &str = "10.244.1.20";
const REMOTE: &str = "10.244.2.30";
const SNAT_PORTS: (u16, u16) = (61000, 61009);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Moves this test's thread into a fresh network namespace (only `lo`, forwarding off), so the
/// programs' FIB lookups see no route of the machine's: every next hop is unresolved.
fn isolate() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = Netns::create(format!("kpltest-xdp-{}-{n}", std::process::id())).unwrap();
    netns::enter(ns.name()).unwrap();
    ns.name().to_owned()
    // The guard removes the name; the namespace lives on while this thread is in it.
}

fn load() -> Datapath {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "packet tests load eBPF programs and must run as root"
    );
    isolate();
    let mut dp = Datapath::load().expect("load eBPF object");
    dp.set_snat(ip(NODE), SNAT_PORTS).unwrap();
    dp
}

fn backend(addr: &str, local: bool) -> BackendAddr {
    BackendAddr {
        addr: ip(addr),
        port: 8080,
        proto: Proto::Tcp,
        local,
    }
}

fn udp_backend(addr: &str, local: bool) -> BackendAddr {
    BackendAddr {
        proto: Proto::Udp,
        ..backend(addr, local)
    }
}

/// A frontend on `addr:port` reachable from outside, written as the reconciler writes it.
fn program(
    dp: &mut Datapath,
    addr: &str,
    port: u16,
    backends: &[BackendAddr],
    local: bool,
    ranges: &[&str],
) {
    program_proto(dp, addr, port, Proto::Tcp, backends, local, ranges);
}

/// The UDP NodePort `NODE:NODE_PORT`, eTP Cluster.
fn program_udp(dp: &mut Datapath, backends: &[BackendAddr]) {
    program_proto(dp, NODE, NODE_PORT, Proto::Udp, backends, false, &[]);
}

fn program_proto(
    dp: &mut Datapath,
    addr: &str,
    port: u16,
    proto: Proto,
    backends: &[BackendAddr],
    local: bool,
    ranges: &[&str],
) {
    let mut state = MapState::default();
    let mut ids = BTreeMap::new();
    for (i, b) in backends.iter().enumerate() {
        let id = 100 + i as u32;
        ids.insert(*b, id);
        state.backends.insert(id, backend_value(*b));
    }
    let external: Vec<BackendAddr> = backends
        .iter()
        .filter(|b| !local || b.local)
        .copied()
        .collect();
    let spec = FrontendSpec {
        frontend: Frontend {
            addr: ip(addr),
            port,
            proto,
        },
        backends: backends.to_vec(),
        drop_empty: false,
        external: Some(ExternalSpec {
            backends: external,
            local,
        }),
        source_ranges: ranges.iter().map(|r| r.parse::<Cidr>().unwrap()).collect(),
    };
    service_entries(&spec, 9, &ids, &mut state);
    for op in diff(&MapState::default(), &state) {
        dp.write(&op).unwrap();
    }
}

fn xdp(dp: &Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(frame, |o| dp.xdp_program().unwrap().test_run(o))
}

fn tc(dp: &Datapath, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(frame, |o| dp.program(prog).unwrap().test_run(o))
}

fn to_external(dp: &Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    tc(dp, prog_names::TO_EXTERNAL, frame)
}

/// The rewritten frame of a packet the program passes or transmits (checksums verified).
fn translated(verdict: u32, out: &[u8]) -> Parsed {
    assert_ne!(verdict, XDP_DROP, "dropped");
    parse_checked(out)
}

#[derive(Debug)]
enum Expect {
    /// Passed to the kernel unchanged.
    Untouched,
    /// Destination rewritten to the backend, source kept (a local backend, or eTP Local).
    Dnat(&'static str),
    /// Destination rewritten to the backend and source to the node and a port of the range.
    DnatSnat(&'static str),
    Dropped(DropReason),
    /// Answered with an RST from the frontend, sent back out (kube-proxy's REJECT).
    Refused,
}

struct Case {
    name: &'static str,
    backends: &'static [(&'static str, bool)],
    local: bool,
    ranges: &'static [&'static str],
    input: fn() -> Vec<u8>,
    expect: Expect,
}

#[test]
fn from_external_table() {
    let cases = [
        Case {
            name: "NodePort, eTP Cluster, local backend: DNAT, client address kept",
            backends: &[(LOCAL, true)],
            local: false,
            ranges: &[],
            input: || Pkt::tcp(CLIENT, 40000, NODE, NODE_PORT, SYN).build(),
            expect: Expect::Dnat(LOCAL),
        },
        Case {
            name: "NodePort, eTP Cluster, remote backend: DNAT and SNAT to the node",
            backends: &[(REMOTE, false)],
            local: false,
            ranges: &[],
            input: || Pkt::tcp(CLIENT, 40001, NODE, NODE_PORT, SYN).build(),
            expect: Expect::DnatSnat(REMOTE),
        },
        Case {
            name: "NodePort, eTP Local: only the local backend, client kept",
            backends: &[(REMOTE, false), (LOCAL, true)],
            local: true,
            ranges: &[],
            input: || Pkt::tcp(CLIENT, 40002, NODE, NODE_PORT, SYN).build(),
            expect: Expect::Dnat(LOCAL),
        },
        Case {
            name: "NodePort, eTP Local, no local backend: dropped, not rejected",
            backends: &[(REMOTE, false)],
            local: true,
            ranges: &[],
            input: || Pkt::tcp(CLIENT, 40003, NODE, NODE_PORT, SYN).build(),
            expect: Expect::Dropped(DropReason::NoLocalBackend),
        },
        Case {
            name: "a LoadBalancer IP (not a node address) without any endpoint: refused",
            backends: &[],
            local: false,
            ranges: &[],
            input: || Pkt::tcp(CLIENT, 40004, NODE, NODE_PORT, SYN).build(),
            expect: Expect::Refused,
        },
        Case {
            name: "another port of the node passes untouched",
            backends: &[(LOCAL, true)],
            local: false,
            ranges: &[],
            input: || Pkt::tcp(CLIENT, 40005, NODE, 22, SYN).build(),
            expect: Expect::Untouched,
        },
        Case {
            name: "UDP to the TCP NodePort passes untouched",
            backends: &[(LOCAL, true)],
            local: false,
            ranges: &[],
            input: || Pkt::udp(CLIENT, 40006, NODE, NODE_PORT).build(),
            expect: Expect::Untouched,
        },
        Case {
            name: "truncated TCP header is dropped",
            backends: &[(LOCAL, true)],
            local: false,
            ranges: &[],
            input: || {
                let mut f = Pkt::tcp(CLIENT, 40007, NODE, NODE_PORT, SYN).build();
                f.truncate(14 + 20 + 10);
                f[16..18].copy_from_slice(&30u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            name: "non-first fragment passes untouched",
            backends: &[(LOCAL, true)],
            local: false,
            ranges: &[],
            input: || {
                Pkt {
                    frag: 0x00b9,
                    ..Pkt::tcp(CLIENT, 40008, NODE, NODE_PORT, ACK)
                }
                .build()
            },
            expect: Expect::Untouched,
        },
    ];
    for case in &cases {
        eprintln!("case: {}", case.name);
        let mut dp = load();
        let backends: Vec<BackendAddr> =
            case.backends.iter().map(|(a, l)| backend(a, *l)).collect();
        program(&mut dp, NODE, NODE_PORT, &backends, case.local, case.ranges);
        let input = (case.input)();
        let (verdict, out) = xdp(&dp, &input);
        match &case.expect {
            Expect::Untouched => {
                assert_eq!((verdict, &out), (XDP_PASS, &input), "{}", case.name);
                assert!(dp.conntrack_entries().unwrap().is_empty(), "{}", case.name);
            }
            Expect::Dropped(reason) => {
                assert_eq!(verdict, XDP_DROP, "{}", case.name);
                assert_eq!(drops(&dp, *reason), 1, "{}", case.name);
            }
            Expect::Refused => {
                assert_eq!(verdict, XDP_TX, "{}: sent back out", case.name);
                let (before, rst) = (parse_checked(&input), parse_checked(&out));
                assert_eq!(
                    (rst.src, rst.sport, rst.dst, rst.dport, rst.tcp_flags),
                    (
                        before.dst,
                        before.dport,
                        before.src,
                        before.sport,
                        RST | ACK
                    ),
                    "{}",
                    case.name
                );
                assert_eq!(
                    (rst.eth_dst, rst.eth_src),
                    (before.eth_src, before.eth_dst),
                    "{}",
                    case.name
                );
                assert_eq!(drops(&dp, DropReason::NoBackend), 1, "{}", case.name);
            }
            Expect::Dnat(to) => {
                let before = parse_checked(&input);
                let after = translated(verdict, &out);
                assert_eq!(
                    verdict, XDP_PASS,
                    "{}: a local backend is the kernel's to deliver",
                    case.name
                );
                assert_eq!((after.dst, after.dport), (ip(to), 8080), "{}", case.name);
                assert_eq!(
                    (after.src, after.sport),
                    (before.src, before.sport),
                    "{}",
                    case.name
                );
            }
            Expect::DnatSnat(to) => {
                let after = translated(verdict, &out);
                assert_eq!((after.dst, after.dport), (ip(to), 8080), "{}", case.name);
                assert_eq!(after.src, ip(NODE), "{}: source is the node", case.name);
                assert!(
                    (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&after.sport),
                    "{}: source port {} outside the SNAT range",
                    case.name,
                    after.sport
                );
                let (ct, claims) = (dp.conntrack_entries().unwrap(), dp.snat_entries().unwrap());
                assert_eq!(
                    (ct.len(), claims.len()),
                    (1, 1),
                    "{}: the forward entry and the port's claim",
                    case.name
                );
                assert!(
                    ct.iter()
                        .chain(&claims)
                        .all(|(_, v)| v.flags & CT_FLAG_SNAT != 0),
                    "{}",
                    case.name
                );
                assert_eq!(
                    claims[0].0.dport,
                    after.sport.to_be(),
                    "{}: the claim is the port used",
                    case.name
                );
            }
        }
    }
}

#[test]
fn source_nated_flows_keep_their_port_and_replies_go_back_to_the_client() {
    let dp = remote_node_port();
    let syn = Pkt::tcp(CLIENT, 41000, NODE, NODE_PORT, SYN).build();
    let (v, out) = xdp(&dp, &syn);
    let fwd = translated(v, &out);
    for _ in 0..3 {
        let (v, out) = xdp(&dp, &Pkt::tcp(CLIENT, 41000, NODE, NODE_PORT, ACK).build());
        let again = translated(v, &out);
        assert_eq!(
            (again.src, again.sport, again.dst),
            (fwd.src, fwd.sport, fwd.dst)
        );
    }
    // The backend answers the node's address and port; the reply goes back to the client from
    // the NodePort it dialled.
    let reply = Pkt::tcp(REMOTE, 8080, NODE, fwd.sport, SYN | ACK).build();
    let (v, out) = xdp(&dp, &reply);
    let back = translated(v, &out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(NODE), NODE_PORT, ip(CLIENT), 41000)
    );
    // A second client gets another port; the first keeps its own.
    let (v, out) = xdp(
        &dp,
        &Pkt::tcp("192.0.2.51", 41000, NODE, NODE_PORT, SYN).build(),
    );
    let other = translated(v, &out);
    assert_ne!(other.sport, fwd.sport);
    assert_eq!(dp.snat_entries().unwrap().len(), 2, "one claim per client");
}

/// A namespace where the FIB resolves (`kplab::netns::add_routed_uplink`), entered; ext0's
/// ifindex.
fn routed(gateway_mac: &str) -> u32 {
    let ns = Netns::create(format!("kpltest-xdp-{}-routed", std::process::id())).unwrap();
    kplab::netns::add_routed_uplink(ns.name(), gateway_mac).unwrap();
    netns::enter(ns.name()).unwrap();
    // SAFETY: a NUL-terminated name; looked up in this thread's namespace.
    let ifindex = unsafe { libc::if_nametoindex(c"ext0".as_ptr()) };
    assert_ne!(ifindex, 0, "ext0 in the test's namespace");
    ifindex
}

fn ip_cmd(args: &str) {
    let ok = std::process::Command::new("ip")
        .args(args.split(' '))
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip {args}");
}

/// One XDP run as if the frame arrived on `ifindex`.
fn xdp_on(dp: &Datapath, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    // `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp
        .xdp_program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&md),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

#[test]
fn source_nated_flows_go_back_out_from_xdp_to_the_next_hop_which_each_flow_keeps() {
    let ifindex = routed("02:00:00:00:00:01");
    let own_mac = [2, 0, 0, 0, 0, 0xaa];
    let mut dp = Datapath::load().expect("load eBPF object");
    dp.set_snat(ip(NODE), SNAT_PORTS).unwrap();
    program(
        &mut dp,
        NODE,
        NODE_PORT,
        &[backend(REMOTE, false)],
        false,
        &[],
    );
    let sent = |dp: &Datapath, frame: &[u8], gateway: [u8; 6]| {
        let (v, out) = xdp_on(dp, ifindex, frame);
        assert_eq!(v, XDP_TX, "sent back out from XDP");
        assert_eq!(&out[..6], &gateway, "to the next hop");
        assert_eq!(&out[6..12], &own_mac, "from the interface");
        assert_eq!(out[22], frame[22] - 1, "TTL decremented");
        parse_checked(&out)
    };
    let old = [2, 0, 0, 0, 0, 1];
    let fwd = sent(
        &dp,
        &Pkt::tcp(CLIENT, 43000, NODE, NODE_PORT, SYN).build(),
        old,
    );
    assert_eq!((fwd.src, fwd.dst), (ip(NODE), ip(REMOTE)));
    let reply = Pkt::tcp(REMOTE, 8080, NODE, fwd.sport, SYN | ACK).build();
    let back = sent(&dp, &reply, old);
    assert_eq!(
        (back.src, back.dst, back.dport),
        (ip(NODE), ip(CLIENT), 43000)
    );
    // The gateway changes its MAC: each flow asks the FIB again when its entry is refreshed (at
    // most a second later), and sends to the new one.
    ip_cmd("neigh replace 172.31.0.1 lladdr 02:00:00:00:00:02 dev ext0 nud permanent");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    dp.tick_clock().unwrap();
    let new = [2, 0, 0, 0, 0, 2];
    sent(
        &dp,
        &Pkt::tcp(CLIENT, 43000, NODE, NODE_PORT, ACK).build(),
        new,
    );
    sent(&dp, &reply, new);
}

/// `NODE:NODE_PORT` with one remote backend (source-NATed), on a node with `SNAT_PORTS`.
fn remote_node_port() -> Datapath {
    let mut dp = load();
    program(
        &mut dp,
        NODE,
        NODE_PORT,
        &[backend(REMOTE, false)],
        false,
        &[],
    );
    dp
}

/// The same on a node with a single source-NAT port, 61000.
fn one_port_node() -> Datapath {
    let mut dp = remote_node_port();
    dp.set_snat(ip(NODE), (61000, 61000)).unwrap();
    dp
}

#[test]
fn a_source_nat_port_claimed_by_another_client_drops_the_old_flow_never_misdelivers() {
    let mut dp = one_port_node();
    let first = Pkt::tcp(CLIENT, 44000, NODE, NODE_PORT, SYN).build();
    let (v, out) = xdp(&dp, &first);
    assert_eq!(translated(v, &out).sport, 61000);
    // The claim is swept (as for a flow idle past its lifetime) and another client takes the
    // only port.
    let (claim, _) = dp.snat_entries().unwrap()[0];
    dp.remove_tracked(CtTable::Snat, &claim).unwrap();
    let (v, out) = xdp(
        &dp,
        &Pkt::tcp("192.0.2.51", 44000, NODE, NODE_PORT, SYN).build(),
    );
    assert_eq!(translated(v, &out).sport, 61000);
    // The first client's next packet after its entry's refresh finds the port is not its own.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    dp.tick_clock().unwrap();
    let (v, _) = xdp(&dp, &Pkt::tcp(CLIENT, 44000, NODE, NODE_PORT, ACK).build());
    assert_eq!(v, XDP_DROP);
    assert_eq!(drops(&dp, DropReason::SnatFailed), 1);
    // And the port's replies still reach the client that holds it.
    let (v, out) = xdp(&dp, &Pkt::tcp(REMOTE, 8080, NODE, 61000, ACK).build());
    let back = translated(v, &out);
    assert_eq!(back.dst, ip("192.0.2.51"));
}

#[test]
fn the_sweep_frees_closed_flows_and_orphaned_claims_and_keeps_live_ones() {
    let mut dp = remote_node_port();
    let now = monotonic_ns();
    let s = 1_000_000_000;
    // A closed 30 s ago (TCP after FIN/RST lives 10 s): its entry and its claim go.
    dp.set_clock(now - 30 * s).unwrap();
    for flags in [SYN, ACK | FIN] {
        let (v, out) = xdp(
            &dp,
            &Pkt::tcp(CLIENT, 45000, NODE, NODE_PORT, flags).build(),
        );
        translated(v, &out);
    }
    // B opened 20 s ago, its forward entry since evicted: its claim is an orphan past the
    // closing lifetime, though an open connection's would be 6 h.
    dp.set_clock(now - 20 * s).unwrap();
    let (v, out) = xdp(&dp, &Pkt::tcp(CLIENT, 45001, NODE, NODE_PORT, SYN).build());
    translated(v, &out);
    let (forward_b, _) = *dp
        .conntrack_entries()
        .unwrap()
        .iter()
        .find(|(k, _)| k.sport == 45001u16.to_be())
        .unwrap();
    dp.remove_tracked(CtTable::Conntrack, &forward_b).unwrap();
    // C is live.
    dp.set_clock(now).unwrap();
    let (v, out) = xdp(&dp, &Pkt::tcp(CLIENT, 45002, NODE, NODE_PORT, SYN).build());
    translated(v, &out);
    assert_eq!(
        (
            dp.conntrack_entries().unwrap().len(),
            dp.snat_entries().unwrap().len()
        ),
        (2, 3)
    );

    let mut agent = Agent::new("n1".into(), dp, NodePortAddresses::Primary);
    agent.gc_conntrack();
    let maps = agent.status().maps;
    assert_eq!(maps["CONNTRACK_V3"].entries, 1, "C's forward entry");
    assert_eq!(maps["SNAT_V1"].entries, 1, "C's claim");
}

#[test]
fn source_nat_exhaustion_is_a_counted_drop_and_an_unconfigured_node_nats_nothing() {
    let dp = one_port_node();
    let (v, out) = xdp(&dp, &Pkt::tcp(CLIENT, 42000, NODE, NODE_PORT, SYN).build());
    assert_eq!(translated(v, &out).sport, 61000);
    let (v, _) = xdp(&dp, &Pkt::tcp(CLIENT, 42001, NODE, NODE_PORT, SYN).build());
    assert_eq!(
        v, XDP_DROP,
        "one port, taken: the second flow cannot be told apart"
    );
    assert_eq!(drops(&dp, DropReason::SnatFailed), 1);

    let mut dp = Datapath::load().unwrap();
    program(
        &mut dp,
        NODE,
        NODE_PORT,
        &[backend(REMOTE, false)],
        false,
        &[],
    );
    let (v, _) = xdp(&dp, &Pkt::tcp(CLIENT, 42002, NODE, NODE_PORT, SYN).build());
    assert_eq!(v, XDP_DROP, "no SNAT address yet");
    assert_eq!(drops(&dp, DropReason::SnatFailed), 1);
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let mut dp = load();
    program(
        &mut dp,
        LB_IP,
        80,
        &[backend(LOCAL, true)],
        false,
        &["192.0.2.0/28", "203.0.113.7/32"],
    );
    for (client, admitted) in [
        ("192.0.2.1", true),
        ("192.0.2.15", true),
        ("203.0.113.7", true),
        ("192.0.2.16", false),
        ("203.0.113.8", false),
    ] {
        let (v, out) = xdp(&dp, &Pkt::tcp(client, 43000, LB_IP, 80, SYN).build());
        if admitted {
            assert_eq!(translated(v, &out).dst, ip(LOCAL), "{client}");
        } else {
            assert_eq!(v, XDP_DROP, "{client}");
        }
    }
    assert_eq!(drops(&dp, DropReason::SourceRange), 2);
    // Pods are held to the ranges too (the cluster scope header carries them).
    let (v, _) = tc(
        &dp,
        prog_names::FROM_POD,
        &Pkt::tcp("10.244.1.99", 43001, LB_IP, 80, SYN).build(),
    );
    assert_eq!(v, 2, "TC_ACT_SHOT");
    assert_eq!(drops(&dp, DropReason::SourceRange), 3);
}

#[test]
fn a_local_backends_reply_leaves_with_the_frontend_as_source() {
    let mut dp = load();
    program(
        &mut dp,
        NODE,
        NODE_PORT,
        &[backend(LOCAL, true)],
        false,
        &[],
    );
    let (v, out) = xdp(&dp, &Pkt::tcp(CLIENT, 44000, NODE, NODE_PORT, SYN).build());
    assert_eq!(translated(v, &out).dst, ip(LOCAL));
    let (v, out) = to_external(
        &dp,
        &Pkt::tcp(LOCAL, 8080, CLIENT, 44000, SYN | ACK).build(),
    );
    assert_eq!(v, TC_ACT_OK);
    let back = parse_checked(&out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(NODE), NODE_PORT, ip(CLIENT), 44000)
    );
    // Unrelated traffic leaving the node is untouched.
    let other = Pkt::tcp(LOCAL, 8080, CLIENT, 44999, ACK).build();
    assert_eq!(to_external(&dp, &other), (TC_ACT_OK, other));
}

#[test]
fn icmp_errors_about_external_flows_reach_the_client_quoting_what_it_sent() {
    use dataplane_core::fixtures::packet::{icmp_error, quoted};
    let mut dp = load();
    program_udp(&mut dp, &[udp_backend(REMOTE, false)]);
    let (v, out) = xdp(&dp, &Pkt::udp(CLIENT, 45000, NODE, NODE_PORT).build());
    let snat = translated(v, &out);
    assert_eq!(snat.src, ip(NODE));
    // The remote backend's port unreachable comes to the node's SNAT port.
    let err = icmp_error(REMOTE, NODE, (3, 3), &out);
    let (v, out) = xdp(&dp, &err);
    let back = translated(v, &out);
    let (kind, code, quote) = back.icmp.expect("still ICMP");
    assert_eq!(
        (kind, code, back.src, back.dst),
        (3, 3, ip(NODE), ip(CLIENT))
    );
    assert_eq!(quoted(&quote), (ip(CLIENT), 45000, ip(NODE), NODE_PORT));

    // A local backend's error leaves through to_external, quoting the NodePort.
    let mut dp = load();
    program_udp(&mut dp, &[udp_backend(LOCAL, true)]);
    let (v, out) = xdp(&dp, &Pkt::udp(CLIENT, 45001, NODE, NODE_PORT).build());
    assert_eq!(translated(v, &out).dst, ip(LOCAL));
    let err = icmp_error(LOCAL, CLIENT, (3, 3), &out);
    let (v, out) = to_external(&dp, &err);
    assert_eq!(v, TC_ACT_OK);
    let out = parse_checked(&out);
    assert_eq!(out.src, ip(NODE));
    assert_eq!(
        quoted(&out.icmp.unwrap().2),
        (ip(CLIENT), 45001, ip(NODE), NODE_PORT)
    );
}

#[test]
fn an_endpoint_without_node_name_routed_to_a_local_interface_is_not_source_nated() {
    let mut dp = load();
    // This thread's namespace: forwarding on, and the local pod network on an interface of its
    // own (as a node routes its pods to their veths).
    let sh = |cmd: &str| {
        let st = std::process::Command::new("sh")
            .args(["-c", cmd])
            .status()
            .unwrap();
        assert!(st.success(), "{cmd}");
    };
    sh(
        "ip link set lo up && ip link add pods0 type veth peer name pods1 && ip link set pods1 up && ip link set pods0 up \
        && ip route add 10.244.1.0/24 dev pods0 && sysctl -qw net.ipv4.ip_forward=1 \
        && ip neigh replace 10.244.1.20 lladdr 02:00:00:00:00:20 dev pods0",
    );
    // Neither backend is marked local (no nodeName in the slice).
    program(
        &mut dp,
        NODE,
        NODE_PORT,
        &[backend(LOCAL, false)],
        false,
        &[],
    );
    let (v, out) = xdp(&dp, &Pkt::tcp(CLIENT, 46000, NODE, NODE_PORT, SYN).build());
    let after = translated(v, &out);
    assert_eq!(
        (after.src, after.dst),
        (ip(CLIENT), ip(LOCAL)),
        "routed locally: client kept"
    );
    assert_eq!(v, XDP_PASS);
}

#[test]
fn a_load_balancer_ip_without_endpoints_refuses_udp_with_port_unreachable() {
    let mut dp = load();
    program_udp(&mut dp, &[]);
    let input = Pkt::udp(CLIENT, 45002, NODE, NODE_PORT).build();
    let (v, out) = xdp(&dp, &input);
    assert_eq!(v, XDP_TX, "sent back out");
    let icmp = parse_checked(&out);
    assert_eq!((icmp.src, icmp.dst, icmp.proto), (ip(NODE), ip(CLIENT), 1));
    let (kind, code, quote) = icmp.icmp.unwrap();
    assert_eq!((kind, code), (3, 3), "port unreachable");
    assert_eq!(quote, input[14..14 + 28], "quoting what the client sent");
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_eq!(drops(&dp, DropReason::NoBackend), 1);
}

#[test]
fn a_node_port_without_endpoints_is_left_to_the_kernel_to_refuse() {
    let mut dp = load();
    // NODE is this namespace's own address: nothing listens on the NodePort, so the kernel
    // answers with an RST, as kube-proxy's REJECT would.
    // (A node forwards; the FIB says "not forwarded, local" only where forwarding is on.)
    let st = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("ip link set lo up && ip addr add {NODE}/32 dev lo && sysctl -qw net.ipv4.ip_forward=1"),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    program(&mut dp, NODE, NODE_PORT, &[], false, &[]);
    let syn = Pkt::tcp(CLIENT, 47000, NODE, NODE_PORT, SYN).build();
    assert_eq!(xdp(&dp, &syn), (XDP_PASS, syn), "passed untranslated");
    assert_eq!(drops(&dp, DropReason::NoBackend), 1, "and counted");
}
