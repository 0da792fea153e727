//! The `SERVICES` map: one header and `count` backend slots per frontend.
//!
//! ```text
//!  {vip, port, proto, scope, slot} --slot 0--> header {count, rev_nat_id, flags}
//!                                  --slot i--> {backend_id}
//! ```

/// Scope of a service entry: who looks it up. Clients in the cluster (pods, the node's own
/// processes) look up `SCOPE_CLUSTER`; traffic from outside the node (the external interfaces'
/// programs) looks up `SCOPE_EXTERNAL`, which only NodePort, LoadBalancer and externalIP frontends
/// have, with the backends `externalTrafficPolicy` allows.
pub const SCOPE_CLUSTER: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// Header flag: no backend means drop, not reject (`externalTrafficPolicy: Local` from outside,
/// `internalTrafficPolicy: Local` from inside, as kube-proxy does).
pub const SVC_FLAG_DROP_EMPTY: u32 = 1;
/// Header flag (`SCOPE_EXTERNAL`): `externalTrafficPolicy: Local`: the client address is kept; no
/// source NAT.
pub const SVC_FLAG_EXTERNAL_LOCAL: u32 = 2;
/// Header flag: only clients inside the `SOURCE_RANGES` prefixes of this frontend's reverse-NAT id
/// reach it (`loadBalancerSourceRanges`).
pub const SVC_FLAG_SOURCE_RANGES: u32 = 4;

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

/// Value of the `SERVICES` map: in the header slot `count`, `rev_nat_id` and `flags`
/// (`SVC_FLAG_*`) are set; in a backend slot only `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Number of backend slots. Zero means the service exists but has no ready endpoint: reject.
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u32,
}

/// Key of the `SOURCE_RANGES` LPM trie: a frontend (by reverse-NAT id) and a client prefix. The
/// trie's prefix length counts `rev_nat_id` and `pad` (32 bits, always matched whole) plus the
/// client prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub rev_nat_id: u16,
    pub pad: u16,
    /// Client prefix address, network byte order.
    pub addr: u32,
}

/// Prefix bits of a [`SourceRangeKey`] before the client address.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for ServiceKey {}
#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for ServiceValue {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SourceRangeKey {}
