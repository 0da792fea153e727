//! Packet tests of both TC programs through the real kernel (BPF_PROG_TEST_RUN), as a table:
//! map contents, input packet, expected verdict, expected output packet and map side effects.
//! They need root; without it they fail, they never skip.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::TestRun as _;
use dataplane_agent::datapath::Datapath;
use dataplane_common::{CT_DIR_REPLY, CT_DIR_SERVICE, DropReason, prog_names};
use dataplane_core::fixtures::packet::{
    self, ACK, FIN, Parsed, Pkt, RST, SYN, TCP, UDP, parse_checked,
};
use dataplane_core::maps::{MapState, backend_value, diff, service_entries};
use dataplane_core::reconcile::MapWriter as _;
use dataplane_core::translate::{BackendAddr, Frontend, FrontendSpec, Proto};

mod common;
use common::{drops, test_run};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: &str = "10.244.1.10";
const VIP: &str = "10.96.0.10";
const BACKEND_A: &str = "10.244.1.20";
const BACKEND_B: &str = "10.244.2.30";

fn load() -> Datapath {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "packet tests load eBPF programs and must run as root"
    );
    Datapath::load()
        .map_err(|e| format!("{e:?}"))
        .expect("load eBPF object")
}

/// Programs one frontend with the given backends (ids 1..) under reverse-NAT id 7, laid out by
/// the core's own [`service_entries`] and written in the core's diff order.
fn add_service(dp: &mut Datapath, vip: &str, port: u16, proto: Proto, backends: &[(&str, u16)]) {
    let fe = Frontend {
        addr: vip.parse().unwrap(),
        port,
        proto,
    };
    let mut state = MapState::default();
    let mut ids = BTreeMap::new();
    let mut spec = FrontendSpec {
        frontend: fe,
        backends: Vec::new(),
        drop_empty: false,
        external: None,
        source_ranges: Vec::new(),
    };
    for (i, (addr, bport)) in backends.iter().enumerate() {
        let id = u32::from(port) * 100 + i as u32;
        let b = BackendAddr {
            addr: addr.parse().unwrap(),
            port: *bport,
            proto,
            local: false,
        };
        state.backends.insert(id, backend_value(b));
        ids.insert(b, id);
        spec.backends.push(b);
    }
    service_entries(&spec, 7, &ids, &mut state);
    for op in diff(&MapState::default(), &state) {
        dp.write(&op).unwrap();
    }
}

/// Runs one program on one frame; returns the verdict and the output frame.
fn run(dp: &Datapath, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    test_run(frame, |o| dp.program(prog).unwrap().test_run(o))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[derive(Debug)]
enum Expect {
    /// Passed with the frame unchanged.
    Untouched,
    /// Passed with the destination rewritten to one of these (checksums verified).
    Dnat(&'static [(&'static str, u16)]),
    /// Dropped and counted under this reason.
    Dropped(DropReason),
}

