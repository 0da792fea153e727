//! Types shared by the eBPF programs (`dataplane-ebpf`) and the agent (`dataplane-agent`).
//!
//! ```text
//!  SERVICES  {vip, port, proto, scope, slot} --slot 0--> header {count, rev_nat_id, flags}
//!                                            --slot i--> {backend_id}
//!  BACKENDS  backend_id --> {addr, port, proto, state}
//!  CONNTRACK {saddr, daddr, sport, dport, proto, dir} --> {nat addr/port, backend, rev_nat, flags, seen}
//!  DROPS     per-CPU [DropReason] --> packets
//!  SVC_STATS per-CPU [rev_nat_id] --> {packets, bytes}
//!  CLOCK     [0] --> CLOCK_MONOTONIC ns, written by the agent (conntrack timestamps)
//! ```
//!
//! Every type is `#[repr(C)]` with explicit padding and a compile-time size check, so both sides agree
//! on the layout byte for byte. Addresses and ports are stored in network byte order, exactly as they
//! appear in the packet, so the datapath never converts.
#![no_std]

/// Map names. The suffix is the layout version: bump it when a key or value layout changes.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES_V1";
    pub const BACKENDS: &str = "BACKENDS_V1";
    pub const CONNTRACK: &str = "CONNTRACK_V1";
    pub const DROPS: &str = "DROPS_V1";
    pub const SVC_STATS: &str = "SVC_STATS_V1";
    pub const CLOCK: &str = "CLOCK_V1";
}

/// Program names as they appear in the eBPF object.
pub mod prog_names {
    /// TC ingress on a pod's host-side interface: packets sent by the pod.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress on a pod's host-side interface: packets delivered to the pod.
    pub const TO_POD: &str = "to_pod";
}

pub const MAX_SERVICE_ENTRIES: u32 = 1 << 20;
pub const MAX_BACKENDS: u32 = 1 << 18;
pub const MAX_CONNTRACK: u32 = 1 << 18;
/// Reverse-NAT ids index `SVC_STATS`; id 0 is never allocated.
pub const MAX_REV_NAT_IDS: u32 = 1 << 16;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Scope of a service entry. Only cluster-wide lookups exist so far.
pub const SCOPE_CLUSTER: u8 = 0;

/// Key of the `SERVICES` map. `slot == 0` is the service header; `1..=count` hold backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Service address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub pad: u16,
}

/// Value of the `SERVICES` map: in the header slot `count`, `rev_nat_id` and `flags` are set; in a
/// backend slot only `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Number of backend slots. Zero means the service exists but has no ready endpoint: reject.
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u32,
}

/// Backend states.
pub const BACKEND_ACTIVE: u8 = 0;

/// Value of the `BACKENDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}

/// Conntrack direction: the client's packets towards the service address.
pub const CT_DIR_SERVICE: u8 = 0;
/// Conntrack direction: the backend's replies towards the client.
pub const CT_DIR_REPLY: u8 = 1;

/// Key of the `CONNTRACK` map: the full 5-tuple as seen on the wire, plus the direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: u16,
}

/// The connection saw a FIN or RST: a new SYN on the same tuple starts a new connection.
pub const CT_FLAG_CLOSING: u16 = 1;
/// A pod reached itself through a service: its source is rewritten to [`HAIRPIN_ADDR`] so the pod
/// accepts the packet, and the reply comes back to the pod's own interface.
pub const CT_FLAG_HAIRPIN: u16 = 2;

/// Source address of hairpinned connections (a pod that reached itself through a service),
/// network byte order: 169.254.42.1, link-local and never a pod or node address.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// Value of the `CONNTRACK` map. For `CT_DIR_SERVICE` the NAT address is the backend (destination
/// rewrite); for `CT_DIR_REPLY` it is the service address (source rewrite).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtValue {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub pad: u16,
    /// `bpf_ktime_get_ns` when the entry was created or last refreshed (refreshed at most once a second).
    pub last_seen_ns: u64,
}

/// Per-service-port traffic counters (`SVC_STATS`, indexed by reverse-NAT id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Why the datapath dropped or rejected a packet. Index into `DROPS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Truncated headers or an IPv4 header length below 20 bytes.
    Malformed = 0,
    /// The service has no ready endpoint: answered with a TCP RST or ICMP port unreachable.
    NoBackend = 1,
    /// A conntrack entry could not be created, so the flow could not be pinned to a backend.
    CtCreateFailed = 2,
    /// A header rewrite or checksum helper failed.
    NatFailed = 3,
    /// The reject reply (RST / ICMP) could not be built; the packet was dropped instead.
    RejectFailed = 4,
    /// A service slot or backend referenced by the service header was missing (mid-update race).
    BackendMissing = 5,
}

impl DropReason {
    pub const COUNT: u32 = 6;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::Malformed,
        DropReason::NoBackend,
        DropReason::CtCreateFailed,
        DropReason::NatFailed,
        DropReason::RejectFailed,
        DropReason::BackendMissing,
    ];

    /// Stable label for metrics and reports.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoBackend => "no_backend",
            DropReason::CtCreateFailed => "ct_create_failed",
            DropReason::NatFailed => "nat_failed",
            DropReason::RejectFailed => "reject_failed",
            DropReason::BackendMissing => "backend_missing",
        }
    }
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);
const _: () = assert!(core::mem::size_of::<SvcStats>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, has explicit padding fields and no pointers, so
    // any bit pattern is a valid value and the bytes can be shared with the kernel as they are.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::SvcStats {}
}
