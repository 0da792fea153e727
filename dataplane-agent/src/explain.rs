//! Why a connection is allowed or dropped, answered by the datapath itself, and the flow log.
//!
//! ```text
//!  explain --from ns/pod | ADDR  --to ADDR:PORT/PROTO
//!    a synthetic first packet (source port 1, which no client uses)
//!      -> from_pod (BPF_PROG_TEST_RUN, the loaded program, the live maps): egress + translation
//!      -> to_pod of the translated destination, when it is a pod of this node: ingress
//!    verdicts from the programs' return values and drop counters; the deciding policy from the
//!    verdict events the runs wrote; the conntrack entries the runs created are removed
//!  flow log: every verdict event, with pod and policy names, as text or JSON lines
//! ```
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use dataplane_common::{
    CT_DIR_REPLY, CT_DIR_SERVICE, CtKey, DropReason, POLICY_DIR_INGRESS, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP, PolicyEvent, VERDICT_ALLOWED, VERDICT_DENIED, prog_names,
};
use dataplane_core::object::NsName;
use dataplane_core::pipeline::Pipeline;
use serde::{Deserialize, Serialize};

use crate::datapath::{CtTable, Datapath, FORWARDED_IFINDEX};

/// The source port of explain's synthetic packets: below every ephemeral range, so no real
/// flow shares their tuples.
const EXPLAIN_PORT: u16 = 1;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// What to explain: from a local pod (or an address, for the ingress half only) to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub from: From,
    pub to: SocketAddrV4,
    pub proto: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    Pod(NsName),
    Addr(Ipv4Addr),
}

impl Query {
    /// `from` is `ns/pod` or an IPv4 address; `to` is `ADDR:PORT/PROTO` (tcp, udp or sctp).
    ///
    /// # Errors
    /// Either does not parse.
    pub fn parse(from: &str, to: &str) -> anyhow::Result<Query> {
        let from = match from.parse::<Ipv4Addr>() {
            Ok(a) => From::Addr(a),
            Err(_) => {
                let (namespace, name) = from.split_once('/').with_context(|| {
                    format!("--from {from:?}: expected NAMESPACE/POD or an IPv4 address")
                })?;
                From::Pod(NsName {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
        };
        let (addr, proto) = to
            .split_once('/')
            .with_context(|| format!("--to {to:?}: expected ADDR:PORT/PROTO"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            "sctp" => PROTO_SCTP,
            p => bail!("--to {to:?}: protocol {p:?} is not tcp, udp or sctp"),
        };
        let to = addr
            .parse()
            .with_context(|| format!("--to {to:?}: {addr:?} is not ADDR:PORT"))?;
        Ok(Query { from, to, proto })
    }

    /// From an HTTP query string `from=..&to=..`.
    ///
    /// # Errors
    /// A parameter is missing or does not parse.
    pub fn from_query_string(q: &str) -> anyhow::Result<Query> {
        let mut from = None;
        let mut to = None;
        for pair in q.split('&') {
            match pair.split_once('=') {
                Some(("from", v)) => from = Some(v.to_owned()),
                Some(("to", v)) => to = Some(v.replace("%2F", "/").replace("%2f", "/")),
                _ => {}
            }
        }
        match (from, to) {
            (Some(f), Some(t)) => Query::parse(&f.replace("%2F", "/"), &t),
            _ => bail!("explain needs from=NAMESPACE/POD (or ADDR) and to=ADDR:PORT/PROTO"),
        }
    }
}

/// One half of the answer: what the pod's programs did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verdict {
    /// The pod judged (`ns/name`).
    pub pod: String,
    pub direction: String,
    /// `allowed`, `denied`, or `not enforced` (no policy selects the pod in this direction).
    pub result: String,
    /// The policy that admitted it (`ns/name`); for a denial, why (`policy_ingress`, ..).
    pub policy: Option<String>,
    pub reason: Option<String>,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    pub node: String,
    pub from: String,
    pub to: String,
    pub protocol: String,
    /// Where the datapath sent it: the backend, for a Service address (with its pod's name),
    /// and the same as `ADDR:PORT`.
    pub translated_to: Option<String>,
    pub backend: Option<String>,
    pub verdicts: Vec<Verdict>,
    /// `allow` or `deny` as far as this node decides; `note` says what another node decides.
    pub answer: String,
    pub note: Option<String>,
}

impl Explanation {
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} -> {}/{}: {} (node {})\n",
            self.from, self.to, self.protocol, self.answer, self.node
        );
        if let Some(t) = &self.translated_to {
            out += &format!("  translated to {t}\n");
        }
        for v in &self.verdicts {
            out += &format!("  {} of {}: {}", v.direction, v.pod, v.result);
            if let Some(p) = &v.policy {
                out += &format!(", by NetworkPolicy {p}");
            }
            if let Some(r) = &v.reason {
                out += &format!(" ({r})");
            }
            out += "\n";
        }
        if let Some(n) = &self.note {
            out += &format!("  {n}\n");
        }
        out
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        1 => "icmp",
        _ => "other",
    }
}

