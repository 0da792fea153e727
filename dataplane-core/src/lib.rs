//! Pure pieces shared by the agent, the lab and the benchmark: no aya, no kube client, no kernel.
//!
//! ```text
//!  manifest: is_manifest, content_digest -> manifest_fingerprint / object_digest
//!  status:   Status { generation, fingerprint, objects, maps, interfaces, drops, services, .. }
//! ```
pub mod manifest;
pub mod status;
