//! The `BACKENDS` map: backend id -> address, port, protocol, flags.

/// The backend runs on this node: traffic from outside reaches it without source NAT.
pub const BACKEND_LOCAL: u8 = 1;

/// Value of the `BACKENDS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

const _: () = assert!(core::mem::size_of::<Backend>() == 8);

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, explicit padding fields and no pointers: any bit pattern is a valid
// value and the bytes can be shared with the kernel as they are.
unsafe impl aya::Pod for Backend {}