/// An Ethernet + IPv4 + first L4 packet: a TCP SYN, or a UDP / SCTP datagram. Checksums are
/// those of the IPv4 header only (the programs never check L4 checksums).
fn frame(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(src.port().to_be_bytes());
    l4.extend(dst.port().to_be_bytes());
    match proto {
        PROTO_TCP => {
            l4.extend([0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
        }
        PROTO_UDP => l4.extend([0, 8, 0, 0]),
        _ => l4.extend([0; 8]),
    }
    let tot_len = 20 + l4.len();
    let mut ip = vec![0x45, 0];
    ip.extend((tot_len as u16).to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, proto, 0, 0]);
    ip.extend(src.ip().octets());
    ip.extend(dst.ip().octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend(ip);
    f.extend(l4);
    f
}

fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    let ip = frame.get(14..34)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let ports = frame.get(14 + ihl..14 + ihl + 4)?;
    Some(SocketAddrV4::new(
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

/// Pods by address, and policy names by id, for events and answers.
pub struct Names<'a> {
    pods: HashMap<Ipv4Addr, &'a NsName>,
    pipeline: &'a Pipeline,
}

impl<'a> Names<'a> {
    #[must_use]
    pub fn new(pipeline: &'a Pipeline) -> Self {
        let pods = pipeline
            .index
            .pods
            .iter()
            .filter(|(_, p)| p.spec.as_ref().is_none_or(|s| s.host_network != Some(true)))
            .filter_map(|(id, p)| {
                let ip = p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
                Some((ip, id))
            })
            .collect();
        Names { pods, pipeline }
    }

    fn pod(&self, addr: Ipv4Addr) -> Option<&'a NsName> {
        self.pods.get(&addr).copied()
    }

    /// `ns/pod (ADDR)` or the address.
    #[must_use]
    pub fn addr(&self, addr: Ipv4Addr) -> String {
        self.pod(addr)
            .map_or_else(|| addr.to_string(), |p| format!("{p} ({addr})"))
    }

    fn policy(&self, id: u32) -> Option<String> {
        self.pipeline
            .reconciler
            .policy()?
            .policy_name(id)
            .map(ToString::to_string)
    }
}

/// One flow log line.
#[derive(Debug, Clone, Serialize)]
pub struct FlowRecord {
    pub time: String,
    pub node: String,
    /// `ingress` or `egress` of `pod`.
    pub direction: &'static str,
    pub pod: String,
    pub src: String,
    pub dst: String,
    pub protocol: &'static str,
    pub verdict: &'static str,
    /// The admitting policy; for a denied flow, none did.
    pub policy: Option<String>,
}

impl FlowRecord {
    #[must_use]
    pub fn of(e: &PolicyEvent, names: &Names, node: &str) -> FlowRecord {
        let local = Ipv4Addr::from(e.local.to_ne_bytes());
        let peer = Ipv4Addr::from(e.peer.to_ne_bytes());
        let (lport, pport) = (u16::from_be(e.local_port), u16::from_be(e.peer_port));
        let ingress = e.dir == POLICY_DIR_INGRESS;
        let (src, dst) = if ingress {
            (
                format!("{}:{pport}", names.addr(peer)),
                format!("{}:{lport}", names.addr(local)),
            )
        } else {
            (
                format!("{}:{lport}", names.addr(local)),
                format!("{}:{pport}", names.addr(peer)),
            )
        };
        FlowRecord {
            time: k8s_openapi::jiff::Timestamp::now().to_string(),
            node: node.to_owned(),
            direction: if ingress { "ingress" } else { "egress" },
            pod: names
                .pod(local)
                .map_or_else(|| local.to_string(), ToString::to_string),
            src,
            dst,
            protocol: proto_name(e.proto),
            verdict: match e.verdict {
                VERDICT_ALLOWED => "allowed",
                VERDICT_DENIED => "denied",
                _ => "denied (fail closed)",
            },
            policy: (e.verdict == VERDICT_ALLOWED)
                .then(|| names.policy(e.policy_id))
                .flatten(),
        }
    }

    #[must_use]
    pub fn render(&self) -> String {
        let why = match (&self.policy, self.verdict) {
            (Some(p), _) => format!("by {p}"),
            (None, "allowed") => String::new(),
            (None, _) => format!("no policy of {} allows it", self.pod),
        };
        format!(
            "{} {} {} -> {} {} {} {} {why}",
            self.time, self.node, self.src, self.dst, self.protocol, self.direction, self.verdict
        )
    }
}

/// How flow log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowLogFormat {
    Human,
    Json,
}

/// The flow log: a file (or standard output for `-`) that every verdict event goes to.
pub struct FlowLog {
    out: Option<Box<dyn std::io::Write + Send>>,
    format: FlowLogFormat,
}

impl FlowLog {
    /// A log that writes nothing.
    #[must_use]
    pub fn disabled() -> FlowLog {
        FlowLog {
            out: None,
            format: FlowLogFormat::Human,
        }
    }

    /// # Errors
    /// The file cannot be opened for appending.
    pub fn open(path: Option<&PathBuf>, format: FlowLogFormat) -> anyhow::Result<FlowLog> {
        let out: Option<Box<dyn std::io::Write + Send>> = match path {
            None => None,
            Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
            Some(p) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening the flow log {}", p.display()))?,
            )),
        };
        Ok(FlowLog { out, format })
    }

    pub fn write(&mut self, records: &[FlowRecord]) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        for r in records {
            let line = match self.format {
                FlowLogFormat::Human => r.render(),
                FlowLogFormat::Json => serde_json::to_string(r).unwrap_or_default(),
            };
            if let Err(e) = writeln!(out, "{line}") {
                tracing::warn!(error = %e, "cannot write the flow log");
                return;
            }
        }
        let _ = out.flush();
    }
}

