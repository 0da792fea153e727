//! Types shared by the eBPF programs (`dataplane-ebpf`) and the agent (`dataplane-agent`).
//!
//! ```text
//!  SERVICES  {vip, port, proto, scope, slot} --slot 0--> header {count, rev_nat_id, flags}
//!                                            --slot i--> {backend_id}
//!  BACKENDS  backend_id --> {addr, port, proto, state}
//!  CONNTRACK {saddr, daddr, sport, dport, proto, dir} --> {nat addr/port, backend, rev_nat, flags, seen,
//!                                                         snat addr/port, next hop}
//!  SNAT      {backend, node addr, backend port, node port, proto, dir} --> the same value: the reply
//!            entries of source-NATed connections (their port claims; never evicted)
//!  SOURCE_RANGES LPM {rev_nat_id, client prefix} --> () (loadBalancerSourceRanges)
//!  DROPS     per-CPU [DropReason] --> packets
//!  SVC_STATS per-CPU [rev_nat_id] --> {packets, bytes, flows}
//!  CLOCK     [0] --> CLOCK_MONOTONIC ns, written by the agent (conntrack timestamps)
//!  SOCK_REVNAT {cookie, backend addr, port} --> {frontend addr, port, rev_nat_id} (socket hooks)
//!  NODE      [0] --> {node netns cookie, SNAT address and ports, policy epoch}, written by the agent
//!  POLICY_IDS LPM {addr} --> identity per generation
//!  POLICY_EP pod addr --> {endpoint id, isolation} per generation
//!  POLICY    LPM {endpoint, dir, generation, identity, proto, port} --> {policy id} (NetworkPolicy)
//!  POLICY_STATS per-CPU [endpoint * 2 + dir] --> {allowed, denied}
//! ```
//!
//! One module per map family (`service`, `backend`, `ct`, `counters`, `sock`, `policy`), re-exported here. Every
//! type is `#[repr(C)]` with explicit padding and a compile-time size check, so both sides agree
//! on the layout byte for byte. Addresses and ports are stored in network byte order, exactly as they
//! appear in the packet, so the datapath never converts.
#![no_std]

pub mod backend;
pub mod counters;
pub mod ct;
pub mod policy;
pub mod service;
pub mod sock;

pub use backend::*;
pub use counters::*;
pub use ct::*;
pub use policy::*;
pub use service::*;
pub use sock::*;

/// Map names. The suffix is the layout version: bump it when a key or value layout changes.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES_V1";
    pub const BACKENDS: &str = "BACKENDS_V1";
    pub const CONNTRACK: &str = "CONNTRACK_V3";
    pub const SNAT: &str = "SNAT_V1";
    pub const DROPS: &str = "DROPS_V1";
    pub const SVC_STATS: &str = "SVC_STATS_V2";
    pub const CLOCK: &str = "CLOCK_V1";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT_V1";
    pub const NODE: &str = "NODE_V3";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES_V1";
    pub const POLICY_IDS: &str = "POLICY_IDS_V2";
    pub const POLICY_EP: &str = "POLICY_EP_V2";
    pub const POLICY: &str = "POLICY_V2";
    pub const POLICY_STATS: &str = "POLICY_STATS_V1";
    pub const POLICY_EVENTS: &str = "POLICY_EVENTS_V1";
    pub const POLICY_EVENT_RATE: &str = "POLICY_EVENT_RATE_V1";
}

/// Program names as they appear in the eBPF object.
pub mod prog_names {
    /// TC ingress on a pod's host-side interface: packets sent by the pod.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress on a pod's host-side interface: packets delivered to the pod.
    pub const TO_POD: &str = "to_pod";
    /// cgroup connect4: a node process's TCP connect or UDP connect to a Service frontend.
    pub const CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: a node process's unconnected UDP datagram to a Service frontend.
    pub const SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup recvmsg4: a reply on a translated socket shows the frontend as its source.
    pub const RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: a translated socket's peer shows as the frontend.
    pub const GETPEERNAME4: &str = "sock_getpeername4";
    /// XDP on the node's external interfaces: NodePort, LoadBalancer and externalIP traffic from
    /// outside, and the replies of source-NATed flows.
    pub const FROM_EXTERNAL: &str = "from_external";
    /// TC egress on the node's external interfaces: replies of local backends to external clients.
    pub const TO_EXTERNAL: &str = "to_external";
}

pub const MAX_SERVICE_ENTRIES: u32 = 1 << 20;
pub const MAX_BACKENDS: u32 = 1 << 18;
pub const MAX_CONNTRACK: u32 = 1 << 18;
/// Source-NATed connections at once (each also has its forward entry in `CONNTRACK`).
pub const MAX_SNAT: u32 = 1 << 17;
pub const MAX_SOCK_REVNAT: u32 = 1 << 18;
pub const MAX_SOURCE_RANGES: u32 = 1 << 16;
/// Reverse-NAT ids index `SVC_STATS`; id 0 is never allocated.
pub const MAX_REV_NAT_IDS: u32 = 1 << 16;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_SCTP: u8 = 132;
