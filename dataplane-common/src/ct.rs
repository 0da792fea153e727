//! The `CONNTRACK` map: one entry per direction of a tracked connection; and the `SNAT` map: the
//! reply entries of source-NATed connections, which are also their port claims.
//!
//! ```text
//!  {saddr, daddr, sport, dport, proto, dir} --> {nat addr/port, backend, rev_nat, flags, seen,
//!                                                snat addr/port, next hop}
//! ```

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

/// The connection came from outside the node to a backend on another node, and is source-NATed
/// to this node (`externalTrafficPolicy: Cluster`): the forward entry's `snat_*` is the node's
/// address and allocated port (source rewrite), the reply entry's (in `SNAT`, not `CONNTRACK`)
/// is the client (destination rewrite).
pub const CT_FLAG_SNAT: u16 = 4;

/// An entry that only records a flow policy admitted (a flow of an enforced pod that is not to a
/// Service): nothing to rewrite.
pub const CT_FLAG_NO_NAT: u16 = 8;
/// The flow was opened by the peer towards the local pod (judged on the pod's ingress); without
/// it, by the local pod (judged on its egress).
pub const CT_FLAG_INGRESS: u16 = 16;

/// Source address of hairpinned connections (a pod that reached itself through a service),
/// network byte order: 169.254.42.1, link-local and never a pod or node address.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// Value of the `CONNTRACK` map. For `CT_DIR_SERVICE` the NAT address is the backend (destination
/// rewrite); for `CT_DIR_REPLY` it is the service address (source rewrite). With `CT_FLAG_SNAT`,
/// `snat_*` is the other end's rewrite (see there).
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
    pub snat_addr: u32,
    pub snat_port: u16,
    pub pad2: u16,
    /// Where `from_external` sends this direction's packets back out itself: the next hop's MAC,
    /// then the interface's. All zero: not known (ask the FIB); cleared when the entry is
    /// refreshed, so a changed neighbour or route is picked up within a second.
    pub next_hop: [u8; 12],
    /// `NODE.policy_epoch` when the flow was last judged by policy (pod interfaces).
    pub policy_epoch: u32,
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtValue>() == 48);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for CtKey {}
#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for CtValue {}
