//! The `SERVICES` map: one header and `count` backend slots per frontend.
//!
//! ```text
//!  {vip, port, proto, scope, slot} --slot 0--> header {count, rev_nat_id, flags}
//!                                  --slot i--> {backend_id}
//! ```

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

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for ServiceKey {}
#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for ServiceValue {}
