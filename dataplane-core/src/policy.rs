//! NetworkPolicy compilation: from Pods, Namespaces and NetworkPolicies to the tables the
//! datapath's policy stage looks up (written by [`crate::policy_maps`]):
//!
//! ```text
//!  peers of every policy (podSelector x namespaceSelector, ipBlock with except)
//!      -> address atoms: every pod IP (/32), and the regions of the ipBlock prefix tree
//!      -> identity per distinct signature {peers the atom is in, named ports it resolves}
//!  identities: prefix -> identity (longest match; 0.0.0.0/0 is the world's region)
//!  endpoints:  local pod IP -> per direction: not isolated, or
//!              {identity (0: any peer), protocol (none: any), port prefix} -> deciding policy
//! ```
//!
//! An identity is the class of addresses that every peer of every policy treats alike, so pods
//! with the same labels in the same namespace share one, and an ipBlock on pod IPs (or an
//! `except` inside another block) is exact: the atoms it splits get identities of their own.
//! Named ports resolve on the destination pod: a local pod's own ports for ingress, the peer's
//! for egress (which is why the ports an atom resolves are part of its signature).
//!
//! Selectors are evaluated on candidates only: the pods of a namespace, or of a `matchLabels`
//! pair (a [`PodIndex`] built once per compile), so the cost follows the pods a selector can
//! match rather than pods x peers.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::net::Cidr;
use crate::object::NsName;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
/// The identity key that matches any peer (a rule with no `from`/`to`).
pub const ANY_PEER: u32 = 0;
/// The namespace label the API server sets on every namespace.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

type Labels = BTreeMap<String, String>;
static NO_LABELS: Labels = BTreeMap::new();
/// An isolated direction's keys, each with the policy that allows it.
pub type Allowed = BTreeMap<RuleKey, NsName>;

/// Why a selector cannot be evaluated (the API server rejects these; a manifest may hold them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown operator {0:?}")]
    Operator(String),
    #[error("operator {0} needs values")]
    NoValues(String),
}

/// Whether `labels` satisfy `sel` (an empty selector matches everything).
///
/// # Errors
/// An operator other than In, NotIn, Exists, DoesNotExist, or In/NotIn without values.
pub fn matches(sel: &LabelSelector, labels: &Labels) -> Result<bool, SelectorError> {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let mut all = by_labels;
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(SelectorError::NoValues(e.operator.clone()));
            }
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(SelectorError::Operator(other.to_owned())),
        };
        all &= ok;
    }
    Ok(all)
}

/// A port range as prefixes: `value`'s top `len` bits match (len 16: one port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPrefix {
    pub value: u16,
    pub len: u8,
}

/// The fewest prefixes that cover `first..=last` exactly.
#[must_use]
pub fn port_prefixes(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push(PortPrefix {
            value: lo as u16,
            len: 16 - size.trailing_zeros() as u8,
        });
        lo += size;
    }
    out
}

/// One allowed (peer class, protocol, ports) of a local pod in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    /// The peer's identity, or [`ANY_PEER`].
    pub identity: u32,
    /// None: every protocol (a rule without ports).
    pub proto: Option<u8>,
    pub port: PortPrefix,
}

/// What a local pod admits in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Direction {
    /// Selected by no policy of this direction: everything passes.
    #[default]
    Open,
    /// Only what a key allows, each with the policy that allows it (the first by namespace/name
    /// when several do).
    Isolated(Allowed),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub ingress: Direction,
    pub egress: Direction,
}

/// Something a policy could not be applied as written; the policy is applied as far as it can be,
/// failing closed (see [`compile`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("{policy}: {what}: {error}")]
    Selector {
        policy: NsName,
        what: &'static str,
        error: SelectorError,
    },
    #[error("{policy}: ipBlock {cidr:?} is not an IPv4 CIDR")]
    Cidr { policy: NsName, cidr: String },
    #[error("{policy}: port {port} is not valid with protocol {protocol}")]
    Port {
        policy: NsName,
        protocol: String,
        port: String,
    },
}

impl PolicyProblem {
    /// The policy it is about.
    #[must_use]
    pub fn policy(&self) -> &NsName {
        match self {
            PolicyProblem::Selector { policy, .. }
            | PolicyProblem::Cidr { policy, .. }
            | PolicyProblem::Port { policy, .. } => policy,
        }
    }
}

/// The compiled tables for one node's pods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Prefix -> identity; an address takes its longest match. 0.0.0.0/0 is always present.
    pub identities: BTreeMap<Cidr, u32>,
    /// Per identity, a digest of what it means (the peers its addresses are in, by where they
    /// are written, and the named ports they resolve): equal across compiles while the meaning
    /// is, so the maps can keep one identity number for it.
    pub stable: BTreeMap<u32, u64>,
    /// This node's pods (by address) and what they admit.
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub problems: Vec<PolicyProblem>,
}

