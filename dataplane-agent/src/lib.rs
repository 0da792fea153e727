//! The per-node agent: objects in, BPF map entries out.
pub mod ebpf;
