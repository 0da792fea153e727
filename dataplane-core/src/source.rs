//! What both sources (the manifests directory, the Kubernetes API) hand the agent: events for the
//! index, in batches, and warnings about what they could not use. Neither source knows the agent,
//! and the agent knows neither source's insides.
use std::time::Instant;

use crate::object::{Object, ObjectKey};

/// One change to the index.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Apply(Object),
    Delete(ObjectKey),
}

/// Something a source could not use. Whatever it names keeps the version the index already has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceWarning {
    #[error("{file}: cannot be read, keeping its objects: {error}")]
    Unreadable { file: String, error: String },
    #[error("{file}: document {document} is not valid YAML, skipped: {error}")]
    NotYaml {
        file: String,
        document: usize,
        error: String,
    },
    #[error("{file}: document {document} ({kind}) has no metadata.name, skipped")]
    NoName {
        file: String,
        document: usize,
        kind: String,
    },
    #[error("{}{key} is malformed, skipped (previous version kept): {error}", in_file(.file.as_deref()))]
    Malformed {
        /// The manifest file it came from; `None` from the API.
        file: Option<String>,
        key: ObjectKey,
        error: String,
    },
    #[error("{file}: {key} is already defined in {owner}, ignored here")]
    Duplicate {
        file: String,
        key: ObjectKey,
        owner: String,
    },
}

fn in_file(file: Option<&str>) -> String {
    file.map(|f| format!("{f}: ")).unwrap_or_default()
}

impl SourceWarning {
    /// The object it names, when its kind and name could be read.
    #[must_use]
    pub fn object(&self) -> Option<&ObjectKey> {
        match self {
            SourceWarning::Malformed { key, .. } | SourceWarning::Duplicate { key, .. } => {
                Some(key)
            }
            _ => None,
        }
    }

    /// The error counter it adds to.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        "malformed_object"
    }
}

/// One batch of changes from a source; `fingerprint` identifies the source state it leads to.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub warnings: Vec<SourceWarning>,
    pub fingerprint: u64,
    /// When the source saw the change (the start of the sync-latency measurement).
    pub received: Instant,
}
