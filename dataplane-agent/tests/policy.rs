//! Packet tests of the policy stage through the real kernel (BPF_PROG_TEST_RUN): the core's
//! policy sync writes the real maps from Pods, Namespaces and NetworkPolicies, and crafted
//! packets run through `from_pod` (a pod's egress) and `to_pod` (its ingress). Each verdict is
//! checked against the tables the sync wrote, read the way the datapath reads them. Root only;
//! without it they fail, they never skip.
use aya::TestRun as _;
use aya::TestRunOptions;
use dataplane_agent::datapath::Datapath;
use dataplane_common::{DropReason, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, PROTO_SCTP, prog_names};
use dataplane_core::fixtures::objects::{namespace, network_policy, pod};
use dataplane_core::fixtures::packet::{ACK, Pkt, SYN};
use dataplane_core::index::Index;
use dataplane_core::maps::Op;
use dataplane_core::object::Object;
use dataplane_core::policy_maps::PolicySync;
use dataplane_core::reconcile::MapWriter;
use serde_json::json;

mod common;
use common::{drops, test_run};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const NODE: &str = "node-a";
const WEB: &str = "10.244.1.20";
const CLIENT: &str = "10.244.1.10";
const OTHER: &str = "10.244.1.11";
const DB: &str = "10.244.2.30";
const OUTSIDE: &str = "192.168.50.7";

fn load() -> Datapath {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "policy packet tests load eBPF programs and must run as root"
    );
    Datapath::load()
        .map_err(|e| format!("{e:?}"))
        .expect("load eBPF object")
}

/// prod: web (app=web, port http=8080), client (app=client); dev: other (app=client); db
/// (prod, app=db, on another node). Policies: web admits app=client of its own namespace on
/// its named port; client may reach web on 8080, 10.0.0.0/8 except 10.244.2.0/24 on UDP 53,
/// and db on SCTP 9000; web's egress is open.
fn cluster() -> Index {
    let mut index = Index::default();
    for obj in [
        Object::from(namespace("prod", &[("env", "prod")])),
        Object::from(namespace("dev", &[("env", "dev")])),
        Object::from(pod(
            "prod",
            "web",
            NODE,
            WEB,
            &[("app", "web")],
            json!([{"name": "http", "containerPort": 8080}]),
        )),
        Object::from(pod(
            "prod",
            "client",
            NODE,
            CLIENT,
            &[("app", "client")],
            json!([]),
        )),
        Object::from(pod(
            "dev",
            "other",
            NODE,
            OTHER,
            &[("app", "client")],
            json!([]),
        )),
        Object::from(pod("prod", "db", "node-b", DB, &[("app", "db")], json!([]))),
        Object::from(network_policy(
            "prod",
            "web-ingress",
            json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                             "ports": [{"port": "http"}]}],
            }),
        )),
        Object::from(network_policy(
            "prod",
            "client-egress",
            json!({
                "podSelector": {"matchLabels": {"app": "client"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                     "ports": [{"port": 8080}]},
                    {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.2.0/24"]}}],
                     "ports": [{"protocol": "UDP", "port": 53}]},
                    {"to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                     "ports": [{"protocol": "SCTP", "port": 9000}]},
                ],
            }),
        )),
    ] {
        index.apply(obj);
    }
    index
}

/// A loaded datapath with the cluster's policy written by the core's sync.
fn programmed(index: &Index) -> (Datapath, PolicySync) {
    let mut dp = load();
    let mut sync = PolicySync::new(NODE);
    let report = sync.sync(index, &mut dp);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    (dp, sync)
}

/// Runs `prog` on `frame` as a packet forwarded from another interface (`ingress_ifindex` set,
/// so `to_pod` does not take it for the node's own or for one it bounced itself).
fn run(dp: &Datapath, prog: &str, frame: &[u8]) -> u32 {
    let mut ctx = [0u8; 192];
    // struct __sk_buff: ingress_ifindex at offset 36.
    ctx[36..40].copy_from_slice(&7u32.to_ne_bytes());
    let program = dp.program(prog).unwrap();
    test_run(frame, |o| {
        program.test_run(TestRunOptions {
            ctx_in: Some(&ctx),
            ..o
        })
    })
    .0
}