/// A service: address, port, protocol and its (address, port) backends.
type ServiceDef = (&'static str, u16, Proto, &'static [(&'static str, u16)]);

struct Case {
    name: &'static str,
    services: &'static [ServiceDef],
    input: fn() -> Vec<u8>,
    expect: Expect,
}

const ONE_TCP: &[ServiceDef] = &[(VIP, 80, Proto::Tcp, &[(BACKEND_A, 8080)])];
const ONE_UDP: &[ServiceDef] = &[(VIP, 53, Proto::Udp, &[(BACKEND_B, 5353)])];

fn truncate(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

#[test]
fn from_pod_table() {
    let cases = [
        Case {
            name: "ARP passes untouched",
            services: ONE_TCP,
            input: || {
                let mut f = vec![0xff; 12];
                f.extend([0x08, 0x06]);
                f.extend([0u8; 28]);
                f
            },
            expect: Expect::Untouched,
        },
        Case {
            name: "TCP SYN to a ClusterIP is translated to its backend",
            services: ONE_TCP,
            input: || Pkt::tcp(CLIENT, 40000, VIP, 80, SYN).build(),
            expect: Expect::Dnat(&[(BACKEND_A, 8080)]),
        },
        Case {
            name: "TCP to the ClusterIP on another port passes untouched",
            services: ONE_TCP,
            input: || Pkt::tcp(CLIENT, 40000, VIP, 81, SYN).build(),
            expect: Expect::Untouched,
        },
        Case {
            name: "UDP to the ClusterIP on the TCP port passes untouched",
            services: ONE_TCP,
            input: || Pkt::udp(CLIENT, 40000, VIP, 80).build(),
            expect: Expect::Untouched,
        },
        Case {
            name: "pod-to-pod TCP passes untouched",
            services: ONE_TCP,
            input: || Pkt::tcp(CLIENT, 40000, BACKEND_A, 8080, SYN).build(),
            expect: Expect::Untouched,
        },
        Case {
            name: "UDP to a ClusterIP is translated",
            services: ONE_UDP,
            input: || Pkt::udp(CLIENT, 40001, VIP, 53).build(),
            expect: Expect::Dnat(&[(BACKEND_B, 5353)]),
        },
        Case {
            name: "UDP with checksum 0 is translated and keeps checksum 0",
            services: ONE_UDP,
            input: || {
                Pkt {
                    udp_zero_csum: true,
                    ..Pkt::udp(CLIENT, 40002, VIP, 53)
                }
                .build()
            },
            expect: Expect::Dnat(&[(BACKEND_B, 5353)]),
        },
        Case {
            name: "IP options: the L4 header is found after them",
            services: ONE_TCP,
            input: || {
                Pkt {
                    ip_options: vec![0x94, 0x04, 0, 0],
                    ..Pkt::tcp(CLIENT, 40003, VIP, 80, SYN)
                }
                .build()
            },
            expect: Expect::Dnat(&[(BACKEND_A, 8080)]),
        },
        Case {
            name: "non-first fragment passes untouched",
            services: ONE_UDP,
            input: || {
                Pkt {
                    frag: 0x00b9,
                    ..Pkt::udp(CLIENT, 40004, VIP, 53)
                }
                .build()
            },
            expect: Expect::Untouched,
        },
        Case {
            name: "first fragment (MF set) passes untouched",
            services: ONE_UDP,
            input: || {
                Pkt {
                    frag: 0x2000,
                    ..Pkt::udp(CLIENT, 40005, VIP, 53)
                }
                .build()
            },
            expect: Expect::Untouched,
        },
        Case {
            name: "truncated TCP header is dropped",
            services: ONE_TCP,
            input: || {
                let f = Pkt::tcp(CLIENT, 40006, VIP, 80, SYN).build();
                let mut f = truncate(f, 14 + 20 + 10);
                f[16..18].copy_from_slice(&30u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than an IPv4 header, so the
            // shortest frame that reaches the program is a bare header.
            name: "IPv4 header without its TCP header is dropped",
            services: ONE_TCP,
            input: || {
                let mut f = truncate(Pkt::tcp(CLIENT, 40007, VIP, 80, SYN).build(), 14 + 20);
                f[16..18].copy_from_slice(&20u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            name: "IHL below 5 is dropped",
            services: ONE_TCP,
            input: || {
                let mut f = Pkt::tcp(CLIENT, 40008, VIP, 80, SYN).build();
                f[14] = 0x44;
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            name: "IHL beyond the packet is dropped",
            services: ONE_TCP,
            input: || {
                let mut f = truncate(Pkt::tcp(CLIENT, 40009, VIP, 80, SYN).build(), 14 + 24);
                f[14] = 0x4f;
                f[16..18].copy_from_slice(&24u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            name: "IPv4 total length beyond the frame is dropped",
            services: ONE_TCP,
            input: || {
                let mut f = Pkt::tcp(CLIENT, 40010, VIP, 80, SYN).build();
                f[16..18].copy_from_slice(&1500u16.to_be_bytes());
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            name: "TCP data offset below 5 is dropped",
            services: ONE_TCP,
            input: || {
                let mut f = Pkt::tcp(CLIENT, 40011, VIP, 80, SYN).build();
                f[14 + 20 + 12] = 4 << 4;
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
        Case {
            name: "IP version 6 in an IPv4 frame is dropped",
            services: ONE_TCP,
            input: || {
                let mut f = Pkt::tcp(CLIENT, 40012, VIP, 80, SYN).build();
                f[14] = 0x65;
                f
            },
            expect: Expect::Dropped(DropReason::Malformed),
        },
    ];
    for case in &cases {
        let mut dp = load();
        for (vip, port, proto, backends) in case.services {
            add_service(&mut dp, vip, *port, *proto, backends);
        }
        let input = (case.input)();
        eprintln!("case: {}", case.name);
        let (verdict, out) = run(&dp, prog_names::FROM_POD, &input);
        match &case.expect {
            Expect::Untouched => {
                assert_eq!(verdict, TC_ACT_OK, "{}: verdict", case.name);
                assert_eq!(out, input, "{}: frame changed", case.name);
                assert!(
                    dp.conntrack_entries().unwrap().is_empty(),
                    "{}: conntrack written",
                    case.name
                );
            }
            Expect::Dropped(reason) => {
                assert_eq!(verdict, TC_ACT_SHOT, "{}: verdict", case.name);
                assert_eq!(drops(&dp, *reason), 1, "{}: drop counter", case.name);
            }
            Expect::Dnat(backends) => {
                assert_eq!(verdict, TC_ACT_OK, "{}: verdict", case.name);
                let before = parse_checked(&input);
                let after = parse_checked(&out);
                assert!(
                    backends
                        .iter()
                        .any(|(a, p)| after.dst == ip(a) && after.dport == *p),
                    "{}: translated to {}:{}",
                    case.name,
                    after.dst,
                    after.dport
                );
                assert_eq!(
                    (after.src, after.sport),
                    (before.src, before.sport),
                    "{}: source kept",
                    case.name
                );
                if before.proto == UDP && before.udp_csum == 0 {
                    assert_eq!(
                        after.udp_csum, 0,
                        "{}: zero UDP checksum must stay zero",
                        case.name
                    );
                }
                let ct = dp.conntrack_entries().unwrap();
                assert_eq!(
                    ct.len(),
                    2,
                    "{}: one conntrack entry per direction",
                    case.name
                );
                assert!(ct.iter().any(|(k, _)| k.dir == CT_DIR_SERVICE));
                assert!(ct.iter().any(|(k, v)| k.dir == CT_DIR_REPLY
                    && k.saddr == u32::from_ne_bytes(after.dst.octets())
                    && v.nat_addr == u32::from_ne_bytes(before.dst.octets())));
            }
        }
    }
}

/// Translates a packet from the client and returns where it went.
fn send(dp: &Datapath, p: &Pkt) -> Parsed {
    let (verdict, out) = run(dp, prog_names::FROM_POD, &p.build());
    assert_eq!(verdict, TC_ACT_OK);
    parse_checked(&out)
}

#[test]
fn flows_stick_to_one_backend_and_spread_over_all() {
    let mut dp = load();
    let backends = [(BACKEND_A, 8080), (BACKEND_B, 8080), ("10.244.2.31", 8080)];
    add_service(&mut dp, VIP, 80, Proto::Tcp, &backends);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41000..41060 {
        let first = send(&dp, &Pkt::tcp(CLIENT, sport, VIP, 80, SYN));
        for _ in 0..5 {
            let again = send(&dp, &Pkt::tcp(CLIENT, sport, VIP, 80, ACK));
            assert_eq!(again.dst, first.dst, "flow {sport} changed backend");
        }
        seen.insert(first.dst);
    }
    assert_eq!(seen.len(), 3, "every backend gets flows: {seen:?}");
    let stats = dp.service_stats(7).unwrap();
    assert_eq!(stats.packets, 60 * 6);
}

#[test]
fn replies_are_translated_back_to_the_service_address() {
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(BACKEND_A, 8080)]);
    add_service(&mut dp, VIP, 53, Proto::Udp, &[(BACKEND_B, 5353)]);
    send(&dp, &Pkt::tcp(CLIENT, 42000, VIP, 80, SYN));
    send(&dp, &Pkt::udp(CLIENT, 42001, VIP, 53));

    let reply = Pkt::tcp(BACKEND_A, 8080, CLIENT, 42000, SYN | ACK).build();
    let (verdict, out) = run(&dp, prog_names::TO_POD, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let out = parse_checked(&out);
    assert_eq!(
        (out.src, out.sport, out.dst, out.dport),
        (ip(VIP), 80, ip(CLIENT), 42000)
    );

    let reply = Pkt::udp(BACKEND_B, 5353, CLIENT, 42001).build();
    let out = parse_checked(&run(&dp, prog_names::TO_POD, &reply).1);
    assert_eq!((out.src, out.sport), (ip(VIP), 53));

    let zero = Pkt {
        udp_zero_csum: true,
        ..Pkt::udp(BACKEND_B, 5353, CLIENT, 42001)
    }
    .build();
    let out = parse_checked(&run(&dp, prog_names::TO_POD, &zero).1);
    assert_eq!((out.src, out.sport, out.udp_csum), (ip(VIP), 53, 0));

    // A packet from the backend to another client port is not a reply of a translated flow.
    let other = Pkt::tcp(BACKEND_A, 8080, CLIENT, 42999, ACK).build();
    let (verdict, out) = run(&dp, prog_names::TO_POD, &other);
    assert_eq!((verdict, out), (TC_ACT_OK, other));
}

#[test]
fn established_flows_survive_backend_changes_and_closed_tuples_reselect() {
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(BACKEND_A, 8080)]);
    let first = send(&dp, &Pkt::tcp(CLIENT, 43000, VIP, 80, SYN));
    assert_eq!(first.dst, ip(BACKEND_A));
    // The endpoint is replaced: the open connection stays where it was.
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(BACKEND_B, 8080)]);
    assert_eq!(
        send(&dp, &Pkt::tcp(CLIENT, 43000, VIP, 80, ACK)).dst,
        ip(BACKEND_A)
    );
    // It closes; a new SYN on the same tuple is a new connection and goes to the new backend.
    assert_eq!(
        send(&dp, &Pkt::tcp(CLIENT, 43000, VIP, 80, FIN | ACK)).dst,
        ip(BACKEND_A)
    );
    assert_eq!(
        send(&dp, &Pkt::tcp(CLIENT, 43000, VIP, 80, SYN)).dst,
        ip(BACKEND_B)
    );
}

/// A backend's packet towards the client pod, through `to_pod`.
fn reply(dp: &Datapath, p: &Pkt) -> Parsed {
    let (verdict, out) = run(dp, prog_names::TO_POD, &p.build());
    assert_eq!(verdict, TC_ACT_OK);
    parse_checked(&out)
}

/// The conntrack entries of one client port: (direction, last seen).
fn seen(dp: &Datapath, client_port: u16) -> Vec<(u8, u64)> {
    let port = client_port.to_be();
    let mut v: Vec<_> = dp
        .conntrack_entries()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.sport == port || k.dport == port)
        .map(|(k, v)| (k.dir, v.last_seen_ns))
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn conntrack_entries_carry_the_agents_clock_refreshed_at_most_once_a_second() {
    const S: u64 = 1_000_000_000;
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(BACKEND_A, 8080)]);
    dp.set_clock(100 * S).unwrap();
    send(&dp, &Pkt::tcp(CLIENT, 45000, VIP, 80, SYN));
    let both = |t| vec![(CT_DIR_SERVICE, t), (CT_DIR_REPLY, t)];
    assert_eq!(seen(&dp, 45000), both(100 * S));
    // Within a second of the last refresh: no write.
    dp.set_clock(100 * S + S / 2).unwrap();
    send(&dp, &Pkt::tcp(CLIENT, 45000, VIP, 80, ACK));
    reply(&dp, &Pkt::tcp(BACKEND_A, 8080, CLIENT, 45000, ACK));
    assert_eq!(seen(&dp, 45000), both(100 * S));
    // Later: each direction refreshes its own entry.
    dp.set_clock(102 * S).unwrap();
    send(&dp, &Pkt::tcp(CLIENT, 45000, VIP, 80, ACK));
    assert_eq!(
        seen(&dp, 45000),
        vec![(CT_DIR_SERVICE, 102 * S), (CT_DIR_REPLY, 100 * S)]
    );
    reply(&dp, &Pkt::tcp(BACKEND_A, 8080, CLIENT, 45000, ACK));
    assert_eq!(seen(&dp, 45000), both(102 * S));
}

#[test]
fn a_direct_connection_on_a_reused_tuple_is_not_translated_as_the_old_service_one() {
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(BACKEND_A, 8080)]);
    add_service(&mut dp, VIP, 53, Proto::Udp, &[(BACKEND_B, 5353)]);
    send(&dp, &Pkt::tcp(CLIENT, 44000, VIP, 80, SYN));
    send(&dp, &Pkt::udp(CLIENT, 44001, VIP, 53));
    // The same source ports, now straight to the backends' own addresses.
    for (direct, reply) in [
        (
            Pkt::tcp(CLIENT, 44000, BACKEND_A, 8080, SYN),
            Pkt::tcp(BACKEND_A, 8080, CLIENT, 44000, SYN | ACK),
        ),
        (
            Pkt::udp(CLIENT, 44001, BACKEND_B, 5353),
            Pkt::udp(BACKEND_B, 5353, CLIENT, 44001),
        ),
    ] {
        let frame = direct.build();
        assert_eq!(run(&dp, prog_names::FROM_POD, &frame), (TC_ACT_OK, frame));
        let frame = reply.build();
        assert_eq!(
            run(&dp, prog_names::TO_POD, &frame),
            (TC_ACT_OK, frame),
            "the answer keeps the backend's address"
        );
    }
    assert!(
        dp.conntrack_entries().unwrap().is_empty(),
        "the Service connections' entries are gone"
    );
    // A new Service connection from the same port is translated again.
    assert_eq!(
        send(&dp, &Pkt::tcp(CLIENT, 44000, VIP, 80, SYN)).dst,
        ip(BACKEND_A)
    );
}

#[test]
fn service_without_endpoints_rejects_tcp_with_rst() {
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[]);
    let syn = Pkt {
        seq: 5000,
        ..Pkt::tcp(CLIENT, 44000, VIP, 80, SYN)
    };
    let (verdict, out) = run(&dp, prog_names::FROM_POD, &syn.build());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let rst = parse_checked(&out);
    assert_eq!(
        (rst.src, rst.sport, rst.dst, rst.dport),
        (ip(VIP), 80, ip(CLIENT), 44000)
    );
    assert_eq!(rst.tcp_flags, RST | ACK);
    assert_eq!(rst.ack, 5001, "RST acknowledges the SYN");
    assert_eq!(
        (rst.eth_dst, rst.eth_src),
        (packet::CLIENT_MAC, packet::HOST_MAC)
    );
    assert_eq!(out.len(), 54);
    assert_eq!(drops(&dp, DropReason::NoBackend), 1);
    assert!(dp.conntrack_entries().unwrap().is_empty());

    // A segment with ACK set gets RST with seq = its ack number.
    let ack = Pkt {
        ack: 777,
        ..Pkt::tcp(CLIENT, 44001, VIP, 80, ACK)
    };
    let rst = parse_checked(&run(&dp, prog_names::FROM_POD, &ack.build()).1);
    assert_eq!((rst.tcp_flags, rst.seq), (RST, 777));

    // An RST is never answered.
    let (verdict, _) = run(
        &dp,
        prog_names::FROM_POD,
        &Pkt::tcp(CLIENT, 44002, VIP, 80, RST).build(),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
fn service_without_endpoints_rejects_udp_with_icmp_port_unreachable() {
    let mut dp = load();
    add_service(&mut dp, VIP, 53, Proto::Udp, &[]);
    let input = Pkt::udp(CLIENT, 45000, VIP, 53).build();
    let (verdict, out) = run(&dp, prog_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let icmp = parse_checked(&out);
    assert_eq!((icmp.src, icmp.dst, icmp.proto), (ip(VIP), ip(CLIENT), 1));
    let (ty, code, quote) = icmp.icmp.unwrap();
    assert_eq!((ty, code), (3, 3));
    assert_eq!(
        quote,
        input[14..14 + 28],
        "quotes the original IPv4 header and 8 bytes"
    );
    assert_eq!(drops(&dp, DropReason::NoBackend), 1);
}

#[test]
fn tcp_payload_checksums_survive_translation() {
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(BACKEND_A, 8080)]);
    let p = Pkt {
        payload: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ..Pkt::tcp(CLIENT, 46000, VIP, 80, SYN)
    };
    let out = send(&dp, &p);
    assert_eq!((out.dst, out.dport, out.proto), (ip(BACKEND_A), 8080, TCP));
}

#[test]
fn a_pod_reaching_itself_through_a_service_is_hairpinned() {
    let mut dp = load();
    add_service(&mut dp, VIP, 80, Proto::Tcp, &[(CLIENT, 8080)]);
    let hairpin = "169.254.42.1";
    let (verdict, out) = run(
        &dp,
        prog_names::FROM_POD,
        &Pkt::tcp(CLIENT, 47000, VIP, 80, SYN).build(),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent straight back to the pod");
    let fwd = parse_checked(&out);
    assert_eq!(
        (fwd.src, fwd.sport, fwd.dst, fwd.dport),
        (ip(hairpin), 47000, ip(CLIENT), 8080)
    );
    assert_eq!(
        (fwd.eth_dst, fwd.eth_src),
        (packet::CLIENT_MAC, packet::HOST_MAC)
    );

    // The pod answers the hairpin address; the reply comes back as from the service address.
    let reply = Pkt::tcp(CLIENT, 8080, hairpin, 47000, SYN | ACK).build();
    let (verdict, out) = run(&dp, prog_names::FROM_POD, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let back = parse_checked(&out);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (ip(VIP), 80, ip(CLIENT), 47000)
    );

    // Later packets of the connection take the same path.
    let (verdict, out) = run(
        &dp,
        prog_names::FROM_POD,
        &Pkt::tcp(CLIENT, 47000, VIP, 80, ACK).build(),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(parse_checked(&out).src, ip(hairpin));

    // A packet to the hairpin address without a connection passes untouched.
    let stray = Pkt::tcp(CLIENT, 8080, hairpin, 47999, ACK).build();
    assert_eq!(run(&dp, prog_names::FROM_POD, &stray), (TC_ACT_OK, stray));
}

#[test]
fn icmp_errors_about_a_translated_flow_quote_the_service_address() {
    let mut dp = load();
    add_service(&mut dp, VIP, 53, Proto::Udp, &[(BACKEND_B, 5353)]);
    let sent = Pkt::udp(CLIENT, 46000, VIP, 53).build();
    let (_, on_wire) = run(&dp, prog_names::FROM_POD, &sent);
    // The backend's port unreachable, and a router's fragmentation needed, about that datagram.
    for (from, kind, outer_src) in [(BACKEND_B, (3, 3), VIP), ("10.0.0.1", (3, 4), "10.0.0.1")] {
        let err = packet::icmp_error(from, CLIENT, kind, &on_wire);
        let (verdict, out) = run(&dp, prog_names::TO_POD, &err);
        assert_eq!(verdict, TC_ACT_OK);
        let out = parse_checked(&out);
        let (icmp_type, code, quote) = out.icmp.expect("still ICMP");
        assert_eq!((icmp_type, code), kind);
        assert_eq!(out.src, ip(outer_src), "{from}: the error's source");
        assert_eq!(
            packet::quoted(&quote),
            (ip(CLIENT), 46000, ip(VIP), 53),
            "{from}: the quote is what the client sent"
        );
    }
    // An error about a flow nobody translated passes as it is.
    let direct = Pkt::udp(CLIENT, 46001, BACKEND_B, 5353).build();
    let err = packet::icmp_error(BACKEND_B, CLIENT, (3, 3), &direct);
    assert_eq!(run(&dp, prog_names::TO_POD, &err), (TC_ACT_OK, err));
}