/// Drains the verdict events into the flow log; the events of explain's synthetic flows (source
/// port [`EXPLAIN_PORT`]) are returned instead.
pub fn drain(
    datapath: &mut Datapath,
    pipeline: &Pipeline,
    node: &str,
    log: &mut FlowLog,
) -> Vec<PolicyEvent> {
    let events = datapath.policy_events();
    if events.is_empty() {
        return events;
    }
    let names = Names::new(pipeline);
    let explain = EXPLAIN_PORT.to_be();
    let (synthetic, real): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|e| e.local_port == explain || e.peer_port == explain);
    let records: Vec<FlowRecord> = real
        .iter()
        .map(|e| FlowRecord::of(e, &names, node))
        .collect();
    log.write(&records);
    synthetic
}

/// Runs the synthetic packet of `q` through this node's programs.
///
/// # Errors
/// The source pod is unknown or not on this node, or a program could not be run.
pub fn explain(
    datapath: &mut Datapath,
    pipeline: &Pipeline,
    node: &str,
    log: &mut FlowLog,
    q: &Query,
) -> anyhow::Result<Explanation> {
    // Earlier events belong to the flow log, not to this answer.
    drain(datapath, pipeline, node, log);
    let names = Names::new(pipeline);
    let (src_addr, src_pod) = match &q.from {
        From::Addr(a) => (*a, None),
        From::Pod(id) => {
            let pod = pipeline
                .index
                .pods
                .get(id)
                .with_context(|| format!("no pod {id}"))?;
            let on = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or("");
            if on != node {
                bail!("pod {id} runs on node {on:?}, not {node}: ask that node's agent");
            }
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("pod {id} has no IPv4 address"))?;
            (ip, Some(id.clone()))
        }
    };
    let src = SocketAddrV4::new(src_addr, EXPLAIN_PORT);
    let mut packet = frame(src, q.to, q.proto);
    let mut verdicts = Vec::new();
    let mut translated = None;
    let mut answer = "allow";
    let mut to = q.to;
    let mut created = vec![(src, q.to)];
    if src_pod.is_some() && *q.to.ip() == src_addr {
        // The kernel loops it back inside the pod's own namespace: nothing judges it, as the
        // API defines (a pod reaching its own address is not subject to policy).
        return Ok(Explanation {
            node: node.to_owned(),
            from: names.addr(src_addr),
            to: q.to.to_string(),
            protocol: proto_name(q.proto).to_owned(),
            translated_to: None,
            backend: None,
            verdicts: Vec::new(),
            answer: "allow".to_owned(),
            note: Some("a pod reaching its own address never leaves it: no policy applies".into()),
        });
    }
    let mut hairpin = false;
    if let Some(pod) = &src_pod {
        let before = datapath.drops()?;
        let run = datapath.test_run_tc(prog_names::FROM_POD, &packet, 0)?;
        let (code, out) = (run.verdict, run.frame);
        let after = datapath.drops()?;
        if let Some(dst) = destination(&out).filter(|d| *d != q.to) {
            translated = Some((names.addr(*dst.ip()) + &format!(":{}", dst.port()), dst));
            to = dst;
            created.push((src, dst));
        }
        let events = drain(datapath, pipeline, node, log);
        let (verdict, passed) = half(
            pod.to_string(),
            "egress",
            code,
            &before,
            &after,
            &events,
            &names,
        );
        verdicts.push(verdict);
        // A pod given itself as a Service's backend: from_pod judged its ingress too.
        hairpin = events
            .iter()
            .any(|e| e.dir == POLICY_DIR_INGRESS && e.local == e.peer);
        if hairpin {
            let (verdict, _) = half(
                pod.to_string(),
                "ingress",
                code,
                &before,
                &after,
                &events,
                &names,
            );
            verdicts.push(verdict);
        }
        if !passed {
            answer = "deny";
        }
        packet = out;
    }
    let local_dst = names.pod(*to.ip()).filter(|p| {
        pipeline
            .index
            .pods
            .get(*p)
            .and_then(|p| p.spec.as_ref()?.node_name.as_deref())
            == Some(node)
    });
    let note = match (answer, local_dst) {
        _ if hairpin => {
            Some("the pod is its own backend: both ends judged at its interface".into())
        }
        ("allow", Some(pod)) => {
            let before = datapath.drops()?;
            let code = datapath
                .test_run_tc(prog_names::TO_POD, &packet, FORWARDED_IFINDEX)?
                .verdict;
            let after = datapath.drops()?;
            let events = drain(datapath, pipeline, node, log);
            let (verdict, passed) = half(
                pod.to_string(),
                "ingress",
                code,
                &before,
                &after,
                &events,
                &names,
            );
            verdicts.push(verdict);
            if !passed {
                answer = "deny";
            }
            None
        }
        ("allow", None) => Some(match names.pod(*to.ip()) {
            Some(p) => format!("{p} is on another node: its ingress is judged there"),
            None => format!(
                "{} is not a pod of the cluster: no ingress policy applies here",
                to.ip()
            ),
        }),
        _ => None,
    };
    for (a, b) in created {
        forget(datapath, a, b, q.proto);
    }
    Ok(Explanation {
        node: node.to_owned(),
        from: src_pod.map_or_else(|| src_addr.to_string(), |p| format!("{p} ({src_addr})")),
        to: q.to.to_string(),
        protocol: proto_name(q.proto).to_owned(),
        translated_to: translated.as_ref().map(|(t, _)| t.clone()),
        backend: translated.map(|(_, d)| d.to_string()),
        verdicts,
        answer: answer.to_owned(),
        note,
    })
}