fn sctp(src: &str, sport: u16, dst: &str, dport: u16) -> Pkt {
    // The common header's ports are where TCP's and UDP's are; the rest is not read.
    Pkt {
        proto: PROTO_SCTP,
        ..Pkt::udp(src, sport, dst, dport)
    }
}

struct Case {
    name: &'static str,
    /// `from_pod` (the sender's egress) or `to_pod` (the receiver's ingress).
    prog: &'static str,
    pkt: Pkt,
    /// The drop reason, or `None` for a pass.
    denied: Option<DropReason>,
}

fn cases() -> Vec<Case> {
    use DropReason::{PolicyEgress, PolicyIngress};
    let to = prog_names::TO_POD;
    let from = prog_names::FROM_POD;
    let case = |name, prog, pkt, denied| Case {
        name,
        prog,
        pkt,
        denied,
    };
    vec![
        case(
            "ingress: selected peer on the named port",
            to,
            Pkt::tcp(CLIENT, 40000, WEB, 8080, SYN),
            None,
        ),
        case(
            "ingress: same labels, other namespace",
            to,
            Pkt::tcp(OTHER, 40001, WEB, 8080, SYN),
            Some(PolicyIngress),
        ),
        case(
            "ingress: selected peer, another port",
            to,
            Pkt::tcp(CLIENT, 40002, WEB, 9090, SYN),
            Some(PolicyIngress),
        ),
        case(
            "ingress: the named port is TCP only",
            to,
            Pkt::udp(CLIENT, 40003, WEB, 8080),
            Some(PolicyIngress),
        ),
        case(
            "ingress: from outside the cluster",
            to,
            Pkt::tcp(OUTSIDE, 40004, WEB, 8080, SYN),
            Some(PolicyIngress),
        ),
        case(
            "ingress: a pod not selected by any policy",
            to,
            Pkt::tcp(OTHER, 40005, CLIENT, 22, SYN),
            None,
        ),
        case(
            "egress: to web on 8080",
            from,
            Pkt::tcp(CLIENT, 40010, WEB, 8080, SYN),
            None,
        ),
        case(
            "egress: to web on another port",
            from,
            Pkt::tcp(CLIENT, 40011, WEB, 80, SYN),
            Some(PolicyEgress),
        ),
        case(
            "egress: ipBlock UDP 53",
            from,
            Pkt::udp(CLIENT, 40012, "10.9.9.9", 53),
            None,
        ),
        case(
            "egress: ipBlock, TCP 53 not listed",
            from,
            Pkt::tcp(CLIENT, 40013, "10.9.9.9", 53, SYN),
            Some(PolicyEgress),
        ),
        case(
            "egress: ipBlock except",
            from,
            Pkt::udp(CLIENT, 40014, "10.244.2.99", 53),
            Some(PolicyEgress),
        ),
        case(
            "egress: outside the ipBlock",
            from,
            Pkt::udp(CLIENT, 40015, OUTSIDE, 53),
            Some(PolicyEgress),
        ),
        case(
            "egress: a pod whose egress is open",
            from,
            Pkt::tcp(WEB, 40016, OUTSIDE, 443, SYN),
            None,
        ),
        case(
            "egress: SCTP to db on 9000",
            from,
            sctp(CLIENT, 40017, DB, 9000),
            None,
        ),
        case(
            "egress: SCTP to db on 9001",
            from,
            sctp(CLIENT, 40018, DB, 9001),
            Some(PolicyEgress),
        ),
        case(
            "egress: TCP to db on 9000 (the rule is SCTP)",
            from,
            Pkt::tcp(CLIENT, 40019, DB, 9000, SYN),
            Some(PolicyEgress),
        ),
        case(
            "egress: a non-first fragment has no ports",
            from,
            Pkt {
                frag: 0x0010,
                ..Pkt::udp(CLIENT, 40020, "10.9.9.9", 53)
            },
            Some(PolicyEgress),
        ),
        case(
            "ingress: a non-first fragment has no ports",
            to,
            Pkt {
                frag: 0x0010,
                ..Pkt::tcp(CLIENT, 40021, WEB, 8080, SYN)
            },
            Some(PolicyIngress),
        ),
        case(
            "ingress: ICMP echo (rules with ports only)",
            to,
            Pkt {
                proto: 1,
                ..Pkt::udp(CLIENT, 0, WEB, 0)
            },
            Some(PolicyIngress),
        ),
    ]
}

