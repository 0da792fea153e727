//! What both sources (the manifests directory, the Kubernetes API) hand the agent: events for the
//! index, in batches. Neither source knows the agent, and the agent knows neither source's insides.
use std::time::Instant;

use crate::model::{Object, ObjectKey};

/// One change to the index.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Apply(Object),
    Delete(ObjectKey),
}

/// One batch of changes from a source; `fingerprint` identifies the source state it leads to.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub warnings: Vec<String>,
    pub fingerprint: u64,
    /// When the source saw the change (the start of the sync-latency measurement).
    pub received: Instant,
}
