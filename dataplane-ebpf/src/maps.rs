//! Every map of the datapath, with what it holds and who writes it. Names carry a layout version
//! (`_V1`): a layout change gets a new name, so an upgraded agent never reads an old layout.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use dataplane_common::{
    Backend, CtKey, CtValue, DropReason, EventRate, MAX_BACKENDS, MAX_CONNTRACK,
    MAX_POLICY_ENDPOINTS, MAX_POLICY_IDS, MAX_POLICY_RULES, MAX_REV_NAT_IDS, MAX_SERVICE_ENTRIES,
    MAX_SNAT, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES, NodeConfig, POLICY_EVENTS_BYTES, PolicyCounters,
    PolicyEndpoints, PolicyIdentity, PolicyKey, PolicyValue, ServiceKey, ServiceValue, SockRevKey,
    SockRevValue, SourceRangeKey, SvcStats,
};

/// Service frontends: slot 0 is the header, slots 1..=count the backend ids. Written by the agent.
#[map(name = "SERVICES_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICE_ENTRIES, BPF_F_NO_PREALLOC);

/// Backend id -> address and port. Written by the agent.
#[map(name = "BACKENDS_V1")]
pub static BACKENDS: HashMap<u32, Backend> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Translated connections, one entry per direction. Written by the datapath; swept by the agent.
#[map(name = "CONNTRACK_V3")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(MAX_CONNTRACK, 0);

/// The reply entries of source-NATed connections, keyed by what the backend answers (the node's
/// address and claimed port). Not LRU: an entry is the claim of its port, and is never evicted to
/// make room, so a live flow's port can never be claimed by another client; full, a new flow is a
/// `SnatFailed` drop. Written by the datapath; swept by the agent.
#[map(name = "SNAT_V1")]
pub static SNAT: HashMap<CtKey, CtValue> = HashMap::with_max_entries(MAX_SNAT, BPF_F_NO_PREALLOC);

/// Packets dropped or rejected, by `DropReason`. Written by the datapath; read by the agent.
#[map(name = "DROPS_V1")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// Packets, bytes and translated flows towards each service port, by reverse-NAT id. Written by the datapath.
#[map(name = "SVC_STATS_V2")]
pub static SVC_STATS: PerCpuArray<SvcStats> = PerCpuArray::with_max_entries(MAX_REV_NAT_IDS, 0);

/// CLOCK_MONOTONIC in ns, written by the agent several times a second: conntrack timestamps need
/// no finer clock (refreshes are a second apart, idle lifetimes 10 s and up), and reading an array
/// slot is a few instructions where a clock helper is a call (costly with return-thunk mitigations).
#[map(name = "CLOCK_V1")]
pub static CLOCK: Array<u64> = Array::with_max_entries(1, 0);

/// Per translated socket, the frontend its backend peer stands for (socket hooks). Written by the
/// connect4/sendmsg4 hooks, read by recvmsg4/getpeername4; pinned with the agent's `--bpffs` so
/// sockets opened before a restart keep their reverse translation.
#[map(name = "SOCK_REVNAT_V1")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(MAX_SOCK_REVNAT, 0);

/// This node's settings: its netns cookie (socket hooks), its source-NAT address and ports
/// (external traffic to remote backends). Written by the agent.
#[map(name = "NODE_V3")]
pub static NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// `loadBalancerSourceRanges`: {frontend's reverse-NAT id, client prefix} for frontends whose
/// header has `SVC_FLAG_SOURCE_RANGES`. Written by the agent.
#[map(name = "SOURCE_RANGES_V1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_RANGES, BPF_F_NO_PREALLOC);

/// NetworkPolicy peers: address prefix -> identity per generation (longest match; 0.0.0.0/0 is
/// always there). Written by the agent.
#[map(name = "POLICY_IDS_V2")]
pub static POLICY_IDS: LpmTrie<u32, PolicyIdentity> =
    LpmTrie::with_max_entries(MAX_POLICY_IDS, BPF_F_NO_PREALLOC);

/// Local pods enforced by NetworkPolicy: pod address -> endpoint id and isolated directions, per
/// generation. Written by the agent.
#[map(name = "POLICY_EP_V2")]
pub static POLICY_EP: HashMap<u32, PolicyEndpoints> =
    HashMap::with_max_entries(MAX_POLICY_ENDPOINTS, BPF_F_NO_PREALLOC);

/// What each enforced pod admits: {endpoint, direction, generation, peer identity, protocol,
/// port prefix} -> the admitting policy. Written by the agent.
#[map(name = "POLICY_V2")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::with_max_entries(MAX_POLICY_RULES, BPF_F_NO_PREALLOC);

/// New flows admitted and denied per endpoint and direction (`endpoint * 2 + dir`). Written by
/// the datapath; read by the agent.
#[map(name = "POLICY_STATS_V1")]
pub static POLICY_STATS: PerCpuArray<PolicyCounters> =
    PerCpuArray::with_max_entries(MAX_POLICY_ENDPOINTS * 2, 0);

/// Verdict events of new flows in isolated directions (the agent's flow log, `explain`).
/// Written by the datapath, at most `POLICY_EVENTS_PER_CPU_SECOND` a second per CPU.
#[map(name = "POLICY_EVENTS_V1")]
pub static POLICY_EVENTS: RingBuf = RingBuf::with_byte_size(POLICY_EVENTS_BYTES, 0);

/// Per CPU: the current second's event budget. Written by the datapath.
#[map(name = "POLICY_EVENT_RATE_V1")]
pub static POLICY_EVENT_RATE: PerCpuArray<EventRate> = PerCpuArray::with_max_entries(1, 0);
