//! The per-node agent: objects in, BPF map entries out.
pub mod agent;
pub mod cleanup;
pub mod datapath;
pub mod diff;
pub mod ebpf;
pub mod http;
pub mod interfaces;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod program;
pub mod source;
#[cfg(test)]
pub mod testutil;
pub mod translate;