#[test]
fn each_rule_kind_allows_and_denies_as_the_compiled_tables_say() {
    let index = cluster();
    let (dp, sync) = programmed(&index);
    for case in cases() {
        let frame = case.pkt.build();
        let before = case.denied.map(|r| drops(&dp, r));
        let verdict = run(&dp, case.prog, &frame);
        let want = if case.denied.is_some() {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        };
        assert_eq!(verdict, want, "{}", case.name);
        if let (Some(reason), Some(before)) = (case.denied, before) {
            assert_eq!(drops(&dp, reason), before + 1, "{}: counted", case.name);
        }
        // The verdict is the one the written tables give (first fragments and TCP/UDP/SCTP).
        if case.pkt.frag & 0x1fff == 0 && case.pkt.proto != 1 {
            let (local, dir, peer) = if case.prog == prog_names::FROM_POD {
                (case.pkt.src, POLICY_DIR_EGRESS, case.pkt.dst)
            } else {
                (case.pkt.dst, POLICY_DIR_INGRESS, case.pkt.src)
            };
            let table = sync
                .programmed()
                .verdict(local, dir, peer, case.pkt.proto, case.pkt.dport);
            assert_eq!(
                table.is_none_or(|v| v.is_ok()),
                case.denied.is_none(),
                "{}: the tables say {table:?}",
                case.name
            );
        }
    }
}

#[test]
fn replies_of_admitted_flows_pass_both_ways_and_unknown_segments_do_not() {
    let index = cluster();
    let (dp, _) = programmed(&index);
    // client -> web:8080 admitted on web's ingress; web's reply passes its from_pod.
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(CLIENT, 41000, WEB, 8080, SYN).build()
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(
            &dp,
            prog_names::FROM_POD,
            &Pkt::tcp(WEB, 8080, CLIENT, 41000, SYN | ACK).build()
        ),
        TC_ACT_OK
    );
    // client's own egress to web, and web's reply into client (client's ingress is open, but
    // the reply must also pass client's to_pod as the reply of its egress flow).
    assert_eq!(
        run(
            &dp,
            prog_names::FROM_POD,
            &Pkt::tcp(CLIENT, 41001, "10.9.9.9", 53, SYN).build()
        ),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(
            &dp,
            prog_names::FROM_POD,
            &Pkt::udp(CLIENT, 41002, "10.9.9.9", 53).build()
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::udp("10.9.9.9", 53, CLIENT, 41002).build()
        ),
        TC_ACT_OK
    );
    // A denied peer's mid-stream segment is not a reply of anything web opened (web's egress
    // is open, so it would pass as one): its ingress is judged, and other is not admitted.
    let mut stray = Pkt::tcp(OTHER, 41003, WEB, 8080, ACK);
    stray.ack = 5;
    assert_eq!(
        run(&dp, prog_names::TO_POD, &stray.build()),
        TC_ACT_OK,
        "web's egress admits the reverse flow, so this is taken as a reply"
    );
    // ... but a SYN from the same peer is judged as a new connection and denied.
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(OTHER, 41004, WEB, 8080, SYN).build()
        ),
        TC_ACT_SHOT
    );
    // A truncated header towards web never passes.
    let mut cut = Pkt::tcp(OTHER, 41005, WEB, 8080, SYN).build();
    cut.truncate(14 + 20 + 10);
    assert_eq!(run(&dp, prog_names::TO_POD, &cut), TC_ACT_SHOT);
}