/// The verdict of one program run: passed or not, and why, from its return value, the drop
/// counters around it and the events it wrote.
fn half(
    pod: String,
    direction: &'static str,
    code: u32,
    before: &[(DropReason, u64)],
    after: &[(DropReason, u64)],
    events: &[PolicyEvent],
    names: &Names,
) -> (Verdict, bool) {
    let passed = code == TC_ACT_OK || code == TC_ACT_REDIRECT;
    let reason = after
        .iter()
        .zip(before)
        .find(|((_, a), (_, b))| a > b)
        .map(|((r, _), _)| r.label());
    let dir = if direction == "ingress" {
        POLICY_DIR_INGRESS
    } else {
        1
    };
    let event = events.iter().rev().find(|e| e.dir == dir);
    // The event says what this direction decided (a hairpin's run decides two); without one,
    // the direction is not enforced, or something other than policy dropped the packet.
    let other_direction = if direction == "ingress" {
        "policy_egress"
    } else {
        "policy_ingress"
    };
    let result = match (event.map(|e| e.verdict), passed) {
        (Some(VERDICT_ALLOWED), _) => "allowed",
        (None, true) => "not enforced",
        // The other direction of a hairpin dropped it.
        (None, false) if reason == Some(other_direction) => "not enforced",
        (Some(_), _) | (None, false) => "denied",
    };
    let passed = passed || result == "allowed";
    let policy = event
        .filter(|e| e.verdict == VERDICT_ALLOWED)
        .and_then(|e| names.policy(e.policy_id));
    (
        Verdict {
            pod,
            direction: direction.to_owned(),
            result: result.to_owned(),
            policy,
            reason: if result == "denied" {
                reason.map(str::to_owned)
            } else {
                None
            },
        },
        passed,
    )
}

