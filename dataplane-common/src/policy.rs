//! The NetworkPolicy maps: who a peer is (`POLICY_IDS`), which local pods are enforced
//! (`POLICY_EP`), and what each enforced pod admits (`POLICY`).
//!
//! ```text
//!  POLICY_IDS LPM {addr}                     --> identity per generation (longest prefix wins)
//!  POLICY_EP  pod addr                       --> {endpoint id, isolation flags} per generation
//!  POLICY     LPM {endpoint, dir, generation, identity, proto, port}   --> {policy id}
//!  POLICY_STATS per-CPU [endpoint * 2 + dir] --> {allowed, denied}
//!  POLICY_EVENTS ring buffer of PolicyEvent (rate-limited by POLICY_EVENT_RATE, per CPU)
//! ```
//!
//! A new flow of an enforced pod in an isolated direction is looked up twice in `POLICY`: with
//! the peer's identity, then with [`POLICY_ANY_PEER`]. The key's fields are big-endian so that a
//! prefix of the key is a prefix of its fields: 64 bits match any protocol and port (a rule
//! without ports), 72 a protocol with any port, `80 + n` the top `n` bits of the port (a port
//! range is a few such prefixes).
//!
//! Two generations of the policy live in the maps at once: the one packets are judged by
//! (`NODE.policy_epoch & 1`) and the one the agent is writing. The agent writes the whole next
//! state into the other generation, then switches with one write of `NODE`: no packet is judged
//! by a half-written policy. A `POLICY_IDS` prefix present in one generation only carries, for
//! the other, the identity that generation's longest match would give, so a lookup in the union
//! of both generations' prefixes answers for either.

/// `POLICY` key direction: traffic into the local pod.
pub const POLICY_DIR_INGRESS: u8 = 0;
/// `POLICY` key direction: traffic the local pod sends.
pub const POLICY_DIR_EGRESS: u8 = 1;

/// The identity of a rule that admits any peer (no `from` / `to`).
pub const POLICY_ANY_PEER: u32 = 0;

/// Prefix bits of a [`PolicyKey`] up to and including the identity: any protocol, any port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 64;
/// Prefix bits up to and including the protocol: any port of it.
pub const POLICY_PREFIX_ANY_PORT: u32 = 72;
/// Prefix bits before the port; a port prefix of `n` bits is `POLICY_PREFIX_PORT + n`.
pub const POLICY_PREFIX_PORT: u32 = 80;

/// Key of `POLICY` (an LPM trie; see the module docs for the prefix lengths).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The local pod's endpoint id, big-endian.
    pub endpoint: u16,
    /// `POLICY_DIR_*`.
    pub dir: u8,
    /// The policy generation the entry belongs to (0 or 1).
    pub generation: u8,
    /// The peer's identity (from `POLICY_IDS`), or [`POLICY_ANY_PEER`]; big-endian.
    pub identity: u32,
    pub proto: u8,
    pub pad2: u8,
    /// The local pod's port (ingress) or the peer's (egress), network byte order.
    pub port: u16,
}

/// Value of `POLICY`: the policy that admits the key (an id the agent maps to namespace/name).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    pub policy_id: u32,
}

/// `POLICY_EP` flag: the pod's ingress is isolated (some policy of that direction selects it).
pub const EP_INGRESS_ISOLATED: u8 = 1;
/// `POLICY_EP` flag: the pod's egress is isolated.
pub const EP_EGRESS_ISOLATED: u8 = 2;
/// `POLICY_EP` flag: the pod's policy could not be written whole (a map was full): every new
/// flow of the pod is denied, in both directions, until it can.
pub const EP_DENY_ALL: u8 = 4;

/// One generation's half of a `POLICY_EP` value. Endpoint id 0 (never allocated): the pod is
/// not enforced in that generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEndpoint {
    pub endpoint: u16,
    /// `EP_*`.
    pub flags: u8,
    /// The generation this half belongs to (its index in [`PolicyEndpoints`]): the datapath
    /// reads it from here rather than keeping `NODE`'s across its lookups.
    pub generation: u8,
}

/// Value of `POLICY_EP`, keyed by a local pod's address (network byte order): the pod in each
/// generation. A pod without an entry is enforced in neither.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEndpoints {
    pub generation: [PolicyEndpoint; 2],
}

/// Value of `POLICY_IDS`: the prefix's identity in each generation (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyIdentity {
    pub generation: [u32; 2],
}

/// The identity of an address in a generation that has no prefix for it (no pod is enforced
/// there): no rule names it, so only rules admitting any peer apply.
pub const POLICY_NO_IDENTITY: u32 = u32::MAX;

/// `POLICY_STATS` per-CPU slot of an endpoint and direction: `endpoint * 2 + dir`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// New flows admitted, and denied, in this direction.
    pub allowed: u64,
    pub denied: u64,
}

/// `PolicyEvent.verdict`: admitted by `policy_id`.
pub const VERDICT_ALLOWED: u8 = 0;
/// `PolicyEvent.verdict`: no policy admits it (the isolated direction's default).
pub const VERDICT_DENIED: u8 = 1;
/// `PolicyEvent.verdict`: denied because the pod's policy could not be read or written whole.
pub const VERDICT_FAIL_CLOSED: u8 = 2;

/// One verdict on a new flow in an isolated direction, from `POLICY_EVENTS` (a ring buffer,
/// rate-limited per CPU). Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEvent {
    /// The enforced local pod, and the other end.
    pub local: u32,
    pub peer: u32,
    pub local_port: u16,
    pub peer_port: u16,
    /// The admitting policy's id (`POLICY` value); 0 when none did.
    pub policy_id: u32,
    pub endpoint: u16,
    pub proto: u8,
    /// `POLICY_DIR_*`.
    pub dir: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    pub pad: [u8; 3],
}

/// `POLICY_EVENT_RATE` per-CPU value: events sent in the current second, events not sent
/// because the second's budget was spent, and the event being built (in map memory rather than
/// on the program's stack, which the pod pipelines use up).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    pub second: u64,
    pub sent: u64,
    pub suppressed: u64,
    pub event: PolicyEvent,
}

/// Verdict events each CPU sends per second at most.
pub const POLICY_EVENTS_PER_CPU_SECOND: u64 = 1000;
/// Size of the `POLICY_EVENTS` ring buffer.
pub const POLICY_EVENTS_BYTES: u32 = 1 << 18;

/// Endpoint ids index `POLICY_STATS` (two slots each); id 0 is never allocated.
pub const MAX_POLICY_ENDPOINTS: u32 = 1 << 14;
/// Entries of the `POLICY` trie.
pub const MAX_POLICY_RULES: u32 = 1 << 20;
/// Entries of the `POLICY_IDS` trie.
pub const MAX_POLICY_IDS: u32 = 1 << 18;

const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);
const _: () = assert!(core::mem::size_of::<PolicyEndpoint>() == 4);
const _: () = assert!(core::mem::size_of::<PolicyEndpoints>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyIdentity>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyCounters>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 24);
const _: () = assert!(core::mem::size_of::<EventRate>() == 48);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for PolicyKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PolicyValue {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PolicyEndpoint {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PolicyEndpoints {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PolicyIdentity {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PolicyCounters {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for PolicyEvent {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for EventRate {}