#[test]
fn a_policy_change_cuts_the_established_flows_it_no_longer_allows() {
    let mut index = cluster();
    let (mut dp, mut sync) = programmed(&index);
    let syn = Pkt::tcp(CLIENT, 42000, WEB, 8080, SYN).build();
    let mut ack = Pkt::tcp(CLIENT, 42000, WEB, 8080, ACK);
    ack.seq = 1001;
    let ack = ack.build();
    assert_eq!(run(&dp, prog_names::TO_POD, &syn), TC_ACT_OK);
    assert_eq!(run(&dp, prog_names::TO_POD, &ack), TC_ACT_OK);
    // An unrelated change keeps the flow (judged again, still admitted).
    index.apply(Object::from(pod(
        "prod",
        "new",
        NODE,
        "10.244.1.40",
        &[("app", "x")],
        json!([]),
    )));
    sync.sync(&index, &mut dp);
    assert_eq!(run(&dp, prog_names::TO_POD, &ack), TC_ACT_OK);
    // client's label changes: web no longer admits it, and the open connection is cut.
    index.apply(Object::from(pod(
        "prod",
        "client",
        NODE,
        CLIENT,
        &[("app", "gone")],
        json!([]),
    )));
    let report = sync.sync(&index, &mut dp);
    assert!(report.ops > 0);
    assert_eq!(run(&dp, prog_names::TO_POD, &ack), TC_ACT_SHOT);
    // Deleting web's policy opens web again.
    index.delete(&dataplane_core::object::ObjectKey {
        kind: dataplane_core::object::Kind::NetworkPolicy,
        namespace: "prod".into(),
        name: "web-ingress".into(),
    });
    sync.sync(&index, &mut dp);
    assert_eq!(run(&dp, prog_names::TO_POD, &ack), TC_ACT_OK);
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(OTHER, 42001, WEB, 9999, SYN).build()
        ),
        TC_ACT_OK
    );
}

/// A map that refuses policy rules (as a full `POLICY` trie does): the pods whose rules could
/// not be written are denied whole, never left half-enforced.
struct RulesFull<'a>(&'a mut Datapath);

impl MapWriter for RulesFull<'_> {
    fn write(&mut self, op: &Op) -> anyhow::Result<()> {
        if matches!(op, Op::UpsertPolicyRule(..)) {
            anyhow::bail!("no space left in POLICY_V1");
        }
        self.0.write(op)
    }
}

#[test]
fn a_policy_that_does_not_fit_the_maps_fails_closed() {
    let index = cluster();
    let mut dp = load();
    let mut sync = PolicySync::new(NODE);
    let report = sync.sync(&index, &mut RulesFull(&mut dp));
    assert!(!report.failures.is_empty());
    let before = drops(&dp, DropReason::PolicyFailClosed);
    // What the policy allows is denied too, and counted as fail-closed.
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(CLIENT, 43000, WEB, 8080, SYN).build()
        ),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(
            &dp,
            prog_names::FROM_POD,
            &Pkt::tcp(CLIENT, 43001, WEB, 8080, SYN).build()
        ),
        TC_ACT_SHOT
    );
    assert_eq!(drops(&dp, DropReason::PolicyFailClosed), before + 2);
    // A pod no policy selects is unaffected.
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(WEB, 43002, OTHER, 22, SYN).build()
        ),
        TC_ACT_OK
    );
    // Once the writes succeed, the policy is enforced as written.
    let report = sync.sync(&index, &mut dp);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(CLIENT, 43003, WEB, 8080, SYN).build()
        ),
        TC_ACT_OK
    );
    assert_eq!(
        run(
            &dp,
            prog_names::TO_POD,
            &Pkt::tcp(OTHER, 43004, WEB, 8080, SYN).build()
        ),
        TC_ACT_SHOT
    );
}
