//! Pure pieces shared by the agent, the lab and the benchmark: no aya, no kube client, no kernel.
//!
//! ```text
//!  object     Kind, ObjectKey, NsName, Object (the watched kinds, typed)
//!  source     Event, Batch, SourceWarning         <- manifest (documents -> objects, fingerprints)
//!                                                 <- relist (the API source's relist state)
//!  index      Index, Dirty { Target::Service(..), Target::Pods }
//!  translate  Service + EndpointSlices -> FrontendSpecs (kube-proxy's rules)
//!  table      Plan (layered diff of keyed tables), IdPool
//!  maps       Op, MapState, service entries and their ordered diff
//!  reconcile  Reconciler: dirty targets -> ops into a MapWriter; SyncProblem
//!  pipeline   Pipeline: Batch -> Index -> Reconciler -> MapWriter; the status it reports
//!  status     Status { generation, fingerprint, objects, maps, interfaces, drops, services, .. }
//!  fixtures   object builders for tests (feature "fixtures")
//! ```
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod index;
pub mod manifest;
pub mod maps;
pub mod net;
pub mod object;
pub mod pipeline;
pub mod policy;
pub mod policy_maps;
pub mod reconcile;
pub mod relist;
pub mod source;
pub mod status;
pub mod table;
pub mod translate;
