//! The per-node agent: objects in, BPF map entries out.
pub mod datapath;
pub mod diff;
pub mod ebpf;
pub mod model;
pub mod program;
pub mod translate;
