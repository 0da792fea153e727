//! The counter maps: `DROPS` (per-CPU, by [`DropReason`]) and `SVC_STATS` (per-CPU, by
//! reverse-NAT id).

/// Per-service-port traffic counters (`SVC_STATS`, indexed by reverse-NAT id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    /// Packets the per-packet programs (TC, XDP) sent towards the frontend, and their bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Flows translated to one of its backends: new connections and unconnected sends at the
    /// socket hooks, new flows on the packet paths.
    pub flows: u64,
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
    /// A socket hook could not record a translated socket's peer; the connect or send was refused
    /// rather than leave replies untranslatable.
    SockRevNatFailed = 6,
    /// Traffic from outside to a frontend with no backend it may use: `externalTrafficPolicy:
    /// Local` without a local endpoint, `internalTrafficPolicy: Local` without one (dropped, as
    /// kube-proxy does), or no endpoint at all (dropped from the external interfaces).
    NoLocalBackend = 7,
    /// A client outside a LoadBalancer frontend's `loadBalancerSourceRanges`.
    SourceRange = 8,
    /// Source NAT for external traffic to a remote backend found no free port (or no address is
    /// configured yet), or a source-NATed flow lost its reply entry: dropped, never delivered to
    /// another client.
    SnatFailed = 9,
    /// A new flow into a pod whose ingress is isolated, that no NetworkPolicy admits.
    PolicyIngress = 10,
    /// A new flow from a pod whose egress is isolated, that no NetworkPolicy admits.
    PolicyEgress = 11,
    /// A flow of a pod whose policy could not be written whole (fail closed), or a packet of an
    /// enforced pod the policy stage cannot judge (a non-first fragment no any-port rule
    /// admits, an IPv4 header that cannot be read).
    PolicyFailClosed = 12,
}

impl DropReason {
    pub const COUNT: u32 = 13;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::Malformed,
        DropReason::NoBackend,
        DropReason::CtCreateFailed,
        DropReason::NatFailed,
        DropReason::RejectFailed,
        DropReason::BackendMissing,
        DropReason::SockRevNatFailed,
        DropReason::NoLocalBackend,
        DropReason::SourceRange,
        DropReason::SnatFailed,
        DropReason::PolicyIngress,
        DropReason::PolicyEgress,
        DropReason::PolicyFailClosed,
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
            DropReason::SockRevNatFailed => "sock_revnat_failed",
            DropReason::NoLocalBackend => "no_local_backend",
            DropReason::SourceRange => "source_range",
            DropReason::SnatFailed => "snat_failed",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::PolicyFailClosed => "policy_fail_closed",
        }
    }
}

const _: () = assert!(core::mem::size_of::<SvcStats>() == 24);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for SvcStats {}
