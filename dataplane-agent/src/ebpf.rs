//! The eBPF object built from `dataplane-ebpf` by this crate's build script.

/// The compiled eBPF object (ELF), embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));
