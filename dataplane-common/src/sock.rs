//! The socket-level maps: `SOCK_REVNAT` (per socket, the Service frontend a translated peer stands
//! for) and `NODE` (what the socket hooks need to know about this node).
//!
//! ```text
//!  SOCK_REVNAT {socket cookie, backend addr, backend port} --> {frontend addr, port, rev_nat_id}
//!  NODE        [0] --> {node netns cookie, SNAT address, SNAT port range, flags, policy epoch}
//! ```

/// Key of `SOCK_REVNAT`: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevKey {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub pad: u16,
}

/// Value of `SOCK_REVNAT`: the frontend the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevValue {
    /// Frontend address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub rev_nat_id: u16,
}

/// Value of `NODE`: what the datapath needs to know about this node, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// `SO_NETNS_COOKIE` of the node's network namespace; 0 (unset) translates nothing at the
    /// socket (sockets of other namespaces, pods in a cgroup below the hooks', are left to TC).
    pub netns_cookie: u64,
    /// Source address of source-NATed external traffic (the node's primary InternalIP), network
    /// byte order; 0 (unknown yet) drops what would need it (`SnatFailed`).
    pub snat_addr: u32,
    /// Source ports for that traffic, host byte order, inclusive; outside the node's
    /// `ip_local_port_range`, so they never collide with the node's own connections.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `NODE_FLAG_*`.
    pub flags: u32,
    /// Bumped by the agent after every change of the policy maps: a conntrack entry admitted
    /// under another epoch is judged again on its next packet.
    pub policy_epoch: u32,
}

/// `NODE.flags`: the socket hooks translate the sockets of every network namespace under their
/// cgroup (the node's pods too), not only the node's own; the pods' TC programs then see flows
/// already addressed to the backend, and translate only what no hook saw.
pub const NODE_FLAG_SOCKET_PODS: u32 = 1;
/// `NODE.flags`: some local pod is enforced by NetworkPolicy (has a `POLICY_EP` entry); without
/// it the pod programs skip the policy stage.
pub const NODE_FLAG_POLICY: u32 = 2;

const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 8);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 24);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for SockRevKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SockRevValue {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NodeConfig {}