/// A pod as policy sees it.
struct PodView<'a> {
    ns: &'a str,
    labels: &'a Labels,
    ip: Ipv4Addr,
    local: bool,
    /// Named container ports: (name, protocol) -> port.
    named: BTreeMap<(String, u8), u16>,
}

fn proto_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

fn pod_view<'a>(id: &'a NsName, pod: &'a Pod, node: &str) -> Option<PodView<'a>> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let named = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = u16::try_from(p.container_port).ok()?;
            Some((
                (p.name.clone()?, proto_number(p.protocol.as_deref())?),
                port,
            ))
        })
        .collect();
    Some(PodView {
        ns: &id.namespace,
        labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
        ip,
        local: spec.node_name.as_deref() == Some(node),
        named,
    })
}

/// The pods by namespace and by label, to evaluate a selector on the pods it can match only.
struct PodIndex<'a> {
    by_ns: HashMap<&'a str, Vec<usize>>,
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
    all: Vec<usize>,
}

impl<'a> PodIndex<'a> {
    fn build(views: &[PodView<'a>]) -> Self {
        let mut index = PodIndex {
            by_ns: HashMap::new(),
            by_label: HashMap::new(),
            all: (0..views.len()).collect(),
        };
        for (i, v) in views.iter().enumerate() {
            index.by_ns.entry(v.ns).or_default().push(i);
            for (k, val) in v.labels {
                index
                    .by_label
                    .entry((k.as_str(), val.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        index
    }

    /// A superset of the pods `selector` matches, ascending: those with its rarest
    /// `matchLabels` pair, else those of `namespace` when given, else every pod.
    fn candidates<'s>(
        &'s self,
        selector: Option<&'s LabelSelector>,
        namespace: Option<&str>,
    ) -> &'s [usize] {
        let none: &'s [usize] = &[];
        let pairs = selector.and_then(|s| s.match_labels.as_ref());
        let by_label = pairs.and_then(|pairs| {
            pairs
                .iter()
                .map(|(k, v)| {
                    self.by_label
                        .get(&(k.as_str(), v.as_str()))
                        .map_or(none, Vec::as_slice)
                })
                .min_by_key(|pods| pods.len())
        });
        let by_ns = namespace.map(|ns| self.by_ns.get(ns).map_or(none, Vec::as_slice));
        match (by_label, by_ns) {
            (Some(l), Some(n)) if n.len() < l.len() => n,
            (Some(l), _) => l,
            (None, Some(n)) => n,
            (None, None) => &self.all,
        }
    }
}

/// The labels of a namespace: its object's, or (not seen yet) only the name label the API
/// server would have set, so selectors on other labels do not match it.
fn namespace_labels(namespaces: &BTreeMap<String, Namespace>, ns: &str) -> Labels {
    let mut labels = namespaces
        .get(ns)
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels
        .entry(NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| ns.to_owned());
    labels
}

/// A policy peer, resolved: which pods (by index) and which address blocks it contains.
struct Peer {
    pods: BTreeSet<usize>,
    block: Option<(Cidr, Vec<Cidr>)>,
    /// Where it is written (policy, direction, rule, position), hashed: the same peer of the same
    /// policy has the same origin in every compile, whatever else changed.
    origin: u64,
}

/// One rule of one policy: the local pods it applies to, its peers as indexes into the peer list
/// (empty: any peer), its ports (none: every port of every protocol).
struct Rule<'a> {
    policy: &'a NsName,
    ingress: bool,
    targets: Vec<usize>,
    peers: Vec<usize>,
    ports: &'a [NetworkPolicyPort],
}

/// What every peer makes of an address atom: the peers it is in, and the named ports (used by an
/// egress rule) it resolves, as a destination pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Signature {
    peers: Vec<usize>,
    named: Vec<((String, u8), u16)>,
}

/// Compiles every policy for the pods of `node`.
///
/// Problems fail closed: a policy whose podSelector cannot be evaluated isolates every pod of its
/// namespace in its directions and allows nothing; a peer selector that cannot be evaluated, an
/// invalid ipBlock or port matches nothing. Each is reported.
#[must_use]
pub fn compile(
    node: &str,
    pods: &BTreeMap<NsName, Pod>,
    namespaces: &BTreeMap<String, Namespace>,
    policies: &BTreeMap<NsName, NetworkPolicy>,
) -> Compiled {
    let mut problems = Vec::new();
    let views: Vec<PodView> = pods
        .iter()
        .filter_map(|(id, p)| pod_view(id, p, node))
        .collect();
    let index = PodIndex::build(&views);
    let mut peers: Vec<Peer> = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    // Per local pod: isolated for ingress, for egress.
    let mut isolated: BTreeMap<usize, (bool, bool)> = BTreeMap::new();
    for (name, np) in policies {
        let Some(spec) = np.spec.as_ref() else {
            continue;
        };
        let (ingress, egress) = match spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ),
            // The API's default: Ingress, and Egress when there are egress rules.
            _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        };
        let (targets, broken) = select_targets(
            name,
            spec.pod_selector.as_ref(),
            &views,
            &index,
            &mut problems,
        );
        for &i in &targets {
            let e = isolated.entry(i).or_default();
            e.0 |= ingress;
            e.1 |= egress;
        }
        if broken || targets.is_empty() {
            continue;
        }
        let directions = [
            (
                ingress,
                true,
                spec.ingress
                    .iter()
                    .flatten()
                    .map(|r| (r.from.as_deref(), r.ports.as_deref()))
                    .collect::<Vec<_>>(),
            ),
            (
                egress,
                false,
                spec.egress
                    .iter()
                    .flatten()
                    .map(|r| (r.to.as_deref(), r.ports.as_deref()))
                    .collect(),
            ),
        ];
        for (on, is_ingress, dir_rules) in directions {
            if !on {
                continue;
            }
            for (rule_at, (rule_peers, ports)) in dir_rules.into_iter().enumerate() {
                let listed = rule_peers.unwrap_or_default();
                let ids: Vec<usize> = listed
                    .iter()
                    .enumerate()
                    .map(|(peer_at, peer)| {
                        let mut resolved =
                            resolve_peer(name, peer, &views, &index, namespaces, &mut problems);
                        resolved.origin = digest(&(name, is_ingress, rule_at, peer_at));
                        peers.push(resolved);
                        peers.len() - 1
                    })
                    .collect();
                rules.push(Rule {
                    policy: name,
                    ingress: is_ingress,
                    targets: targets.clone(),
                    peers: ids,
                    ports: ports.unwrap_or_default(),
                });
            }
        }
    }

    let identities = Identities::build(&views, &peers, &rules);
    // Per local pod: its ingress and egress keys.
    let mut endpoints: BTreeMap<usize, (Allowed, Allowed)> = BTreeMap::new();
    for rule in &rules {
        let peer_ids: Vec<u32> = if rule.peers.is_empty() {
            vec![ANY_PEER]
        } else {
            identities.containing(&rule.peers)
        };
        for &t in &rule.targets {
            let table = endpoints.entry(t).or_default();
            let table = if rule.ingress {
                &mut table.0
            } else {
                &mut table.1
            };
            for key in rule_keys(rule, &views[t], &peer_ids, &identities, &mut problems) {
                table.entry(key).or_insert_with(|| rule.policy.clone());
            }
        }
    }
    let endpoints = views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.local)
        .map(|(i, v)| {
            let (ing, eg) = isolated.get(&i).copied().unwrap_or_default();
            let mut tables = endpoints.remove(&i).unwrap_or_default();
            let dir = |on: bool, t: &mut Allowed| {
                if on {
                    Direction::Isolated(std::mem::take(t))
                } else {
                    Direction::Open
                }
            };
            (
                v.ip,
                Endpoint {
                    ingress: dir(ing, &mut tables.0),
                    egress: dir(eg, &mut tables.1),
                },
            )
        })
        .collect();
    problems.dedup();
    let stable = identities
        .signatures
        .iter()
        .map(|(&id, sig)| {
            let mut origins: Vec<u64> = sig.peers.iter().map(|&p| peers[p].origin).collect();
            origins.sort_unstable();
            (id, digest(&(origins, &sig.named)))
        })
        .collect();
    Compiled {
        identities: identities.by_prefix,
        stable,
        endpoints,
        problems,
    }
}

