//! Manifest files: which are read, how their documents become objects, and the fingerprints that
//! tell a caller when an agent programmed exactly them.
use serde::Deserialize as _;

use crate::object::{Kind, Object, ObjectKey};
use crate::source::SourceWarning;

/// Whether a file of a manifests directory is read (by the agent, and by the lab building from
/// the same directory): YAML or JSON, not hidden.
#[must_use]
pub fn is_manifest(name: &str) -> bool {
    !name.starts_with('.')
        && std::path::Path::new(name)
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a (64 bit) of `bytes`, length-prefixed, continuing from `h`.
fn fnv_feed(mut h: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Digest of one file's (or one document's) bytes: FNV-1a, 64 bit.
#[must_use]
pub fn content_digest(content: &[u8]) -> u64 {
    fnv_feed(FNV_OFFSET, content)
}

/// Fingerprint of a set of manifest files, so a caller can tell when the agent has programmed
/// exactly the files it wrote. Files must be given sorted by name; names are length-prefixed, so no
/// two different sets collide by concatenation.
#[must_use]
pub fn manifest_fingerprint<'a>(files: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> u64 {
    fingerprint_of_digests(
        files
            .into_iter()
            .map(|(name, content)| (name, content_digest(content))),
    )
}

/// [`manifest_fingerprint`] from each file's [`content_digest`], for a caller that keeps only those.
#[must_use]
pub fn fingerprint_of_digests<'a>(files: impl IntoIterator<Item = (&'a [u8], u64)>) -> u64 {
    files.into_iter().fold(FNV_OFFSET, |h, (name, digest)| {
        fnv_feed(fnv_feed(h, name), &digest.to_le_bytes())
    })
}

/// Contribution of one object version to a Kubernetes source's digest: the XOR of this over every
/// object held equals the XOR over a list of the same objects at the same resource versions, so a
/// caller that listed them can tell when the agent caught up. Cluster-scoped objects have an empty
/// namespace.
#[must_use]
pub fn object_digest(kind: &str, namespace: &str, name: &str, resource_version: &str) -> u64 {
    manifest_fingerprint([
        (kind.as_bytes(), namespace.as_bytes()),
        (name.as_bytes(), resource_version.as_bytes()),
    ])
}

/// Parses every document of a manifest file, each with the digest of its JSON form; a document that
/// cannot be read is a warning naming the file (and the object, when its kind and name can be
/// read). Kinds the agent does not watch are left out silently.
pub fn parse_documents(file: &str, content: &[u8]) -> Vec<Result<(Object, u64), SourceWarning>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_slice(content).enumerate() {
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.push(Err(SourceWarning::NotYaml {
                    file: file.to_owned(),
                    document: i + 1,
                    error: e.to_string(),
                }));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        if let Some(result) = to_object(file, i, value) {
            out.push(result);
        }
    }
    out
}

fn to_object(
    file: &str,
    index: usize,
    value: serde_yaml::Value,
) -> Option<Result<(Object, u64), SourceWarning>> {
    let field = |path: &[&str]| -> Option<String> {
        let mut v = &value;
        for p in path {
            v = v.get(*p)?;
        }
        v.as_str().map(str::to_owned)
    };
    let api_version = field(&["apiVersion"]).unwrap_or_default();
    let kind_name = field(&["kind"]).unwrap_or_default();
    let kind = Kind::from_type(&api_version, &kind_name)?;
    let Some(name) = field(&["metadata", "name"]) else {
        return Some(Err(SourceWarning::NoName {
            file: file.to_owned(),
            document: index + 1,
            kind: kind_name,
        }));
    };
    let namespace = if kind.is_namespaced() {
        field(&["metadata", "namespace"]).unwrap_or_else(|| "default".to_owned())
    } else {
        String::new()
    };
    let key = ObjectKey {
        kind,
        namespace,
        name,
    };
    let parsed = serde_json::to_value(&value)
        .and_then(|v| Object::parse(kind, v))
        .map(|o| {
            let digest = o.content_digest();
            (o, digest)
        });
    Some(parsed.map_err(|e| SourceWarning::Malformed {
        file: Some(file.to_owned()),
        key,
        error: e.to_string(),
    }))
}
