//! What an agent reports about itself (the status file, `/metrics`), typed for every reader.
use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A label: static in the agent, owned when read back.
pub type Label = Cow<'static, str>;

/// A map by label from the agent's static labels.
pub fn by_label<V>(entries: impl IntoIterator<Item = (&'static str, V)>) -> BTreeMap<Label, V> {
    entries
        .into_iter()
        .map(|(k, v)| (Cow::Borrowed(k), v))
        .collect()
}

/// Upper bounds (seconds) of the sync-latency histogram buckets.
const LATENCY_BOUNDS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// A Prometheus-style histogram (per-bucket counts; rendered cumulatively).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            bounds: LATENCY_BOUNDS.to_vec(),
            counts: vec![0; LATENCY_BOUNDS.len()],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// Entries and capacity of one map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapUsage {
    pub entries: u64,
    pub capacity: u64,
}

/// Per-service-port traffic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceStatus {
    pub service: String,
    pub frontend: String,
    pub backends: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    /// Flows translated to a backend (connections and unconnected sends at the socket, new
    /// flows on the packet paths).
    #[serde(default)]
    pub flows: u64,
}

/// A local pod that NetworkPolicy enforces, and its new flows by verdict.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyEndpointStatus {
    /// `namespace/name`.
    pub pod: String,
    pub address: String,
    /// Whether a policy of that direction selects it.
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// `EP_DENY_ALL`: its policy could not be written whole, everything is denied.
    pub fail_closed: bool,
    pub ingress_allowed: u64,
    pub ingress_denied: u64,
    pub egress_allowed: u64,
    pub egress_denied: u64,
}

/// What the agent reports about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub node: String,
    /// Number of batches fully programmed so far; 0 until the first full sync is programmed.
    pub generation: u64,
    /// When the last batch was programmed (RFC 3339), for kube-proxy's `/healthz` format.
    #[serde(default)]
    pub last_programmed: Option<String>,
    /// Fingerprint of the source state the maps now reflect (hex), once programmed.
    pub fingerprint: Option<String>,
    pub objects: BTreeMap<Label, usize>,
    pub frontends: usize,
    pub backends: usize,
    pub maps: BTreeMap<Label, MapUsage>,
    /// Pod interfaces the programs are attached to.
    pub interfaces: Vec<String>,
    /// External interfaces, with their XDP mode (`eth0 (XDP Generic)`).
    #[serde(default)]
    pub external_interfaces: Vec<String>,
    /// The cgroups the socket hooks are attached to.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// How pods' connections to Services are translated: `socket` (at connect()/sendmsg(), TC
    /// catching the rest) or `tc` (per packet on their interfaces).
    #[serde(default)]
    pub pod_translation: Option<String>,
    /// Problems by label: skipped objects, map write and attach failures.
    pub errors: BTreeMap<Label, u64>,
    pub drops: BTreeMap<Label, u64>,
    /// Time from a change being received to its map writes being done.
    pub sync_latency: Histogram,
    pub services: Vec<ServiceStatus>,
    /// The local pods NetworkPolicy enforces.
    #[serde(default)]
    pub policy: Vec<PolicyEndpointStatus>,
}

impl Status {
    /// Ready once the first full sync is programmed.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.generation > 0
    }
}