/// The local pods of the policy's namespace its podSelector selects; an unevaluable selector
/// selects them all (and the policy is `broken`: it isolates, allows nothing).
fn select_targets(
    policy: &NsName,
    selector: Option<&LabelSelector>,
    views: &[PodView],
    index: &PodIndex,
    problems: &mut Vec<PolicyProblem>,
) -> (Vec<usize>, bool) {
    let empty = LabelSelector::default();
    let mut broken = None;
    // An unevaluable selector selects every pod of the namespace: candidates by namespace then.
    let valid = matches(selector.unwrap_or(&empty), &NO_LABELS).is_ok();
    let candidates = index.candidates(selector.filter(|_| valid), Some(&policy.namespace));
    let selector = selector.unwrap_or(&empty);
    let targets = candidates
        .iter()
        .map(|&i| (i, &views[i]))
        .filter(|(_, v)| v.local && v.ns == policy.namespace)
        .filter(|(_, v)| match matches(selector, v.labels) {
            Ok(m) => m,
            Err(e) => {
                broken.get_or_insert(e);
                true
            }
        })
        .map(|(i, _)| i)
        .collect();
    if let Some(error) = broken.clone() {
        problems.push(PolicyProblem::Selector {
            policy: policy.clone(),
            what: "podSelector",
            error,
        });
    }
    (targets, broken.is_some())
}