/// Removes the conntrack entries a synthetic flow between `a` and `b` may have created.
fn forget(datapath: &mut Datapath, a: SocketAddrV4, b: SocketAddrV4, proto: u8) {
    let key = |s: SocketAddrV4, d: SocketAddrV4, dir| CtKey {
        saddr: u32::from_ne_bytes(s.ip().octets()),
        daddr: u32::from_ne_bytes(d.ip().octets()),
        sport: s.port().to_be(),
        dport: d.port().to_be(),
        proto,
        dir,
        pad: 0,
    };
    for k in [
        key(a, b, CT_DIR_SERVICE),
        key(a, b, CT_DIR_REPLY),
        key(b, a, CT_DIR_SERVICE),
        key(b, a, CT_DIR_REPLY),
    ] {
        let _ = datapath.remove_tracked(CtTable::Conntrack, &k);
    }
}

#[cfg(test)]
mod tests {
    use super::{From, Query};

    #[test]
    fn queries_parse_pods_addresses_and_protocols_and_name_what_is_wrong() {
        let q = Query::parse("prod/web", "10.96.0.10:80/TCP").unwrap();
        assert_eq!(
            q.from,
            From::Pod(dataplane_core::object::NsName {
                namespace: "prod".into(),
                name: "web".into()
            })
        );
        assert_eq!(q.to.to_string(), "10.96.0.10:80");
        assert_eq!(q.proto, 6);
        assert!(matches!(
            Query::parse("172.31.0.100", "10.0.0.1:53/udp")
                .unwrap()
                .from,
            From::Addr(_)
        ));
        let e = Query::parse("web", "10.0.0.1:53/udp")
            .unwrap_err()
            .to_string();
        assert!(e.contains("NAMESPACE/POD"), "{e}");
        let e = Query::parse("a/b", "10.0.0.1:53/icmp")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not tcp, udp or sctp"), "{e}");
        let q = Query::from_query_string("from=a%2Fb&to=10.0.0.1:53%2Fudp").unwrap();
        assert_eq!(q.proto, 17);
    }
}
