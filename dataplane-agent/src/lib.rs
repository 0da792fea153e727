//! The per-node agent: the edges around [`dataplane_core`]'s pure pipeline (sources, kernel maps,
//! interfaces, clock, HTTP).
pub mod agent;
pub mod cleanup;
pub mod datapath;
pub mod ebpf;
pub mod explain;
pub mod health;
pub mod http;
pub mod interfaces;
pub mod kube_source;
pub mod manifests;
pub mod metrics;