/// The keys one rule gives one local pod: every peer identity x every port it names.
fn rule_keys(
    rule: &Rule,
    target: &PodView,
    peer_ids: &[u32],
    identities: &Identities,
    problems: &mut Vec<PolicyProblem>,
) -> Vec<RuleKey> {
    let any = PortPrefix { value: 0, len: 0 };
    if rule.ports.is_empty() {
        return peer_ids
            .iter()
            .map(|&identity| RuleKey {
                identity,
                proto: None,
                port: any,
            })
            .collect();
    }
    let mut keys = Vec::new();
    for p in rule.ports {
        let bad = |problems: &mut Vec<PolicyProblem>| {
            problems.push(PolicyProblem::Port {
                policy: rule.policy.clone(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: format!("{:?}-{:?}", p.port, p.end_port),
            });
        };
        let Some(proto) = proto_number(p.protocol.as_deref()) else {
            bad(problems);
            continue;
        };
        let key = |identity, port| RuleKey {
            identity,
            proto: Some(proto),
            port,
        };
        match &p.port {
            None => keys.extend(peer_ids.iter().map(|&i| key(i, any))),
            Some(IntOrString::Int(n)) => {
                let first = u16::try_from(*n).ok().filter(|n| *n > 0);
                let last = p.end_port.map_or(first, |e| u16::try_from(e).ok());
                match (first, last) {
                    (Some(a), Some(b)) if a <= b => {
                        for prefix in port_prefixes(a, b) {
                            keys.extend(peer_ids.iter().map(|&i| key(i, prefix)));
                        }
                    }
                    _ => bad(problems),
                }
            }
            Some(IntOrString::String(name)) => {
                let named = (name.clone(), proto);
                if rule.ingress {
                    // The destination is the local pod: its own port of that name.
                    if let Some(&port) = target.named.get(&named) {
                        let exact = PortPrefix {
                            value: port,
                            len: 16,
                        };
                        keys.extend(peer_ids.iter().map(|&i| key(i, exact)));
                    }
                } else {
                    // The destination is the peer: each identity's own port of that name.
                    for (identity, port) in identities.resolving(&named, peer_ids) {
                        keys.push(key(
                            identity,
                            PortPrefix {
                                value: port,
                                len: 16,
                            },
                        ));
                    }
                }
            }
        }
    }
    keys
}

/// Address atoms and their identities.
struct Identities {
    by_prefix: BTreeMap<Cidr, u32>,
    signatures: BTreeMap<u32, Signature>,
}

impl Identities {
    fn build(views: &[PodView], peers: &[Peer], rules: &[Rule]) -> Identities {
        let egress_names: BTreeSet<(String, u8)> = rules
            .iter()
            .filter(|r| !r.ingress)
            .flat_map(|r| r.ports)
            .filter_map(|p| match &p.port {
                Some(IntOrString::String(n)) => {
                    Some((n.clone(), proto_number(p.protocol.as_deref())?))
                }
                _ => None,
            })
            .collect();
        let world = Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            len: 0,
        };
        let mut prefixes: BTreeSet<Cidr> = [world].into();
        for (c, except) in peers.iter().filter_map(|p| p.block.as_ref()) {
            prefixes.insert(*c);
            prefixes.extend(except.iter().copied());
        }
        let pod_at: BTreeMap<Ipv4Addr, usize> =
            views.iter().enumerate().map(|(i, v)| (v.ip, i)).collect();
        prefixes.extend(pod_at.keys().map(|&addr| Cidr { addr, len: 32 }));

        // Per pod, the selector peers it is in (ascending), from the peers' own member lists:
        // the cost is the members, not pods x peers.
        let mut pod_peers: Vec<Vec<usize>> = vec![Vec::new(); views.len()];
        for (i, peer) in peers.iter().enumerate() {
            if peer.block.is_none() {
                for &pod in &peer.pods {
                    pod_peers[pod].push(i);
                }
            }
        }
        let blocks: Vec<(usize, &(Cidr, Vec<Cidr>))> = peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.block.as_ref()?)))
            .collect();
        let mut interned: BTreeMap<Signature, u32> = BTreeMap::new();
        let mut by_prefix = BTreeMap::new();
        for prefix in prefixes {
            let pod = (prefix.len == 32)
                .then(|| pod_at.get(&prefix.addr))
                .flatten();
            let mut in_peers: Vec<usize> = blocks
                .iter()
                .filter(|(_, (c, except))| {
                    within(&prefix, c) && !except.iter().any(|e| within(&prefix, e))
                })
                .map(|(i, _)| *i)
                .chain(pod.into_iter().flat_map(|&i| pod_peers[i].iter().copied()))
                .collect();
            in_peers.sort_unstable();
            let sig = Signature {
                peers: in_peers,
                named: pod.map_or_else(Vec::new, |&i| {
                    egress_names
                        .iter()
                        .filter_map(|n| Some((n.clone(), *views[i].named.get(n)?)))
                        .collect()
                }),
            };
            let next = u32::try_from(interned.len()).unwrap_or(u32::MAX - 1) + 1;
            let id = *interned.entry(sig).or_insert(next);
            by_prefix.insert(prefix, id);
        }
        let signatures = interned.into_iter().map(|(s, id)| (id, s)).collect();
        Identities {
            by_prefix,
            signatures,
        }
    }

    /// Identities in any of `peers`.
    fn containing(&self, peers: &[usize]) -> Vec<u32> {
        self.signatures
            .iter()
            .filter(|(_, s)| peers.iter().any(|p| s.peers.binary_search(p).is_ok()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The identities among `peer_ids` (all, for [`ANY_PEER`]) that resolve a named port, and
    /// to which port.
    fn resolving(&self, named: &(String, u8), peer_ids: &[u32]) -> Vec<(u32, u16)> {
        self.signatures
            .iter()
            .filter(|(id, _)| peer_ids.contains(&ANY_PEER) || peer_ids.contains(id))
            .filter_map(|(id, s)| {
                let port = s.named.iter().find(|(n, _)| n == named)?.1;
                Some((*id, port))
            })
            .collect()
    }
}

/// A digest that is the same in every compile of this process.
fn digest<T: std::hash::Hash>(value: &T) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// Whether prefix `inner` lies within prefix `outer`.
fn within(inner: &Cidr, outer: &Cidr) -> bool {
    inner.len >= outer.len && outer.contains(inner.addr)
}

fn resolve_peer<'a>(
    policy: &NsName,
    peer: &NetworkPolicyPeer,
    views: &[PodView<'a>],
    index: &PodIndex,
    namespaces: &BTreeMap<String, Namespace>,
    problems: &mut Vec<PolicyProblem>,
) -> Peer {
    let mut out = Peer {
        pods: BTreeSet::new(),
        block: None,
        origin: 0,
    };
    if let Some(b) = &peer.ip_block {
        let parse = |s: &str| {
            s.parse::<Cidr>().map_err(|_| PolicyProblem::Cidr {
                policy: policy.clone(),
                cidr: s.to_owned(),
            })
        };
        match (
            parse(&b.cidr),
            b.except
                .iter()
                .flatten()
                .map(|e| parse(e))
                .collect::<Result<Vec<_>, _>>(),
        ) {
            (Ok(c), Ok(except)) => out.block = Some((c, except)),
            (Err(p), _) | (_, Err(p)) => problems.push(p),
        }
        return out;
    }
    let mut failed = |what, error| {
        problems.push(PolicyProblem::Selector {
            policy: policy.clone(),
            what,
            error,
        });
    };
    // A selector that cannot be evaluated matches nothing (reported once a pod would need it).
    if let Some(Err(e)) = peer
        .namespace_selector
        .as_ref()
        .map(|s| matches(s, &NO_LABELS))
    {
        if !views.is_empty() {
            failed("namespaceSelector", e);
        }
        return out;
    }
    // podSelector alone: the policy's own namespace; with a namespaceSelector, its namespaces
    // (each evaluated once).
    let mut namespace_ok: HashMap<&'a str, bool> = HashMap::new();
    let mut in_namespace = |ns: &'a str| match &peer.namespace_selector {
        None => ns == policy.namespace,
        Some(sel) => *namespace_ok
            .entry(ns)
            .or_insert_with(|| matches(sel, &namespace_labels(namespaces, ns)).unwrap_or(false)),
    };
    let own = peer
        .namespace_selector
        .is_none()
        .then_some(policy.namespace.as_str());
    if let Some(Err(e)) = peer.pod_selector.as_ref().map(|s| matches(s, &NO_LABELS)) {
        if index
            .candidates(None, own)
            .iter()
            .any(|&i| in_namespace(views[i].ns))
        {
            failed("podSelector", e);
        }
        return out;
    }
    for &i in index.candidates(peer.pod_selector.as_ref(), own) {
        let v = &views[i];
        if in_namespace(v.ns)
            && peer
                .pod_selector
                .as_ref()
                .is_none_or(|sel| matches(sel, v.labels).unwrap_or(false))
        {
            out.pods.insert(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.to_owned(),
                operator: op.to_owned(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| (*v).to_owned()).collect()),
            }]),
            match_labels: None,
        }
    }

    #[test]
    fn selectors_match_as_the_api_defines() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(
            matches(&LabelSelector::default(), &l).unwrap(),
            "empty: all"
        );
        let ml = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: None,
        };
        assert!(matches(&ml, &l).unwrap());
        assert!(!matches(&ml, &labels(&[("app", "db")])).unwrap());
        for (sel, want) in [
            (expr("app", "In", &["web", "db"]), true),
            (expr("app", "In", &["db"]), false),
            (expr("app", "NotIn", &["db"]), true),
            (expr("missing", "NotIn", &["x"]), true),
            (expr("app", "NotIn", &["web"]), false),
            (expr("tier", "Exists", &[]), true),
            (expr("missing", "Exists", &[]), false),
            (expr("missing", "DoesNotExist", &[]), true),
            (expr("app", "DoesNotExist", &[]), false),
        ] {
            assert_eq!(matches(&sel, &l).unwrap(), want, "{sel:?}");
        }
        assert_eq!(
            matches(&expr("app", "Has", &["x"]), &l),
            Err(SelectorError::Operator("Has".into()))
        );
        assert_eq!(
            matches(&expr("app", "In", &[]), &l),
            Err(SelectorError::NoValues("In".into()))
        );
    }

    #[test]
    fn port_ranges_become_the_fewest_exact_prefixes() {
        assert_eq!(port_prefixes(80, 80), [PortPrefix { value: 80, len: 16 }]);
        assert_eq!(port_prefixes(0, 65535), [PortPrefix { value: 0, len: 0 }]);
        assert_eq!(
            port_prefixes(8000, 8015),
            [PortPrefix {
                value: 8000,
                len: 12
            }]
        );
        // Exactness, on ranges that start and end off any boundary.
        for (a, b) in [
            (1u16, 65535u16),
            (32000, 32768),
            (7, 9),
            (1000, 1999),
            (65535, 65535),
        ] {
            let ps = port_prefixes(a, b);
            for p in 0..=65535u16 {
                let covered = ps.iter().filter(|x| {
                    let mask = if x.len == 0 {
                        0
                    } else {
                        u16::MAX << (16 - x.len)
                    };
                    p & mask == x.value
                });
                assert_eq!(
                    covered.count(),
                    usize::from((a..=b).contains(&p)),
                    "{a}-{b}: {p}"
                );
            }
            assert!(ps.len() <= 30, "{a}-{b}: {}", ps.len());
        }
    }

    fn pod(
        ns: &str,
        name: &str,
        node: &str,
        ip: &str,
        pod_labels: &[(&str, &str)],
        ports: serde_json::Value,
    ) -> (NsName, Pod) {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "labels": labels(pod_labels)},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
            "status": {"podIP": ip, "phase": "Running"},
        }))
        .unwrap();
        (
            NsName {
                namespace: ns.into(),
                name: name.into(),
            },
            pod,
        )
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> (NsName, NetworkPolicy) {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": spec,
        }))
        .unwrap();
        (
            NsName {
                namespace: ns.into(),
                name: name.into(),
            },
            np,
        )
    }

    /// A small cluster: namespace `a` (labelled team=blue) and `b`; node n1 holds web (a),
    /// client (a) and other (b); n2 holds far (a).
    fn cluster() -> (BTreeMap<NsName, Pod>, BTreeMap<String, Namespace>) {
        let http = serde_json::json!([{"name": "http", "containerPort": 8080}]);
        let pods = [
            pod(
                "a",
                "web",
                "n1",
                "10.0.1.1",
                &[("app", "web")],
                http.clone(),
            ),
            pod(
                "a",
                "client",
                "n1",
                "10.0.1.2",
                &[("app", "client")],
                serde_json::json!([]),
            ),
            pod(
                "b",
                "other",
                "n1",
                "10.0.1.3",
                &[("app", "client")],
                serde_json::json!([{"name": "http", "containerPort": 9090}]),
            ),
            pod(
                "a",
                "far",
                "n2",
                "10.0.2.1",
                &[("app", "client"), ("tier", "x")],
                http,
            ),
        ]
        .into_iter()
        .collect();
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "labels": {"team": "blue"}}
        }))
        .unwrap();
        (pods, [("a".to_owned(), ns)].into())
    }

    fn compiled(policies: &[(NsName, NetworkPolicy)]) -> Compiled {
        let (pods, namespaces) = cluster();
        compile(
            "n1",
            &pods,
            &namespaces,
            &policies.iter().cloned().collect(),
        )
    }

    fn identity_of(c: &Compiled, ip: &str) -> u32 {
        let ip: Ipv4Addr = ip.parse().unwrap();
        c.identities
            .iter()
            .filter(|(p, _)| p.contains(ip))
            .max_by_key(|(p, _)| p.len)
            .map(|(_, id)| *id)
            .unwrap()
    }

    fn allows(dir: &Direction, peer: u32, proto: u8, port: u16) -> Option<Option<&NsName>> {
        match dir {
            Direction::Open => Some(None),
            Direction::Isolated(keys) => keys
                .iter()
                .find(|(k, _)| {
                    let mask = if k.port.len == 0 {
                        0
                    } else {
                        u16::MAX << (16 - k.port.len)
                    };
                    (k.identity == ANY_PEER || k.identity == peer)
                        && k.proto.is_none_or(|p| p == proto)
                        && (k.proto.is_none() || port & mask == k.port.value)
                })
                .map(|(_, p)| Some(p)),
        }
    }

    /// What a local pod's ingress says about `from` -> `to`:port (None: denied).
    fn ingress(c: &Compiled, from: &str, to: &str, proto: u8, port: u16) -> bool {
        let ep = &c.endpoints[&to.parse::<Ipv4Addr>().unwrap()];
        allows(&ep.ingress, identity_of(c, from), proto, port).is_some()
    }

    fn egress(c: &Compiled, from: &str, to: &str, proto: u8, port: u16) -> bool {
        let ep = &c.endpoints[&from.parse::<Ipv4Addr>().unwrap()];
        allows(&ep.egress, identity_of(c, to), proto, port).is_some()
    }

    const WEB: &str = "10.0.1.1";
    const CLIENT: &str = "10.0.1.2";
    const OTHER: &str = "10.0.1.3";
    const FAR: &str = "10.0.2.1";
    const OUTSIDE: &str = "192.0.2.9";

    #[test]
    fn no_policy_isolates_nothing_and_only_local_pods_are_endpoints() {
        let c = compiled(&[]);
        assert_eq!(c.endpoints.len(), 3, "n1's pods");
        assert!(c.endpoints.values().all(|e| *e == Endpoint::default()));
    }

    #[test]
    fn default_deny_and_allow_from_a_pod_selector_on_a_port() {
        let deny = policy(
            "a",
            "deny",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        );
        let c = compiled(std::slice::from_ref(&deny));
        assert!(!ingress(&c, CLIENT, WEB, PROTO_TCP, 8080));
        assert!(egress(&c, WEB, CLIENT, PROTO_TCP, 1), "egress not isolated");
        assert!(
            ingress(&c, WEB, OTHER, PROTO_TCP, 80),
            "namespace b untouched"
        );

        let allow = policy(
            "a",
            "allow",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]}]
            }),
        );
        let c = compiled(&[deny, allow]);
        assert!(ingress(&c, CLIENT, WEB, PROTO_TCP, 8080));
        assert!(
            ingress(&c, FAR, WEB, PROTO_TCP, 8080),
            "same namespace, other node"
        );
        assert!(!ingress(&c, CLIENT, WEB, PROTO_TCP, 8081), "other port");
        assert!(
            !ingress(&c, CLIENT, WEB, PROTO_UDP, 8080),
            "protocol defaults to TCP"
        );
        assert!(
            !ingress(&c, OTHER, WEB, PROTO_TCP, 8080),
            "podSelector alone: own namespace only"
        );
        assert!(!ingress(&c, OUTSIDE, WEB, PROTO_TCP, 8080));
        assert!(
            !ingress(&c, WEB, CLIENT, PROTO_TCP, 8080),
            "client: deny only"
        );
    }

    #[test]
    fn namespace_and_pod_selector_in_one_peer_and_or_across_peers() {
        let and = policy(
            "a",
            "and",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "x"}}}]}]
            }),
        );
        let c = compiled(&[and]);
        assert!(ingress(&c, FAR, WEB, PROTO_UDP, 53));
        assert!(
            !ingress(&c, OTHER, WEB, PROTO_TCP, 80),
            "namespace matches, labels do not"
        );
        let or = policy(
            "a",
            "or",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}}, {"podSelector": {"matchLabels": {"tier": "x"}}}]}]
            }),
        );
        let c = compiled(&[or]);
        assert!(
            ingress(&c, OTHER, WEB, PROTO_TCP, 80),
            "b has no team label"
        );
        assert!(ingress(&c, FAR, WEB, PROTO_TCP, 80), "by the second peer");
        assert!(!ingress(&c, CLIENT, WEB, PROTO_TCP, 80), "in neither");
        let by_name = policy(
            "a",
            "by-name",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}]
            }),
        );
        let c = compiled(&[by_name]);
        assert!(
            ingress(&c, OTHER, WEB, PROTO_TCP, 80),
            "the name label, object unseen"
        );
    }

    #[test]
    fn ip_blocks_with_except_apply_to_pod_ips_and_the_world() {
        let np = policy(
            "a",
            "cidr",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]},
                            {"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["192.0.2.0/24"]}}], "ports": [{"port": 53, "protocol": "UDP"}]}]
            }),
        );
        let c = compiled(&[np]);
        assert!(
            ingress(&c, FAR, WEB, PROTO_TCP, 80),
            "10.0.2.1 is in, not excepted"
        );
        assert!(
            !ingress(&c, CLIENT, WEB, PROTO_TCP, 80),
            "10.0.1.2 is excepted"
        );
        assert!(
            ingress(&c, CLIENT, WEB, PROTO_UDP, 53),
            "0.0.0.0/0 matches pods too"
        );
        assert!(ingress(&c, "198.51.100.1", WEB, PROTO_UDP, 53));
        assert!(
            !ingress(&c, OUTSIDE, WEB, PROTO_UDP, 53),
            "excepted from the world"
        );
        assert!(!ingress(&c, "198.51.100.1", WEB, PROTO_TCP, 80));
        assert_eq!(
            identity_of(&c, CLIENT),
            identity_of(&c, OTHER),
            "treated alike: one identity"
        );
        assert_ne!(identity_of(&c, CLIENT), identity_of(&c, FAR));
    }

    #[test]
    fn named_ports_resolve_on_the_destination_pod_and_end_port_is_inclusive() {
        let np = policy(
            "a",
            "named",
            serde_json::json!({
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"ports": [{"port": "http"}]}],
                "egress": [{"ports": [{"port": "http"}, {"port": 30000, "endPort": 30010, "protocol": "SCTP"}]}]
            }),
        );
        let c = compiled(&[np]);
        assert!(ingress(&c, OUTSIDE, WEB, PROTO_TCP, 8080), "web's http");
        assert!(
            !ingress(&c, OUTSIDE, CLIENT, PROTO_TCP, 8080),
            "client has no http port"
        );
        assert!(
            egress(&c, CLIENT, OTHER, PROTO_TCP, 9090),
            "other's http is 9090"
        );
        assert!(!egress(&c, CLIENT, OTHER, PROTO_TCP, 8080));
        assert!(
            egress(&c, CLIENT, FAR, PROTO_TCP, 8080),
            "far's http is 8080"
        );
        assert!(
            !egress(&c, CLIENT, OUTSIDE, PROTO_TCP, 8080),
            "no pod, no named port"
        );
        for (port, ok) in [(29999, false), (30000, true), (30010, true), (30011, false)] {
            assert_eq!(egress(&c, CLIENT, OUTSIDE, PROTO_SCTP, port), ok, "{port}");
        }
    }

    #[test]
    fn policy_types_default_as_the_api_does_and_the_first_policy_decides() {
        let empty_egress = policy(
            "a",
            "p1",
            serde_json::json!({"podSelector": {}, "egress": []}),
        );
        let c = compiled(&[empty_egress]);
        let ep = &c.endpoints[&WEB.parse::<Ipv4Addr>().unwrap()];
        assert_eq!(ep.egress, Direction::Open, "no egress rules: Ingress only");
        assert_eq!(ep.ingress, Direction::Isolated(Allowed::new()));
        let with_egress = policy(
            "a",
            "p2",
            serde_json::json!({"podSelector": {}, "egress": [{}]}),
        );
        let both = policy(
            "a",
            "p0",
            serde_json::json!({"podSelector": {}, "ingress": [{}]}),
        );
        let c = compiled(&[with_egress, both]);
        let ep = &c.endpoints[&WEB.parse::<Ipv4Addr>().unwrap()];
        assert!(
            matches!(ep.egress, Direction::Isolated(ref k) if !k.is_empty()),
            "egress: [{{}}] allows all"
        );
        let decided = allows(&ep.ingress, identity_of(&c, OUTSIDE), PROTO_TCP, 1).unwrap();
        assert_eq!(decided.unwrap().name, "p0");
    }

    #[test]
    fn an_unreadable_policy_fails_closed_and_is_reported() {
        let bad = policy(
            "a",
            "bad",
            serde_json::json!({
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "Like", "values": ["w"]}]},
                "ingress": [{}]
            }),
        );
        let bad_peer = policy(
            "b",
            "bad-peer",
            serde_json::json!({
                "podSelector": {},
                "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "x", "operator": "In"}]}}]}, {"from": [{"ipBlock": {"cidr": "300.0.0.0/8"}}]}]
            }),
        );
        let c = compiled(&[bad, bad_peer]);
        assert!(
            !ingress(&c, OUTSIDE, WEB, PROTO_TCP, 80),
            "every pod of a isolated, nothing allowed"
        );
        assert!(!ingress(&c, OUTSIDE, CLIENT, PROTO_TCP, 80));
        assert!(
            !ingress(&c, WEB, OTHER, PROTO_TCP, 80),
            "a bad peer matches nothing"
        );
        assert!(!ingress(&c, OUTSIDE, OTHER, PROTO_TCP, 80));
        assert_eq!(c.problems.len(), 3, "{:?}", c.problems);
    }
}
